"""Dense reference of perturbed top-K: the formula written out, for tests and benchmarks only.

It materialises what `perturbed_topk` avoids: the (B, S, k, n) one-hots and the
(B, k, n, n) Jacobian, the way the DPS supplement's Appendix G code and its public
PyTorch port do, but with the correct contraction (no per-element product, no
extra factor k). Use `perturbed_topk` for real work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DensePerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, sigma, noise):
        # scores (B, n); noise (S, B, n), the same draws `sample_noise` returns
        z = noise.permute(1, 0, 2).float()  # (B, S, n)
        num_samples = z.shape[1]
        perturbed = scores.detach().float().unsqueeze(1) + sigma * z
        idx = torch.topk(perturbed, k, dim=-1).indices.sort(dim=-1).values  # (B, S, k)
        onehots = F.one_hot(idx, scores.shape[1]).float()  # (B, S, k, n)
        indicators = onehots.mean(dim=1)  # (B, k, n)
        # E[Y* Z^T] / sigma: dY_{kn} / ds_e, the full (B, k, n, n) Jacobian
        jacobian = torch.einsum("bskn,bse->bkne", onehots, z) / (num_samples * sigma)
        ctx.save_for_backward(jacobian)
        return indicators.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (jacobian,) = ctx.saved_tensors
        grad = torch.einsum("bkn,bkne->be", grad_output.float(), jacobian)
        return grad.to(grad_output.dtype), None, None, None


def dense_perturbed_topk(scores: torch.Tensor, k: int, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """(B, n) scores, (S, B, n) noise -> (B, k, n) indicators, with the dense Jacobian backward."""
    return DensePerturbedTopK.apply(scores, k, float(sigma), noise)
