"""PatchDrop policy pieces: actions, exploration bound, reward, self-critical REINFORCE, curriculum, a toy."""
import pytest
import torch

from hrsel.select.policy import (apply_curriculum, bound_probs, curriculum_free, greedy_actions, log_prob,
                                 patchdrop_reward, reinforce_loss, sample_actions, self_critical_advantage,
                                 with_one_kept)


def test_greedy_keeps_p_at_least_half_and_an_empty_row_gets_its_most_probable_patch():
    probs = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.3, 0.2]])
    greedy = greedy_actions(probs)
    assert greedy.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]  # PatchDrop: p >= 0.5 is kept
    assert with_one_kept(greedy, probs).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_sampling_frequency_matches_probabilities():
    probs = torch.tensor([[0.8, 0.5, 0.1]]).expand(4000, -1)
    actions = sample_actions(probs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(actions.mean(0), probs[0], atol=0.03, rtol=0)


def test_exploration_bound():
    p = torch.tensor([0.0, 0.3, 0.5, 1.0])
    torch.testing.assert_close(bound_probs(p, 0.8), torch.tensor([0.2, 0.38, 0.5, 0.8]))  # 0.8 p + 0.2 (1 - p)
    torch.testing.assert_close(bound_probs(p, 1.0), p)
    # a patch the policy drops with certainty is still kept in 20% of the training samples
    sure = sample_actions(bound_probs(torch.zeros(4000, 2), 0.8), generator=torch.Generator().manual_seed(1))
    assert abs(sure.mean().item() - 0.2) < 0.02
    with pytest.raises(ValueError, match="alpha"):
        bound_probs(p, 0.4)


def test_log_prob_matches_torch_bernoulli_and_masks_patches():
    probs = torch.rand(3, 6) * 0.9 + 0.05
    actions = (torch.rand(3, 6) < 0.5).float()
    per_patch = torch.distributions.Bernoulli(probs=probs).log_prob(actions)
    torch.testing.assert_close(log_prob(probs, actions), per_patch.sum(1))
    mask = torch.tensor([[1.0, 1, 0, 0, 0, 0]]).expand(3, -1)
    torch.testing.assert_close(log_prob(probs, actions, mask=mask), per_patch[:, :2].sum(1))


def test_reward_values():
    correct = torch.tensor([True, True, True, False])
    kept = torch.tensor([4 / 16, 1.0, 1 / 16, 0.25])
    torch.testing.assert_close(patchdrop_reward(correct, kept, penalty=0.5),
                               torch.tensor([1 - 1 / 16, 0.0, 1 - 1 / 256, -0.5]))  # pre-training penalty
    assert patchdrop_reward(correct, kept, penalty=10.0)[3] == -10.0  # fine-tuning penalties: 5 to 20
    with pytest.raises(ValueError, match="magnitude"):
        patchdrop_reward(correct, kept, penalty=-0.5)


def test_self_critical_advantage_and_policy_gradient_by_hand():
    alpha = 0.8
    logits = torch.tensor([[0.4, -1.0, 2.0], [-0.3, 0.7, -2.0]], requires_grad=True)
    probs = torch.sigmoid(logits)
    bounded = bound_probs(probs, alpha)
    sampled = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert greedy_actions(probs).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    # image 0: sample right with 1 of 3 kept, greedy right with 2 of 3; image 1: sample wrong, greedy right with 1
    reward = patchdrop_reward(torch.tensor([True, False]), torch.tensor([1 / 3, 2 / 3]), penalty=0.5)
    greedy_reward = patchdrop_reward(torch.tensor([True, True]), torch.tensor([2 / 3, 1 / 3]), penalty=0.5)
    advantage = self_critical_advantage(reward, greedy_reward)
    torch.testing.assert_close(advantage, torch.tensor([(1 - 1 / 9) - (1 - 4 / 9), -0.5 - (1 - 1 / 9)]))
    reinforce_loss(log_prob(bounded, sampled), reward, greedy_reward).backward()
    # d log p'(a) / d logit with p' = alpha p + (1 - alpha)(1 - p): (2 alpha - 1) p (1 - p) / p' for a = 1,
    # and minus that with 1 - p' below for a = 0; the loss is -mean_b(advantage_b * sum_n log p'(a_bn))
    p, q = probs.detach(), bounded.detach()
    dlog = (2 * alpha - 1) * p * (1 - p) * torch.where(sampled > 0, 1 / q, -1 / (1 - q))
    torch.testing.assert_close(logits.grad, -advantage[:, None] * dlog / 2)


def test_curriculum_frees_one_stage_at_a_time():
    stages = [curriculum_free(t, num_patches=16, steps=160) for t in (0, 9, 10, 159, 160, 10_000)]
    assert stages == [1, 1, 2, 16, 16, 16]
    assert curriculum_free(0, num_patches=16, steps=0) == 16  # no curriculum
    actions = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    forced, mask = apply_curriculum(actions, 2)
    assert forced.tolist() == [[0.0, 1.0, 1.0, 1.0]]  # PatchDrop: policy_sample[:, e + 1:] = 1
    assert mask.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # ... and those patches leave the loss


def _toy_run(seed: int, *, steps: int = 120, n: int = 8, batch: int = 32) -> tuple[float, float]:
    """A linear policy on per-patch features learns which patch to keep.

    One patch of each image is informative (feature 1 + noise, else 0 + noise); the "classifier"
    is right when that patch is kept and right by chance (1/3) otherwise. Returns the greedy
    policy's hit rate and mean kept count on fresh images.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(2, requires_grad=True)  # keep logit = w0 * feature + w1
    optimizer = torch.optim.Adam([w], lr=0.1)

    def draw(b):
        cell = torch.randint(0, n, (b,), generator=g)
        return cell, torch.nn.functional.one_hot(cell, n).float() + 0.3 * torch.randn(b, n, generator=g)

    def reward_of(actions, cell):
        hit = actions.gather(1, cell[:, None]).squeeze(1) > 0
        lucky = torch.rand(len(cell), generator=g) < 1 / 3
        return patchdrop_reward(hit | lucky, actions.sum(1) / n, penalty=0.5)

    for _ in range(steps):
        cell, feature = draw(batch)
        probs = torch.sigmoid(w[0] * feature + w[1])
        bounded = bound_probs(probs, 0.8)
        actions = sample_actions(bounded, generator=g)
        loss = reinforce_loss(log_prob(bounded, actions), reward_of(actions, cell),
                              reward_of(greedy_actions(probs), cell))  # self-critical baseline
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cell, feature = draw(256)
    greedy = greedy_actions(torch.sigmoid(w[0] * feature + w[1]))
    return greedy.gather(1, cell[:, None]).mean().item(), greedy.sum(1).mean().item()


def test_policy_gradient_toy_learns_to_keep_the_informative_patch():
    runs = [_toy_run(seed) for seed in range(5)]
    good = sum(hit >= 0.9 and kept <= 2.5 for hit, kept in runs)
    assert good >= 4, f"only {good} of 5 seeds learned (hit rate, kept of 8): {runs}"
