"""PatchDrop-style selector (Uzkent & Ermon, CVPR 2020): a Bernoulli keep/drop policy per patch.

A policy network on the downscaled image gives a keep probability per grid patch.
Training samples keep/drop actions and learns the policy with REINFORCE (reward: correct
minus a penalty that grows with the kept fraction; baseline: a running mean of rewards);
the classifier is trained jointly on the kept patches. Inference keeps p > 0.5.
"""
from __future__ import annotations

from typing import Any

import torch

from hrsel.models.classifier import PatchClassifier
from hrsel.models.heads import is_correct
from hrsel.models.patches import ImageBatch
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.models.scorers import build_scorer
from hrsel.select.extract import GridGeometry
from hrsel.select.policy import log_prob, patchdrop_reward, reinforce_loss, sample_actions
from hrsel.tasks import TaskSpec


class PatchDropPipeline(Pipeline):
    """Keep/drop policy over a regular patch grid, REINFORCE for the policy.

    Keyword-only options:
        tasks: task name -> TaskSpec (the reward needs every task right).
        in_chans: image channels.
        patch_size: side of the grid patches (stride = patch_size).
        downscale: integer factor of the policy network's input.
        policy, policy_options: name in SCORERS for the policy network and its options.
        backbone, backbone_options, aggregator, aggregator_options, head_hidden: see `PatchClassifier`.
        penalty: reward of a wrong prediction is -penalty (PatchDrop: 0.5 pre-training).
        max_kept: keep at most this many patches (the most probable kept ones); None = no cap.
        policy_weight: weight of the REINFORCE loss.
        baseline_momentum: running-mean factor of the reward baseline.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 32, downscale: int = 4,
                 policy: str = "dps", policy_options: dict[str, Any] | None = None, backbone: str = "resnet18",
                 backbone_options: dict[str, Any] | None = None, aggregator: str = "mean",
                 aggregator_options: dict[str, Any] | None = None, head_hidden: int | None = None,
                 penalty: float = 0.5, max_kept: int | None = None, policy_weight: float = 1.0,
                 baseline_momentum: float = 0.9):
        super().__init__()
        self.tasks = dict(tasks)
        self.patch_size, self.downscale, self.penalty, self.max_kept = patch_size, downscale, penalty, max_kept
        self.policy_weight, self.momentum = policy_weight, baseline_momentum
        self.policy = build_scorer(policy, in_chans=in_chans, **(policy_options or {}))
        self.classifier = PatchClassifier(tasks=tasks, in_chans=in_chans, backbone=backbone,
                                          backbone_options=backbone_options, aggregator=aggregator,
                                          aggregator_options=aggregator_options, head_hidden=head_hidden)
        self.register_buffer("baseline", torch.zeros(()))

    def forward(self, images) -> PipelineOutput:
        batch = ImageBatch(images, device=next(self.parameters()).device)
        geometry = GridGeometry.regular(batch.image_hw, patch_size=self.patch_size)
        logits_p = self.policy(batch.downscaled(self.downscale), grid_shape=geometry.shape).flatten(1)  # (B, N)
        probs = torch.sigmoid(logits_p)
        actions = sample_actions(probs, greedy=not self.training)
        indices = _kept(actions, probs, self.max_kept)  # (B, K), -1 padded
        mask = indices >= 0
        patches = batch.gather(geometry, indices)
        logits = self.classifier(patches, mask=mask, positions=indices)
        extras = {"log_prob": log_prob(probs, actions), "kept_fraction": mask.float().sum(1) / actions.shape[1]}
        return PipelineOutput(logits=logits, indices=indices, scores=probs.detach(), extras=extras,
                              stats={"kept_fraction": float(extras["kept_fraction"].mean())})

    def auxiliary_loss(self, out: PipelineOutput, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """REINFORCE on the sampled actions; zero outside training."""
        if not self.training or "log_prob" not in out.extras:
            return next(iter(out.logits.values())).new_zeros(())
        correct = torch.stack([is_correct(out.logits[t], targets[t], spec) for t, spec in self.tasks.items()]).all(0)
        reward = patchdrop_reward(correct, out.extras["kept_fraction"], penalty=self.penalty)
        loss = reinforce_loss(out.extras["log_prob"], reward, self.baseline)
        with torch.no_grad():
            self.baseline.mul_(self.momentum).add_((1 - self.momentum) * reward.mean())
        return self.policy_weight * loss


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
