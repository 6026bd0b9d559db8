"""Self-attention written for the ONNX exporter: the same arithmetic as ``nn.MultiheadAttention``, fewer layout ops.

``nn.MultiheadAttention`` exports (through ``F.multi_head_attention_forward``) as a sequence-first graph: the
batch-first input is transposed, the heads are folded into the batch, then unfolded again, with shape arithmetic
between. On the world student that layout shuffling (Transpose, Gather, Slice) was 35% of ONNX Runtime's time.
:func:`export_friendly` swaps each batch-first self-attention of a module copy for :class:`BatchFirstSelfAttention`,
which holds the same parameters and computes one QKV projection, one permute, ``scaled_dot_product_attention`` and
one transpose back; the swapped copy's outputs equal the original's (checked by the export before it writes).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn import functional as F


class BatchFirstSelfAttention(nn.Module):
    """``mha(x, x, x, need_weights=False)`` for a batch-first ``nn.MultiheadAttention`` without a mask; any other
    call (cross-attention, a mask, attention weights asked for) goes to the original module unchanged."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha
        self.heads = mha.num_heads
        self.scale = float(mha.head_dim) ** -0.5

    def forward(self, query, key=None, value=None, *args, need_weights: bool = True, attn_mask=None, **kwargs):
        plain = (key is None or key is query) and (value is None or value is query) and not args and not kwargs
        if not plain or need_weights or attn_mask is not None:
            return self.mha(query, key, value, *args, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        batch, length, width = query.shape
        qkv = F.linear(query, self.mha.in_proj_weight, self.mha.in_proj_bias)
        q, k, v = qkv.reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.mha.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


def _swappable(mha: nn.MultiheadAttention) -> bool:
    return (
        mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.bias_k is None
        and not mha.add_zero_attn
        and (not mha.training or mha.dropout == 0.0)
    )


def export_friendly(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``module`` whose swappable self-attentions are :class:`BatchFirstSelfAttention`, and how many."""
    module = copy.deepcopy(module)
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and _swappable(child):
                setattr(parent, name, BatchFirstSelfAttention(child))
                swapped += 1
    return module, swapped


__all__ = ["BatchFirstSelfAttention", "export_friendly"]
