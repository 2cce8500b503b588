"""benchmarks/billiard_blind.py: the position-blind ceiling of billiard's max-left-right task."""
from __future__ import annotations

import importlib.util
import json
import sys
from itertools import permutations
from pathlib import Path

from fixtures_data import write_release

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_billiard_blind", REPO / "benchmarks" / "billiard_blind.py")
blind = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = blind
spec.loader.exec_module(blind)


def balls(*pairs: tuple[float, int]) -> list[dict]:
    return [{"position": [x, 0.0, 0.0], "number": n, "color": "red"} for x, n in pairs]


def test_blind_guess_is_the_class_most_orderings_give():
    from hrsel.data.billiard import max_left_right

    numbers = [3, 9, 2, 2]
    guess = blind_guess_by_enumeration(numbers)
    assert blind.blind_guess(numbers) == guess == 8  # 9 is leftmost or rightmost in half of the orderings
    assert blind.blind_guess([5, 5]) == 4 and blind.blind_guess([1, 2, 3]) == 2  # 3 is at an end in 4 of 6 pairs
    for numbers in ([1, 4, 4, 2, 7], [2, 2, 6, 6, 3], [9, 1, 1, 1, 1, 1, 1, 1]):
        assert blind.blind_guess(numbers) == blind_guess_by_enumeration(numbers), numbers
    assert max_left_right(balls((0.1, 3), (0.5, 9), (0.9, 2))) == 2  # a table the blind guess gets wrong


def blind_guess_by_enumeration(numbers: list[int]) -> int:
    """The class most x-orderings of the balls give, by listing every ordering (the plain reference)."""
    from collections import Counter

    from hrsel.data.billiard import max_left_right

    votes = Counter(max_left_right(balls(*zip(range(len(order)), order))) for order in permutations(numbers))
    return min(votes, key=lambda c: (-votes[c], c))


def test_ceilings_on_a_small_release(tmp_path, capsys):
    train = [balls((0.1, 4), (0.9, 6))] * 3 + [balls((0.1, 1), (0.9, 2))]  # commonest class: 5
    test = [balls((0.1, 3), (0.5, 9), (0.9, 2)),  # label 2; largest number says 8, blind says 8
            balls((0.1, 9), (0.5, 1), (0.9, 1)),  # label 8; both say 8
            balls((0.1, 6), (0.9, 2))]  # label 5; both say 5, as the commonest class
    write_release(tmp_path, "train", train)
    write_release(tmp_path, "test", test)
    assert blind.main([str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["images"] == 3 and result["train_commonest_class"] == 5
    assert result["train_commonest_class_accuracy"] == round(1 / 3, 4)
    assert result["largest_number_accuracy"] == result["position_blind_bayes_accuracy"] == round(2 / 3, 4)
    assert "position_blind_bayes_accuracy" in capsys.readouterr().out
