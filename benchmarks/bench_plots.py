"""What the benchmark pictures share: log-log axes with plain tick labels, saved and closed."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def finish_log_log(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """Log scales labelled 1, 2, 5, 10, 20... (not 10^0), grid, legend; writes `path` and closes `fig`."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
