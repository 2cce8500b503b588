"""Perturbed top-K (Berthet et al. 2020), the selection operator of DPS (Cordonnier et al. 2021).

Forward:   Y_sigma(s) = 1/S sum_m Y*(s + sigma Z_m),  Z_m ~ N(0, I)
Backward:  dL/ds = 1/(S sigma) sum_m <G, Y*(s + sigma Z_m)>_F Z_m

Y*(s) is the (k, n) matrix of one-hot rows of the k largest entries, sorted by
position. The upstream gradient G (B, k, n) is contracted over the output index
(j, n), the noise index stays free; there is no factor k.

Memory: only the selected indices (B, S, k) are kept. The noise is drawn in
chunks of samples and regenerated in backward from a saved generator state, so
neither the (B, S, k, n) one-hots nor the (B, k, n, n) Jacobian nor the
(B, S, n) noise ever exist at once.
"""
from __future__ import annotations

from typing import Iterator

import torch

from hrsel.select._checks import check_generator, check_k, check_non_negative, check_positive_int, check_scores
from hrsel.select.topk import hard_topk, hard_topk_indicators

# Noise chunk: about this many float32 values (16 MB) per chunk of samples.
_CHUNK_ELEMENTS = 1 << 22


def _samples_per_chunk(batch: int, n: int, num_samples: int) -> int:
    return max(1, min(num_samples, _CHUNK_ELEMENTS // max(1, batch * n)))


def noise_chunks(
    batch: int, num_samples: int, n: int, *, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Standard normal noise for `num_samples` perturbations, (c, B, n) float32 chunks along samples.

    The chunking is a pure function of the shape, so replaying a generator state
    yields the same noise: this is how backward regenerates it.
    """
    step = _samples_per_chunk(batch, n, num_samples)
    for start in range(0, num_samples, step):
        c = min(step, num_samples - start)
        z = torch.randn((c, batch, n), generator=generator, device=generator.device, dtype=torch.float32)
        yield z.to(device, non_blocking=True)


def sample_noise(batch: int, num_samples: int, n: int, *, generator: torch.Generator, device=None) -> torch.Tensor:
    """All the noise `perturbed_topk` draws with this generator, as one (S, B, n) tensor (for references)."""
    device = torch.device(device) if device is not None else generator.device
    return torch.cat(list(noise_chunks(batch, num_samples, n, generator=generator, device=device)))


def _private_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the global RNG, so `torch.manual_seed` makes runs repeatable."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def _replay(generator: torch.Generator, state: torch.Tensor) -> torch.Generator:
    g = torch.Generator(device=generator.device)
    g.set_state(state)
    return g


class PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, sigma, num_samples, generator, variance_reduction):
        b, n = scores.shape
        ctx.k, ctx.sigma, ctx.num_samples, ctx.variance_reduction = k, sigma, num_samples, variance_reduction
        ctx.set_materialize_grads(False)
        if sigma == 0:
            ctx.zero = True
            return hard_topk_indicators(scores, k)
        ctx.zero = False
        generator = generator if generator is not None else _private_generator(scores.device)
        ctx.generator, ctx.state = generator, generator.get_state()

        s = scores.detach().float()
        chunks = []
        for z in noise_chunks(b, num_samples, n, generator=generator, device=scores.device):
            perturbed = s.unsqueeze(0) + sigma * z  # (c, B, n)
            chunks.append(torch.topk(perturbed, k, dim=-1, sorted=False).indices.sort(dim=-1).values)
        idx = torch.cat(chunks).permute(1, 2, 0)  # (S, B, k) -> (B, k, S)

        indicators = torch.zeros(b, k, n, device=scores.device, dtype=torch.float32)
        indicators.scatter_add_(2, idx, torch.full(idx.shape, 1.0 / num_samples, device=scores.device))
        saved = [idx]
        if variance_reduction:
            saved.append(hard_topk(s, k))
        ctx.save_for_backward(*saved)
        return indicators.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.zero or grad_output is None:
            return None, None, None, None, None, None
        idx, *rest = ctx.saved_tensors  # idx: (B, k, S)
        g_out = grad_output.float()
        b, k, n = g_out.shape
        # <G, Y*(s + sigma Z_m)> for every sample m: a gather, summed over the k rows.
        g = g_out.gather(2, idx).sum(dim=1)  # (B, S)
        if ctx.variance_reduction:
            (hard_idx,) = rest  # (B, k): Y*(s); E[Z] = 0 keeps the estimate unbiased
            g = g - g_out.gather(2, hard_idx.unsqueeze(-1)).sum(dim=(1, 2)).unsqueeze(1)

        grad = torch.zeros(b, n, device=g_out.device, dtype=torch.float32)
        generator = _replay(ctx.generator, ctx.state)
        start = 0
        for z in noise_chunks(b, ctx.num_samples, n, generator=generator, device=g_out.device):
            c = z.shape[0]
            grad += torch.einsum("bm,mbn->bn", g[:, start:start + c], z)
            start += c
        grad /= ctx.num_samples * ctx.sigma
        return grad.to(grad_output.dtype), None, None, None, None, None


def perturbed_topk(
    scores: torch.Tensor,
    k: int,
    sigma: float,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    variance_reduction: bool = False,
) -> torch.Tensor:
    """Differentiable top-K indicators by averaging hard top-K over Gaussian perturbations.

    Args:
        scores: (B, N) float scores (DPS normalises them to [0, 1] first, see `normalize_scores`).
        k: number of patches to select, 1 <= k <= N.
        sigma: noise scale; 0 returns the hard top-K one-hots and a zero gradient.
        num_samples: number of perturbations S (500 in DPS).
        generator: makes the noise deterministic (it is advanced, as any sampler would).
            Without it, the noise comes from a generator seeded by the global RNG.
        variance_reduction: subtract Y*(s) in the backward (unbiased, lower variance).

    Returns:
        (B, k, N) indicators in the dtype of `scores`; row j is the soft one-hot of the
        j-th selected patch in raster order.
    """
    check_scores(scores)
    check_k(k, scores.shape[1])
    check_non_negative(sigma, "sigma")
    check_positive_int(num_samples, "num_samples")
    check_generator(generator)
    return PerturbedTopK.apply(scores, k, float(sigma), num_samples, generator, variance_reduction)
