"""Reading the CSV files people write (manifests, label tables) as UTF-8, with a named error otherwise.

    rows = csv.reader(io.StringIO(read_csv_text(path), newline=""))

Spreadsheets often save CSV as Latin-1 or Windows-1252: `read_csv_text` names the file, the
line and the byte that is not UTF-8, and says how to save it as UTF-8. A byte-order mark
(Excel's "CSV UTF-8") is dropped.
"""
from __future__ import annotations

import os
from pathlib import Path

from hrsel.errors import DataError


def read_csv_text(path: str | os.PathLike) -> str:
    """The text of the file at `path`, decoded as UTF-8 (BOM dropped); DataError naming file and line if not."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: line {line}, column {column}: byte 0x{raw[e.start]:02x} is not UTF-8 (the file "
                        f"was saved as Latin-1 / Windows-1252?); save it as UTF-8 (a spreadsheet's 'CSV UTF-8', "
                        f"or iconv -f latin1 -t utf-8 old.csv > new.csv)") from None
