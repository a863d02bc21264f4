"""Adam optimizers (``bitsandbytes.optim.adam``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "Adam")
Adam = _classes["Adam"]
Adam8bit = _classes["Adam8bit"]
Adam32bit = _classes["Adam32bit"]
PagedAdam = _classes["PagedAdam"]
PagedAdam8bit = _classes["PagedAdam8bit"]
PagedAdam32bit = _classes["PagedAdam32bit"]
del _classes

__all__ = ["Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit"]
