"""SGD optimizers (``bitsandbytes.optim.sgd``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "SGD")
SGD = _classes["SGD"]
SGD8bit = _classes["SGD8bit"]
SGD32bit = _classes["SGD32bit"]
del _classes

__all__ = ["SGD", "SGD8bit", "SGD32bit"]
