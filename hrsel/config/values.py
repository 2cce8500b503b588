"""Impossible values of the free keys (model options, data set options, generator options), by name.

    check_option_values("model", {"k": 0, "aggregator_options": {"dropout": 1.5}})
    # ConfigError: config key 'model.k' = 0 must be > 0 (a count or a size) ...

The free keys are keyword arguments of builders, so their ranges follow their names: a
count or size is > 0, a count that may be zero is >= 0, a probability, fraction or momentum
lies in [0, 1]. Nested `*_options` mappings are walked; lists are checked item by item.
Values that are not numbers (yet) are left to the type checks. No torch.
"""
from __future__ import annotations

from typing import Any

from hrsel.errors import ConfigError

POSITIVE = frozenset({
    "k", "K", "m", "M", "num_selected", "num_patches_kept", "memory_size", "iter_size", "patch_size",
    "chunk_size", "num_samples", "stride", "downscale", "score_downscale", "global_downscale", "extract_chunk",
    "score_chunk", "num_candidates", "sinkhorn_iterations", "sinkhorn_epsilon", "width", "height", "widths",
    "strides", "blocks", "stem_stride", "in_dim", "dim", "heads", "head_dim", "mlp_dim", "depth", "mlp_ratio",
    "reduction", "num_tokens", "head_hidden", "n_train", "n_test", "workers", "padded_size", "resize", "crop",
    "max_tensor_pixels", "image_size", "max_kept",
})
NON_NEGATIVE = frozenset({
    "num_positions", "num_patches", "n_noise", "curriculum_steps", "sigma", "sigma_final", "level", "penalty",
    "seed", "max_shift", "policy_weight", "attention_l2",
})
PROBABILITY = frozenset({
    "dropout", "feature_dropout", "attention_smoothing", "alpha", "baseline_momentum", "colour_p",
    "min_tissue_fraction", "p", "prob", "probability",
})


def check_option_values(prefix: str, options: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key under `prefix` whose value its name rules out."""
    for key, value in options.items():
        full = f"{prefix}.{key}"
        if isinstance(value, dict):
            check_option_values(full, value)
            continue
        for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            shown = f"{full}[{i}]" if isinstance(value, (list, tuple)) else full
            _check_one(str(key), shown, _number(item))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_one(name: str, key: str, value: float | None) -> None:
    if value is None:
        return
    if value != value:  # NaN passes no range
        raise ConfigError(f"config key {key!r} is NaN; give a number")
    if name in POSITIVE and not value > 0:
        raise ConfigError(f"config key {key!r} = {_shown(value)} must be > 0 (a count or a size)")
    if name in NON_NEGATIVE and value < 0:
        raise ConfigError(f"config key {key!r} = {_shown(value)} must be >= 0")
    if name in PROBABILITY and not 0 <= value <= 1:
        raise ConfigError(f"config key {key!r} = {_shown(value)} must be in [0, 1] (a probability or fraction)")


def _shown(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
