"""Each pipeline learns to select the patch that decides the label (see toy_bright.py).

Before training the selectors prefer the bright decoy; the tests train a few dozen
steps and assert the selected indices on held-out images, not only the accuracy.
"""
import functools

import pytest
import torch

from hrsel.engine.optim import clip_gradients
from hrsel.models import build_pipeline
from hrsel.tasks import TaskSpec

from hrsel.models.patches import ImageBatch
from hrsel.select.extract import GridGeometry

from toy_bright import SIDE, make_batch, one_torch_thread  # noqa: F401 (autouse fixture)

TASKS = {"y": TaskSpec("multiclass", 3)}
LIGHT = dict(in_chans=1, backbone="narrow_resnet", backbone_options={"width": 16, "strides": (2, 2), "blocks": (1, 1)})
CONFIGS = {  # name: (options, steps, learning rate)
    "ips": (dict(LIGHT, patch_size=20, k=4, score_chunk=4,
                 aggregator_options={"heads": 2, "head_dim": 8, "mlp_dim": 32, "dropout": 0.0}), 60, 3e-3),
    # DPS's own 500 samples and a clipped gradient (below): with 50 samples and no clipping, spikes of the
    # estimated gradient (norm 40-50 against 1-8) threw the scorer off the faint cell for good on 2 of 5 seeds
    "dps": (dict(LIGHT, patch_size=20, k=2, downscale=2, num_samples=500, sigma=0.5, sigma_schedule="constant"),
            120, 3e-3),
    "dps_candidates": (dict(LIGHT, patch_size=20, k=2, num_candidates=12, downscale=1, score_chunk=5,
                            num_samples=50, sigma=0.3, sigma_schedule="constant"), 80, 2e-3),
    # ATS draws at eval by default; the hit rate here judges the learnt attention's top-K
    "ats": (dict(LIGHT, patch_size=20, k=2, downscale=2, sample_at_inference=False), 100, 1e-3),
    "patchdrop": (dict(LIGHT, patch_size=20, downscale=2, penalty=0.5, stage="pretrain"), 150, 3e-3),
    "cnn": (dict(LIGHT, downscale=1), 60, 3e-3),
}


CLIP_NORM = {"dps": 1.0}  # as configs/mnist_s_dps.yaml (the DPS release clips by value)


def train(name: str, seed: int = 0):
    if name == "patchdrop":
        return train_patchdrop(seed)
    options, steps, lr = CONFIGS[name]
    torch.manual_seed(seed)
    model = build_pipeline(name, tasks=TASKS, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(1 + seed)
    model.train()
    for step in range(steps):
        x, y, _ = make_batch(8, data)
        model.set_progress(step, steps)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits["y"], y) + model.auxiliary_loss(out, {"y": y})
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(model.parameters(), clip_norm=CLIP_NORM.get(name, 0.0))
        optimizer.step()
    return model.eval()


def train_patchdrop(seed: int, classifier_steps: int = 60):
    """PatchDrop's recipe: a classifier trained on every patch, then the policy against it, frozen."""
    options, steps, lr = CONFIGS["patchdrop"]
    torch.manual_seed(seed)
    model = build_pipeline("patchdrop", tasks=TASKS, **options)
    data = torch.Generator().manual_seed(1 + seed)
    every = GridGeometry.regular((SIDE, SIDE), patch_size=options["patch_size"])
    classifier = model.classifier.requires_grad_(True).train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    for _ in range(classifier_steps):
        x, y, _ = make_batch(8, data)
        loss = torch.nn.functional.cross_entropy(classifier(ImageBatch(x).chunk(every, 0, every.num_patches))["y"], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.requires_grad_(False)
    model.train()  # the pretrain stage keeps the classifier in eval mode
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=lr)
    for step in range(steps):
        x, y, _ = make_batch(8, data)
        model.set_progress(step, steps)
        loss = model.auxiliary_loss(model(x), {"y": y})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def held_out():
    return make_batch(48, torch.Generator().manual_seed(99))


def hit_rate(indices: torch.Tensor, cell: torch.Tensor) -> float:
    """Fraction of images with a faint cell whose selection contains it."""
    has = cell >= 0
    return (indices == cell[:, None]).any(1)[has].float().mean().item()


SEEDS, REQUIRED = range(5), 4  # a learning claim holds for 4 of 5 seeds, never for one lucky seed


@functools.lru_cache(maxsize=None)
def outcomes(name: str) -> tuple[dict[str, float], ...]:
    """Train `name` once per seed; per seed: hit rate, accuracy, kept patches, top-score-on-cell rate."""
    x, y, cell = held_out()
    rows = []
    for seed in SEEDS:
        model = train(name, seed)
        with torch.no_grad():
            out = model(x)
        row = {"accuracy": (out.logits["y"].argmax(1) == y).float().mean().item()}
        if out.indices is not None:
            row["hit"] = hit_rate(out.indices, cell)
            row["kept"] = (out.indices >= 0).sum(1).float().mean().item()
        if out.scores is not None:
            row["top_on_cell"] = (out.scores.argmax(1) == cell)[cell >= 0].float().mean().item()
        rows.append(row)
    return tuple(rows)


def assert_most_seeds(name: str, passes) -> None:
    rows = outcomes(name)
    good = sum(bool(passes(r)) for r in rows)
    shown = "; ".join(", ".join(f"{k} {v:.2f}" for k, v in r.items()) for r in rows)
    assert good >= REQUIRED, f"{name}: {good} of {len(rows)} seeds learned ({shown})"


@pytest.mark.parametrize("name", ["ips", "dps", "dps_candidates", "ats"])
def test_untrained_selectors_miss_the_informative_patch(name):
    x, _, cell = held_out()
    torch.manual_seed(0)
    untrained = build_pipeline(name, tasks=TASKS, **CONFIGS[name][0]).eval()
    with torch.no_grad():
        before = hit_rate(untrained(x).indices, cell)
    assert before < 0.7, f"{name}: the toy problem is too easy before training ({before:.2f})"


@pytest.mark.parametrize("name", ["ips", "dps", "dps_candidates"])
def test_selector_learns_to_pick_the_informative_patch(name):
    assert_most_seeds(name, lambda r: r["hit"] >= 0.95 and r["accuracy"] >= 0.7)


def test_ips_score_map_ranks_the_informative_patch_first():
    """The recorded attention is comparable across chunks: the faint cell wins wherever it arrived."""
    assert_most_seeds("ips", lambda r: r["top_on_cell"] >= 0.9)


def test_ats_gets_most_of_the_way():
    # ATS is the unstable baseline of the DPS paper: it gets most of the way, not all
    assert_most_seeds("ats", lambda r: r["hit"] >= 0.6 and r["accuracy"] >= 0.45)


def test_patchdrop_keeps_the_informative_patch_and_drops_most_others():
    # PatchDrop's claim: about half the patches dropped at little cost in accuracy. Its reward,
    # 1 - (kept / 16)^2, hardly separates 1 kept patch from 4, so it does not go down to one.
    assert_most_seeds("patchdrop", lambda r: r["hit"] >= 0.95 and r["kept"] <= 8.0 and r["accuracy"] >= 0.85)


def test_cnn_baseline_learns_the_toy_problem():
    assert_most_seeds("cnn", lambda r: r["accuracy"] >= 0.9)
