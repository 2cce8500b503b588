"""How far billiard's max-left-right goes without positions: the ceiling of an aggregator that reads
every ball number perfectly but cannot tell left from right (mean or max pooling without a position code).

    python benchmarks/billiard_blind.py data/billiard_500 --json benchmarks/results/billiard_blind_cpu.json

The label is max(leftmost number, rightmost number) - 1. Given only the numbers on the table, the
leftmost and rightmost balls are any ordered pair of distinct balls, all pairs equally likely (the
generator draws positions and numbers independently), so the best position-blind guess is the class
that the most ordered pairs give (`blind_guess`). Also printed: always the train split's commonest
class, and the largest number on the table minus 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hrsel.data.billiard import ensure_billiard, list_samples, max_left_right, read_balls  # noqa: E402


def blind_guess(numbers: list[int]) -> int:
    """The max-left-right class most ordered pairs of distinct balls give (ties: the smaller class)."""
    votes = Counter(max(a, b) - 1 for i, a in enumerate(numbers) for j, b in enumerate(numbers) if i != j)
    return min(votes, key=lambda c: (-votes[c], c))


def tables(root: Path, split: str) -> list[list[dict]]:
    folder = ensure_billiard(root, split)
    return [read_balls(folder / f"{sample_id}.json") for sample_id in list_samples(folder)]


def ceilings(root: Path, split: str = "test") -> dict[str, float]:
    train, held_out = tables(root, "train"), tables(root, split)
    commonest = Counter(max_left_right(t) for t in train).most_common(1)[0][0]
    labels = [max_left_right(t) for t in held_out]
    numbers = [[b["number"] for b in t] for t in held_out]

    def share(guesses) -> float:
        return round(sum(g == y for g, y in zip(guesses, labels)) / len(labels), 4)

    return {"split": split, "images": len(labels), "train_commonest_class": commonest,
            "train_commonest_class_accuracy": share([commonest] * len(labels)),
            "largest_number_accuracy": share([max(n) - 1 for n in numbers]),
            "position_blind_bayes_accuracy": share([blind_guess(n) for n in numbers])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="a billiard data set (train/ and the split)")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = {"root": str(args.root), **ceilings(args.root, args.split)}
    for key, value in result.items():
        print(f"{key:32s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
