""""Did you mean": the valid config key closest to a misspelt one.

    closest_key("optim.learnig_rate", all_keys())  # -> "optim.lr"
    closest_key("data.bach_size", all_keys())      # -> "data.batch_size"

Leaves are compared without case or underscores, first within the key's own section,
then across sections: an exact leaf, then a known alias (`learning_rate` -> `lr`, also
misspelt), then the smallest edit distance (a swap of two letters counts once), then a
prefix, then shared words, then difflib as a last resort. No torch, no YAML.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

# Names people bring from other frameworks -> the leaf hrsel uses, or the dotted key where the leaf
# alone is ambiguous (keys are normalised: no _ or case).
ALIASES = {
    "learningrate": "lr", "baselr": "lr", "lrate": "lr", "wd": "weight_decay", "weightdecayrate": "weight_decay",
    "bs": "batch_size", "batch": "batch_size", "trainbatchsize": "batch_size", "evalbs": "eval_batch_size",
    "valbatchsize": "eval_batch_size", "testbatchsize": "eval_batch_size",
    "epoch": "epochs", "nepochs": "epochs", "numepochs": "epochs", "maxepochs": "epochs",
    "steps": "max_steps", "numsteps": "max_steps", "totalsteps": "max_steps", "iterations": "max_steps",
    "optimizer": "optim.name", "optimiser": "optim.name", "dataset": "data.name", "pipeline": "model.name",
    "method": "model.name", "name": "experiment",
    "workers": "num_workers", "numworker": "num_workers", "loaderworkers": "num_workers",
    "warmup": "warmup_epochs", "warmupsteps": "warmup_ratio",
    "accumulate": "grad_accum", "gradientaccumulation": "grad_accum", "accumulationsteps": "grad_accum",
    "accumgradbatches": "grad_accum", "gradclip": "clip_norm", "clipgrad": "clip_norm", "maxgradnorm": "clip_norm",
    "gradientclipping": "clip_norm", "amp": "precision", "mixedprecision": "precision", "dtype": "precision",
    "outdir": "output_dir", "logdir": "output_dir", "savedir": "output_dir", "rundir": "output_dir",
    "randomseed": "seed", "datadir": "root", "datapath": "root", "path": "root", "dataroot": "root",
    "topk": "k", "numpatches": "k", "numselected": "k", "chunksize": "score_chunk", "scheduler": "schedule",
    "lrschedule": "schedule", "lrscheduler": "schedule", "exp": "experiment", "expname": "experiment",
    "runname": "experiment", "gpu": "device", "metric": "metric", "selectionmetric": "metric", "numheads": "heads",
    "nheads": "heads",
}


def closest_key(key: str, valid: list[str]) -> str | None:
    """The valid dotted key most like `key`, preferring keys of the same section, or None."""
    section, _, leaf = key.rpartition(".")
    same = [k for k in valid if _section(k) == section]
    steps = [(m, same) for m in (_exact, _alias, _nearest, _prefix)]  # a typo within the section
    steps += [(m, valid) for m in (_exact, _alias, _nearest)]  # the key belongs to another section
    steps += [(m, pool) for pool in (same, valid) for m in (_shared_words, _similar)]
    for match, pool in steps:
        hit = match(leaf, pool)
        if hit is not None:
            return hit
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def unknown_key_message(key: str, value: Any, valid: list[str]) -> str:
    """The message of an unknown `key`: the closest valid key and the valid keys of its section."""
    close = closest_key(key, valid)
    hint = f" Did you mean {close!r}?" if close else ""
    section = key.rpartition(".")[0]
    listed = [k for k in valid if k.rpartition(".")[0] == section] or valid
    return f"unknown config key {key!r} (value {value!r}).{hint} Valid keys here: {', '.join(listed)}"


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and adjacent swaps."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def _section(key: str) -> str:
    return key.rpartition(".")[0]


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _norm(leaf: str) -> str:
    return leaf.lower().replace("_", "").replace("-", "")


def _allowed(text: str) -> int:
    """How many edits still count as a typo of a word this long."""
    return 1 if len(text) <= 5 else 2 if len(text) <= 11 else 3


def _by_leaf(pool: list[str], wanted: Callable[[str], bool]) -> str | None:
    return next((k for k in pool if wanted(_norm(_leaf(k)))), None)


def _exact(leaf: str, pool: list[str]) -> str | None:
    return _by_leaf(pool, lambda cand: cand == _norm(leaf))


def _alias(leaf: str, pool: list[str]) -> str | None:
    norm = _norm(leaf)
    target = ALIASES.get(norm)
    if target is None:  # a misspelt alias: learnig_rate -> learning_rate -> lr
        near = [(edit_distance(norm, a), a) for a in ALIASES if abs(len(a) - len(norm)) <= 2]
        near = [(d, a) for d, a in near if d <= _allowed(a) - (len(a) <= 3)]
        target = ALIASES[min(near)[1]] if near else None
    if target is None:
        return None
    if "." in target:
        return target if target in pool else None
    return _by_leaf(pool, lambda cand: cand == _norm(target))


def _nearest(leaf: str, pool: list[str]) -> str | None:
    norm = _norm(leaf)
    scored = [(edit_distance(norm, _norm(_leaf(k))), -difflib.SequenceMatcher(None, leaf, _leaf(k)).ratio(), i)
              for i, k in enumerate(pool)]
    scored = [s for s in scored if s[0] <= _allowed(norm)]
    return pool[min(scored)[2]] if scored else None


def _prefix(leaf: str, pool: list[str]) -> str | None:
    norm = _norm(leaf)
    if len(norm) < 3:
        return None
    hits = [k for k in pool if _norm(_leaf(k)).startswith(norm) or norm.startswith(_norm(_leaf(k)))]
    hits = [k for k in hits if len(_norm(_leaf(k))) >= 3]
    return min(hits, key=lambda k: abs(len(_norm(_leaf(k))) - len(norm))) if hits else None


def _shared_words(leaf: str, pool: list[str]) -> str | None:
    """Two shared words (`clip_grad_norm` -> `clip_norm`), or one long word of a short key."""
    words = set(leaf.lower().split("_")) - {""}
    scored = [(len(shared), -i, shared) for i, k in enumerate(pool)
              for shared in [words & set(_leaf(k).lower().split("_"))]]
    count, i, shared = max(scored, default=(0, 0, set()))
    strong = count >= 2 or (count == 1 and len(words) <= 2 and len(next(iter(shared))) >= 4)
    return pool[-i] if strong else None


def _similar(leaf: str, pool: list[str]) -> str | None:
    by_leaf = {_leaf(k): k for k in pool}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[close[0]] if close else None
