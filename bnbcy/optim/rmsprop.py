"""RMSprop optimizers (``bitsandbytes.optim.rmsprop``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "RMSprop")
RMSprop = _classes["RMSprop"]
RMSprop8bit = _classes["RMSprop8bit"]
RMSprop32bit = _classes["RMSprop32bit"]
del _classes

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit"]
