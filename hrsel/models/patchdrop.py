"""PatchDrop (Uzkent & Ermon, CVPR 2020): a Bernoulli keep/drop policy per patch, learnt with REINFORCE.

A policy network on the downscaled image gives a keep probability per grid patch; the
classifier sees the kept full-resolution patches. Training follows PatchDrop's released code
(github.com/ermongroup/PatchDrop, pretrain.py / finetune.py as of commit 9e9d9fa): actions
sampled from the bounded probabilities alpha p + (1 - alpha)(1 - p), reward 1 - (kept/N)^2
if every task is right else -penalty, self-critical baseline = the reward of the greedy
policy (p >= 0.5) on the same image, computed by a second, no-grad classifier pass. Two stages:

- pretrain: the classifier is frozen (no gradient, eval mode) and only the policy learns,
  against a high-resolution classifier loaded with `classifier_checkpoint`;
- finetune: policy and classifier jointly, the classifier in training mode (the released
  finetune.py calls rnet.train()); the classifier's loss is the trainer's task loss on the
  sampled patches (PatchDrop: cross-entropy on the sampled image).

Two options keep the behaviour of PatchDrop's first commit (1df48e5), which the released code
dropped: `curriculum_steps` (pretrain.py freed one patch per epoch) and `freeze_norm`
(finetune.py kept the classifier in eval mode, rnet.eval()). Both are off by default.

Inference keeps p >= 0.5. See hrsel/select/policy.py for the pieces. With `tissue=` (one mask
per image) cells off tissue are always dropped and left out of the policy's loss.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrsel.errors import ConfigError
from hrsel.models.candidates import candidate_masks, nan_outside
from hrsel.models.classifier import PatchClassifier
from hrsel.models.heads import is_correct
from hrsel.models.patches import ImageBatch
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.models.scorers import build_scorer
from hrsel.models.torch_file import load_weights_only
from hrsel.select.extract import GridGeometry
from hrsel.select.policy import (apply_curriculum, bound_probs, curriculum_free, greedy_actions, log_prob,
                                 patchdrop_reward, reinforce_loss, sample_actions, self_critical_advantage,
                                 with_one_kept)
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
BASELINES = ("self_critical", "running_mean")


class PatchDropPipeline(Pipeline):
    """Keep/drop policy over a regular patch grid, REINFORCE for the policy.

    Keyword-only options:
        tasks: task name -> TaskSpec (the reward needs every task right).
        in_chans: image channels.
        patch_size: side of the grid patches (stride = patch_size).
        downscale: integer factor of the policy network's input.
        policy, policy_options: name in SCORERS for the policy network and its options.
        backbone, backbone_options, aggregator, aggregator_options, head_hidden, pos_encoding,
            num_positions: see `PatchClassifier`.
        stage: pretrain (classifier frozen, policy only) | finetune (joint).
        penalty: a wrong prediction earns -penalty (PatchDrop: 0.5 pre-training, 5 to 20 fine-tuning).
        alpha: exploration bound of the training samples (PatchDrop: 0.8; 1 = none).
        baseline: self_critical (PatchDrop) | running_mean (of the batch rewards, `baseline_momentum`).
        curriculum_steps: pre-training curriculum over this many steps: at step t the policy decides
            patches 0 .. t N / steps, the others are kept and left out of the loss (0 = off, as the
            released code; PatchDrop's first commit freed one patch per epoch). Training only;
            evaluation always lets the policy decide every patch.
        max_kept: the classifier sees at most this many kept patches (the most probable ones);
            the reward still counts every kept patch. None = no cap (PatchDrop has none).
        freeze_norm: finetune with the classifier in eval mode (BatchNorm running statistics, no
            dropout), as PatchDrop's first commit did (rnet.eval()); off by default, as the released
            finetune.py (rnet.train()). Always so in pretrain (both versions: rnet.eval()).
        policy_weight: weight of the REINFORCE loss.
        classifier_checkpoint, policy_checkpoint: a hrsel checkpoint (file, or run folder: its
            best.pt) whose `classifier.*` / `policy.*` weights initialise this pipeline's.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 32, downscale: int = 4,
                 policy: str = "dps", policy_options: dict[str, Any] | None = None, backbone: str = "resnet18",
                 backbone_options: dict[str, Any] | None = None, aggregator: str = "mean",
                 aggregator_options: dict[str, Any] | None = None, head_hidden: int | str | None = None,
                 pos_encoding: str = "none", num_positions: int = 0, stage: str = "finetune",
                 penalty: float = 0.5, alpha: float = 0.8, baseline: str = "self_critical",
                 baseline_momentum: float = 0.9, curriculum_steps: int = 0, max_kept: int | None = None,
                 freeze_norm: bool = False, policy_weight: float = 1.0, classifier_checkpoint: str = "",
                 policy_checkpoint: str = ""):
        super().__init__()
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        _check_options(stage=stage, baseline=baseline, penalty=penalty, alpha=alpha, max_kept=max_kept)
        self.tasks = dict(tasks)
        self.patch_size, self.downscale, self.penalty, self.max_kept = patch_size, downscale, penalty, max_kept
        self.stage, self.alpha, self.baseline_kind, self.curriculum_steps = stage, alpha, baseline, curriculum_steps
        self.policy_weight, self.momentum = policy_weight, baseline_momentum
        self.freeze_norm = freeze_norm or stage == "pretrain"
        self.policy = build_scorer(policy, in_chans=in_chans, **(policy_options or {}))
        self.classifier = PatchClassifier(tasks=tasks, in_chans=in_chans, backbone=backbone,
                                          backbone_options=backbone_options, aggregator=aggregator,
                                          aggregator_options=aggregator_options, head_hidden=head_hidden,
                                          pos_encoding=pos_encoding, num_positions=num_positions)
        self.register_buffer("baseline", torch.zeros(()))
        self._step = 0
        if classifier_checkpoint:
            load_part(self.classifier, classifier_checkpoint, prefix="classifier", option="classifier_checkpoint")
        if policy_checkpoint:
            load_part(self.policy, policy_checkpoint, prefix="policy", option="policy_checkpoint")
        if stage == "pretrain":
            self.classifier.requires_grad_(False)
            if not classifier_checkpoint:
                log.warning("PatchDrop pretrain stage without model.classifier_checkpoint: the policy learns "
                            "against a frozen, untrained classifier")
        self.train()

    def train(self, mode: bool = True) -> "PatchDropPipeline":
        super().train(mode)
        if self.freeze_norm:
            self.classifier.eval()
        return self

    def set_progress(self, step: int, total_steps: int) -> None:
        self._step = step

    def forward(self, images, tissue=None) -> PipelineOutput:
        """`tissue`: None or one mask per image; cells off tissue are never kept."""
        batch = ImageBatch(images, device=next(self.parameters()).device, in_chans=self.in_chans)
        geometry = GridGeometry.regular(batch.image_hw, patch_size=self.patch_size)
        n = geometry.num_patches
        logits_p = self.policy(batch.downscaled(self.downscale), grid_shape=geometry.shape).flatten(1)  # (B, N)
        probs = torch.sigmoid(logits_p)
        candidates = candidate_masks(tissue, geometry, batch_size=batch.batch_size, image_wh=batch.image_hw[::-1],
                                     device=probs.device)
        on = None if candidates is None else candidates.to(probs.dtype)  # (B, N) 1 on tissue

        def only(actions: torch.Tensor) -> torch.Tensor:
            return actions if on is None else actions * on

        ranked = probs if on is None else probs * on  # with_one_kept / max_kept pick among candidates
        stats = {"patches_scored": float(n)}
        if not self.training:
            logits, indices, kept = self._classify(batch, geometry, only(greedy_actions(probs)), ranked)
            stats["kept_fraction"] = float(kept.mean()) / n
            return PipelineOutput(logits=logits, indices=indices, scores=nan_outside(probs.detach(), candidates),
                                  stats=stats)
        free = curriculum_free(self._step, num_patches=n, steps=self.curriculum_steps)
        bounded = bound_probs(probs, self.alpha)  # (B, N) the distribution actually sampled
        actions, mask = apply_curriculum(sample_actions(bounded), free)
        actions, mask = only(actions), only(mask)
        logits, indices, kept = self._classify(batch, geometry, actions, ranked)
        extras = {"log_prob": log_prob(bounded, actions, mask=mask), "kept_fraction": kept / n}
        if self.baseline_kind == "self_critical":
            with torch.no_grad():
                greedy, _ = apply_curriculum(greedy_actions(probs), free)
                greedy_logits, _, greedy_kept = self._classify(batch, geometry, only(greedy), ranked)
            extras["greedy_kept_fraction"] = greedy_kept / n
            extras.update({f"greedy_logits/{t}": v.detach() for t, v in greedy_logits.items()})
        stats.update(kept_fraction=float(kept.mean()) / n, free_patches=float(free))
        return PipelineOutput(logits=logits, indices=indices, scores=nan_outside(probs.detach(), candidates),
                              extras=extras, stats=stats)

    def _classify(self, batch: ImageBatch, geometry: GridGeometry, actions: torch.Tensor, probs: torch.Tensor):
        """(B, N) 0/1 actions -> (logits, kept indices (B, K) -1 padded, kept count (B,) before the cap)."""
        shown = with_one_kept(actions, probs)
        indices = _kept(shown, probs, self.max_kept)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage == "finetune"):
            logits = self.classifier(batch.gather(geometry, indices), mask=indices >= 0, positions=indices)
        return logits, indices, shown.sum(dim=1)

    def _all_correct(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([is_correct(logits[t], targets[t], spec) for t, spec in self.tasks.items()]).all(0)

    def auxiliary_loss(self, out: PipelineOutput, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """REINFORCE on the sampled actions; zero outside training."""
        if not self.training or "log_prob" not in out.extras:
            return next(iter(out.logits.values())).new_zeros(())
        reward = patchdrop_reward(self._all_correct(out.logits, targets), out.extras["kept_fraction"],
                                  penalty=self.penalty)
        if self.baseline_kind == "self_critical":
            greedy_logits = {t: out.extras[f"greedy_logits/{t}"] for t in self.tasks}
            baseline = patchdrop_reward(self._all_correct(greedy_logits, targets),
                                        out.extras["greedy_kept_fraction"], penalty=self.penalty)
            loss = -(self_critical_advantage(reward, baseline) * out.extras["log_prob"]).mean()
        else:
            baseline = self.baseline.clone()
            loss = reinforce_loss(out.extras["log_prob"], reward, baseline)
            with torch.no_grad():
                self.baseline.mul_(self.momentum).add_((1 - self.momentum) * reward.mean())
        out.stats.update(reward=float(reward.mean()), baseline=float(baseline.float().mean()))
        return self.policy_weight * loss


def _check_options(*, stage: str, baseline: str, penalty: float, alpha: float, max_kept: int | None) -> None:
    if stage not in STAGES:
        raise ConfigError(f"model.stage {stage!r} is unknown; valid: {', '.join(STAGES)}")
    if baseline not in BASELINES:
        raise ConfigError(f"model.baseline {baseline!r} is unknown; valid: {', '.join(BASELINES)}")
    if not penalty >= 0:
        raise ConfigError(f"model.penalty must be >= 0, got {penalty!r}: it is the magnitude of the reward of a "
                          "wrong prediction (PatchDrop's --penalty -0.5 is model.penalty: 0.5)")
    if not 0.5 <= alpha <= 1.0:
        raise ConfigError(f"model.alpha must be in [0.5, 1], got {alpha!r} (PatchDrop: 0.8; 1 = no bound)")
    if max_kept is not None and max_kept < 1:
        raise ConfigError(f"model.max_kept must be >= 1 or null, got {max_kept!r}")


def load_part(module: nn.Module, path: str, *, prefix: str, option: str) -> None:
    """Load the `prefix.*` weights of a hrsel checkpoint (its "model" state) into `module`."""
    file = Path(path)
    file = file / "best.pt" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"model.{option}: no checkpoint at {str(file)!r}; give a .pt file or a run folder "
                          "holding best.pt")
    fix = f". Give model.{option} a checkpoint hrsel wrote (a run's best.pt or last.pt)"
    state = load_weights_only(file, advice=fix)  # a pickle with code in it is refused before it runs
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"model.{option}: {str(file)!r} holds a {type(state).__name__}, not a hrsel checkpoint "
                          f"(a mapping of weights){fix}")
    part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not part:
        raise ConfigError(f"model.{option}: {str(file)!r} holds no {prefix}.* weights; give the checkpoint of a "
                          f"pipeline with a {prefix} (e.g. an IPS or PatchDrop run)")
    try:
        module.load_state_dict(part)
    except RuntimeError as err:
        raise ConfigError(f"model.{option}: the {prefix} in {str(file)!r} does not match this config; use the "
                          f"backbone / aggregator / policy options of the run that wrote it. {err}") from None


def _kept(actions: torch.Tensor, probs: torch.Tensor, cap: int | None) -> torch.Tensor:
    """(B, N) 0/1 actions -> (B, K) kept patch indices in raster order, -1 padded.

    K is the largest kept count in the batch, at most `cap`; over the cap the most
    probable kept patches stay.
    """
    count = int(actions.sum(dim=1).max())
    count = min(count, cap) if cap else count
    key = torch.where(actions > 0, probs.detach() + 1.0, torch.zeros_like(probs))  # kept ones rank first
    top = key.topk(count, dim=1)
    big = torch.iinfo(torch.int64).max
    idx = torch.where(top.values > 0, top.indices, torch.full_like(top.indices, big)).sort(dim=1).values
    return idx.masked_fill(idx == big, -1)
