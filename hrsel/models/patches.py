"""A batch of images seen through a patch grid: in-memory tensors or lazy `hrsel.io` sources.

Pipelines never materialise a full-resolution float image of a lazy source: they stream
chunks of grid patches (`hrsel.tiling.stream_patches`, read ahead by threads), read
chunks at random (one region per grid row segment), gather chosen patches, or build a
downscaled copy band by band. Memory is O(chunk) or O(downscaled image).
All patches come back as float on `device`: pixels (uint8, uint16 or float32, one channel per
band) become float once, here, by the batch's `BandNormalizer` (`hrsel.io.bands`): the one its
sources carry (`source.band_norm`, from `data.band_norm`), else the dtype's default (uint8 / 255,
the fast path; uint16 / 65535; float as is).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hrsel.errors import ChannelMismatchError, PixelTypeError, SelectionError
from hrsel.io.bands import to_float
from hrsel.select.extract import GridGeometry, grid_chunk


def _is_source(x: Any) -> bool:
    return hasattr(x, "read_region") and hasattr(x, "dimensions")


_to_float = to_float  # (..., C, h, w) pixels -> float, with an optional BandNormalizer (hrsel.io.bands)


def host_to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pixels (still uint8: 4x less to copy than float) to `device`; to a GPU through pinned memory
    without blocking, so that the copy overlaps the GPU's work and the reader threads run ahead."""
    if device.type == "cuda" and pixels.device.type == "cpu":
        return pixels.pin_memory().to(device, non_blocking=True)
    return pixels.to(device)


def source_normalizer(sources: Sequence[Any]) -> Any:
    """The `BandNormalizer` of a batch of sources: the first one's `band_norm`, else its dtype's default."""
    from hrsel.io.bands import default_normalizer

    carried = getattr(sources[0], "band_norm", None)
    if carried is not None:
        return carried
    dtype = getattr(sources[0], "dtype", np.dtype(np.uint8))
    return None if dtype == np.uint8 else default_normalizer(dtype)  # None: the uint8 fast path


def check_channels(images: torch.Tensor | Sequence[Any], *, in_chans: int) -> None:
    """`ChannelMismatchError` naming the first image (a (B, C, H, W) tensor or sources) whose
    channel count is not the model's `in_chans`; reads no pixels."""
    if isinstance(images, torch.Tensor):
        named = [(f"images tensor of shape {tuple(images.shape)}", int(images.shape[1]))]
    else:
        named = [(repr(source), source.channels) for source in images]
    wrong = [(name, channels) for name, channels in named if channels != in_chans]
    if not wrong:
        return
    name, channels = wrong[0]
    among = f" ({len(wrong)} of the {len(named)} images of the batch differ)" if len(named) > 1 else ""
    raise ChannelMismatchError(
        f"{name} has {channels} channel(s) but the model was built with in_chans={in_chans}{among}. Fix: "
        f"convert the image to {in_chans} channel(s) (gray -> RGB, drop an extra band) or set the config key "
        f"model.in_chans: {channels}"
    )


def with_coordinate_channels(images: Any) -> torch.Tensor:
    """(B, C, H, W) -> (B, C + 2, H, W) float: the image in [0, 1] plus x and y in [0, 1].

    DPS's "concat. position" baselines: the position becomes visible to a network that
    otherwise only sees pixels. In-memory images only (a lazy source has no channels to add).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError("coord_channels=True needs in-memory (B, C, H, W) images, not lazy sources; "
                         "load the images as tensors (the data set's as_source=False) or turn it off")
    b, _, h, w = images.shape
    ys = torch.linspace(0, 1, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(0, 1, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([_to_float(images), xs, ys], dim=1)


class ImageBatch:
    """B images of one size: a (B, C, H, W) tensor (uint8, uint16 or float) or a list of sources.

    With `in_chans` (the model's), an image of another channel count raises `ChannelMismatchError`
    naming it, before any pixel is read or any layer runs. `normalizer` (a `hrsel.io.bands.BandNormalizer`)
    turns pixels into float; by default the sources' own (`source_normalizer`) or the dtype's.
    """

    def __init__(self, images: torch.Tensor | Sequence[Any], *, device: torch.device | str | None = None,
                 in_chans: int | None = None, normalizer: Any = None):
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
            if images.shape[0] == 0:
                raise SelectionError(f"images is an empty batch (shape {tuple(images.shape)}); pass at least one image")
            self.tensor, self.sources = images, None
            self.batch_size, self.channels = images.shape[:2]
            self.image_hw = tuple(images.shape[-2:])
            self.device = torch.device(device) if device is not None else images.device
        else:
            sources = list(images)
            if not sources or not all(_is_source(s) for s in sources):
                raise ValueError("images must be a (B, C, H, W) tensor or a non-empty list of hrsel.io ImageSource")
            sizes = {s.dimensions for s in sources}
            if len(sizes) != 1:
                raise ValueError(f"all images of a batch must have one size, got (width, height) {sorted(sizes)}; "
                                 "use batch size 1 or resize")
            (w, h), = sizes
            self.tensor, self.sources = None, sources
            self.batch_size, self.channels, self.image_hw = len(sources), sources[0].channels, (h, w)
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        if in_chans is not None:
            check_channels(images if self.sources is None else self.sources, in_chans=in_chans)
        if normalizer is None and self.sources is not None:
            normalizer = source_normalizer(self.sources)
        self.normalizer = normalizer
        self._padded: dict[GridGeometry, tuple[torch.Tensor, tuple[int, int]]] = {}

    @property
    def is_lazy(self) -> bool:
        return self.sources is not None

    # ---- grid patches --------------------------------------------------------------------
    def chunk(self, geometry: GridGeometry, start: int, stop: int) -> torch.Tensor:
        """Patches start..stop-1 of the grid -> (B, n, C, p, p) float."""
        if not self.is_lazy:
            if geometry not in self._padded:  # pad the (uint8) image once per grid
                self._padded = {geometry: geometry.pad_image(self.tensor)}
            padded, offset = self._padded[geometry]
            return self._to_float(host_to_device(grid_chunk(padded, geometry, offset, start, stop), self.device))
        return self._to_float(torch.stack([self._source_chunk(s, geometry, start, stop) for s in self.sources]))

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return _to_float(x, self.normalizer)
        except PixelTypeError as error:  # float pixels outside [0, 1] without data.band_norm: name the images
            names = ", ".join(repr(s) for s in self.sources) if self.is_lazy else "the images tensor"
            raise PixelTypeError(f"{names}: {error}") from None

    def _source_chunk(self, source: Any, geometry: GridGeometry, start: int, stop: int) -> torch.Tensor:
        """One region read per grid row segment, sliced into patches: (n, C, p, p) of the source's dtype."""
        p, cols = geometry.patch_size, geometry.shape[1]
        (sy, sx), (py, px) = geometry.stride, geometry.padding
        parts = []
        for row in range(start // cols, (stop - 1) // cols + 1):
            c_lo, c_hi = max(start - row * cols, 0), min(stop - row * cols, cols)
            x0 = c_lo * sx - px
            band = source.read_region(x0, row * sy - py, (c_hi - c_lo - 1) * sx + p, p)  # (p, width, C)
            strip = torch.from_numpy(np.ascontiguousarray(band)).permute(2, 0, 1)  # (C, p, width)
            parts.append(strip.unfold(2, p, sx).permute(2, 0, 1, 3))  # (n, C, p, p)
        return host_to_device(torch.cat(parts), self.device)

    def chunks(self, geometry: GridGeometry, chunk_size: int,
               cells: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (indices (B, n) int64, patches (B, n, C, p, p)) over the whole grid in raster order.

        `cells` (n,) int64: only those grid cells (the same for every image of the batch, e.g. the
        tissue candidates of a one-image batch), in the given order; indices are still grid cells.
        Lazy sources are streamed: reader threads fetch the next chunks while the caller works.
        """
        if self.is_lazy:
            yield from self._streamed_chunks(geometry, chunk_size, cells)
            return
        if cells is not None:
            for start in range(0, len(cells), chunk_size):
                idx = cells[start:start + chunk_size].to(self.device).expand(self.batch_size, -1)
                yield idx, self.gather(geometry, idx)
            return
        n = geometry.num_patches
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            idx = torch.arange(start, stop, device=self.device).expand(self.batch_size, -1)
            yield idx, self.chunk(geometry, start, stop)

    def _streamed_chunks(self, geometry: GridGeometry, chunk_size: int,
                         cells: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from hrsel.tiling import PatchGrid, stream_patches

        cells = torch.arange(geometry.num_patches) if cells is None else cells.cpu()
        corners = geometry.top_left(cells).flip(-1).numpy()  # (n, 2) (x, y)
        streams = [
            stream_patches(source, PatchGrid.from_corners(corners, image_size=source.dimensions,
                                                          patch_size=geometry.patch_size, stride=geometry.stride[1]),
                           chunk_size=chunk_size)
            for source in self.sources
        ]
        try:
            for parts in zip(*streams):  # the same chunk of every image
                idx = cells[torch.from_numpy(parts[0].indices)].to(self.device).expand(self.batch_size, -1)
                yield idx, self._to_float(host_to_device(torch.stack([part.patches for part in parts]), self.device))
        finally:
            for stream in streams:
                stream.close()  # stops the reader threads when the caller stops early

    def gather(self, geometry: GridGeometry, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) patch indices (-1 = absent, zeros) -> (B, K, C, p, p) float."""
        p = geometry.patch_size
        safe = indices.clamp_min(0).cpu()
        corners = geometry.top_left(safe).tolist()  # (B, K, 2) (y, x)
        if not self.is_lazy:
            padded, (oy, ox) = self._padded.get(geometry) or geometry.pad_image(self.tensor)
            rows = [torch.stack([padded[b, :, y + oy:y + oy + p, x + ox:x + ox + p] for y, x in row])
                    for b, row in enumerate(corners)]
        else:
            from hrsel.tiling import read_patches

            rows = [read_patches(source, [(x, y) for y, x in row], p, workers=2)
                    for source, row in zip(self.sources, corners)]
        out = self._to_float(host_to_device(torch.stack(rows), self.device))
        return out * (indices >= 0).to(out.dtype).to(self.device)[..., None, None, None]

    # ---- whole image ---------------------------------------------------------------------
    def downscaled(self, factor: int, *, band_rows: int = 64) -> torch.Tensor:
        """Block-mean downscale by an integer factor -> (B, C, H // factor, W // factor) float.

        Lazy sources are read band by band from the deepest pyramid level that fits.
        """
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"downscale factor must be a positive int, got {factor!r}")
        h, w = self.image_hw
        out_h, out_w = h // factor, w // factor
        if out_h < 1 or out_w < 1:
            raise ValueError(f"downscale factor {factor} is larger than the image (height, width)={self.image_hw}")
        if not self.is_lazy:
            rows = [self.tensor[:, :, y * factor:(y + band_rows) * factor, :out_w * factor]
                    for y in range(0, out_h, band_rows)]
            bands = [F.avg_pool2d(self._to_float(band), factor) for band in rows]
            return torch.cat(bands, dim=2).to(self.device)
        return torch.stack([self._source_downscaled(s, factor, out_h, out_w, band_rows) for s in self.sources])

    def _source_downscaled(self, source: Any, factor: int, out_h: int, out_w: int, band_rows: int) -> torch.Tensor:
        level = source.get_best_level_for_downsample(factor)
        ds = source.level_downsamples[level]
        rest = max(1, int(round(factor / ds)))  # remaining block size at that level
        bands = []
        for y in range(0, out_h, band_rows):
            rows = min(band_rows, out_h - y)
            region = source.read_region(0, int(y * factor), out_w * rest, rows * rest, level)  # (h, w, C)
            band = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)[None]
            bands.append(F.avg_pool2d(self._to_float(band), rest)[0])
        return torch.cat(bands, dim=1).to(self.device)  # (C, out_h, out_w)

    def full(self, *, downscale: int = 1) -> torch.Tensor:
        """The whole image as (B, C, H', W') float (optionally downscaled); O(image) memory."""
        if downscale == 1 and not self.is_lazy:
            return self._to_float(self.tensor).to(self.device)
        return self.downscaled(downscale)
