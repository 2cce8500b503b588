"""What a prediction head predicts: shared by data sets, models and the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["multiclass", "multilabel", "binary"]


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task.

    kind: "multiclass" (softmax over `num_classes`, integer targets),
          "multilabel" (one sigmoid per class, multi-hot float targets) or
          "binary" (one logit, float target in {0, 1}; `num_classes` is 1).
    """

    kind: TaskKind
    num_classes: int

    def __post_init__(self) -> None:
        if self.kind not in ("multiclass", "multilabel", "binary"):
            raise ValueError(f"TaskSpec.kind must be multiclass, multilabel or binary, got {self.kind!r}")
        if self.num_classes < 1 or (self.kind == "binary" and self.num_classes != 1):
            raise ValueError(f"TaskSpec.num_classes={self.num_classes} is invalid for kind {self.kind!r}")
