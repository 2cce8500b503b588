"""Iterative top-M selection over a stream of chunks (the IPS driver).

IPS (Bergner et al., ICLR 2023) keeps a buffer of the M best items seen so far; for
every new chunk of I items it scores buffer + chunk together (the scores may depend on
the whole set, as attention does) and keeps the M best. Memory is O((M + I) x item),
whatever the number of items N. The driver is generic: an "item" is any tensor per
element (a patch embedding, a scalar score); the caller encodes and scores.

Ties go to the item seen first (stable sort), or to a random one with
`random_ties=True` (IPS shuffles its patches for the same effect). With a pointwise
score the result equals a global top-M.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from hrsel.errors import SelectionError
from hrsel.select._checks import check_generator, check_positive_int, nonfinite_message

# (items (B, n, ...), mask (B, n) bool, indices (B, n) int64) -> scores (B, n)
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# the same arguments for one arriving chunk -> (B, n, ...) values to record per item
RecordFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TopMResult:
    indices: torch.Tensor  # (B, M) int64 stream indices, ascending; -1 where fewer than M items exist
    items: torch.Tensor  # (B, M, ...) the kept items, in the order of `indices`
    scores: torch.Tensor  # (B, M) their scores in the last round; -inf where absent
    mask: torch.Tensor  # (B, M) bool, True for a real item
    all_scores: torch.Tensor | None = None  # (B, N, ...) what was recorded per item, NaN where none arrived


def _keep_top(indices, items, scores, mask, keys, m: int):
    """Keep the m best of (B, n) candidates; absent ones (mask False) sort last, ties by ascending key."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    by_key = keys.argsort(dim=1, stable=True)
    indices, items, scores, mask, keys = _gather_rows(by_key, indices, items, scores, mask, keys)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :m]  # (B, m)
    return _gather_rows(order, indices, items, scores, mask, keys)


@torch.no_grad()
def iterative_topm(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], *, m: int, score_fn: ScoreFn,
                   record_scores: bool = False, record_fn: RecordFn | None = None,
                   random_ties: bool = False, generator: torch.Generator | None = None) -> TopMResult:
    """Select the M best items of a stream without holding more than M + I of them.

    Args:
        chunks: yields (indices (B, n) int64, items (B, n, ...)) or (indices, items, present (B, n)
            bool); indices identify the items (e.g. patch indices in the grid) and are returned for
            the winners. An item not `present` is never kept ahead of a present one: it fills a
            slot (mask False) only when a row has fewer than m present items.
        m: how many items to keep (M).
        score_fn: scores (B, n') for a set of items and its mask; called on buffer + chunk.
        record_scores: also return every item's score from the round in which it arrived,
            placed at its index (needs indices in [0, N)). Comparable across items only for a
            pointwise score: a set-dependent score (attention) differs with the chunk an item
            arrived in; use `record_fn` for those.
        record_fn: called on each arriving chunk alone; its (B, n, ...) values are returned
            in `all_scores` at the items' indices (e.g. attention logits, which the caller
            normalises over all N afterwards). Takes precedence over `record_scores`.
        random_ties: break score ties randomly instead of by arrival order.
        generator: for the random tie-break keys.

    Returns:
        TopMResult sorted by ascending index (raster order for patch indices).

    Raises:
        SelectionError: an empty batch, or a score_fn that returned NaN or +-inf for a real item
            (checked once, after the stream: the message names the batch row and the item index).
    """
    check_positive_int(m, "m")
    check_generator(generator)
    buf = None  # (indices, items, scores, mask, keys)
    arrived = 0
    nonfinite = None  # per row: first stream index with a non-finite score, and that score
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    for chunk in chunks:
        idx, items = chunk[0], chunk[1]
        if idx.dim() != 2 or items.shape[:2] != idx.shape:
            raise SelectionError(
                f"each chunk must be (indices (B, n), items (B, n, ...)), got shapes "
                f"{tuple(idx.shape)} and {tuple(items.shape)}"
            )
        if idx.shape[0] == 0:
            raise SelectionError(f"iterative_topm got an empty batch (indices of shape {tuple(idx.shape)}); "
                                 "pass at least one image")
        new_mask = chunk[2] if len(chunk) > 2 else torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        if random_ties:
            new_keys = torch.rand(idx.shape, generator=generator, device="cpu", dtype=torch.float64).to(idx.device)
        else:  # arrival order
            new_keys = torch.arange(arrived, arrived + idx.shape[1], device=idx.device, dtype=torch.float64)
            new_keys = new_keys.expand(idx.shape)
        arrived += idx.shape[1]
        if buf is None:
            cand_idx, cand_items, cand_mask, cand_keys = idx, items, new_mask, new_keys
        else:
            cand_idx = torch.cat([buf[0], idx], dim=1)
            cand_items = torch.cat([buf[1], items], dim=1)
            cand_mask = torch.cat([buf[3], new_mask], dim=1)
            cand_keys = torch.cat([buf[4], new_keys], dim=1)
        scores = score_fn(cand_items, cand_mask, cand_idx)
        if scores.shape != cand_idx.shape:
            raise SelectionError(f"score_fn returned shape {tuple(scores.shape)}, expected {tuple(cand_idx.shape)}")
        nonfinite = _first_nonfinite(scores, cand_mask, cand_idx, nonfinite)
        if record_fn is not None:
            recorded.append((idx, record_fn(items, torch.ones_like(new_mask), idx).float()))
        elif record_scores:
            recorded.append((idx, scores[:, -idx.shape[1]:].float()))
        buf = _keep_top(cand_idx, cand_items, scores, cand_mask, cand_keys, m)
    if buf is None:
        raise SelectionError("iterative_topm got an empty stream of chunks")
    _check_nonfinite(nonfinite, arrived)
    indices, items, scores, mask, _ = buf
    if indices.shape[1] < m:  # fewer than M items in all: pad with absent slots
        pad = m - indices.shape[1]
        b = indices.shape[0]
        indices = torch.cat([indices, indices.new_full((b, pad), -1)], dim=1)
        items = torch.cat([items, items.new_zeros((b, pad) + items.shape[2:])], dim=1)
        scores = torch.cat([scores, scores.new_full((b, pad), float("-inf"))], dim=1)
        mask = torch.cat([mask, mask.new_zeros((b, pad))], dim=1)
    # raster order; absent slots (index -1) last
    key = torch.where(mask, indices, torch.iinfo(torch.int64).max)
    order = key.argsort(dim=1)
    indices, items, scores, mask = _gather_rows(order, indices, items, scores, mask)
    all_scores = _place(recorded) if recorded else None
    return TopMResult(indices, items, scores, mask, all_scores)


def _first_nonfinite(scores: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor,
                     found: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest stream index of a real item with a non-finite score so far, and that score.

    (B, n) scores, mask, indices -> ((B,) index, int64 max where none; (B,) its score); no host sync.
    """
    bad = ~torch.isfinite(scores) & mask
    key = torch.where(bad, indices.long(), torch.iinfo(torch.int64).max)
    pos = key.argmin(dim=1, keepdim=True)  # (B, 1)
    first, value = key.gather(1, pos)[:, 0], scores.gather(1, pos)[:, 0].float()
    if found is None:
        return first, value
    earlier = first < found[0]
    return torch.where(earlier, first, found[0]), torch.where(earlier, value, found[1])


def _check_nonfinite(found: tuple[torch.Tensor, torch.Tensor] | None, arrived: int) -> None:
    """SelectionError naming the rows (and first item) where score_fn returned NaN or +-inf."""
    if found is None:
        return
    first, value = found
    bad = first != torch.iinfo(torch.int64).max
    if bool(bad.any()):
        raise SelectionError(nonfinite_message(value[:, None], bad[:, None], "score_fn's scores",
                                               items=first[:, None], where=f"{len(first)} rows of a stream "
                                               f"of {arrived} items",
                                               hint="the scorer returned NaN or inf for a real item, which "
                                               "would be kept or dropped arbitrarily; check the scorer "
                                               "(e.g. an overflow or a division by zero)"))


def _place(recorded: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[(indices (B, n), values (B, n, ...))] -> (B, N, ...) values at their indices, NaN elsewhere."""
    idx_all = torch.cat([i for i, _ in recorded], dim=1)
    val_all = torch.cat([v for _, v in recorded], dim=1)
    out = val_all.new_full((idx_all.shape[0], int(idx_all.max()) + 1) + val_all.shape[2:], float("nan"))
    view = idx_all.view(idx_all.shape + (1,) * (val_all.dim() - 2)).expand(val_all.shape)
    return out.scatter_(1, view, val_all)


def _gather_rows(order: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Reorder dim 1 of each (B, n, ...) tensor by (B, n') positions."""
    out = []
    for t in tensors:
        view = order.view(order.shape + (1,) * (t.dim() - 2)).expand(order.shape + t.shape[2:])
        out.append(t.gather(1, view))
    return out
