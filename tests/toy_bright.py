"""A toy problem for the pipeline tests: one faint striped patch decides the label.

Images are 1 x 80 x 80, a 4 x 4 grid of 20 x 20 cells over dim noise. One cell holds
faint stripes, horizontal (label 0) or vertical (label 1), or no cell does (label 2).
Another cell holds bright stripes of a random orientation: an untrained selector
prefers it, and it carries no information about the label. With the "none" class no
shortcut ("not vertical, so horizontal") works: a model is right on labels 0 and 1
only when it looks at the faint cell, whose index is returned (-1 for label 2).
"""
import pytest
import torch

SIDE, CELL = 80, 20
GRID = SIDE // CELL


def _stripes(low: float, high: float) -> torch.Tensor:
    """Horizontal stripes, 2 pixels wide: (CELL, CELL)."""
    rows = torch.where(torch.arange(CELL) // 2 % 2 == 0, high, low)
    return rows[:, None].expand(CELL, CELL)


def _paint(images: torch.Tensor, i: int, cell: int, pattern: torch.Tensor) -> None:
    r, c = divmod(cell, GRID)
    images[i, 0, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = pattern


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> images (n, 1, 80, 80) uint8, labels (n,) int64, index of the faint cell (n,) int64."""
    images = torch.rand(n, 1, SIDE, SIDE, generator=generator) * 0.15
    labels = torch.randint(0, 3, (n,), generator=generator)
    decoy_orientation = torch.randint(0, 2, (n,), generator=generator)
    cells = torch.randint(0, GRID * GRID, (n,), generator=generator)
    decoys = (cells + torch.randint(1, GRID * GRID, (n,), generator=generator)) % (GRID * GRID)
    faint, bright = _stripes(0.15, 0.5), _stripes(0.6, 1.0)
    for i in range(n):
        if labels[i] < 2:
            _paint(images, i, int(cells[i]), faint if labels[i] == 0 else faint.T)
        _paint(images, i, int(decoys[i]), bright if decoy_orientation[i] == 0 else bright.T)
    cells = torch.where(labels < 2, cells, -1)
    return (images * 255).round().to(torch.uint8), labels, cells


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny ops on a shared 2-core machine run many times faster single-threaded (no spin-waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
