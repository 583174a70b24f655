"""Attention over a learned persistent prefix under a local mask, the Titans core (§3.3, §4).

Titans prepends persistent memory tokens P = [p_1 .. p_Np] to the context of its attention
(Eq. 19) and restricts what each query sees: MAC attends within a segment (Fig. 3a), MAG and
MAL use sliding-window attention "with prefix" (SW-Attn*, Fig. 3b). `PrefixAttention` holds
the projections and the persistent tokens; the caller builds the keys (with their caches) and
a boolean visibility mask for them, and every query always sees the whole prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.models.layers import LayerKV, apply_rotary


def band_mask(query_index: Tensor, key_index: Tensor, window: int | None) -> Tensor:
    """``(Tq, Tk)`` bool: query i sees key j iff ``0 <= i - j < window`` (no bound for None)."""
    gap = query_index.unsqueeze(-1) - key_index.unsqueeze(0)
    visible = gap >= 0
    return visible if window is None else visible & (gap < window)


class PrefixAttention(nn.Module):
    """Multi-head softmax attention whose keys are ``[persistent ‖ given keys]``, with RoPE.

    The persistent tokens are learned vectors in the layer's (normalised) input space, so they
    go through the same W_K, W_V as the sequence (x_new = [p ‖ x], Eq. 19) at RoPE positions
    0 .. Np-1; the caller places its tokens after them. ``n_persistent = 0`` disables them.
    """

    def __init__(self, d_model: int, n_heads: int, n_persistent: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model)) if n_persistent else None

    @property
    def n_persistent(self) -> int:
        return 0 if self.persistent is None else self.persistent.shape[0]

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x ``(B, T, D)`` -> q, k, v ``(B, n_heads, T, head_dim)``, not yet rotated."""
        batch, length, d_model = x.shape
        q, k, v = (t.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(d_model, dim=-1))
        return q, k, v

    def prefix(self, batch: int, cos: Tensor, sin: Tensor) -> LayerKV:
        """Keys (rotated with ``cos``/``sin`` of positions 0..Np-1) and values of the persistent
        tokens, ``(batch, n_heads, Np, head_dim)``; empty without persistent tokens."""
        if self.persistent is None:
            empty = self.proj.weight.new_zeros(batch, self.n_heads, 0, self.head_dim)
            return empty, empty
        _, k, v = self.heads(self.persistent.unsqueeze(0))
        k = apply_rotary(k, cos, sin)
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, visible: Tensor,
               prefix: LayerKV) -> Tensor:
        """softmax(q [P_K ‖ keys]ᵀ / √d) [P_V ‖ values], prefix always visible, ``visible``
        ``(Tq, Tk)`` for ``keys``; returns the merged heads ``(B, Tq, D)`` before ``proj``."""
        n_prefix = prefix[0].shape[2]
        mask = torch.cat([visible.new_ones(visible.shape[0], n_prefix), visible], dim=1)
        y = F.scaled_dot_product_attention(q, torch.cat([prefix[0], keys], dim=2),
                                           torch.cat([prefix[1], values], dim=2), attn_mask=mask)
        batch, _, length, _ = y.shape
        return y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)

    def sliding(self, x: Tensor, cache: LayerKV, cos: Tensor, sin: Tensor, window: int,
                ) -> tuple[Tensor, LayerKV]:
        """SW-Attn* (§4.2, Fig. 3b) of ``x`` ``(B, T, D)`` after the ``cache`` of earlier tokens.

        ``cos``/``sin`` cover positions 0 .. Np + n_past + T - 1: the prefix, then the tokens.
        Token i sees the prefix and tokens i-window+1 .. i. ``cache`` holds the rotated keys and
        values of at most the last ``window - 1`` tokens; the returned one is cut to that.
        Returns the merged heads before ``proj`` and the new cache.
        """
        n_prefix, length, cached = self.n_persistent, x.shape[1], cache[0].shape[2]
        q, k, v = self.heads(x)
        q, k = (apply_rotary(t, cos[-length:], sin[-length:]) for t in (q, k))
        keys, values = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        index = torch.arange(cached + length, device=x.device)
        visible = band_mask(index[cached:], index, window)
        y = self.attend(q, keys, values, visible,
                        self.prefix(x.shape[0], cos[:n_prefix], sin[:n_prefix]))
        keep = keys.shape[2] - min(window - 1, keys.shape[2])
        return y, (keys[:, :, keep:], values[:, :, keep:])
