"""One training step of IPS, DPS and DPS with candidates: hrsel's pipeline vs a plain implementation.

"hrsel" is `hrsel.models.build_pipeline(...)` moved to the device with `prepare_for_device` (channels_last,
the no-grad scoring pass in `score_batch` parts); "plain" is the same algorithm written here the way the
public reference code does it: NCHW float32 patches, every chunk encoded in one call per chunk, embeddings
kept, no fusions. A step = forward (no-grad selection pass + gradient pass), the loss summed over the
tasks (+ the pipeline's auxiliary loss), backward, AdamW step; random inputs.

Cases (B = batch, N = patches):
    ips_b4_n900 ... ips_b16_n3600   IPS at the Megapixel MNIST config (configs/mnist.yaml): ResNet18 to layer2,
                                    50x50 patches, M = I = 100, 4 tasks, sin/cos positions; (B, 1, H, W) uint8
                                    images with H = W = 50 sqrt(N)
    ips_b16_n250000                 the IPS paper's headline (250k patches at batch 16), CUDA only: lazy synthetic
                                    images whose pixels are made per read (10 GB as uint8)
    dps_traffic                     DPS at configs/traffic_dps_k5.yaml: 960x1280 RGB, scorer on the 3x
                                    downscaled image -> 2028 cells, K = 5, 500 samples, 100x100 patches, ATS net
    dps_candidates                  DPS with candidates, closest to traffic: the same images, net and K, a regular
                                    grid of 100x100 patches at stride 24 (36 x 50 = 1800), scorer on each patch
                                    downscaled 3x, C = 20 candidates

Every (case, impl) runs in a fresh process: a warm-up step, then --repeats timed steps -> their median.
Rounds are interleaved (round r runs every case x impl, the impl order alternating), and the table gives
the median over rounds. Peak memory: on the CPU the growth of the peak RSS over the RSS before the first
step (the inputs are made before: `input_mb` says how big they are), on CUDA torch.cuda.max_memory_allocated
above what was allocated before the first step.

    python benchmarks/train_step.py                                  # every CPU case, 3 rounds
    python benchmarks/train_step.py --cases ips_b4_n900 --rounds 1 --repeats 1
    python benchmarks/train_step.py --quick --rounds 1               # tiny sizes, seconds (the test)
    python benchmarks/train_step.py --device cuda --precision fp32,bf16 --cases ips_b16_n900,ips_b16_n250000
    python benchmarks/train_step.py --profile ips_b4_n900            # top 15 ops of hrsel's step

JSON (--json, default benchmarks/results/local/train_step_cpu.json): {"machine": {...}, "rows": [{case, impl,
precision, batch, patches, step_ms_median, step_ms_all (per round), select_ms_median (hrsel IPS / DPS with
candidates: the no-grad pass), peak_mb, input_mb, ratio_vs_plain, peak_ratio_vs_plain, status, ...}]}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("hrsel", "plain")
IPS_CASES = {f"ips_b{b}_n{n}": dict(kind="ips", batch=b, n=n) for b in (4, 16) for n in (900, 3600)}
CASES = dict(IPS_CASES, ips_b16_n250000=dict(kind="ips", batch=16, n=250_000, lazy=True, cuda_only=True),
             dps_traffic=dict(kind="dps", batch=None), dps_candidates=dict(kind="dps_candidates", batch=None))
CPU_CASES = tuple(c for c, spec in CASES.items() if not spec.get("cuda_only"))


# ----------------------------------------------------------------------------- configurations
def ips_setup(n: int, quick: bool) -> dict:
    """IPS Megapixel MNIST (configs/mnist.yaml); --quick: 32-pixel patches, M = I = 4, 2 tasks."""
    from hrsel.tasks import TaskSpec

    side = math.isqrt(n)
    if side * side != n:
        raise SystemExit(f"IPS cases need a square number of patches, got N = {n}")
    patch, m = (32, 4) if quick else (50, 100)
    tasks = {"majority": TaskSpec("multiclass", 10), "multi": TaskSpec("multilabel", 10)}
    if not quick:
        tasks = {"majority": TaskSpec("multiclass", 10), "max": TaskSpec("multiclass", 10),
                 "top": TaskSpec("multiclass", 10), "multi": TaskSpec("multilabel", 10)}
    options = dict(in_chans=1, patch_size=patch, k=m, score_chunk=m, backbone="resnet18",
                   backbone_options={"last_stage": "layer2"},
                   aggregator_options={"heads": 8, "head_dim": 16, "mlp_dim": 512, "dropout": 0.1},
                   pos_encoding="sincos", num_positions=n, mode="lazy")
    return dict(name="ips", tasks=tasks, options=options, image_hw=(side * patch, side * patch), channels=1,
                lr=1e-3, weight_decay=0.1)


def dps_setup(kind: str, quick: bool) -> dict:
    """DPS traffic K = 5 (configs/traffic_dps_k5.yaml), or DPS with candidates on the same images."""
    from hrsel.tasks import TaskSpec

    tasks = {"speed_limit": TaskSpec("multiclass", 4)}
    common = dict(in_chans=3, k=2 if quick else 5, num_samples=20 if quick else 500, sigma=0.05,
                  selector="perturbed", entropy_coef=-0.01, backbone="ats_resnet",
                  backbone_options={"width": 8 if quick else 32}, aggregator="mean", head_hidden="same")
    hw = (120, 120) if quick else (960, 1280)
    if kind == "dps":  # quick: 120 / 3 = 40 -> 32 -> 4 x 4 cells
        options = dict(common, patch_size=32 if quick else 100, downscale=3, scorer="dps")
    else:  # quick: 4 x 4 patches of 32 at stride 24
        options = dict(common, patch_size=32 if quick else 100, stride=24, num_candidates=4 if quick else 20,
                       downscale=3, score_chunk=256, scorer="dps")
    return dict(name=kind, tasks=tasks, options=options, image_hw=hw, channels=3, lr=1e-4, weight_decay=1e-4)


def case_setup(case: str, quick: bool) -> dict:
    spec = CASES[case]
    if spec["kind"] == "ips":
        setup = ips_setup(16 if quick else spec["n"], quick)
    else:
        setup = dps_setup(spec["kind"], quick)
    return dict(setup, kind=spec["kind"], lazy=bool(spec.get("lazy")) and not quick)


# ----------------------------------------------------------------------------- inputs
class SyntheticGray:
    """A lazy (H, W) one-channel uint8 image: a periodic random texture, made for each read (no storage)."""

    PERIOD = 1021

    def __init__(self, height: int, width: int, seed: int):
        self.height, self.width = height, width
        self.texture = np.random.default_rng(seed).integers(0, 256, (self.PERIOD, self.PERIOD), dtype=np.uint8)

    def pixels(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        rows = np.arange(y, y + h) % self.PERIOD
        cols = np.arange(x, x + w) % self.PERIOD
        return self.texture[np.ix_(rows, cols)]

    def source(self):
        """The same pixels as an hrsel.io ImageSource (what the hrsel pipeline streams)."""
        from hrsel.io.base import ImageSource, Pyramid

        gray = self

        class Source(ImageSource):
            backend = "synthetic"

            def _open(self):
                return "synthetic"

            def _describe(self, handle):
                return Pyramid(level_dimensions=((gray.width, gray.height),), channels=1)

            def _read(self, handle, level, x, y, width, height):
                return gray.pixels(x, y, width, height)[..., None]

        return Source(f"synthetic://{self.width}x{self.height}", fill=0)


def make_images(setup: dict, batch: int, impl: str, device: str, seed: int = 0):
    """Random inputs in the form each impl takes: uint8 (B, C, H, W) for hrsel, float32 in [0, 1] for plain."""
    h, w = setup["image_hw"]
    if setup["lazy"]:
        grays = [SyntheticGray(h, w, seed + i) for i in range(batch)]
        return grays if impl == "plain" else [g.source() for g in grays]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, setup["channels"], h, w), dtype=torch.uint8, generator=gen)
    if impl == "plain":
        images = images.float().div_(255)  # the reference's loaders hand over float32 NCHW
    return images if device == "cpu" or setup["kind"] == "ips" else images.to(device)


def make_targets(tasks: dict, batch: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, spec in tasks.items():
        if spec.kind == "multiclass":
            out[name] = torch.randint(0, spec.num_classes, (batch,), generator=gen)
        else:
            out[name] = torch.randint(0, 2, (batch, spec.num_classes), generator=gen).float()
    return {k: v.to(device) for k, v in out.items()}


def task_losses(logits: dict, targets: dict, tasks: dict) -> torch.Tensor:
    """Sum over tasks of the batch-mean loss: cross-entropy (multi-class) or BCE on logits (multi-label)."""
    total = 0.0
    for name, spec in tasks.items():
        if spec.kind == "multiclass":
            total = total + F.cross_entropy(logits[name].float(), targets[name])
        else:
            total = total + F.binary_cross_entropy_with_logits(logits[name].float(), targets[name])
    return total


# ----------------------------------------------------------------------------- plain IPS
def sincos(num_positions: int, dim: int) -> torch.Tensor:
    from hrsel.models.aggregators import sincos_table  # a constant table: the same numbers as IPS's

    return sincos_table(num_positions, dim)


class PlainMIL(nn.Module):
    """Cross-attention MIL pooling as in IPS: one learned query per task, H heads of D_k, then an MLP."""

    def __init__(self, dim: int, tokens: int, heads: int, head_dim: int, mlp_dim: int, dropout: float,
                 num_positions: int):
        super().__init__()
        self.tokens, self.heads, self.head_dim = tokens, heads, head_dim
        self.query = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.to_q, self.to_k = nn.Linear(dim, heads * head_dim), nn.Linear(dim, heads * head_dim)
        self.to_v, self.to_out = nn.Linear(dim, heads * head_dim), nn.Linear(heads * head_dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))
        self.drop = nn.Dropout(dropout)
        self.register_buffer("table", sincos(num_positions, dim), persistent=False)

    def attention(self, x, positions):
        b, k, _ = x.shape
        x = x + self.table[positions]
        q = self.to_q(self.query).view(1, self.tokens, self.heads, self.head_dim).transpose(1, 2)
        keys = self.to_k(x).view(b, k, self.heads, self.head_dim).transpose(1, 2)
        values = self.to_v(x).view(b, k, self.heads, self.head_dim).transpose(1, 2)
        return torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1), values

    def scores(self, x, positions):  # (B, K) attention averaged over heads and tasks
        return self.attention(x, positions)[0].mean(dim=(1, 2))

    def forward(self, x, positions):
        attn, values = self.attention(x, positions)
        pooled = (attn @ values).transpose(1, 2).reshape(x.shape[0], self.tokens, -1)
        out = self.norm1(self.query + self.drop(self.to_out(pooled)))
        return self.norm2(out + self.drop(self.mlp(out)))


class PlainIPS(nn.Module):
    """ResNet18 (1-channel stem) to layer2 + GAP, cross-attention MIL, one linear head per task."""

    def __init__(self, setup: dict):
        super().__init__()
        from torchvision.models import resnet18

        o = setup["options"]
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(o["in_chans"], 64, 7, 2, 3, bias=False)
        self.encoder = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
        a = o["aggregator_options"]
        self.mil = PlainMIL(128, len(setup["tasks"]), a["heads"], a["head_dim"], a["mlp_dim"], a["dropout"],
                            o["num_positions"])
        self.heads = nn.ModuleDict({name: nn.Linear(128, spec.num_classes) for name, spec in setup["tasks"].items()})
        self.patch, self.m, self.i = o["patch_size"], o["k"], o["score_chunk"]

    def encode(self, patches):  # (B, n, C, p, p) -> (B, n, D)
        b, n = patches.shape[:2]
        return self.encoder(patches.reshape(b * n, *patches.shape[2:])).mean(dim=(2, 3)).view(b, n, -1)

    def patches_of(self, images, idx):
        """(B, n) patch indices -> (B, n, C, p, p) float32: slices of the float images, or reads of lazy ones."""
        p = self.patch
        if isinstance(images, torch.Tensor):
            grid = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, rows, cols, p, p), a view
            cols = grid.shape[3]
            rows = torch.arange(images.shape[0])[:, None]
            return grid.permute(0, 2, 3, 1, 4, 5)[rows, idx // cols, idx % cols]
        cols = images[0].width // p
        out = [[torch.from_numpy(g.pixels(int(j) % cols * p, int(j) // cols * p, p, p).copy()) for j in row]
               for g, row in zip(images, idx.tolist())]
        return torch.stack([torch.stack(r) for r in out])[:, :, None].float().div_(255)

    @torch.no_grad()
    def select(self, images, num_patches: int, device):
        """The IPS no-grad pass: buffer of the first M, then chunks of I; top M of buffer + chunk by attention."""
        self.eval()
        b = len(images)
        arange = torch.arange(num_patches)
        idx_buf = arange[: self.m].expand(b, -1)
        emb_buf = self.encode(self.patches_of(images, idx_buf).to(device))
        idx_buf = idx_buf.to(device)
        for start in range(self.m, num_patches, self.i):
            idx = arange[start:start + self.i].expand(b, -1)
            emb = self.encode(self.patches_of(images, idx).to(device))
            all_emb, all_idx = torch.cat([emb_buf, emb], 1), torch.cat([idx_buf, idx.to(device)], 1)
            top = self.mil.scores(all_emb, all_idx).topk(self.m, dim=1).indices
            emb_buf = all_emb.gather(1, top[..., None].expand(-1, -1, all_emb.shape[2]))
            idx_buf = all_idx.gather(1, top)
        self.train()
        return idx_buf.sort(dim=1).values

    def forward(self, images, num_patches: int, device):
        idx = self.select(images, num_patches, device)
        patches = self.patches_of(images, idx.cpu()).to(device)
        tokens = self.mil(self.encode(patches), idx)
        return {name: head(tokens[:, i]) for i, (name, head) in enumerate(self.heads.items())}, idx


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy a state dict across modules of the same layout (tensors in the same order and shapes)."""
    a, b = src.state_dict(), dst.state_dict()
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a.values(), b.values())):
        raise ValueError(f"layouts differ: {len(a)} vs {len(b)} tensors")
    dst.load_state_dict(dict(zip(b, a.values())))


# ----------------------------------------------------------------------------- plain DPS
class PlainPerturbedTopK(torch.autograd.Function):
    """The public PyTorch port's perturbed top-K: (B, S, N) noise, (B, S, K, N) one-hots, dense Jacobian."""

    @staticmethod
    def forward(ctx, scores, k, sigma, num_samples):
        b, n = scores.shape
        noise = torch.randn(b, num_samples, n, device=scores.device)
        perturbed = scores[:, None] + sigma * noise
        idx = torch.topk(perturbed, k, dim=-1).indices.sort(dim=-1).values  # (B, S, K)
        onehots = F.one_hot(idx, n).float()  # (B, S, K, N)
        ctx.save_for_backward(onehots, noise)
        ctx.sigma, ctx.num_samples = sigma, num_samples
        return onehots.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_output):
        onehots, noise = ctx.saved_tensors
        jacobian = torch.einsum("bskn,bse->bkne", onehots, noise) / (ctx.num_samples * ctx.sigma)
        return torch.einsum("bkn,bkne->be", grad_output, jacobian), None, None, None


class PlainATS(nn.Module):
    """ATS / DPS traffic feature net: 3x3 conv, three pre-activation blocks (stride 2), BN-ReLU, GAP."""

    def __init__(self, width: int, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            bn1=nn.BatchNorm2d(width), conv1=nn.Conv2d(width, width, 3, 2, 1, bias=False),
            bn2=nn.BatchNorm2d(width), conv2=nn.Conv2d(width, width, 3, 1, 1, bias=False),
            short=nn.Conv2d(width, width, 1, 2, bias=False))) for _ in range(3))
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = F.relu(blk["bn1"](x))
            x = blk["conv2"](F.relu(blk["bn2"](blk["conv1"](x)))) + blk["short"](x)
        return F.relu(self.bn(x)).mean(dim=(2, 3))


class PlainDPS(nn.Module):
    """DPS as the reference does it: scorer on the downscaled image, dense perturbed top-K over all cells,
    every patch extracted (B, N, C, p, p) and mixed by the indicators; with `candidates`: every patch
    scored without grad, the top C re-scored with grad, top-K over those."""

    def __init__(self, setup: dict):
        super().__init__()
        o = setup["options"]
        self.o, self.tasks = o, setup["tasks"]
        layers, c_in = [], o["in_chans"]
        for c_out in (8, 16, 32):
            layers += [nn.Conv2d(c_in, c_out, 3), nn.ReLU(inplace=True)]
            c_in = c_out
        self.scorer = nn.Sequential(*layers, nn.Conv2d(32, 1, 3))
        width = o["backbone_options"]["width"]
        self.backbone = PlainATS(width, o["in_chans"])
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(width, width), nn.SiLU(),
                                                        nn.Linear(width, spec.num_classes))
                                    for name, spec in self.tasks.items()})

    def select(self, scores):
        lo, hi = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
        normalized = (scores - lo) / (hi - lo + 1e-5)
        return PlainPerturbedTopK.apply(normalized, self.o["k"], self.o["sigma"], self.o["num_samples"])

    def grid_patches(self, images, rows: int, cols: int, stride: int, pad: int):
        """Every patch of a rows x cols grid (first one at (-pad, -pad)) -> (B, N, C, p, p) float32, materialised."""
        p = self.o["patch_size"]
        padded = F.pad(images, (pad, p, pad, p))  # generous bottom / right zero padding
        grid = padded.unfold(2, p, stride).unfold(3, p, stride).permute(0, 2, 3, 1, 4, 5)  # (B, R, C', C, p, p)
        return grid[:, :rows, :cols].reshape(images.shape[0], rows * cols, *grid.shape[3:])

    def patch_scores(self, patches):  # (B, n, C, p, p) -> (B, n)
        b, n = patches.shape[:2]
        small = F.avg_pool2d(patches.reshape(b * n, *patches.shape[2:]), self.o["downscale"])
        return self.scorer(small).amax(dim=(1, 2, 3)).view(b, n)

    def forward(self, images):
        o = self.o
        if "num_candidates" not in o:  # DPS over the whole score grid
            scores = F.max_pool2d(self.scorer(F.avg_pool2d(images, o["downscale"])), 8, 8)[:, 0]  # (B, rows, cols)
            rows, cols = scores.shape[1:]
            stride = images.shape[2] // rows  # square cells here (traffic: 960 / 39 = 1280 / 52 = 24)
            patches = self.grid_patches(images, rows, cols, stride, (o["patch_size"] - stride) // 2)
            scores = scores.flatten(1)
        else:  # candidates: no-grad scores of every patch, top C, re-scored with grad
            stride = o["stride"]
            rows = (images.shape[2] - o["patch_size"]) // stride + 1
            cols = (images.shape[3] - o["patch_size"]) // stride + 1
            everything = self.grid_patches(images, rows, cols, stride, 0)
            with torch.no_grad():
                all_scores = torch.cat([self.patch_scores(c) for c in everything.split(o["score_chunk"], 1)], 1)
            cand = all_scores.topk(o["num_candidates"], dim=1).indices.sort(dim=1).values
            patches = everything[torch.arange(images.shape[0])[:, None], cand]
            scores = self.patch_scores(patches)
        indicators = self.select(scores)
        mixed = torch.einsum("bkn,bnchw->bkchw", indicators, patches)
        b, k = mixed.shape[:2]
        feats = self.backbone(mixed.reshape(b * k, *mixed.shape[2:])).view(b, k, -1).mean(1)
        logits = {name: head(feats) for name, head in self.heads.items()}
        log_p = torch.log_softmax(scores, dim=-1)
        return logits, o["entropy_coef"] * -(log_p.exp() * log_p).sum(-1).mean()


# ----------------------------------------------------------------------------- one process
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(case: str, impl: str, quick: bool, device: str, score_batch: str = "auto"):
    """-> (model, step(images, targets) -> loss, setup, note)."""
    from hrsel.models import build_pipeline

    setup = case_setup(case, quick)
    torch.manual_seed(0)
    extra = {"score_batch": parse_score_batch(score_batch)} if setup["kind"] == "ips" else {}
    hrsel_model = build_pipeline(setup["name"], tasks=setup["tasks"], **setup["options"], **extra)
    note = ""
    if impl == "plain":
        model = (PlainIPS if setup["kind"] == "ips" else PlainDPS)(setup)
        counts = [sum(p.numel() for p in m.parameters()) for m in (hrsel_model, model)]
        if counts[0] != counts[1]:
            raise SystemExit(f"{case}: parameter counts differ: hrsel {counts[0]} vs plain {counts[1]}")
        del hrsel_model
        model = model.to(device).train()
    else:
        try:
            from hrsel.models.fastpath import prepare_for_device
            model = prepare_for_device(hrsel_model, device)
        except ImportError:
            model, note = hrsel_model.to(device), "no hrsel.models.fastpath: plain .to(device)"
        model.train()
    return model, setup, note


def parse_score_batch(value: str) -> int | str | None:
    """--score-batch: "auto" (hrsel's default), "none" (the whole chunk in one call) or patches per call."""
    return None if value == "none" else value if value == "auto" else int(value)


def worker(case: str, impl: str, args) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    bf16 = impl.endswith("_bf16")
    kind = "plain" if impl == "plain" else "hrsel"
    model, setup, note = build(case, kind, args.quick, device, args.score_batch)
    spec = CASES[case]
    batch = spec["batch"] or args.dps_batch
    if args.quick:
        batch = min(batch, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup["lr"], weight_decay=setup["weight_decay"])
    num_patches = setup["options"].get("num_positions", 0)
    timing = {"select": []}
    if kind == "hrsel" and setup["kind"] in ("ips", "dps_candidates"):  # time the no-grad pass
        attr = "select" if setup["kind"] == "ips" else "_stream"
        inner = getattr(model, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            timing["select"].append((time.perf_counter() - t0) * 1e3)
            return out
        setattr(model, attr, timed)

    def step(images, targets):
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16, enabled=bf16):
            if kind == "hrsel":
                out = model(images)
                loss = task_losses(out.logits, targets, setup["tasks"]) + model.auxiliary_loss(out, targets)
            elif setup["kind"] == "ips":
                logits, _ = model(images, num_patches, device)
                loss = task_losses(logits, targets, setup["tasks"])
            else:
                logits, aux = model(images)
                loss = task_losses(logits, targets, setup["tasks"]) + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    base_inputs = rss_mb()
    images = make_images(setup, batch, kind, device)
    input_mb = images.nbytes / 2**20 if isinstance(images, torch.Tensor) else 0.0
    targets = make_targets(setup["tasks"], batch, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    times = []
    for i in range(1 + args.repeats):  # step 0 warms up
        if i == 1:
            timing["select"].clear()
        t0 = time.perf_counter()
        loss = step(images, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    row = dict(case=case, impl=kind, precision="bf16" if bf16 else "fp32", batch=batch, device=device,
               patches=num_patches or None, threads=torch.get_num_threads(), step_ms=statistics.median(times),
               steps_ms=[round(t, 1) for t in times], peak_mb=round(peak, 1), input_mb=round(input_mb, 1),
               base_mb=round(base_inputs if device == "cpu" else base, 1), loss=loss, status="ok")
    if timing["select"]:
        row["select_ms"] = statistics.median(timing["select"])
    if note:
        row["note"] = note
    return row


def profile(case: str, args) -> None:
    """The torch profiler over one hrsel step (after a warm-up): top 15 ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, setup, _ = build(case, "hrsel", args.quick, args.device)
    batch = min(CASES[case]["batch"] or args.dps_batch, 2 if args.quick else 10**9)
    images, targets = make_images(setup, batch, "hrsel", args.device), make_targets(setup["tasks"], batch, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup["lr"])

    def step():
        out = model(images)
        loss = task_losses(out.logits, targets, setup["tasks"]) + model.auxiliary_loss(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ----------------------------------------------------------------------------- parent
def run_one(case: str, impl: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, impl, "--device", args.device,
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--dps-batch", str(args.dps_batch),
           "--score-batch", args.score_batch]
    cmd += ["--quick"] if args.quick else []
    row = dict(case=case, impl="plain" if impl == "plain" else "hrsel",
               precision="bf16" if impl.endswith("_bf16") else "fp32", device=args.device)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(row, status="timeout")
    if proc.returncode != 0:
        err = proc.stderr or proc.stdout
        status = "oom" if proc.returncode in (-9, 137) or "out of memory" in err.lower() else "error"
        return dict(row, status=status, error=(err.strip().splitlines() or [""])[-1][:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict) -> list[dict]:
    """Per (case, impl, precision): medians over rounds, and ratios to the plain fp32 row of the case."""
    rows = []
    for (case, impl, precision), runs in results.items():
        ok = [r for r in runs if r.get("status") == "ok"]
        row = dict(case=case, impl=impl, precision=precision, rounds=len(runs), ok_rounds=len(ok))
        if not ok:
            rows.append(dict(row, status=runs[-1].get("status"), error=runs[-1].get("error")))
            continue
        first = ok[0]
        row.update(batch=first["batch"], patches=first["patches"], threads=first["threads"],
                   step_ms_median=round(statistics.median(r["step_ms"] for r in ok), 1),
                   step_ms_all=[round(r["step_ms"], 1) for r in ok],
                   peak_mb=round(statistics.median(r["peak_mb"] for r in ok), 1), input_mb=first["input_mb"],
                   status="ok")
        if any("select_ms" in r for r in ok):
            row["select_ms_median"] = round(statistics.median(r["select_ms"] for r in ok if "select_ms" in r), 1)
        if "note" in first:
            row["note"] = first["note"]
        rows.append(row)
    plain = {r["case"]: r for r in rows if r["impl"] == "plain" and r.get("status") == "ok"}
    for r in rows:
        ref = plain.get(r["case"])
        if r.get("status") == "ok" and ref:
            r["ratio_vs_plain"] = round(r["step_ms_median"] / ref["step_ms_median"], 3)
            held, ref_held = r["peak_mb"] + r["input_mb"], ref["peak_mb"] + ref["input_mb"]
            r["peak_ratio_vs_plain"] = round(held / max(1e-6, ref_held), 3)
    return rows


def machine(args) -> dict:
    from machine import describe  # benchmarks/machine.py: CPU model, ISA flags, the oneDNN cap in force

    return describe(threads=args.threads or torch.get_num_threads(), device=args.device, quick=args.quick,
                    rounds=args.rounds, repeats=args.repeats, dps_batch=args.dps_batch, score_batch=args.score_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help=f"comma-separated, of {', '.join(CASES)} (default: every "
                        "CPU case; on CUDA also ips_b16_n250000)")
    parser.add_argument("--impls", default="hrsel,plain", help="hrsel, plain or both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process, after one warm-up step")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", help="fp32 and/or bf16 (torch.autocast, hrsel impl, CUDA)")
    parser.add_argument("--dps-batch", type=int, default=4, help="batch of the DPS cases")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (N = 16, 2 tasks, batch <= 2): a smoke run")
    parser.add_argument("--score-batch", default="auto", help="hrsel IPS: patches per encoder call of the no-grad "
                        "pass: auto (64 on a CPU), none (the whole chunk) or a number")
    parser.add_argument("--skip-plain-above", type=int, default=0,
                        help="no plain run for cases of more than this many patches (0: never skip); the plain "
                        "IPS reads lazy images patch by patch, as the reference's lazy loading does")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "local", "train_step_cpu.json"))
    parser.add_argument("--profile", metavar="CASE", help="profile one hrsel step of CASE and print the top ops")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    if args.profile:
        profile(args.profile, args)
        return
    cases = args.cases.split(",") if args.cases else list(CPU_CASES) + (
        ["ips_b16_n250000"] if args.device == "cuda" else [])
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; valid: {', '.join(CASES)}")
        if CASES[case].get("cuda_only") and args.device != "cuda":
            parser.error(f"case {case} runs on CUDA only (--device cuda)")
    precisions = args.precision.split(",")
    if "bf16" in precisions and args.device != "cuda":
        parser.error("--precision bf16 needs --device cuda")
    impls = []
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            parser.error(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
        impls += [impl + ("" if p == "fp32" else "_bf16") for p in precisions] if impl == "hrsel" else [impl]
    results: dict = {}
    for r in range(args.rounds):
        for case in cases:
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                n = case_setup(case, args.quick)["options"].get("num_positions", 0)
                if impl == "plain" and args.skip_plain_above and n > args.skip_plain_above:
                    continue
                row = run_one(case, impl, args)
                results.setdefault((case, row["impl"], row["precision"]), []).append(row)
                print(f"round {r + 1} {case:16s} {impl:10s} {row.get('status'):7s} "
                      f"step {row.get('step_ms', float('nan')):10.1f} ms  peak {row.get('peak_mb', '-')} MB"
                      + (f"  ({row['error']})" if row.get("error") else ""), flush=True)
                write_json(args, summarise(results))  # after every process: a killed run keeps its rows
    rows = summarise(results)
    print(f"\n{'case':16s} {'impl':6s} {'prec':5s} {'step ms':>10s} {'peak MB':>9s} {'x plain':>8s}")
    for r in rows:
        print(f"{r['case']:16s} {r['impl']:6s} {r['precision']:5s} {r.get('step_ms_median', float('nan')):10.1f} "
              f"{r.get('peak_mb', float('nan')):9.1f} {r.get('ratio_vs_plain', float('nan')):8.3f}")
    write_json(args, rows)


def write_json(args, rows: list[dict]) -> None:
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "train_step", "machine": machine(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
