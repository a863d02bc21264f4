"""Lion optimizers (``bitsandbytes.optim.lion``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "Lion")
Lion = _classes["Lion"]
Lion8bit = _classes["Lion8bit"]
Lion32bit = _classes["Lion32bit"]
PagedLion = _classes["PagedLion"]
PagedLion8bit = _classes["PagedLion8bit"]
PagedLion32bit = _classes["PagedLion32bit"]
del _classes

__all__ = ["Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"]
