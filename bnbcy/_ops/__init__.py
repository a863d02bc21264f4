"""bnbcy's ``torch.library`` custom ops (``torch.ops.bnbcy.*``), with bitsandbytes' op names and
schemas. Each area's ops are defined in one module of this package through :mod:`._lib`, which
also re-defines every op under another namespace (``torch.ops.bitsandbytes`` for the stand-in).
The kernel of every op is the array-level function of :mod:`bnbcy.backends` (one validation,
one CPU/CUDA dispatch)."""
from ._lib import add_namespace, defined_ops  # noqa: F401
from . import blockwise, fourbit, int8  # noqa: F401  (define the ops)
