"""Shared data pieces: augmentation (eager and lazy), collate, downloads, the registry."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from hrsel.data import DATASETS, augment, build_dataset, download
from hrsel.data.collate import collate
from hrsel.errors import ConfigError, DataError
from hrsel.io import ArraySource


def test_translate_equals_pad_then_crop():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    for dx, dy in [(0, 0), (5, -3), (-7, 4), (29, 0), (-40, 0)]:
        padded = torch.nn.functional.pad(image, (50, 50, 50, 50), value=7)
        reference = padded[:, 50 - dy:50 - dy + 20, 50 - dx:50 - dx + 30]
        torch.testing.assert_close(augment.translate(image, dx, dy, fill=7), reference)


def test_colour_affine_matches_formula_and_clips():
    x = torch.arange(0, 256, dtype=torch.uint8).reshape(1, 16, 16)
    out = augment.colour_affine(x, 1.2, -0.1)
    expected = (x.double() * 1.2 - 25.5).round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(out, expected, atol=1, rtol=0)  # float32 may round x.5 the other way
    assert out[0, 0, 0] == 0 and out[0, -1, -1] == 255 and out[0, 10, 1] == 168  # 161 * 1.2 - 25.5 = 167.7
    np.testing.assert_array_equal(augment.colour_affine(x.numpy(), 1.2, -0.1), out.numpy())
    assert augment.colour_affine(x, 1.0, 0.0) is x


def test_sample_params_ranges_and_probability():
    g = torch.Generator().manual_seed(0)
    draws = [augment.sample_params(g, max_shift=(100, 50), colour_p=0.8) for _ in range(400)]
    assert all(abs(p.dx) <= 100 and abs(p.dy) <= 50 for p in draws)
    coloured = [p for p in draws if (p.a, p.b) != (1.0, 0.0)]
    assert 0.7 < len(coloured) / len(draws) < 0.9
    assert all(0.8 <= p.a <= 1.2 and -0.1 <= p.b <= 0.1 for p in coloured)
    assert max(p.dx for p in draws) > 80 and min(p.dx for p in draws) < -80


def test_augmented_source_reads_what_the_eager_path_computes():
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    params = augment.AugmentParams(dx=7, dy=-5, a=0.9, b=0.05)
    eager = augment.apply_params(image, params, fill=255)  # (3, H, W)
    lazy = augment.AugmentedSource(ArraySource(image.permute(1, 2, 0).numpy()), params)
    assert lazy.dimensions == (60, 40)
    region = lazy.read_region(3, 30, 20, 10)  # (h, w, c)
    np.testing.assert_array_equal(region, eager[:, 30:40, 3:23].permute(1, 2, 0).numpy())
    import pickle

    again = pickle.loads(pickle.dumps(lazy))
    np.testing.assert_array_equal(again.read_region(0, 0, 60, 40), eager.permute(1, 2, 0).numpy())


def test_pad_random_crop_keeps_shape_and_content():
    image = torch.randint(1, 256, (3, 50, 50), dtype=torch.uint8)
    out = augment.pad_random_crop(image, (70, 70), torch.Generator().manual_seed(3))
    assert out.shape == image.shape
    assert (out > 0).sum() >= 3 * 40 * 40  # a shift of at most 10 px each way


def test_collate_stacks_tensors_and_keeps_sources():
    items = [{"image": torch.zeros(1, 4, 5, dtype=torch.uint8), "id": i,
              "targets": {"cls": torch.tensor(i), "multi": torch.ones(3), "bin": torch.tensor(1.0)}}
             for i in range(3)]
    batch = collate(items)
    assert batch["images"].shape == (3, 1, 4, 5) and batch["ids"] == ["0", "1", "2"]
    assert batch["targets"]["cls"].dtype == torch.int64 and batch["targets"]["cls"].tolist() == [0, 1, 2]
    assert batch["targets"]["multi"].shape == (3, 3) and batch["targets"]["bin"].dtype == torch.float32
    src = [dict(items[0], image=ArraySource(np.zeros((4, 5), np.uint8))) for _ in range(2)]
    assert isinstance(collate(src)["images"], list)
    with pytest.raises(DataError, match="different shapes"):
        collate([items[0], dict(items[1], image=torch.zeros(1, 5, 5, dtype=torch.uint8))])
    with pytest.raises(DataError, match="mixes"):
        collate([items[0], src[0]])


def test_download_from_file_url_with_md5(tmp_path):
    source = tmp_path / "payload.zip"
    with zipfile.ZipFile(source, "w") as z:
        z.writestr("inner/a.txt", "hello")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    got = download.download_url(source.as_uri(), tmp_path / "dl" / "p.zip", md5=md5, progress=False)
    assert download.md5sum(got) == md5
    assert (download.extract_archive(got, tmp_path / "x") / "inner" / "a.txt").read_text() == "hello"
    with pytest.raises(DataError, match="md5 mismatch.*p2.zip"):
        download.download_url(source.as_uri(), tmp_path / "dl" / "p2.zip", md5="0" * 32, progress=False)
    assert not (tmp_path / "dl" / "p2.zip").exists() and not (tmp_path / "dl" / "p2.zip.part").exists()
    (tmp_path / "bad.zip").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="bad.zip"):
        download.extract_archive(tmp_path / "bad.zip", tmp_path / "y")


def test_offline_download_names_url_and_folder(tmp_path):
    url = (tmp_path / "nowhere" / "file.bin").as_uri()
    with pytest.raises(DataError, match=r"cannot download .*file.bin.*place it at .*dest") as info:
        download.download_url(url, tmp_path / "dest" / "file.bin", progress=False)
    assert str(tmp_path / "dest") in str(info.value)


def test_registry_names_and_unknown_name():
    names = {"megapixel_mnist", "traffic", "billiard", "camelyon16", "camelyon16_features", "cub200"}
    assert names <= set(DATASETS.names())
    with pytest.raises(ConfigError, match="unknown dataset 'trafic'.*Did you mean 'traffic'"):
        build_dataset("trafic", split="train", root=".")


def test_import_hrsel_data_is_cheap():
    code = "import sys, hrsel.data; print(sorted(m for m in ('torch', 'zarr', 'numba', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
