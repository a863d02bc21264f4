"""AdEMAMix optimizers (``bitsandbytes.optim.ademamix``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "AdEMAMix")
AdEMAMix = _classes["AdEMAMix"]
AdEMAMix8bit = _classes["AdEMAMix8bit"]
AdEMAMix32bit = _classes["AdEMAMix32bit"]
PagedAdEMAMix = _classes["PagedAdEMAMix"]
PagedAdEMAMix8bit = _classes["PagedAdEMAMix8bit"]
PagedAdEMAMix32bit = _classes["PagedAdEMAMix32bit"]
del _classes

__all__ = ["AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit"]
