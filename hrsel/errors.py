"""Every error hrsel raises on bad input derives from `HrselError`.

Messages name the offending path, key, value or shape, say what is valid and
how to fix it.
"""


class HrselError(Exception):
    """Base class of hrsel's own errors."""


class ImageReadError(HrselError, OSError):
    """An image exists but cannot be read (missing, truncated, corrupt, bad level or region)."""


class UnsupportedFormatError(ImageReadError):
    """No backend can open this file."""


class DataError(HrselError, ValueError):
    """A data set file is missing or malformed (names the file and line)."""


class ConfigError(HrselError, ValueError):
    """A configuration key or value is invalid (names the key and the closest valid one)."""


class SelectionError(HrselError, ValueError):
    """An input to a selection operator is invalid (names the argument, the batch row and the shape)."""


class RunWriteError(HrselError, OSError):
    """A file of a run folder (last.pt, best.pt, metrics.csv) cannot be written; the previous one is intact."""


class RunFolderError(HrselError):
    """A run folder, or the --out of predict / features, is busy (locked by a running run), already holds a
    finished run, is not a (run) folder, or cannot be written (read-only, disk full); names it and the fix."""


class CheckpointError(HrselError):
    """A checkpoint file is missing, truncated, empty, foreign or does not fit the pipeline (names the file)."""


class PixelTypeError(UnsupportedFormatError):
    """An image's pixel type or value range is not one hrsel reads (names the file, dtype, range and the fix)."""


class ImageTooLargeError(ImageReadError):
    """Decoding, thumbnailing or tiling an image would exceed a set bound (names the size, the bound, the fix)."""


class ChannelMismatchError(HrselError, ValueError):
    """An image's channel count differs from the model's in_chans (names the image, both counts and the fix)."""


class ShadowedPackageError(HrselError, ImportError):
    """`python -m hrsel.<command>` imported a `hrsel/` folder of the working folder instead of the package
    (names the folder, the package and the fix)."""
