"""AdamW optimizers (``bitsandbytes.optim.adamw``), generated from the family table in
:mod:`bnbcy.optim._families`."""
from ._families import build

_classes = build(__name__, "AdamW")
AdamW = _classes["AdamW"]
AdamW8bit = _classes["AdamW8bit"]
AdamW32bit = _classes["AdamW32bit"]
PagedAdamW = _classes["PagedAdamW"]
PagedAdamW8bit = _classes["PagedAdamW8bit"]
PagedAdamW32bit = _classes["PagedAdamW32bit"]
del _classes

__all__ = ["AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit"]
