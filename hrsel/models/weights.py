"""Pretrained weights from local files: read, adapt the stem to any channel count, load strictly.

    state = read_state_dict("resnet50.safetensors")        # .pt/.pth/.bin (torch) or .safetensors
    state["conv1.weight"] = adapt_stem_weight(state["conv1.weight"], in_chans=4, key="conv1.weight", path=...)
    load_strict(module, state, path="resnet50.safetensors", ignore=("fc",))

Nothing here downloads: a file is given or the network stays random. Input normalisation
stats for N channels (`channel_stats`) follow the stem adaptation: one channel takes the mean
of the RGB values, N channels repeat R, G, B cyclically, as the filters are repeated.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hrsel.errors import ConfigError

logger = logging.getLogger(__name__)

_NESTED = ("state_dict_ema", "model_ema", "state_dict", "model")  # checkpoint layouts of timm and trainers


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a torch state dict/checkpoint or a .safetensors file (on the CPU).

    A checkpoint that wraps the weights ({"state_dict": ...}, {"model": ...}) is unwrapped and a
    `module.` prefix (DataParallel) is stripped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"backbone weights_path {path!r} does not exist; give a local weights file "
                          f"(.pt/.pth/.bin torch state dict or .safetensors) or null for random init")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled non-tensor objects
        kind = "safetensors" if path.endswith(".safetensors") else "torch (weights_only)"
        raise ConfigError(f"backbone weights_path {path!r} cannot be read as a {kind} file: "
                          f"{type(e).__name__}: {e}. Save the weights with torch.save(model.state_dict(), path) "
                          f"or safetensors.torch.save_file") from None
    for key in _NESTED:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone weights_path {path!r} holds no state dict of tensors "
                          f"(got {type(state).__name__}); save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def adapt_stem_weight(weight: torch.Tensor, in_chans: int, *, key: str, path: str) -> torch.Tensor:
    """A pretrained first-conv weight (O, I, kh, kw) adapted to `in_chans` inputs, as timm does.

    1 channel: the RGB filters summed; N != 3: the RGB filters repeated cyclically and scaled by
    3 / N (timm's `adapt_input_conv`), so a gray or an N-channel copy of an image gives the
    same response as the RGB image.
    """
    from timm.models import adapt_input_conv

    if weight.shape[1] == in_chans:
        return weight
    try:
        out = adapt_input_conv(in_chans, weight)
    except (NotImplementedError, AssertionError):
        raise ConfigError(f"backbone weights_path {path!r}: stem {key} has shape {tuple(weight.shape)} "
                          f"({weight.shape[1]} input channels), which cannot be adapted to in_chans={in_chans}; "
                          f"only 3-channel (RGB) stems are adapted. Use weights with {in_chans} input "
                          f"channels") from None
    logger.info("adapted stem %s of %s from %d to %d input channels", key, path, weight.shape[1], in_chans)
    return out


def channel_stats(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Per-channel RGB normalisation values for `in_chans` channels: 1 -> their mean, N -> R, G, B repeated."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, path: str,
                ignore: Sequence[str] = ()) -> None:
    """Load `state` into `module`; every key must match by name and shape, except those under `ignore`.

    `ignore` lists module prefixes (the classifier head) dropped on both sides. Raises a
    ConfigError naming the missing, unexpected and mis-shaped keys.
    """
    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    state = {k: v for k, v in state.items() if not ignored(k)}
    own = {k: v for k, v in module.state_dict().items() if not ignored(k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches (file vs model)", shapes)) if keys]
        raise ConfigError(f"backbone weights_path {path!r} does not fit the backbone {type(module).__name__}: "
                          f"{'; '.join(parts)}. Give weights saved from the same architecture")
    result = module.load_state_dict(state, strict=False)
    assert all(ignored(k) for k in result.missing_keys) and not result.unexpected_keys, result


def first_conv_keys(first_conv: str | Sequence[str] | None) -> list[str]:
    """timm's pretrained_cfg['first_conv'] (a module name or several) as weight keys."""
    if not first_conv:
        return []
    names = [first_conv] if isinstance(first_conv, str) else list(first_conv)
    return [f"{n}.weight" for n in names]

