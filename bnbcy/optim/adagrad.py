"""Adagrad optimizers (``bitsandbytes.optim.adagrad``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "Adagrad")
Adagrad = _classes["Adagrad"]
Adagrad8bit = _classes["Adagrad8bit"]
Adagrad32bit = _classes["Adagrad32bit"]
del _classes

__all__ = ["Adagrad", "Adagrad8bit", "Adagrad32bit"]
