"""bnbcy standing in for ``bitsandbytes``: the torch side (see ``_bnbcy_standin`` for the
import-system side and ``docs/standin.md`` for the user's view).

Nothing here runs unless the stand-in is turned on: ``BNBCY_AS_BITSANDBYTES=1`` (through the
``.pth`` hook the wheel installs) or :func:`install_as_bitsandbytes`.
"""
from __future__ import annotations

import importlib
import sys

_activated = False


def install_as_bitsandbytes():
    """Make ``import bitsandbytes`` (and every ``bitsandbytes.x`` submodule) give bnbcy's modules.

    Call it before transformers, PEFT, accelerate or your own code import bitsandbytes. The
    effect is that of ``BNBCY_AS_BITSANDBYTES=1`` in the environment: ``importlib.metadata``
    reports bitsandbytes ``0.50.2+bnbcy<version>``, ``torch.ops.bitsandbytes.*`` are bnbcy's
    ops, and a real bitsandbytes installed too is shadowed (with one warning). Idempotent.

    Returns
    -------
    module
        ``sys.modules["bitsandbytes"]``, i.e. the ``bnbcy`` package.

    Raises
    ------
    RuntimeError
        If the real bitsandbytes was imported already (nothing is changed then).
    """
    try:
        import _bnbcy_standin
    except ImportError as exc:  # bnbcy copied without the wheel's top-level hook module
        raise ImportError("the bnbcy stand-in needs the top-level module _bnbcy_standin, which "
                          "bnbcy's wheel installs next to the bnbcy package") from exc
    _bnbcy_standin.install()
    return importlib.import_module(_bnbcy_standin.ALIAS)


def _alias_loaded_modules() -> None:
    """``sys.modules["bitsandbytes.x"] = bnbcy.x`` for every bnbcy module imported so far (the
    finder covers later imports)."""
    for name, module in list(sys.modules.items()):
        if name == "bnbcy" or name.startswith("bnbcy."):
            sys.modules.setdefault("bitsandbytes" + name[len("bnbcy"):], module)


def _name_optimizers_as_bitsandbytes() -> None:
    """Report bnbcy's optimizer classes under ``bitsandbytes.optim.*``.

    transformers' Trainer registers its 32-bit embedding override (``adamw_bnb_8bit``) only when
    ``"bitsandbytes" in str(optimizer_cls)``. Under the stand-in ``bitsandbytes.optim.x`` *is*
    ``bnbcy.optim.x``, so the renamed ``__module__`` still resolves (pickle included).
    """
    from . import optim
    for name in optim.__all__:
        cls = getattr(optim, name)
        if isinstance(cls, type) and cls.__module__.startswith("bnbcy.optim"):
            cls.__module__ = "bitsandbytes" + cls.__module__[len("bnbcy"):]


def activate() -> None:
    """Torch-side set-up of the stand-in, run on the first ``import bitsandbytes`` (idempotent):
    bnbcy's ops also as ``torch.ops.bitsandbytes.*``, the module aliases, the optimizer names."""
    global _activated
    if _activated:
        return
    from ._ops import add_namespace
    add_namespace("bitsandbytes")
    _alias_loaded_modules()
    _name_optimizers_as_bitsandbytes()
    _activated = True


def active() -> bool:
    """Whether the stand-in is on in this process."""
    return getattr(sys.modules.get("bitsandbytes"), "__name__", None) == "bnbcy"


__all__ = ["activate", "active", "install_as_bitsandbytes"]
