"""What every command line (train, evaluate, predict, features) does with an hrsel error.

    def main(argv=None) -> int:
        args = parse_args(argv)
        return run_command(lambda: body(args), bad_input=BAD_INPUT)

An error in `bad_input` (a bad config, data set, run folder, checkpoint or image: the user can
fix it) prints one line and exits with status 2; any other HrselError prints one line and exits
with 1, or 128 + the signal number when a signal stopped the run. No traceback for either.

A `hrsel/` folder in the working folder that is not the package (no `__init__.py`) hides an
editable install from `python -m hrsel.<command>`, which searches the working folder first:
Python makes it a namespace package, the command's own modules still load, and the first
`from hrsel import __version__` fails far from the cause. `check_package_home` names it first.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from hrsel.errors import (ChannelMismatchError, CheckpointError, ConfigError, DataError, HrselError, ImageReadError,
                          RunFolderError, ShadowedPackageError)

EXIT_BAD_INPUT = 2
# what the user can fix: the same exit status from every command
BAD_INPUT = (ConfigError, DataError, RunFolderError, CheckpointError, ChannelMismatchError, ImageReadError,
             ShadowedPackageError)


def run_command(body: Callable[[], int], *, bad_input: tuple[type[BaseException], ...] = BAD_INPUT) -> int:
    """`body()`'s exit status, or the status of the hrsel error it raised (printed to stderr)."""
    try:
        check_package_home()
        return body()
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except HrselError as e:
        print(f"error: {e}", file=sys.stderr)
        signum = getattr(e, "signum", 0)
        return 128 + signum if signum else 1


def check_package_home() -> None:
    """ShadowedPackageError when the `hrsel` Python imported is a folder without `__init__.py` (see above)."""
    package = sys.modules.get("hrsel")
    if package is None or hasattr(package, "__version__"):
        return
    home = Path(__file__).resolve().parent
    found = [str(p) for p in getattr(package, "__path__", []) if Path(p).resolve() != home]
    folder = found[0] if found else "a folder named hrsel"
    raise ShadowedPackageError(
        f"Python imported 'hrsel' from the folder {folder} (it has no __init__.py), not from the hrsel package "
        f"in {home}: `python -m` searches the working folder ({os.getcwd()}) first, so that folder hides the "
        f"package. Run the command from another folder, or rename {folder}")


class StderrHandler(logging.StreamHandler):
    """A handler writing to `sys.stderr` as it is when a record is logged, not as it was when the command
    started: a command run in-process after its stderr was replaced (a notebook cell, a test) still logs."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(fmt: str, *, level: int = logging.INFO) -> None:
    """What `logging.basicConfig(level, format)` does for a command (nothing when the process already
    logs elsewhere), with a handler that follows `sys.stderr`; a second command replaces the first's."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_hrsel_command", False)]:
        root.removeHandler(handler)
    if root.handlers:  # a run's own handlers (`hrsel.engine.logbook`), a caller's
        return
    handler = StderrHandler()
    handler._hrsel_command = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
