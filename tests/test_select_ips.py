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


def _attention_mil(heads: int = 2, tokens: int = 3, dim: int = 8):
    from hrsel.models.aggregators import build_aggregator

    torch.manual_seed(0)
    return build_aggregator("attention", in_dim=dim, num_tokens=tokens, heads=heads, head_dim=4, mlp_dim=16,
                            dropout=0.0).eval()


def _shuffled_stream(items: torch.Tensor, chunk: int, order: torch.Tensor):
    """Chunks of `items` (B, N, D) in the item order `order` (N,), with their true indices."""
    b = items.shape[0]
    for s in range(0, len(order), chunk):
        idx = order[s:s + chunk].expand(b, -1)
        yield idx, items[:, order[s:s + chunk]]


def _record_map(agg, items, chunk, order):
    score = lambda x, mask, idx: agg.attention_scores(x, mask=mask)  # noqa: E731
    logits = lambda x, mask, idx: agg.attention_logits(x, mask=mask)  # noqa: E731
    res = iterative_topm(_shuffled_stream(items, chunk, order), m=4, score_fn=score, record_fn=logits)
    return agg.scores_from_logits(res.all_scores), res


def test_recorded_attention_does_not_depend_on_the_chunk_order():
    """The IPS score map equals one-round attention over all N, whatever order the chunks came in."""
    agg = _attention_mil()
    items = torch.randn(2, 23, 8)
    with torch.no_grad():
        one_round = agg.attention_scores(items)  # (B, N): every patch scored in one set
        maps = [_record_map(agg, items, chunk, torch.randperm(23, generator=torch.Generator().manual_seed(s)))[0]
                for s, chunk in [(0, 5), (1, 5), (2, 7), (3, 23)]]
    for scores in maps:
        torch.testing.assert_close(scores, one_round, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps[0].sum(1), torch.ones(2))


def test_arrival_round_scores_are_biased_towards_the_first_chunk():
    """Why IPS records logits: a chunk's softmax over I items (first) vs M + I (later) inflates the first."""
    agg = _attention_mil(heads=1, tokens=1)
    items = torch.randn(1, 40, 8)
    score = lambda x, mask, idx: agg.attention_scores(x, mask=mask)  # noqa: E731
    with torch.no_grad():
        orders = [torch.arange(40), torch.arange(40).flip(0)]
        arrival = [iterative_topm(_shuffled_stream(items, 8, o), m=8, score_fn=score, record_scores=True).all_scores
                   for o in orders]
        recorded = [_record_map(agg, items, 8, o)[0] for o in orders]
    assert not torch.allclose(arrival[0], arrival[1])  # the old map changed with the order
    torch.testing.assert_close(recorded[0], recorded[1])


def test_record_fn_places_per_item_vectors_at_their_indices():
    values = torch.randn(2, 9)
    vectors = lambda items, mask, idx: torch.stack([items, 2 * items], dim=-1)  # noqa: E731
    res = iterative_topm(stream(values, 4), m=3, score_fn=pointwise, record_fn=vectors)
    assert res.all_scores.shape == (2, 9, 2)
    torch.testing.assert_close(res.all_scores, torch.stack([values, 2 * values], dim=-1))
