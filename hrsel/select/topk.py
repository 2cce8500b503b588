"""Hard top-K: the selection DPS uses at inference and in the limit sigma -> 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hrsel.select._checks import check_k, check_scores


def hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, sorted ascending (raster order).

    scores: (B, N) -> (B, k) int64. Sorting by position matters: row j of the
    selection is always the j-th selected patch in raster order.
    """
    check_scores(scores)
    check_k(k, scores.shape[1])
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def indices_to_onehot(indices: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, k) indices -> (B, k, n) one-hot indicators."""
    return F.one_hot(indices, n).to(dtype)


def hard_topk_indicators(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) -> (B, k, N) one-hot rows of `hard_topk`, in the dtype of the scores."""
    return indices_to_onehot(hard_topk(scores, k), scores.shape[1], scores.dtype)
