import pytest
import torch

from meshfl.aggregate.fedavg import fedavg, weighted_average
from meshfl.aggregate.partial import Part, PartialAggregates
from meshfl.core.params import Layout, Params

LAYOUT = Layout(("w",), ((5,),))


def params(values) -> Params:
    return Params(torch.tensor(values, dtype=torch.float32), LAYOUT)


def test_fedavg_is_the_exact_weighted_mean():
    a, b, c = params([1, 2, 3, 4, 5]), params([3, 2, 1, 0, -1]), params([0, 0, 0, 0, 10])
    result = fedavg([a, b, c], [1, 3, 4])
    expected = torch.tensor([(1 + 9 + 0) / 8, (2 + 6) / 8, (3 + 3) / 8, (4 + 0) / 8, (5 - 3 + 40) / 8])
    assert torch.equal(result.flat, expected)


def test_fedavg_of_equal_weights_is_plain_mean_and_single_model_is_itself():
    torch.manual_seed(1)
    vectors = [torch.randn(1000) for _ in range(7)]
    assert torch.allclose(weighted_average(vectors, [2.0] * 7), torch.stack(vectors).mean(0), atol=1e-6)
    assert torch.equal(weighted_average(vectors[:1], [5.0]), vectors[0])


def test_fedavg_rejects_bad_weights():
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([torch.zeros(2), torch.ones(2)], [0.0, 0.0])
    with pytest.raises(ValueError, match="2 vectors but 1 weights"):
        weighted_average([torch.zeros(2), torch.ones(2)], [1.0])


def test_partial_aggregates_never_count_a_model_twice_and_reach_fedavg():
    torch.manual_seed(2)
    models = {p: params(torch.randn(5).tolist()) for p in range(4)}
    weights = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    left = PartialAggregates()
    assert left.add(Part(models[0], frozenset([0]), weights[0]))
    assert left.add(Part(models[1], frozenset([1]), weights[1]))
    sent = left.for_neighbour(frozenset([1]))  # neighbour already holds 1: gets 0 alone
    assert sent.contributors == frozenset([0])
    right = PartialAggregates()
    assert right.add(Part(models[2], frozenset([2]), weights[2]))
    assert right.add(Part(models[3], frozenset([3]), weights[3]))
    pair = right.result()
    assert left.add(pair) and not left.add(Part(models[3], frozenset([3]), weights[3]))
    assert left.covers(range(4)) and left.missing(range(5)) == [4]
    expected = fedavg([models[p] for p in range(4)], [weights[p] for p in range(4)])
    result = left.result()
    assert result.weight == 100.0
    assert torch.allclose(result.params.flat, expected.flat, atol=1e-6)
