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
