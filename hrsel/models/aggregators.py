"""Aggregators: a set of patch embeddings -> T pooled tokens for the heads.

All take x (B, K, D), an optional mask (B, K) bool (True = a real patch; padding and
absent patches are masked everywhere) and optional positions, either (B, K) int64
raster indices or (B, K, N) soft indicators (DPS: indicator-weighted position
embeddings, i.e. Y @ table). They return (B, T, out_dim): T = 1, or one token per task
for cross-attention MIL pooling (`num_tokens`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hrsel.errors import ConfigError
from hrsel.registry import Registry

AGGREGATORS = Registry("aggregator")
POS_ENCODINGS = ("none", "learned", "sincos")


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """1-D sinusoidal encodings over raster indices: (num_positions, dim)."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class PositionalEncoding(nn.Module):
    """kind: none | learned | sincos over `num_positions` grid cells; added to the patch embeddings."""

    def __init__(self, *, kind: str = "none", num_positions: int = 0, dim: int):
        super().__init__()
        if kind not in POS_ENCODINGS:
            raise ConfigError(f"pos_encoding {kind!r} is unknown; valid: {', '.join(POS_ENCODINGS)}")
        if kind != "none" and num_positions < 1:
            raise ConfigError(f"pos_encoding {kind!r} needs num_positions >= 1 (the number of grid cells)")
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        elif kind == "sincos":
            self.register_buffer("table", sincos_table(num_positions, dim), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "none" or positions is None:
            return x
        if positions.dtype == torch.int64:  # (B, K) raster indices; -1 = absent
            return x + self.table[positions.clamp_min(0)]
        return x + positions.to(x.dtype) @ self.table.to(x.dtype)  # (B, K, N) @ (N, D)


class _Aggregator(nn.Module):
    num_tokens = 1

    def __init__(self, *, in_dim: int, pos_encoding: str = "none", num_positions: int = 0):
        super().__init__()
        self.in_dim = self.out_dim = in_dim
        self.pos = PositionalEncoding(kind=pos_encoding, num_positions=num_positions, dim=in_dim)

    @staticmethod
    def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be (B, K)={tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        return mask


@AGGREGATORS.register("mean")
class MeanPool(_Aggregator):
    """Mean over the real patches. Args: in_dim, pos_encoding, num_positions."""

    def forward(self, x, *, mask=None, positions=None):
        m = self._mask(x, mask).to(x.dtype)[..., None]  # (B, K, 1)
        x = self.pos(x, positions)
        return ((x * m).sum(1) / m.sum(1).clamp_min(1.0))[:, None]  # (B, 1, D)


@AGGREGATORS.register("max")
class MaxPool(_Aggregator):
    """Element-wise max over the real patches. Args: in_dim, pos_encoding, num_positions."""

    def forward(self, x, *, mask=None, positions=None):
        m = self._mask(x, mask)
        x = self.pos(x, positions).masked_fill(~m[..., None], float("-inf"))
        out = x.amax(dim=1, keepdim=True)  # (B, 1, D)
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)


@AGGREGATORS.register("transformer")
class TransformerAggregator(_Aggregator):
    """A CLS token and a post-LayerNorm transformer encoder over the patch embeddings (DPS billiard).

    Args:
        in_dim: embedding width of the backbone.
        dim: transformer width (a linear map from in_dim when different); DPS 256.
        depth: layers (3); heads: attention heads (8); mlp_ratio: FFN width / dim (2);
        dropout: 0.1; pos_encoding: none | learned | sincos; num_positions: grid cells.
    """

    def __init__(self, *, in_dim: int, dim: int = 256, depth: int = 3, heads: int = 8, mlp_ratio: float = 2.0,
                 dropout: float = 0.1, pos_encoding: str = "learned", num_positions: int = 0):
        super().__init__(in_dim=dim, pos_encoding=pos_encoding, num_positions=num_positions)
        self.in_dim, self.out_dim = in_dim, dim
        self.proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, batch_first=True,
                                           norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x, *, mask=None, positions=None):
        m = self._mask(x, mask)
        x = self.pos(self.proj(x), positions)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + K, dim)
        keep = torch.cat([m.new_ones(m.shape[0], 1), m], dim=1)
        return self.encoder(tokens, src_key_padding_mask=~keep)[:, :1]  # (B, 1, dim)


@AGGREGATORS.register("attention")
class CrossAttentionMIL(_Aggregator):
    """Cross-attention MIL pooling (IPS): one learnable query per task attends over the patches.

    out = LN(q + W_o attn(q, x)), then LN(out + MLP(out)); `attention_scores` gives the
    attention averaged over heads and queries, the score IPS selects patches by.

    Args:
        in_dim: embedding width D; num_tokens: one query per task;
        heads: H (8); head_dim: D_k (16 MNIST, 64 traffic); mlp_dim: D_inner (512 / 2048);
        dropout: 0.1; pos_encoding: none | learned | sincos (IPS MNIST: sincos); num_positions.
    """

    def __init__(self, *, in_dim: int, num_tokens: int = 1, heads: int = 8, head_dim: int = 16,
                 mlp_dim: int = 512, dropout: float = 0.1, pos_encoding: str = "none", num_positions: int = 0):
        super().__init__(in_dim=in_dim, pos_encoding=pos_encoding, num_positions=num_positions)
        self.num_tokens, self.heads, self.head_dim = num_tokens, heads, head_dim
        inner = heads * head_dim
        self.query = nn.Parameter(torch.randn(1, num_tokens, in_dim) * 0.02)
        self.to_q, self.to_k = nn.Linear(in_dim, inner), nn.Linear(in_dim, inner)
        self.to_v, self.to_out = nn.Linear(in_dim, inner), nn.Linear(inner, in_dim)
        self.norm1, self.norm2 = nn.LayerNorm(in_dim), nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, in_dim))
        self.drop = nn.Dropout(dropout)

    def _attention(self, x, mask, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (attention (B, H, T, K), values (B, H, K, D_k))."""
        m = self._mask(x, mask)
        x = self.pos(x, positions)
        b, k, _ = x.shape
        q = self.to_q(self.query).view(1, self.num_tokens, self.heads, self.head_dim).transpose(1, 2)  # (1, H, T, Dk)
        keys = self.to_k(x).view(b, k, self.heads, self.head_dim).transpose(1, 2)  # (B, H, K, Dk)
        values = self.to_v(x).view(b, k, self.heads, self.head_dim).transpose(1, 2)
        logits = q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, K)
        logits = logits.masked_fill(~m[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0), values

    def attention_scores(self, x, *, mask=None, positions=None) -> torch.Tensor:
        """(B, K, D) -> (B, K) attention averaged over heads and queries (0 at masked patches)."""
        attn, _ = self._attention(x, mask, positions)
        return attn.mean(dim=(1, 2))

    def forward(self, x, *, mask=None, positions=None):
        attn, values = self._attention(x, mask, positions)
        pooled = (attn @ values).transpose(1, 2).reshape(x.shape[0], self.num_tokens, -1)  # (B, T, H*Dk)
        out = self.norm1(self.query + self.drop(self.to_out(pooled)))
        return self.norm2(out + self.drop(self.mlp(out)))  # (B, T, D)


def build_aggregator(name: str, **kwargs) -> nn.Module:
    """`build_aggregator("attention", in_dim=128, num_tokens=4)`; the module has `.out_dim`, `.num_tokens`."""
    return AGGREGATORS.build(name, **kwargs)
