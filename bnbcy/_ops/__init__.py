"""bnbcy's ``torch.library`` custom ops (``torch.ops.bnbcy.*``), with bitsandbytes' op names and
schemas. Each area's ops are defined in one module of this package through :mod:`._lib`, which
also re-defines every op under another namespace (``torch.ops.bitsandbytes`` for the stand-in).
"""
from ._lib import add_namespace, defined_ops  # noqa: F401
