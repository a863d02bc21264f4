"""bnbcy.nn: quantized layers with bitsandbytes' names (``bitsandbytes.nn``)."""
from .convert import register_weight_hook, replace_linear
from .embedding_quant import Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4
from .modules import Embedding, Int8Params, Linear4bit, Linear8bitLt, LinearFP4, LinearNF4, Params4bit, StableEmbedding

__all__ = ["Embedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4", "StableEmbedding", "Int8Params", "Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "Params4bit",
           "register_weight_hook", "replace_linear"]
