"""bnbcy.functional: quantization ops with bitsandbytes' names, signatures and defaults.

Every op takes torch tensors, CuPy arrays or NumPy arrays and returns arrays
of the input's kind on the input's device.
"""
from .blockwise import dequantize_blockwise, quantize_blockwise
from .maps import (create_dynamic_map, create_fp8_map, create_linear_map, create_normal_map,
                   name2qmap)
from .quant_state import QuantState, pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "QuantState", "create_dynamic_map", "create_fp8_map", "create_linear_map", "create_normal_map",
    "dequantize_blockwise", "name2qmap", "pack_dict_to_tensor", "quantize_blockwise",
    "unpack_tensor_to_dict",
]
