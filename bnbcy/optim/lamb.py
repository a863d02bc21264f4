"""LAMB optimizers (``bitsandbytes.optim.lamb``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "LAMB")
LAMB = _classes["LAMB"]
LAMB8bit = _classes["LAMB8bit"]
LAMB32bit = _classes["LAMB32bit"]
del _classes

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit"]
