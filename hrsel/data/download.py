"""Fetch data set files: download with a progress bar, md5 checks, archive extraction.

Every failure names the URL and the folder where the user can place the file by
hand, so an offline machine gets an actionable message instead of a traceback.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from hrsel.errors import DataError

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


def md5sum(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: str | os.PathLike, md5: str | None) -> bool:
    """True when `path` exists and (if `md5` is given) has that checksum."""
    path = Path(path)
    if not path.is_file():
        return False
    return md5 is None or md5sum(path) == md5


def download_url(url: str, path: str | os.PathLike, *, md5: str | None = None,
                 progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `url` to `path` (atomically via a `.part` file) and verify `md5`.

    A file already at `path` with the right checksum is kept. Raises `DataError`
    naming the URL and the destination folder when the network is unreachable or
    the checksum does not match.
    """
    path = Path(path)
    if check_md5(path, md5):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    log.info("downloading %s -> %s", url, path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(_BLOCK), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        raise DataError(
            f"cannot download {url} ({exc}); this machine may be offline. "
            f"Download it by hand and place it at {path} (folder {path.parent})."
        ) from exc
    if md5 is not None and md5sum(part) != md5:
        got = md5sum(part)
        part.unlink(missing_ok=True)
        raise DataError(
            f"md5 mismatch for {url}: expected {md5}, got {got}; the download is corrupt "
            f"or the file changed upstream. Place a correct copy at {path}."
        )
    os.replace(part, path)
    return path


def extract_archive(archive: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Extract a .zip, .tar, .tar.gz or .tar.xz archive into `destination`."""
    archive, destination = Path(archive), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s -> %s", archive, destination)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(destination)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(destination, filter="data")
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive; delete it and download again")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DataError(f"archive {archive} is corrupt ({exc}); delete it and download again") from exc
    return destination
