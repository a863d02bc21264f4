"""bnbcy's version and the bitsandbytes API level it implements (read by ``pyproject.toml`` and,
without importing bnbcy, by the bitsandbytes stand-in's metadata)."""
__version__ = "0.1.0"
BITSANDBYTES_API = "0.50.2"
