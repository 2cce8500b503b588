"""Any timm model as a feature network: `backbone: timm/resnet50`, `timm/efficientnet_b0`, `timm/vit_small_patch16_224`.

The model is built with `pretrained=False, num_classes=0` (never downloaded), so its forward
gives the pooled features before the classifier, D = `out_dim`. Weights come only from a
local file (`weights_path`, .pt/.pth/.bin or .safetensors), loaded strictly with the
classifier head dropped; a 3-channel (RGB) stem is adapted to `in_chans` as timm does
(`hrsel.models.weights.adapt_stem_weight`).

Normalisation: inputs in [0, 1] are normalised with the mean/std of the model's pretrained
config (ImageNet for most; 0.5/0.5 for many ViTs), by default when weights are loaded
(`normalize: null`), always with `normalize: true`, never with `false`. For in_chans != 3 the
values follow the stem adaptation: 1 channel takes the mean of the three, N channels repeat
R, G, B cyclically (`channel_stats`).

ViTs take one input size: patches of another size than the model's default need
`backbone_options: {img_size: 64}` (position embeddings of a loaded file are resampled).
"""
from __future__ import annotations

import difflib
import functools
import logging
import sys
from typing import Any

import torch
from torch import nn

from hrsel.errors import ConfigError
from hrsel.models.weights import adapt_stem_weight, channel_stats, first_conv_keys, load_strict, read_state_dict

logger = logging.getLogger(__name__)

PREFIX = "timm/"


class TimmBackbone(nn.Module):
    """A timm model without its classifier: (n, C, p, p) in [0, 1] -> (n, D) pooled features.

    Args:
        model_name: a timm model name, optionally with a pretrained tag (`resnet50.a1_in1k`; the tag
            picks the normalisation values, nothing is downloaded). Given by the backbone name.
        in_chans: input channels.
        weights_path: a local state dict (.pt/.pth/.bin) or .safetensors file, e.g. timm's
            `model.safetensors`; None = random init.
        normalize: normalise with the pretrained config's mean/std; None = when weights_path is given.
        img_size: input size for models with a fixed one (ViTs) when patches differ from the default.
        drop_path_rate: stochastic depth rate (models that have it).
        model_options: further keywords of `timm.create_model` for this model (e.g. global_pool).
    """

    def __init__(self, *, model_name: str, in_chans: int = 3, weights_path: str | None = None,
                 normalize: bool | None = None, img_size: int | None = None, drop_path_rate: float | None = None,
                 model_options: dict[str, Any] | None = None):
        super().__init__()
        check_model_name(model_name)
        import timm

        extra = dict(model_options or {})
        extra.update({k: v for k, v in (("img_size", img_size), ("drop_path_rate", drop_path_rate)) if v is not None})
        try:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans, **extra)
        except TypeError as e:  # a keyword this architecture does not take
            raise ConfigError(f"backbone {PREFIX}{model_name} does not take option(s) "
                              f"{', '.join(sorted(extra))}: {e}. Remove them from backbone_options") from None
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        if weights_path is not None:
            self._load(weights_path, cfg, in_chans)
        self.model_name, self.in_chans = model_name, in_chans
        self.out_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.normalize = weights_path is not None if normalize is None else normalize
        mean = channel_stats(cfg.get("mean", (0.485, 0.456, 0.406)), in_chans)
        std = channel_stats(cfg.get("std", (0.229, 0.224, 0.225)), in_chans)
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, in_chans, 1, 1), persistent=False)
        embed = getattr(self.model, "patch_embed", None)
        fixed = embed is not None and getattr(embed, "strict_img_size", False) and not getattr(
            embed, "dynamic_img_size", False)
        self.input_size = tuple(embed.img_size) if fixed and embed.img_size is not None else None

    def _load(self, path: str, cfg: dict[str, Any], in_chans: int) -> None:
        state = read_state_dict(path)
        family = sys.modules.get(type(self.model).__module__)
        filter_fn = getattr(family, "checkpoint_filter_fn", None)  # timm's converter: formats, pos-embed size
        if filter_fn is not None:
            state = filter_fn(state, self.model)
        for key in first_conv_keys(cfg.get("first_conv")):
            if key in state and state[key].dim() == 4:
                state[key] = adapt_stem_weight(state[key], in_chans, key=key, path=path)
        heads = cfg.get("classifier") or ()
        load_strict(self.model, state, path=path, ignore=[heads] if isinstance(heads, str) else list(heads))
        logger.info("loaded %s%s weights from %s", PREFIX, type(self.model).__name__, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            raise ConfigError(f"backbone {PREFIX}{self.model_name} takes {self.input_size[0]}x{self.input_size[1]} "
                              f"patches, got {tuple(x.shape)}; set backbone_options.img_size: {x.shape[-1]} "
                              f"(square patches) or model_options: {{dynamic_img_size: true}}")
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.model(x)  # (n, D)


def check_model_name(model_name: str) -> None:
    """A ConfigError listing close timm names when `model_name` is not a timm model."""
    import timm

    if model_name and timm.is_model(model_name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(model_name, names, n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(PREFIX + c for c in close)}." if close else ""
    raise ConfigError(f"unknown backbone {PREFIX + model_name!r}: timm has no model {model_name!r}.{hint} "
                      f"List them with python -c \"import timm; print(timm.list_models('*{model_name[:6]}*'))\"")


def resolve(model_name: str) -> functools.partial:
    """The builder of `timm/<model_name>`: TimmBackbone with the name bound (options checkable by keyword)."""
    check_model_name(model_name)
    return functools.partial(TimmBackbone, model_name=model_name)
