"""hrsel: recognise what is in huge images by looking at a few patches.

Importing the package is cheap: torch, numba and the readers load only when a
submodule that needs them is imported.
"""
from hrsel.errors import (
    ChannelMismatchError,
    CheckpointError,
    ConfigError,
    DataError,
    HrselError,
    ImageReadError,
    ImageTooLargeError,
    PixelTypeError,
    RunFolderError,
    RunWriteError,
    SelectionError,
    ShadowedPackageError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HrselError",
    "ImageReadError",
    "ImageTooLargeError",
    "PixelTypeError",
    "RunFolderError",
    "RunWriteError",
    "SelectionError",
    "ShadowedPackageError",
    "UnsupportedFormatError",
    "__version__",
    "load_model",
]


def __getattr__(name: str):
    if name == "load_model":  # lazily: importing hrsel stays cheap (no torch)
        from hrsel.inference.load import load_model

        return load_model
    raise AttributeError(f"module 'hrsel' has no attribute {name!r}")
