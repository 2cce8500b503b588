"""PatchDrop policy helpers: actions, log-probabilities, reward, REINFORCE gradient."""
import torch

from hrsel.select.policy import log_prob, patchdrop_reward, reinforce_loss, sample_actions


def test_greedy_keeps_confident_patches_and_never_nothing():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.3, 0.2]])
    actions = sample_actions(probs, greedy=True)
    assert actions.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # row 2: its most probable patch


def test_sampling_frequency_matches_probabilities():
    probs = torch.tensor([[0.8, 0.5, 0.1]]).expand(4000, -1)
    actions = sample_actions(probs, greedy=False, min_keep=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(actions.mean(0), probs[0], atol=0.03, rtol=0)


def test_log_prob_matches_torch_bernoulli():
    probs = torch.rand(3, 6) * 0.9 + 0.05
    actions = (torch.rand(3, 6) < 0.5).float()
    expected = torch.distributions.Bernoulli(probs=probs).log_prob(actions).sum(1)
    torch.testing.assert_close(log_prob(probs, actions), expected)


def test_reward_and_reinforce_gradient_direction():
    reward = patchdrop_reward(torch.tensor([True, True, False]), torch.tensor([0.5, 1.0, 0.2]), penalty=0.5)
    torch.testing.assert_close(reward, torch.tensor([0.75, 0.0, -0.5]))
    logits = torch.zeros(1, 2, requires_grad=True)
    probs = torch.sigmoid(logits)
    actions = torch.tensor([[1.0, 0.0]])
    reinforce_loss(log_prob(probs, actions), torch.tensor([1.0]), 0.0).backward()
    # a rewarded action becomes more likely: keep-logit of patch 0 up, of patch 1 down
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]
