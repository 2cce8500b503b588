"""Reading the small JSON files of data sets (parameters, labels, annotations) with named errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hrsel.errors import DataError


def read_json(path: Path, *, fix: str) -> Any:
    """The parsed content of `path`; an unreadable file or invalid JSON is a DataError naming the
    file (and the line) and ending with `fix`, e.g. "regenerate the data set"."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; {fix}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); {fix}") from exc
