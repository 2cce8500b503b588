"""Tissue masks (hrsel.tiling.tissue): the rule against a plain reference, exact patch fractions, the
cache, and every pipeline selecting only on tissue, down to a training run through the command line."""
from __future__ import annotations

import colorsys
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hrsel.io import ArraySource
from hrsel.io.writer import write_pyramid
from hrsel.models import build_pipeline
from hrsel.models.candidates import cell_corners
from hrsel.select.extract import GridGeometry
from hrsel.tasks import TaskSpec
from hrsel.tiling.mask import foreground_mask
from hrsel.tiling.tissue import TissueMask, compute_tissue_mask, tissue_pixels
from hrsel.train import main

from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

GLASS, PINK, PURPLE, PALE = (238, 238, 236), (205, 125, 175), (150, 60, 140), (222, 190, 212)
BLUE_INK, GREEN_INK, BLACK_INK = (40, 60, 170), (40, 150, 60), (22, 20, 25)


def synthetic_thumbnail(seed: int = 0) -> tuple[np.ndarray, dict[str, tuple[slice, slice]]]:
    rng = np.random.default_rng(seed)
    image = np.empty((60, 90, 3), np.uint8)
    image[:] = GLASS
    regions = {"pink": (slice(5, 25), slice(5, 30)), "purple": (slice(30, 50), slice(5, 25)),
               "pale": (slice(30, 50), slice(30, 45)), "blue": (slice(5, 15), slice(40, 85)),
               "green": (slice(20, 28), slice(50, 85)), "black": (slice(35, 55), slice(60, 66))}
    colours = {"pink": PINK, "purple": PURPLE, "pale": PALE, "blue": BLUE_INK, "green": GREEN_INK,
               "black": BLACK_INK}
    for name, (rows, cols) in regions.items():
        image[rows, cols] = colours[name]
    noise = rng.integers(-4, 5, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), regions


def reference_mask(rgb: np.ndarray) -> np.ndarray:
    """The documented rule, pixel by pixel with colorsys, math.log10 and a brute-force Otsu."""
    h, w, _ = rgb.shape
    ink = np.zeros((h, w), bool)
    sats = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            r, g, b = (int(v) for v in rgb[y, x])
            hue, sat, value = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
            sats[y, x] = sat
            degrees = hue * 360
            coloured = sat >= 0.3 and (75 <= degrees <= 250 or degrees >= 350 or degrees <= 20)
            od = [-math.log10(max(v, 1) / 255) for v in (r, g, b)]
            grey_ink = max(od) >= 0.15 and min(od) >= 0.65 * max(od)
            ink[y, x] = coloured or grey_ink or max(r, g, b) < 40
    grey = np.rint(rgb.mean(axis=2)).astype(int)
    values = grey[~ink]
    best, threshold = -1.0, 0
    for t in range(256):  # maximise the between-class variance of {v <= t} and {v > t}
        low, high = values[values <= t], values[values > t]
        if len(low) and len(high):
            between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
            if between > best:
                best, threshold = between, t
    return (((grey <= threshold) & (sats >= 0.07)) | (sats >= 0.1)) & ~ink


def test_mask_matches_the_plain_reference_and_rejects_glass_and_ink():
    thumb, regions = synthetic_thumbnail()
    mask = tissue_pixels(thumb)
    np.testing.assert_array_equal(mask, reference_mask(thumb))
    for name in ("pink", "purple", "pale"):
        assert mask[regions[name]].all(), f"{name} tissue lost"
    for name in ("blue", "green", "black"):
        assert not mask[regions[name]].any(), f"{name} ink kept"
    assert mask.sum() == sum(mask[regions[n]].size for n in ("pink", "purple", "pale")), "glass kept"
    grey_only = foreground_mask(thumb)  # plain grey-level Otsu keeps the ink
    assert grey_only[regions["blue"]].all() and grey_only[regions["black"]].all()


# ---- pen ink of every colour, on glass and over H&E-like tissue -----------------------------------

# An H&E-like thumbnail made as light passes a slide (Beer-Lambert: absorbances add): glass, then
# stains of Macenko's reference H&E optical densities (real slides' mean stain vectors), then pen
# ink, each ink a transmittance per channel (what fraction of R, G, B it lets through).
H_OD, E_OD = np.array([0.5626, 0.7201, 0.4062]), np.array([0.2159, 0.8012, 0.5581])
INKS = {"black": (0.27, 0.27, 0.3), "dark_blue": (0.15, 0.2, 0.45), "green": (0.25, 0.6, 0.3),
        "red": (0.8, 0.15, 0.2), "blue": (0.2, 0.35, 0.8)}


def he_slide_thumbnail(seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(96, 160, 3) uint8: an ellipse of tissue, eosin from pale (left) to dense (right), a nuclei-dense
    blob (haematoxylin up to 1.0: dark purple), and one 6-px stroke per ink from glass across the tissue."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:160]
    tissue = ((xx - 80) / 70.0) ** 2 + ((yy - 48) / 44.0) ** 2 < 1
    eosin = np.where(tissue, 0.25 + 0.45 * xx / 160, 0.0)
    cx, cy = 50 + 10 * seed, 44 + 4 * seed
    nuclei = np.where(tissue, np.exp(-((xx - cx) / 14.0) ** 2 - ((yy - cy) / 12.0) ** 2), 0.0)
    rgb = np.array([238.0, 238.0, 236.0]) * 10.0 ** -(eosin[..., None] * E_OD + nuclei[..., None] * H_OD)
    parts = {"tissue": tissue, "dense": tissue & (nuclei > 0.6)}
    for i, (name, transmittance) in enumerate(INKS.items()):
        stroke = np.zeros_like(tissue)
        stroke[6 + 18 * i:12 + 18 * i] = True
        rgb[stroke] *= transmittance
        parts[name] = stroke
    inked = np.any([parts[name] for name in INKS], axis=0)
    parts["tissue"], parts["dense"] = tissue & ~inked, parts["dense"] & ~inked
    parts["glass"] = ~tissue & ~inked
    noisy = rgb + rng.normal(0, 1, rgb.shape)  # a thumbnail averages many pixels: little noise
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), {**parts, "under_ink": tissue}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ink_of_every_colour_is_left_out_and_stained_tissue_kept(seed):
    thumb, parts = he_slide_thumbnail(seed)
    mask = tissue_pixels(thumb)
    for name in INKS:
        on_glass = mask[parts[name] & ~parts["under_ink"]]
        assert on_glass.mean() <= 0.01, f"{name} ink on glass kept as tissue ({on_glass.mean():.0%})"
    for name in ("black", "green", "red", "blue"):  # dark blue over eosin looks like haematoxylin: see the doc
        over = mask[parts[name] & parts["under_ink"]]
        assert over.mean() <= 0.05, f"{name} ink over tissue kept as tissue ({over.mean():.0%})"
    assert mask[parts["tissue"]].mean() >= 0.99, "H&E tissue lost"
    assert mask[parts["dense"]].mean() >= 0.97 and parts["dense"].sum() > 100, "nuclei-dense tissue lost"
    assert mask[parts["glass"]].mean() <= 0.01, "glass kept"


def test_patches_under_black_ink_are_no_candidates_and_every_grid_uses_the_one_rule():
    """The QC mask, a pipeline's candidate cells and PatchGrid.for_source (hrsel.features, camelyon16 grids)
    all come from one function: black ink over tissue, where a trained model scored p = 0.99, is on none."""
    from hrsel.tiling import PatchGrid

    thumb, parts = he_slide_thumbnail(0)
    source = ArraySource(np.repeat(np.repeat(thumb, 4, 0), 4, 1))  # 640 x 384, the thumbnail at 1/4
    mask = compute_tissue_mask(source, max_size=160, min_fraction=0.5)
    grid = PatchGrid.for_source(source, patch_size=24, min_tissue_fraction=0.5, mask_size=160)
    full = PatchGrid.for_source(source, patch_size=24)
    np.testing.assert_array_equal(grid.indices, np.flatnonzero(mask.candidates(full.coords, 24)))
    black_rows = np.flatnonzero(parts["black"].any(axis=1)) * 4  # the stroke: image rows 24..47
    on_black = (full.coords[:, 1] == black_rows[0]) & (full.coords[:, 0] >= 80) & (full.coords[:, 0] <= 536)
    assert on_black.sum() >= 15 and not np.isin(np.flatnonzero(on_black), grid.indices).any(), \
        "a patch under black ink is still a candidate"
    plain = foreground_mask(thumb)  # what PatchGrid.with_mask used before: grey-level Otsu, ink kept
    assert plain[parts["black"]].mean() > 0.9


def test_fractions_are_exact_against_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) < 0.4
    d = 4  # image pixels per mask pixel
    tissue = TissueMask(mask, (53 * d, 37 * d))
    full = np.repeat(np.repeat(mask, d, 0), d, 1).astype(float)  # the mask at image resolution
    pad = 64
    padded = np.pad(full, pad)
    corners = rng.integers(-40, 53 * d + 10, (300, 2))
    sizes = rng.integers(1, 60, 300)
    got = np.array([tissue.fractions(c[None], int(s))[0] for c, s in zip(corners, sizes)])
    want = np.array([padded[y + pad:y + pad + s, x + pad:x + pad + s].sum() / s ** 2
                     for (x, y), s in zip(corners, sizes)])
    np.testing.assert_allclose(got, want, atol=1e-9)
    batched = tissue.fractions(corners, 17)  # all at once, one patch size
    np.testing.assert_allclose(batched, [padded[y + pad:y + pad + 17, x + pad:x + pad + 17].sum() / 289
                                         for x, y in corners], atol=1e-9)


def test_patches_partly_under_ink_are_no_candidates_however_much_tissue_they_hold():
    """A patch two-thirds tissue and one-third ink passes min_fraction 0.5 on its tissue alone; its ink
    share (over max_ink_fraction, 0.1) rules it out. Ink fractions are exact like tissue fractions."""
    tissue = np.zeros((40, 40), bool)
    tissue[:, :30] = True
    ink = np.zeros((40, 40), bool)
    ink[:, 20:30] = True  # a vertical stroke over the right part of the tissue
    tissue &= ~ink
    with_ink = TissueMask(tissue, (160, 160), 0.5, ink=ink)
    without = TissueMask(tissue, (160, 160), 0.5)
    corners = np.array([[0, 0], [40, 0], [52, 0], [76, 0], [120, 0]], float)  # patches of 60 image pixels
    np.testing.assert_allclose(with_ink.fractions(corners, 60), [1, 0.6667, 0.4667, 0.0667, 0], atol=1e-3)
    np.testing.assert_allclose(with_ink.ink_fractions(corners, 60), [0, 0.3333, 0.5333, 0.6667, 0], atol=1e-3)
    np.testing.assert_array_equal(without.candidates(corners, 60), [True, True, False, False, False])
    np.testing.assert_array_equal(with_ink.candidates(corners, 60), [True, False, False, False, False])
    assert without.ink_fractions(corners, 60).sum() == 0
    assert TissueMask(tissue, (160, 160), ink=np.zeros_like(ink)).ink is None  # no ink seen: nothing to check


def test_save_load_key_and_picture(tmp_path):
    thumb, _ = synthetic_thumbnail()
    source = ArraySource(np.repeat(np.repeat(thumb, 4, 0), 4, 1))
    mask = compute_tissue_mask(source, max_size=90, min_fraction=0.25)
    assert mask.image_size == (360, 240) and mask.mask.shape == (60, 90)
    mask.save(tmp_path / "m.npz", key="a")
    back = TissueMask.load(tmp_path / "m.npz", min_fraction=0.25, key="a")
    np.testing.assert_array_equal(back.mask, mask.mask)
    assert back.image_size == mask.image_size and back.min_fraction == 0.25
    assert mask.ink is not None and mask.ink.any()  # the thumbnail's pen strokes
    np.testing.assert_array_equal(back.ink, mask.ink)
    assert TissueMask.load(tmp_path / "m.npz", key="another image") is None
    assert TissueMask.load(tmp_path / "absent.npz") is None
    picture = mask.save_picture(thumb, tmp_path / "m.png", title="qc")
    assert picture.stat().st_size > 0


# ---- pipelines: only candidate cells ---------------------------------------------------------

LIGHT = dict(in_chans=3, backbone="narrow_resnet", backbone_options={"width": 8, "strides": (2, 2), "blocks": (1, 1)})
SMALL = {
    "ips": dict(LIGHT, patch_size=16, k=3, score_chunk=5,
                aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 16}),
    "dps": dict(LIGHT, patch_size=16, k=3, downscale=2, num_samples=10),
    "dps_candidates": dict(LIGHT, patch_size=16, k=2, num_candidates=5, downscale=1, num_samples=10,
                           score_chunk=6),
    "ats": dict(LIGHT, patch_size=16, k=3, downscale=2),
    "patchdrop": dict(LIGHT, patch_size=16, downscale=2),
}


def island_images(n: int = 2) -> tuple[torch.Tensor, list[TissueMask]]:
    """(n, 3, 96, 96) glass with a different tissue island per image, and each image's mask (1 px per 4)."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(n):
        image = np.full((96, 96, 3), 236, np.uint8)
        mask = np.zeros((24, 24), bool)
        y, x = 16 + 32 * i, 16 + 16 * i
        image[y:y + 32, x:x + 48] = rng.integers(60, 200, (32, 48, 3))
        mask[y // 4:(y + 32) // 4, x // 4:(x + 48) // 4] = True
        images.append(image)
        masks.append(TissueMask(mask, (96, 96), min_fraction=0.5))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), masks


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("training", [True, False])
def test_pipelines_select_only_on_tissue(name, training):
    torch.manual_seed(0)
    images, masks = island_images()
    pipeline = build_pipeline(name, tasks={"y": TaskSpec("multiclass", 3)}, **SMALL[name]).train(training)
    out = pipeline(images, tissue=masks)
    n = out.scores.shape[1]
    side = int(round(n ** 0.5))
    geometry = (GridGeometry.regular((96, 96), patch_size=16) if name in ("ips", "dps_candidates", "patchdrop")
                else GridGeometry.centred((96, 96), (side, side), patch_size=16))
    assert geometry.num_patches == n
    for b, mask in enumerate(masks):
        on = mask.candidates(cell_corners(geometry), geometry.patch_size)
        assert 0 < on.sum() < n
        chosen = out.indices[b][out.indices[b] >= 0].numpy()
        assert len(chosen) and on[chosen].all(), f"{name}: a selected patch lies off tissue"
        scores = out.scores[b].numpy()
        assert np.isnan(scores[~on]).all(), "the score map must be NaN off tissue"
        if name in ("ips", "dps_candidates"):
            assert np.isfinite(scores[on]).all()
    out.logits["y"].sum().backward()  # the gradient pass still works


def test_ips_streams_only_tissue_cells_and_cnn_ignores_masks():
    images, masks = island_images()
    ips = build_pipeline("ips", tasks={"y": TaskSpec("multiclass", 3)}, **SMALL["ips"])
    encoded = []  # patches handed to the encoder: the scoring pass (which may encode a blank patch once) + M
    ips.classifier.backbone.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
    scoring = ips.classifier.encode_for_scoring

    def count_scored(patches, **kwargs):
        encoded.append(patches.shape[0] * patches.shape[1])
        return scoring(patches, **kwargs)

    ips.classifier.encode_for_scoring = count_scored
    with torch.no_grad():
        out = ips.eval()(images, tissue=masks)
    tissue_cells = sum(int(m.candidates(cell_corners(GridGeometry.regular((96, 96), patch_size=16)), 16).sum())
                       for m in masks)
    selected = int((out.indices >= 0).sum())
    assert sum(encoded) == tissue_cells + selected, "IPS must encode only the tissue cells (+ the M re-read)"
    assert out.stats["patches_scored"] == tissue_cells / 2
    cnn = build_pipeline("cnn", tasks={"y": TaskSpec("multiclass", 3)}, **LIGHT)
    assert cnn(images, tissue=masks).logits["y"].shape == (2, 3)


def test_ips_with_fewer_tissue_cells_than_m_keeps_every_cell(caplog):
    """As the other pipelines: one tissue cell and M = 3 must not become a selection of one patch (a
    slide with a speck of tissue and data.batch_size 1 then fed BatchNorm a single patch)."""
    images, _ = island_images(1)
    speck = np.zeros((24, 24), bool)
    speck[4:8, 4:8] = True  # exactly the cell at x 16, y 16
    mask = TissueMask(speck, (96, 96), min_fraction=0.5)
    assert int(mask.candidates(cell_corners(GridGeometry.regular((96, 96), patch_size=16)), 16).sum()) == 1
    ips = build_pipeline("ips", tasks={"y": TaskSpec("multiclass", 3)}, **SMALL["ips"]).eval()
    with torch.no_grad():
        out = ips(images, tissue=[mask])
    assert int((out.indices >= 0).sum()) == 3 and np.isfinite(out.scores.numpy()).all()
    assert "fewer than the 3 to select: every cell stays a candidate" in caplog.text


# ---- through the command line: a manifest of slides with tissue islands on glass -------------------

def write_slide(path: Path, islands: list[tuple[int, int]], *, seed: int, pen: bool) -> None:
    """256 x 256 glass, 64 x 64 tissue islands at (x, y), optionally a blue pen stroke off the tissue."""
    rng = np.random.default_rng(seed)
    image = np.full((256, 256, 3), 236, np.uint8)
    for x, y in islands:
        image[y:y + 64, x:x + 64] = np.clip(np.array(PURPLE) + rng.integers(-30, 30, (64, 64, 3)), 0, 255)
    if pen:
        image[200:214, 0:120] = BLUE_INK
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, image, levels=2, tile=128, compression="jpeg")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tissue_slides")
    rows = [("slides/a.tif", "tumor", "train", [(32, 32), (160, 96)]),
            ("slides/b.tif", "normal", "val", [(96, 32)]),
            ("slides/c.tif", "tumor", "test", [(32, 128), (160, 32)])]
    for i, (rel, _, _, islands) in enumerate(rows):
        write_slide(root / rel, islands, seed=i, pen=i != 1)
    (root / "slides.csv").write_text("path,label,split\n" + "".join(f"{r},{l},{s}\n" for r, l, s, _ in rows))
    return root


RUNS = {
    "ips": ["model.name=ips", "model.k=3", "model.score_chunk=8",
            "model.aggregator_options={heads: 2, head_dim: 4, mlp_dim: 16, dropout: 0.0}"],
    "dps_candidates": ["model.name=dps_candidates", "model.k=2", "model.num_candidates=4",
                       "model.downscale=2", "model.num_samples=8", "model.aggregator=mean",
                       "model.scorer_options={}"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_training_run_selects_only_on_tissue(name, slides, tmp_path, capsys):
    from hrsel.data.manifest import ManifestDataset
    from hrsel.inference import load_model

    config = tmp_path / "tissue.yaml"
    config.write_text(f"""
experiment: tissue_{name}
device: cpu
data: {{name: manifest, root: {slides}, manifest: slides.csv, tissue: true, min_tissue_fraction: 0.5,
        tissue_cache: {tmp_path / 'masks'}, batch_size: 1, eval_batch_size: 1}}
model: {{in_chans: 3, patch_size: 32, backbone: narrow_resnet,
         backbone_options: {{width: 8, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1]}}}}
optim: {{lr: 0.001}}
train: {{epochs: 1, progress_bar: false}}
eval: {{pictures: 1, metric: label/accuracy}}
""")
    code = main([str(config), *RUNS[name], f"--output-dir={tmp_path / 'runs'}"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 3, "one cached mask per slide"
    assert len(list((tmp_path / "masks").glob("*_tissue.png"))) == 3, "one QC picture per slide"
    with open(tmp_path / "runs" / f"tissue_{name}" / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["patches_scored"]) == 8, "training streams the 8 tissue cells of slide a, not all 64"
    model = load_model(tmp_path / "runs" / f"tissue_{name}")
    geometry = GridGeometry.regular((256, 256), patch_size=32)
    for split in ("train", "val", "test"):
        data = ManifestDataset(root=slides, split=split, manifest="slides.csv", tissue=True,
                               tissue_cache=str(tmp_path / "masks"))
        item = data[0]
        on = item["tissue"].candidates(cell_corners(geometry), 32)
        assert 4 <= on.sum() <= 8, f"{item['id']}: {on.sum()} tissue cells (islands of 2 x 2 cells)"
        for training in (True, False):
            model.pipeline.train(training)
            with torch.no_grad():
                out = model.pipeline([item["image"]], tissue=[item["tissue"]])
            chosen = out.indices[0][out.indices[0] >= 0].numpy()
            assert len(chosen) and on[chosen].all(), f"{item['id']}: a selected patch lies on glass or ink"
            assert np.isnan(out.scores[0].numpy()[~on]).all()
    if name == "ips":  # predict computes the same masks (the run's data.tissue) and scores only tissue
        from hrsel.inference import predict_sources

        result = predict_sources(model, [slides / "slides.csv"], out_dir=tmp_path / "preds", pictures=False)
        assert len(result.rows) == 3 and len(list((tmp_path / "preds" / "tissue").glob("*.npz"))) == 3


def test_camelyon_items_carry_cached_masks(tmp_path):
    from fixtures_data import make_camelyon

    from hrsel.data.camelyon import Camelyon16

    root = make_camelyon(tmp_path / "c16")
    item = Camelyon16(root=root, split="train", tissue=True, min_tissue_fraction=0.25)[0]
    mask = item["tissue"]
    assert mask.image_size == (512, 384) and mask.min_fraction == 0.25
    assert 0.2 < mask.tissue_share < 0.3  # make_slide's block: 256 x 192 of 512 x 384 pixels
    assert (root / "tissue_masks" / f"{item['id']}.npz").is_file()
    assert (root / "tissue_masks" / f"{item['id']}_tissue.png").is_file()
