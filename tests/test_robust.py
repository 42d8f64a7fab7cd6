"""Robust aggregators: each resists the liars it is meant to, and says clearly when it cannot run."""

import pytest
import torch

from meshfl.aggregate.robust import RobustConfig, robust_aggregate
from meshfl.core.params import Layout, Params

LAYOUT = Layout(("w",), ((50,),))


def honest_and_liars(honest: int = 8, liars: int = 2, scale: float = 100.0):
    g = torch.Generator().manual_seed(0)
    truth = torch.ones(50)
    models = [Params(truth + 0.1 * torch.randn(50, generator=g), LAYOUT) for _ in range(honest)]
    models += [Params(-scale * truth, LAYOUT) for _ in range(liars)]  # sign flip, scaled
    return truth, models


def error(rule: str, **options) -> float:
    truth, models = honest_and_liars()
    weights = [100.0] * 8 + [1e9] * 2  # the liars also claim a huge weight
    out = robust_aggregate(models, weights, RobustConfig(rule=rule, **options), reference=Params(torch.zeros(50), LAYOUT))
    return float((out.flat - truth).norm() / truth.norm())


def test_fedavg_is_taken_over_by_two_liars_and_robust_rules_are_not():
    assert error("fedavg") > 50  # the liars' claimed weight decides it
    assert error("fedavg", max_weight=100.0) > 10  # capped weights: still pulled far by the scaled models
    for rule, options in [("median", {}), ("trimmed_mean", {"trim_fraction": 0.2}), ("krum", {"byzantine": 2}),
                          ("multi_krum", {"byzantine": 2}), ("geometric_median", {})]:
        assert error(rule, **options) < 0.1, rule
    assert error("clip", max_weight=100.0) < 0.8  # clipping bounds the liars' pull to the median norm


def test_rules_agree_with_the_mean_when_nobody_lies():
    truth, models = honest_and_liars(honest=9, liars=0)
    mean = torch.stack([m.flat for m in models]).mean(0)
    for rule in ("fedavg", "median", "trimmed_mean", "multi_krum", "geometric_median"):
        out = robust_aggregate(models, [1.0] * 9, RobustConfig(rule=rule, byzantine=1))
        assert float((out.flat - mean).norm()) < 0.3, rule  # a model's own noise has norm ~0.7
    exact = robust_aggregate(models, [1.0] * 9, RobustConfig(rule="fedavg"))
    assert torch.allclose(exact.flat, mean, atol=1e-6)


def test_median_and_trimmed_mean_exact_values():
    models = [Params(torch.full((50,), float(v)), LAYOUT) for v in (1, 2, 3, 100)]
    assert robust_aggregate(models, [1] * 4, RobustConfig(rule="median")).flat[0] == 2.5
    assert robust_aggregate(models, [1] * 4, RobustConfig(rule="trimmed_mean", trim_fraction=0.25)).flat[0] == 2.5
    odd = models[:3]
    assert robust_aggregate(odd, [1] * 3, RobustConfig(rule="median")).flat[0] == 2.0


def test_krum_picks_an_honest_model_and_multi_krum_averages_honest_ones():
    truth, models = honest_and_liars()
    krum = robust_aggregate(models, [1] * 10, RobustConfig(rule="krum", byzantine=2))
    assert any(torch.equal(krum.flat, m.flat) for m in models[:8])
    multi = robust_aggregate(models, [1] * 10, RobustConfig(rule="multi_krum", byzantine=2))
    assert torch.allclose(multi.flat, torch.stack([m.flat for m in models[:8]]).mean(0), atol=1e-6)  # the 8 honest


def test_clear_errors():
    _, models = honest_and_liars(honest=3, liars=1)
    with pytest.raises(ValueError, match="byzantine: krum needs more than 2f \\+ 2 = 4 models, got 4"):
        robust_aggregate(models, [1] * 4, RobustConfig(rule="krum", byzantine=1))
    with pytest.raises(ValueError, match="clip needs the reference"):
        robust_aggregate(models, [1] * 4, RobustConfig(rule="clip"))
    with pytest.raises(ValueError, match="no models"):
        robust_aggregate([], [], RobustConfig())
