"""Embedding tables stored quantized (``bitsandbytes.nn.Embedding8bit``, ``Embedding4bit``,
``EmbeddingFP4``, ``EmbeddingNF4``): a lookup gathers the codes and scales of the selected rows
only and dequantizes those, never the whole table.

As in bitsandbytes, the table is quantized on the first move to a device (``.to(device)``,
``.cpu()``, ``.cuda()``) after the float weight is loaded, and these modules cannot be saved
(``state_dict()`` raises ``NotImplementedError``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import functional as F
from .modules import Int8Params, Params4bit, fix_4bit_weight_quant_state_from_module

__all__ = ["Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4"]

logger = logging.getLogger(__name__)


class _NotSaved:
    """bitsandbytes does not serialize quantized embeddings; say so instead of writing a state
    dict that no loader reads."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise NotImplementedError(f"Saving {self._bnb_name} module is not implemented")


class Embedding8bit(_NotSaved, nn.Embedding):
    """Embedding table in int8 with one absmax scale per row (LLM.int8()'s row-wise format).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    device : torch.device, optional
    dtype : torch.dtype, optional
        Dtype of the float table before quantization, and of the lookups' output.

    Examples
    --------
    >>> emb = Embedding8bit(128, 64)                              # doctest: +SKIP
    >>> emb.load_state_dict(nn.Embedding(128, 64).state_dict())
    >>> emb = emb.to("cpu")                                        # quantized here
    """

    _bnb_name = "Embedding8bit"

    def __init__(self, num_embeddings, embedding_dim, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)

    def forward(self, input: Tensor) -> Tensor:
        """Rows ``input`` of the table: ``codes[input] * SCB[input] / 127`` in ``self.dtype``."""
        scb = getattr(self.weight, "SCB", None)
        if scb is None:
            raise RuntimeError("Embedding layer is not quantized. Please call .cuda() or .to(device) first.")
        rows = TF.embedding(input, self.weight.data)
        scales = TF.embedding(input, scb.view(self.num_embeddings, 1))
        return (rows * (scales / 127.0)).to(self.dtype)


class Embedding4bit(_NotSaved, nn.Embedding):
    """Embedding table in 4 bits (FP4 or NF4, blocksize 64, no double quantization).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    dtype : torch.dtype, optional
        Dtype of the float table before quantization, and of the lookups' output.
    quant_type : {"fp4", "nf4"}, default "fp4"
    quant_storage : torch.dtype, default torch.uint8
    device : torch.device, optional

    Notes
    -----
    With ``embedding_dim`` a multiple of the blocksize a lookup gathers the selected rows' packed
    bytes and block maxima and dequantizes only those; otherwise blocks straddle rows and the whole
    table is dequantized per lookup (bitsandbytes logs a warning at construction, as here).
    """

    _bnb_name = "Embedding4bit"

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_type="fp4", quant_storage=torch.uint8,
                 device=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(self.weight.data, requires_grad=False, compress_statistics=None,
                                 quant_type=quant_type, quant_storage=quant_storage, module=self)
        if embedding_dim % self.weight.blocksize != 0:
            logger.warning(f"Embedding size {embedding_dim} is not divisible by block size {self.weight.blocksize}. "
                           "This will lead to slow inference.")

    def _lookup_rows(self, input: Tensor) -> Tensor:
        state = self.weight.quant_state
        half = self.embedding_dim // 2
        blocks_per_row = self.embedding_dim // state.blocksize
        packed = self.weight.data.view(torch.uint8).view(self.num_embeddings, half)
        codes = TF.embedding(input, packed).view(-1, 1)
        absmax = TF.embedding(input, state.absmax.view(self.num_embeddings, blocks_per_row)).view(-1)
        rows_state = F.QuantState(absmax=absmax, shape=torch.Size((*input.shape, self.embedding_dim)), code=state.code,
                                  blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
        return F.dequantize_4bit(codes, rows_state)

    def forward(self, input: Tensor) -> Tensor:
        """Rows ``input`` of the dequantized table, in ``self.dtype``."""
        fix_4bit_weight_quant_state_from_module(self)
        state = self.weight.quant_state
        if self.embedding_dim % state.blocksize == 0 and state.state2 is None:
            return self._lookup_rows(input).to(self.dtype)
        table = F.dequantize_4bit(self.weight.data, state)
        return TF.embedding(input, table).to(self.dtype)


class EmbeddingFP4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="fp4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="fp4", quant_storage=quant_storage,
                         device=device)


class EmbeddingNF4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="nf4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="nf4", quant_storage=quant_storage,
                         device=device)
