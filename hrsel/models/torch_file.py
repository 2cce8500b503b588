"""Read a torch file without running code: `torch.load(weights_only=True)` with named errors.

    state = load_weights_only("runs/mnist/best.pt", advice=". Train the run again")

Every checkpoint hrsel reads goes through here (resume, load_model, PatchDrop's
classifier_checkpoint / policy_checkpoint). A pickle that holds Python objects other than
tensors, numbers, strings and plain containers is refused before anything in it runs, with a
`CheckpointError` that says so; an empty, truncated or foreign file gets one naming its size.
`advice` ends both messages (which other file to use, what to do).
"""
from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from hrsel.errors import CheckpointError


def load_weights_only(path: str | os.PathLike, *, advice: str = "") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; CheckpointError naming `path` on failure."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: named below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise holds_objects(path, f"torch.load(weights_only=True) said: {unpickling_cause(e)}", advice) from None
        imports = pickled_globals(path)
        if imports:  # a plain pickle (not torch's zip) that would import and call these
            raise holds_objects(path, f"unpickling it would import {', '.join(imports[:5])}", advice) from None
        raise unreadable(path, e, advice, said=unpickling_cause(e)) from None
    except (EOFError, RuntimeError, ValueError, OSError, AttributeError, ImportError, IndexError, KeyError,
            TypeError) as e:
        raise unreadable(path, e, advice) from None


def holds_objects(path: Path, said: str, advice: str = "") -> CheckpointError:
    """The error of a file that would run code when unpickled (a crafted or foreign pickle)."""
    return CheckpointError(
        f"checkpoint {str(path)!r} holds Python objects other than tensors, numbers, strings and plain "
        f"containers, so hrsel does not unpickle it ({said}); it was written by another program or by hrsel "
        f"before checkpoints were weights-only{advice}")


def pickled_globals(path: Path, *, limit: int = 1 << 20) -> list[str]:
    """What the first pickle of a plain (non-zip) pickle file would import ("module.name"), read with
    pickletools without unpickling anything; [] for torch's zip format or a file that is no pickle."""
    if zipfile.is_zipfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read(limit)
    if not data.startswith(b"\x80"):  # PROTO: every pickle of protocol 2 or later
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
    except ValueError:  # cut short: report what was read
        pass
    return found


def unreadable(path: Path, error: BaseException, advice: str = "", *, said: str = "") -> CheckpointError:
    """The error of a file torch cannot read: empty, or truncated / corrupt / foreign (with its size)."""
    size = path.stat().st_size
    what = "empty" if size == 0 else f"truncated, corrupt or not a torch checkpoint ({size} bytes)"
    return CheckpointError(f"checkpoint {str(path)!r} cannot be read: the file is {what}; torch.load said: "
                           f"{said or first_line(error)}{advice}")


def unpickling_cause(error: BaseException) -> str:
    """The line of torch's weights_only refusal that names the object (e.g. numpy.core.multiarray._reconstruct)."""
    text = " ".join(str(error).split())
    start = text.find("WeightsUnpickler error:")
    if start < 0:
        return first_line(error)
    cause = text[start:].split(" by default")[0].split(" Check the documentation")[0]
    return cause[:300]


def first_line(error: BaseException) -> str:
    """The error's first sentence (torch's zip reader adds a paragraph of advice after it)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text.split('. ')[0][:200]}"
