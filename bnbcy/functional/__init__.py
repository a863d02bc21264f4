"""bnbcy.functional: quantization ops with bitsandbytes' names, signatures and defaults.

Every op takes torch tensors, CuPy arrays or NumPy arrays and returns arrays
of the input's kind on the input's device.
"""
from .. import _ops  # noqa: F401  (defines torch.ops.bnbcy.*, which the functions call)
from .._features import has_avx512bf16
from .blockwise import dequantize_blockwise, quantize_blockwise
from .fourbit import (dequantize_4bit, dequantize_fp4, dequantize_nf4, get_4bit_type, quantize_4bit,
                      quantize_fp4, quantize_nf4)
from .fourbit_matmul import gemm_4bit, gemv_4bit
from .int8 import (int8_double_quant, int8_linear_matmul, int8_mixed_scaled_mm, int8_mm_dequant,
                   int8_scaled_mm, int8_vectorwise_dequant, int8_vectorwise_quant)
from .maps import (create_dynamic_map, create_fp8_map, create_linear_map, create_normal_map,
                   name2qmap)
from .optim_update import (optimizer_update_8bit_blockwise, optimizer_update_8bit_blockwise_multi,
                           optimizer_update_32bit, optimizer_update_32bit_multi, percentile_clipping)
from .quant_state import QuantState, pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "QuantState", "create_dynamic_map", "dequantize_4bit", "dequantize_fp4", "dequantize_nf4",
    "gemm_4bit", "gemv_4bit", "get_4bit_type", "has_avx512bf16", "int8_double_quant", "int8_linear_matmul",
    "int8_mixed_scaled_mm", "int8_mm_dequant", "int8_scaled_mm", "int8_vectorwise_dequant",
    "int8_vectorwise_quant", "optimizer_update_32bit", "optimizer_update_32bit_multi",
    "optimizer_update_8bit_blockwise", "optimizer_update_8bit_blockwise_multi", "percentile_clipping", "quantize_4bit", "quantize_fp4", "quantize_nf4", "create_fp8_map", "create_linear_map", "create_normal_map",
    "dequantize_blockwise", "name2qmap", "pack_dict_to_tensor", "quantize_blockwise",
    "unpack_tensor_to_dict",
]
