"""hrsel: recognise what is in huge images by looking at a few patches.

Importing the package is cheap: torch, numba and the readers load only when a
submodule that needs them is imported.
"""
from hrsel.errors import (
    ConfigError,
    DataError,
    HrselError,
    ImageReadError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "HrselError",
    "ImageReadError",
    "UnsupportedFormatError",
    "__version__",
]
