"""Aggregators: a set of patch embeddings -> T pooled tokens for the heads.

All take x (B, K, D), an optional mask (B, K) bool (True = a real patch; padding and
absent patches are masked everywhere) and optional positions, either (B, K) int64
raster indices, (B, K, N) soft indicators (DPS: indicator-weighted position
embeddings, i.e. Y @ table) or `SoftCells`, soft indicators over C of the N cells
(DPS with candidates). They return (B, T, out_dim): T = 1, or one token per task
for cross-attention MIL pooling (`num_tokens`).

Positional encodings (`pos_encoding`): none, learned (a table, no bias), sincos (a
fixed table) or dense (DPS: a Linear layer with bias over the N-dim indicator vector,
Y @ W + b; for hard indices W[idx] + b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hrsel.errors import ConfigError
from hrsel.registry import Registry

AGGREGATORS = Registry("aggregator")
POS_ENCODINGS = ("none", "learned", "sincos", "dense")
POOLINGS = ("cls", "sum")


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """1-D sinusoidal encodings over raster indices: (num_positions, dim)."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


@dataclass(frozen=True)
class SoftCells:
    """K soft indicators over C grid cells: cells (B, C) int64 raster indices (-1: absent), weights (B, K, C).

    The same positions as the (B, K, N) indicators that are zero outside the C cells, whose
    encoding Y @ table is weights @ table[cells]: O(B C D) memory instead of O(B K N).
    """
    cells: torch.Tensor
    weights: torch.Tensor


class PositionalEncoding(nn.Module):
    """kind: none | learned | sincos | dense over `num_positions` grid cells; added to the patch embeddings.

    learned: a table T (N, D), no bias: T[idx] or Y @ T. sincos: the same with a fixed table.
    dense (DPS JAX): Dense(indicators) = Y @ W + b, i.e. W[idx] + b for hard indices; W is
    initialised like Flax's Dense (LeCun normal, std 1/sqrt(N)), b at zero.
    """

    def __init__(self, *, kind: str = "none", num_positions: int = 0, dim: int):
        super().__init__()
        if kind not in POS_ENCODINGS:
            raise ConfigError(f"pos_encoding {kind!r} is unknown; valid: {', '.join(POS_ENCODINGS)}")
        if kind != "none" and num_positions < 1:
            raise ConfigError(f"pos_encoding {kind!r} needs num_positions >= 1, got {num_positions}: set "
                              "model.num_positions to the number of score-grid cells (e.g. 900 for a 30x30 "
                              "grid) or model.pos_encoding=none")
        self.kind = kind
        if kind in ("learned", "dense"):
            std = 0.02 if kind == "learned" else num_positions ** -0.5
            self.table = nn.Parameter(torch.randn(num_positions, dim) * std)  # (N, D)
        elif kind == "sincos":
            self.register_buffer("table", sincos_table(num_positions, dim), persistent=False)
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "dense" else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | SoftCells | None) -> torch.Tensor:
        if self.kind == "none" or positions is None:
            return x
        pos = self._encode(positions, x.dtype)  # (B, K, D)
        return x + pos if self.bias is None else x + pos + self.bias.to(x.dtype)

    def _encode(self, positions: torch.Tensor | SoftCells, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.int64:  # (B, K) raster indices; -1 = absent
            self._check_cells(positions)
            return self.table[positions.clamp_min(0)]
        table = self.table.to(dtype)
        if isinstance(positions, SoftCells):
            self._check_cells(positions.cells)
            weights = positions.weights.to(dtype) * (positions.cells >= 0)[:, None]  # (B, K, C), none on absent
            return torch.einsum("bkc,bcd->bkd", weights, table[positions.cells.clamp_min(0)])
        if positions.shape[-1] != table.shape[0]:
            raise ConfigError(f"positions have {positions.shape[-1]} grid cells but pos_encoding {self.kind!r} was "
                              f"built for model.num_positions={table.shape[0]}; set it to the score grid's cell "
                              f"count")
        return positions.to(dtype) @ table  # (B, K, N) @ (N, D)

    def _check_cells(self, cells: torch.Tensor) -> None:
        num = self.table.shape[0]
        if cells.numel() and int(cells.max()) >= num:
            raise ConfigError(f"a selected patch has grid position {int(cells.max())}, but pos_encoding "
                              f"{self.kind!r} was built for model.num_positions={num} positions; set "
                              f"model.num_positions to the score grid's cell count (at least "
                              f"{int(cells.max()) + 1} here), or model.pos_encoding=none")


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


@AGGREGATORS.register("concat")
class ConcatPool(_Aggregator):
    """The K patch features side by side in selection (raster) order: (B, K, D) -> (B, 1, K * D).

    DPS table 3 "[Concat]" (as NTS-Net): a large linear classifier over K * D features;
    masked patches contribute zeros.

    Args: in_dim, num_patches (K; the DPS pipeline fills in its k), pos_encoding, num_positions.
    """

    def __init__(self, *, in_dim: int, num_patches: int = 0, pos_encoding: str = "none", num_positions: int = 0):
        super().__init__(in_dim=in_dim, pos_encoding=pos_encoding, num_positions=num_positions)
        if num_patches < 1:
            raise ConfigError(f"aggregator 'concat' needs num_patches >= 1 (the K patches it concatenates), "
                              f"got {num_patches}; set model.aggregator_options.num_patches to K")
        self.num_patches = num_patches
        self.out_dim = num_patches * in_dim

    def forward(self, x, *, mask=None, positions=None):
        if x.shape[1] != self.num_patches:
            raise ValueError(f"aggregator 'concat' was built for {self.num_patches} patches, got {x.shape[1]}")
        m = self._mask(x, mask).to(x.dtype)[..., None]  # (B, K, 1)
        x = self.pos(x, positions) * m
        return x.flatten(1)[:, None]  # (B, 1, K * D)


class PostLNLayer(nn.Module):
    """A post-LayerNorm encoder layer as in the DPS JAX transformer.

    x = LN(x + drop(attn(x))); x = LN(x + drop(FFN(x))), FFN = Dense(hidden) ReLU Dense(dim).
    Dropout acts on the attention output and on the FFN output only (not on the attention
    weights nor inside the FFN); LayerNorm epsilon 1e-6 (Flax).
    """

    def __init__(self, *, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim), padding (B, L) bool (True = ignore as a key) -> (B, L, dim)."""
        attended = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        x = self.norm1(x + self.drop(attended))
        return self.norm2(x + self.drop(self.ffn(x)))


@AGGREGATORS.register("transformer")
class TransformerAggregator(_Aggregator):
    """A post-LayerNorm transformer encoder over the patch embeddings (DPS billiard).

    DPS (JAX ptopk_patch_selection): position = Dense(indicators) added to the in_dim
    features, Dense(in_dim -> dim), 3 post-LN layers, 8 heads, FFN 2x, dropout 0.1, then the
    token outputs are summed (pool "sum", no CLS token). The position is added before the
    projection for every kind of encoding. pool "cls" prepends a learned CLS token and
    returns its output instead.

    Args:
        in_dim: embedding width of the backbone.
        dim: transformer width (a linear map from in_dim when different); DPS 256.
        depth: layers (3); heads: attention heads (8); mlp_ratio: FFN width / dim (2);
        dropout: 0.1; pool: sum (DPS) | cls;
        pos_encoding: none | learned | sincos | dense (DPS); num_positions: grid cells.
    """

    def __init__(self, *, in_dim: int, dim: int = 256, depth: int = 3, heads: int = 8, mlp_ratio: float = 2.0,
                 dropout: float = 0.1, pool: str = "sum", pos_encoding: str = "none", num_positions: int = 0):
        super().__init__(in_dim=in_dim, pos_encoding=pos_encoding, num_positions=num_positions)
        if pool not in POOLINGS:
            raise ConfigError(f"transformer pool {pool!r} is unknown; valid: {', '.join(POOLINGS)}")
        self.pool, self.out_dim = pool, dim
        self.proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.layers = nn.ModuleList(PostLNLayer(dim=dim, heads=heads, hidden=int(dim * mlp_ratio), dropout=dropout)
                                    for _ in range(depth))

    def forward(self, x, *, mask=None, positions=None):
        m = self._mask(x, mask)
        tokens = self.proj(self.pos(x, positions))  # (B, K, dim)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + K, dim)
            m = torch.cat([m.new_ones(m.shape[0], 1), m], dim=1)
        padding = ~(m | ~m.any(dim=1, keepdim=True))  # a sample without real patches attends to all (no NaN)
        for layer in self.layers:
            tokens = layer(tokens, padding)
        if self.cls is not None:
            return tokens[:, :1]  # (B, 1, dim)
        return (tokens * m[..., None].to(tokens.dtype)).sum(dim=1, keepdim=True)  # (B, 1, dim)


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

    def _logits(self, x, mask, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (attention logits (B, H, T, K), -inf at masked patches; values (B, H, K, D_k))."""
        m = self._mask(x, mask)
        x = self.pos(x, positions)
        b, k, _ = x.shape
        q = self.to_q(self.query).view(1, self.num_tokens, self.heads, self.head_dim).transpose(1, 2)  # (1, H, T, Dk)
        keys = self.to_k(x).view(b, k, self.heads, self.head_dim).transpose(1, 2)  # (B, H, K, Dk)
        values = self.to_v(x).view(b, k, self.heads, self.head_dim).transpose(1, 2)
        logits = q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, K)
        return logits.masked_fill(~m[:, None, None, :], float("-inf")), values

    def _attention(self, x, mask, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (attention (B, H, T, K), values (B, H, K, D_k))."""
        logits, values = self._logits(x, mask, positions)
        return torch.softmax(logits, dim=-1).nan_to_num(0.0), values

    def attention_scores(self, x, *, mask=None, positions=None) -> torch.Tensor:
        """(B, K, D) -> (B, K) attention averaged over heads and queries (0 at masked patches)."""
        attn, _ = self._attention(x, mask, positions)
        return attn.mean(dim=(1, 2))

    def attention_logits(self, x, *, mask=None, positions=None) -> torch.Tensor:
        """(B, K, D) -> (B, K, H*T) pre-softmax logits, -inf at masked patches.

        A patch's logits do not depend on the other patches of the set, so logits recorded
        chunk by chunk can be normalised over the whole image afterwards (`scores_from_logits`).
        """
        logits, _ = self._logits(x, mask, positions)
        return logits.flatten(1, 2).transpose(1, 2)  # (B, H*T, K) -> (B, K, H*T)

    @staticmethod
    def scores_from_logits(logits: torch.Tensor) -> torch.Tensor:
        """(B, N, H*T) logits of every patch -> (B, N) attention over all N, averaged over heads and queries.

        Equals `attention_scores` of the whole set in one round; NaN (never seen) stays NaN.
        """
        seen = ~torch.isnan(logits[..., 0])  # (B, N)
        attn = torch.softmax(logits.nan_to_num(float("-inf")), dim=1).nan_to_num(0.0)
        return attn.mean(dim=2).masked_fill(~seen, float("nan"))

    def forward(self, x, *, mask=None, positions=None):
        attn, values = self._attention(x, mask, positions)
        pooled = (attn @ values).transpose(1, 2).reshape(x.shape[0], self.num_tokens, -1)  # (B, T, H*Dk)
        out = self.norm1(self.query + self.drop(self.to_out(pooled)))
        return self.norm2(out + self.drop(self.mlp(out)))  # (B, T, D)


def build_aggregator(name: str, **kwargs) -> nn.Module:
    """`build_aggregator("attention", in_dim=128, num_tokens=4)`; the module has `.out_dim`, `.num_tokens`."""
    return AGGREGATORS.build(name, **kwargs)
