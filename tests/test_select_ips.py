"""The IPS driver keeps exactly the global top-M, whatever the chunk size."""
import pytest
import torch

from hrsel.select.ips import iterative_topm


def stream(values: torch.Tensor, chunk: int):
    for s in range(0, values.shape[1], chunk):
        idx = torch.arange(s, min(s + chunk, values.shape[1])).expand(values.shape[0], -1)
        yield idx, values[:, s:s + chunk]


pointwise = lambda items, mask, idx: items  # noqa: E731


@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize("m", [1, 3, 10])
@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_equals_global_topm(n, m, chunk):
    g = torch.Generator().manual_seed(n * 100 + m * 10 + chunk)
    values = torch.randn(3, n, generator=g)
    res = iterative_topm(stream(values, chunk), m=m, score_fn=pointwise)
    k = min(m, n)
    expected = values.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(res.indices[:, :k], expected)
    assert torch.equal(res.items[:, :k], values.gather(1, expected))
    assert res.mask[:, :k].all() and not res.mask[:, k:].any()
    assert (res.indices[:, k:] == -1).all() and res.indices.shape == (3, m)


def test_items_carry_along_with_set_dependent_scores():
    # score = item minus the set mean: ranking within every set equals ranking by item
    values = torch.randn(2, 30, 1)
    setwise = lambda items, mask, idx: items[..., 0] - items[..., 0].mean(1, keepdim=True)  # noqa: E731
    res = iterative_topm(stream(values, 7), m=5, score_fn=setwise)
    assert torch.equal(res.indices, values[..., 0].topk(5, dim=1).indices.sort(dim=1).values)
    assert res.items.shape == (2, 5, 1)


def test_ties_go_to_first_seen_or_random():
    values = torch.zeros(1, 20)
    first = iterative_topm(stream(values, 3), m=4, score_fn=pointwise)
    assert first.indices.tolist() == [[0, 1, 2, 3]]
    picks = {tuple(iterative_topm(stream(values, 3), m=4, score_fn=pointwise, random_ties=True,
                                  generator=torch.Generator().manual_seed(s)).indices[0].tolist()) for s in range(5)}
    assert len(picks) > 1


def test_record_scores_and_errors():
    values = torch.randn(2, 9)
    res = iterative_topm(stream(values, 4), m=2, score_fn=pointwise, record_scores=True)
    torch.testing.assert_close(res.all_scores, values)
    with pytest.raises(ValueError, match="empty"):
        iterative_topm(iter([]), m=2, score_fn=pointwise)
    with pytest.raises(ValueError, match="score_fn returned"):
        iterative_topm(stream(values, 4), m=2, score_fn=lambda i, m, x: i[:, :1])
