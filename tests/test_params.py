import pytest
import torch

from meshfl.core.params import Layout, Params, bind_flat
from meshfl.learn.models import build_model


def test_module_round_trip_preserves_every_tensor():
    torch.manual_seed(0)
    source = build_model("cnn", (1, 8, 8), 10)
    params = Params.from_module(source)
    target = build_model("cnn", (1, 8, 8), 10)
    params.to_module(target)
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert params.flat.numel() == sum(p.numel() for p in source.parameters())
    assert torch.equal(params.tensor("0.weight"), source[0].weight.detach())


def test_layout_offsets_and_fingerprint():
    layout = Layout(("a", "b"), ((2, 3), (4,)))
    assert layout.offsets == (0, 6) and layout.numel == 10
    assert layout.slice_of("b") == slice(6, 10)
    assert layout.fingerprint == Layout(("a", "b"), ((2, 3), (4,))).fingerprint
    assert layout.fingerprint != Layout(("a", "b"), ((3, 2), (4,))).fingerprint
    assert layout.fingerprint != Layout(("a", "c"), ((2, 3), (4,))).fingerprint


def test_bad_params_are_refused():
    layout = Layout(("a",), ((3,),))
    with pytest.raises(ValueError, match="layout needs"):
        Params(torch.zeros(4), layout)
    with pytest.raises(ValueError, match="float32"):
        Params(torch.zeros(3, dtype=torch.float64), layout)
    with pytest.raises(ValueError, match="duplicate"):
        Layout(("a", "a"), ((1,), (1,)))
    other = build_model("mlp", (4,), 2)
    with pytest.raises(ValueError, match="fingerprint"):
        Params.from_module(build_model("mlp", (5,), 2)).to_module(other)


def test_bind_flat_makes_parameters_views_of_one_buffer():
    module = build_model("mlp", (4,), 3)
    before = Params.from_module(module)
    flat = bind_flat(module)
    assert torch.equal(flat, before.flat)
    flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in module.parameters())
    flat.copy_(before.flat)
    assert Params.from_module(module).equal(before)


def test_digest_covers_values_and_layout_and_is_computed_once():
    a, b = Layout(("w",), ((4,),)), Layout(("v",), ((4,),))
    zeros = Params(torch.zeros(4), a)
    assert zeros.digest == Params(torch.zeros(4), a).digest and len(zeros.digest) == 64
    assert zeros.digest != Params(torch.zeros(4), b).digest  # same bytes, other layout
    nudged = torch.zeros(4)
    nudged[2] = 1e-30
    assert zeros.digest != Params(nudged, a).digest
    assert "digest" in vars(zeros)  # cached on the object
