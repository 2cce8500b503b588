"""Megapixel MNIST noise as IPS draws it, digits on top of it, and the `multi` metric."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from hrsel.data.megapixel_mnist_gen import (
    DIGIT,
    N_NOISE_PATTERNS,
    make_noise_patterns,
    noise_lines,
    render_rows,
    sample_layout,
)
from hrsel.engine import metrics as M
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

MAX_ANGLE = np.deg2rad(72)


def reference_line(angle: float) -> np.ndarray:
    """A line as IPS's make_mnist.py draws it: slope tan(angle), 56 points, np.round."""
    slope = np.tan(angle)
    rows_end = 27.49 if slope <= 1 else 27.49 / slope
    rows = np.linspace(0, rows_end, 56)
    line = np.zeros((DIGIT, DIGIT), dtype=bool)
    line[np.round(rows).astype(int), np.round(slope * rows).astype(int)] = True
    return line


def component_of(mask: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """The 8-connected component of `mask` (H, W) bool holding `start`."""
    seen = np.zeros_like(mask)
    queue = deque([start])
    seen[start] = True
    while queue:
        r, c = queue.popleft()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
    return seen


@pytest.fixture(scope="module")
def many_patterns() -> np.ndarray:
    return make_noise_patterns(np.random.default_rng(11), 3000)


# ---- lines and patterns ---------------------------------------------------------------------------

def test_noise_lines_match_the_ips_rasterisation():
    angles = np.concatenate([[0.0, np.pi / 4, MAX_ANGLE - 1e-9],
                             np.random.default_rng(0).uniform(0, MAX_ANGLE, 300)])
    lines = noise_lines(angles)
    assert lines.shape == (len(angles), DIGIT, DIGIT) and lines.dtype == bool
    for angle, line in zip(angles, lines):
        np.testing.assert_array_equal(line, reference_line(angle), err_msg=f"angle {np.rad2deg(angle):.3f} deg")
    left_edge = np.zeros((DIGIT, DIGIT), dtype=bool)
    left_edge[:, 0] = True
    np.testing.assert_array_equal(lines[0], left_edge)
    np.testing.assert_array_equal(lines[1], np.eye(DIGIT, dtype=bool))


def test_noise_lines_start_at_the_corner_and_run_to_the_border():
    lines = noise_lines(np.linspace(0, MAX_ANGLE, 200))
    for line in lines:
        assert line[0, 0]
        rows, cols = np.nonzero(line)
        assert rows.max() == DIGIT - 1 or cols.max() == DIGIT - 1, "the line stops before the border"
        assert component_of(line, (0, 0)).sum() == line.sum(), "the line is not one connected stroke"
    counts = lines.sum((1, 2))
    assert counts.min() >= DIGIT and counts.max() <= 42


def test_noise_lines_reject_angles_outside_a_quadrant():
    with pytest.raises(DataError, match="angles"):
        noise_lines(np.array([0.1, -0.2]))


def test_patterns_light_about_65_pixels(many_patterns):
    lit = (many_patterns > 0).sum((1, 2))
    assert 50 <= lit.mean() <= 80 and 60 <= lit.mean() <= 72, f"mean {lit.mean():.1f} lit pixels per pattern"
    assert lit.min() >= DIGIT and lit.max() <= 2 * 42
    values = many_patterns[many_patterns > 0].astype(float)
    assert values.min() >= 204 and values.max() <= 255, "intensity is 255 * U[0.8, 1]"
    assert abs(values.mean() - 229.5) < 1.0


def test_each_pattern_holds_a_line_from_a_corner(many_patterns):
    lit = many_patterns > 0
    for pattern in lit[:400]:
        assert pattern[0, 0], "the first line starts at the corner (0, 0)"
        stroke = component_of(pattern, (0, 0))
        rows, cols = np.nonzero(stroke)
        assert rows.max() == DIGIT - 1 or cols.max() == DIGIT - 1, "the corner line reaches the border"
    mirrored = lit[:, 0, DIGIT - 1].mean()  # only a mirrored copy starts at the corner (0, 27)
    assert 0.38 <= mirrored <= 0.50, f"{mirrored:.2f} of the copies mirrored; IPS: 2 * 0.33 * 0.67 = 0.44"


def test_angles_stay_below_72_degrees(many_patterns):
    lit = many_patterns > 0
    # a line from a top corner at < 72 deg lights at most 3 pixels of the top row (0.5 * tan 72 = 1.54)
    top = lit[:, 0, :]
    assert not top[:, 3:DIGIT - 3].any(), "a line leaves its corner at more than 72 degrees"
    # rows 1..3 likewise: column <= round((row + 0.5) * tan 72) from the nearer top corner
    for row in (1, 2, 3):
        reach = int(np.ceil((row + 0.5) * np.tan(MAX_ANGLE)))
        assert not lit[:, row, reach + 1:DIGIT - reach - 1].any(), f"row {row}: a line steeper than 72 deg"
    # and the whole range is used: near-vertical lines (down the left edge) and near-72-degree ones
    assert lit[:, DIGIT - 1, 0].mean() > 0.01  # angle < 1 deg: ~2.8% of the patterns
    assert lit[:, 9, DIGIT - 1].any(), "no line above 70.9 deg (those end on the right border at row 9)"


def test_patterns_match_a_plain_reference_with_the_same_draws():
    n = 40
    patterns = make_noise_patterns(np.random.default_rng(5), n)
    rng = np.random.default_rng(5)  # the draws in the generator's order: angles, copy, mirror, intensity
    angles = rng.uniform(0, MAX_ANGLE, n)
    copy_of = rng.permutation(n)
    mirror = rng.random(n) < 2 * 0.33 * 0.67
    intensity = rng.uniform(0.8, 1.0, (n, DIGIT, DIGIT))
    for i in range(n):
        copy = reference_line(angles[copy_of[i]])
        lit = reference_line(angles[i]) | (copy[:, ::-1] if mirror[i] else copy)
        np.testing.assert_array_equal(patterns[i], np.floor(255 * lit * intensity[i]).astype(np.uint8))


def test_noise_is_deterministic_given_the_seed():
    a, b = make_noise_patterns(np.random.default_rng(3)), make_noise_patterns(np.random.default_rng(3))
    assert a.shape == (N_NOISE_PATTERNS, DIGIT, DIGIT) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, make_noise_patterns(np.random.default_rng(4)))
    labels = np.repeat(np.arange(10), 5)
    first = sample_layout(labels, n=6, height=300, width=260, noise=True, n_noise=50, seed=9)
    again = sample_layout(labels, n=6, height=300, width=260, noise=True, n_noise=50, seed=9)
    for field in ("noise_patterns", "noise_positions", "noise_index", "positions", "digit_index"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    other = sample_layout(labels, n=6, height=300, width=260, noise=True, n_noise=50, seed=10)
    assert not np.array_equal(first.noise_patterns, other.noise_patterns)


# ---- placement and drawing order -------------------------------------------------------------------

def test_noise_placements_lie_in_28_to_size_minus_28():
    layout = sample_layout(np.arange(10), n=400, height=150, width=130, noise=True, n_noise=50, seed=2)
    pos = layout.noise_positions
    assert pos.shape == (400, 50, 2) and layout.noise_index.shape == (400, 50)
    assert pos.min() == DIGIT and pos[..., 0].max() == 150 - DIGIT - 1 and pos[..., 1].max() == 130 - DIGIT - 1
    assert layout.noise_patterns.shape == (N_NOISE_PATTERNS, DIGIT, DIGIT)
    assert set(np.unique(layout.noise_index)) == set(range(N_NOISE_PATTERNS))
    quiet = sample_layout(np.arange(10), n=3, height=150, width=130, noise=False, n_noise=50, seed=2)
    assert quiet.noise_positions.shape == (3, 0, 2)


def test_noise_drawn_first_and_digits_on_top():
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 256, size=(10, DIGIT, DIGIT)).astype(np.uint8)
    pool[:, 10:14] = 0  # blank digit pixels must hide the noise below them too
    layout = sample_layout(np.arange(10), n=2, height=160, width=150, noise=True, n_noise=200, seed=4)
    for item in range(2):
        canvas = np.zeros((160, 150), dtype=np.uint8)  # plain painter: noise in order, then digits
        for (y, x), j in zip(layout.noise_positions[item], layout.noise_index[item]):
            canvas[y:y + DIGIT, x:x + DIGIT] = layout.noise_patterns[j]
        for (y, x), j in zip(layout.positions[item], layout.digit_index[item]):
            canvas[y:y + DIGIT, x:x + DIGIT] = pool[j]
        np.testing.assert_array_equal(render_rows(layout, pool, item, (0, 160), 150), canvas)
        covered = np.zeros_like(canvas, dtype=bool)
        for y, x in layout.positions[item]:
            covered[y:y + DIGIT, x:x + DIGIT] = True
        noise_under = np.zeros_like(covered)
        for y, x in layout.noise_positions[item]:
            noise_under[y:y + DIGIT, x:x + DIGIT] = True
        assert (covered & noise_under).any(), "the test needs noise under a digit"
        # each placement overwrites its whole 28x28 square (as IPS): ~66 / 784 of the noise area stays lit
        density = (canvas[~covered & noise_under] > 0).mean()
        assert 0.05 < density < 0.12, f"{density:.3f} of the uncovered noise area lit"


# ---- the multi task's metric ------------------------------------------------------------------------

def test_multilabel_reports_exact_match_first():
    target = torch.zeros(4, 10)
    target[:, [1, 7]] = 1.0
    logits = torch.where(target > 0, 3.0, -3.0)
    logits[0, 4] = 2.0  # one wrong label in item 0, one in item 1
    logits[1, 7] = -2.0
    out = M.all_metrics({"multi": logits}, {"multi": target}, {"multi": TaskSpec("multilabel", 10)})
    assert list(out) == ["multi/exact_match", "multi/accuracy"], "exact match is the multi task's headline"
    assert out["multi/exact_match"] == pytest.approx(2 / 4)
    assert out["multi/accuracy"] == pytest.approx(38 / 40)
