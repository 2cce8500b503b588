"""Image sources: one lazy, picklable, thread-safe protocol over every backend.

numpy only; each backend imports its library (openslide, zarr, tifffile, PIL)
when it first opens a file.
"""
from hrsel.io.array import ArraySource
from hrsel.io.base import ImageSource, Pyramid
from hrsel.io.factory import BACKENDS, open_image
from hrsel.io.pillow import PillowSource
from hrsel.io.slide import OpenSlideSource
from hrsel.io.tiff import TiffSource
from hrsel.io.zarr_source import ZarrSource

__all__ = [
    "BACKENDS",
    "ArraySource",
    "ImageSource",
    "OpenSlideSource",
    "PillowSource",
    "TiffSource",
    "Pyramid",
    "ZarrSource",
    "open_image",
]
