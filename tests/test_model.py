"""Whole-model helpers: sparsify, thresholds round trip, the paper's update, penalty, collapse, density."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import spafl_kernels as sk


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 4 * 4, 8), nn.ReLU()), nn.Linear(8, 3),
    )


def test_sparsify_replaces_in_place_and_keeps_weights():
    model = small_net()
    x = torch.randn(2, 1, 6, 6)
    before = model(x)
    out = sk.sparsify(model, ste="outer", backend="torch", skip=["4"])
    assert out is model
    assert isinstance(model[0], sk.SparseConv2d) and isinstance(model[3][0], sk.SparseLinear)
    assert type(model[4]) is nn.Linear  # skipped
    assert [name for name, _ in sk.sparse_layers(model)] == ["0", "3.0"]
    assert model[0].ste == "outer" and model[3][0].backend == "torch"
    torch.testing.assert_close(model(x), before)


def test_sparsify_skip_covers_children_and_checks_names():
    model = small_net()
    sk.sparsify(model, skip=["3"])
    assert type(model[3][0]) is nn.Linear
    with pytest.raises(ValueError, match=r"skip names not found in the model: \['nope'\]"):
        sk.sparsify(small_net(), skip=["nope"])
    assert isinstance(sk.sparsify(nn.Linear(2, 3)), sk.SparseLinear)


def test_thresholds_round_trip_and_checks():
    model = sk.sparsify(small_net())
    taus = sk.thresholds(model)
    assert set(taus) == {"0", "3.0", "4"} and taus["3.0"].shape == (8,)
    taus["3.0"] += 0.5
    assert (model[3][0].threshold == 0).all()  # thresholds() returns copies
    sk.load_thresholds(model, taus)
    assert (model[3][0].threshold == 0.5).all()
    with pytest.raises(ValueError, match=r"missing \['4'\]"):
        sk.load_thresholds(model, {k: v for k, v in taus.items() if k != "4"})
    with pytest.raises(ValueError, match=r"unknown names \['5'\]"):
        sk.load_thresholds(model, {**taus, "5": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"3.0: shape \(7,\), expected \(8,\)"):
        sk.load_thresholds(model, {**taus, "3.0": torch.zeros(7)})
    with pytest.raises(ValueError, match="4: non-finite values"):
        sk.load_thresholds(model, {**taus, "4": torch.full((3,), float("nan"))})
    with pytest.raises(ValueError, match="4: dtype torch.int64, expected torch.float32"):
        sk.load_thresholds(model, {**taus, "4": torch.zeros(3, dtype=torch.long)})
    sk.load_thresholds(model, {**taus, "4": torch.full((3,), 0.25, dtype=torch.float64)})  # converted
    assert model[4].threshold.dtype == torch.float32 and (model[4].threshold == 0.25).all()


def test_apply_threshold_update_is_the_papers_rule():
    model = sk.sparsify(small_net())
    w_conv, w_fc = model[0].weight.detach().clone(), model[4].weight.detach().clone()
    delta = {name: torch.randn(t.shape) for name, t in sk.thresholds(model).items()}
    sk.apply_threshold_update(model, delta)
    # Conv2d: n = kh * kw = 9; Linear: n = in_features = 8. Sign of each row's sum.
    expected_conv = w_conv - (delta["0"] * w_conv.sum((1, 2, 3)).sign() / 9).view(-1, 1, 1, 1)
    expected_fc = w_fc - (delta["4"] * w_fc.sum(1).sign() / 8).view(-1, 1)
    torch.testing.assert_close(model[0].weight.detach(), expected_conv)
    torch.testing.assert_close(model[4].weight.detach(), expected_fc)


def test_threshold_penalty():
    model = sk.sparsify(small_net())
    with torch.no_grad():
        model[4].threshold.fill_(1.0)
    expected = 4 * 1 + 8 * 1 + 3 * math.exp(-1.0)
    penalty = sk.threshold_penalty(model)
    assert penalty.item() == pytest.approx(expected)
    penalty.backward()
    torch.testing.assert_close(model[4].threshold.grad, torch.full((3,), -math.exp(-1.0)))
    assert sk.threshold_penalty(nn.Linear(2, 2)).item() == 0.0


def test_reset_collapsed_and_density():
    model = sk.sparsify(small_net())
    with torch.no_grad():
        model[3][0].threshold.fill_(100.0)  # every row pruned
        model[4].threshold.copy_(model[4].weight.abs().mean(1) + torch.tensor([1.0, -1.0, -1.0]))
    dens = sk.density(model)
    assert dens["0"] == 1.0 and dens["3.0"] == 0.0 and dens["4"] == pytest.approx(2 / 3)
    rows_weights = {"0": (4, 9), "3.0": (8, 64), "4": (3, 8)}
    total = sum(r * k for r, k in rows_weights.values())
    assert dens["total"] == pytest.approx((4 * 9 + 0 + 2 * 8) / total)
    assert sk.reset_collapsed(model, min_density=0.01) == ["3.0"]
    assert (model[3][0].threshold == 0).all() and sk.density(model)["3.0"] == 1.0
    assert sk.density(nn.Linear(2, 2)) == {"total": 1.0}


def test_sparsify_leaves_multihead_attention_dense():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="0 is an nn.MultiheadAttention"):
        sk.sparsify(model)
    assert type(model[0].out_proj) is not sk.SparseLinear and isinstance(model[1], sk.SparseLinear)


# --------------------------------------------------------------- sparsify keeps what the model means


def test_sparsify_keeps_a_module_used_twice_and_shared_modules_shared():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    twice = nn.Sequential(layer, nn.ReLU(), layer)
    shared = nn.Linear(4, 4)
    parents = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    x = torch.randn(3, 4)
    before = twice(x)
    sk.sparsify(twice)
    sk.sparsify(parents, skip="b.0")  # a plain string is one name; any alias skips a shared module
    assert twice[0] is twice[2] and isinstance(twice[0], sk.SparseLinear)
    torch.testing.assert_close(twice(x), before)
    assert parents["a"][0] is parents["b"][0] and type(parents["a"][0]) is nn.Linear
    sk.sparsify(parents)
    assert parents["a"][0] is parents["b"][0] and isinstance(parents["a"][0], sk.SparseLinear)
    assert [name for name, _ in sk.sparse_layers(parents)] == ["a.0"]


def test_sparsify_keeps_tied_weights_and_frozen_flags():
    embedding, decoder = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
    decoder.weight = embedding.weight  # tied, as in language models
    frozen = nn.Linear(6, 6)
    frozen.requires_grad_(False)
    model = nn.ModuleDict({"embedding": embedding, "decoder": decoder, "frozen": frozen})
    weight = decoder.weight
    sk.sparsify(model)
    assert model["decoder"].weight is weight is model["embedding"].weight
    assert not model["frozen"].weight.requires_grad and not model["frozen"].bias.requires_grad
    assert not model["frozen"].threshold.requires_grad  # a frozen layer stays frozen
    assert model["decoder"].threshold.requires_grad


def test_sparsify_keeps_hooks():
    model = nn.Sequential(nn.Linear(3, 3))
    calls = []
    handle = model[0].register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    model[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    sk.sparsify(model)
    model(torch.randn(2, 3))
    assert calls == ["pre", "SparseLinear"]
    handle.remove()  # handles taken before conversion still work
    model(torch.randn(2, 3))
    assert calls == ["pre", "SparseLinear", "pre"]


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm", "legacy_weight_norm"])
def test_sparsify_keeps_parametrizations(norm):
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 3)
    if norm == "legacy_weight_norm":
        conv, fc = torch.nn.utils.weight_norm(conv), torch.nn.utils.weight_norm(fc)
    else:
        apply = getattr(torch.nn.utils.parametrizations, norm)
        conv, fc = apply(conv), apply(fc)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    x = torch.randn(2, 2, 5, 5)
    before = model(x)
    sk.sparsify(model, backend="torch")
    assert isinstance(model[0], sk.SparseConv2d) and isinstance(model[4], sk.SparseLinear)
    torch.testing.assert_close(model(x), before)  # every row active: the same function
    model(x).sum().backward()
    trained = [p for name, p in model.named_parameters() if "threshold" not in name]
    assert all(p.grad is not None for p in trained)  # gradients reach the parametrizations' originals
    if norm == "weight_norm":
        torch.nn.utils.parametrize.remove_parametrizations(model[4], "weight")
        assert type(model[4]) is sk.SparseLinear


def test_sparsify_refuses_subclasses_naming_the_module():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(3, 3), Scaled(3, 3))
    with pytest.raises(ValueError, match=r"cannot convert 1: it is a .*Scaled.*skip=\['1'\]"):
        sk.sparsify(model)
    assert type(model[0]) is nn.Linear  # nothing changed before the error
    sk.sparsify(model, skip=["1"])
    assert isinstance(model[0], sk.SparseLinear) and type(model[1]) is Scaled
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        sk.sparsify(nn.Sequential(nn.Conv2d(1, 1, 3, padding_mode="reflect")))


# ------------------------------------------------------- modules that read a child's weight directly


def _encoder(nested: bool, layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_transformer_encoder_prunes_at_inference(backend, nested):
    """In eval mode under no_grad, nn.TransformerEncoderLayer's fast path (and the encoder's nested-tensor
    path through it) read linear1/linear2's weights directly: sparsify turns them off, so inference gives
    what training mode gives, with the pruned rows pruned."""
    enc = _encoder(nested)
    dense = _encoder(nested)
    with pytest.warns(UserWarning, match="MultiheadAttention") as caught:
        sk.sparsify(enc, backend=backend)
    assert any("nested tensors" in str(w.message) for w in caught) == nested
    with torch.no_grad():
        enc.layers[0].linear1.threshold.fill_(1e3)
        enc.layers[1].linear2.threshold[::2] = 1e3
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if nested else None
    y_train = enc.train()(x, src_key_padding_mask=pad)
    enc.eval()
    dense.eval()
    with torch.no_grad():
        y_inference = enc(x, src_key_padding_mask=pad)
        y_dense = dense(x, src_key_padding_mask=pad)
    torch.testing.assert_close(y_inference, y_train)
    assert (y_inference - y_dense).abs().max() > 0.1  # the pruning shows
    assert sk.density(enc)["layers.0.linear1"] == 0.0


def test_transformer_encoder_layer_alone_and_skipped_linears_keep_the_fast_path():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match="self_attn is an nn.MultiheadAttention"):
        sk.sparsify(layer, backend="cpp")
    with torch.no_grad():
        layer.linear2.threshold.fill_(1e3)
    x = torch.randn(3, 4, 8)
    y_train = layer.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), y_train)
    untouched = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.warns(UserWarning):
        sk.sparsify(untouched, skip=["linear1", "linear2"])
    assert untouched.activation_relu_or_gelu == 1  # nothing sparse inside: the fast path stays


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="nn.LinearCrossEntropyLoss is PyTorch >= 2.13")
def test_linear_cross_entropy_loss_stays_dense():
    """nn.LinearCrossEntropyLoss passes its linear.weight to F.linear_cross_entropy: a sparse linear would
    be ignored, so it stays dense, with a warning naming it."""
    model = nn.ModuleDict({"body": nn.Linear(4, 6), "loss": nn.LinearCrossEntropyLoss(6, 3)})
    with pytest.warns(UserWarning, match="loss is an nn.LinearCrossEntropyLoss, which uses its linear.weight"):
        sk.sparsify(model)
    assert type(model["loss"].linear) is nn.Linear and isinstance(model["body"], sk.SparseLinear)


# ------------------------------------------------------------- sparsify changes all or nothing


def _structure(model: nn.Module) -> list:
    return [(name, type(m), sorted(m._parameters), sorted(k for k in vars(m) if not k.startswith("_")))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("kwargs, error", [
    ({"ste": "Identity"}, "ste must be one of"),
    ({"backend": "bogus"}, "backend must be 'auto' or one of"),
    ({"skip": ["nope"]}, "skip names not found"),
    ({"skip": [3]}, "skip must be a module name or a list of them"),
    ({"skip": 3}, "skip must be a module name or a list of them"),
])
def test_sparsify_checks_every_argument_before_changing_anything(kwargs, error):
    model = small_net()
    before, state = _structure(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=error):
        sk.sparsify(model, **kwargs)
    assert _structure(model) == before
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    repr(model)
    sk.sparsify(model, ste="outer")
    assert [name for name, _ in sk.sparse_layers(model)] == ["0", "3.0", "4"]
    model(torch.randn(2, 1, 6, 6)).sum().backward()


def test_sparsify_failing_midway_restores_the_model(monkeypatch):
    """A conversion that fails after others succeeded (here the Conv2d's, made to fail) leaves no module
    converted."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Conv2d(1, 2, 1))
    before = _structure(model)

    def broken(self, ste, backend):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(sk.SparseConv2d, "_init_sparse", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        sk.sparsify(model)
    assert _structure(model) == before
    repr(model)
    monkeypatch.undo()
    sk.sparsify(model)
    assert len(list(sk.sparse_layers(model))) == 3


# ----------------------------------------------------------------------------- edge values


def test_layer_without_rows_has_mask_and_density():
    model = sk.sparsify(nn.Sequential(nn.Linear(3, 0), nn.Conv2d(2, 0, 3), nn.Linear(3, 2)))
    assert model[0].mask().shape == (0,) and model[1].mask().shape == (0,)
    assert model[0].density() == 1.0
    assert sk.density(model) == {"0": 1.0, "1": 1.0, "2": 1.0, "total": 1.0}
    assert sk.reset_collapsed(model) == []


@pytest.mark.parametrize("min_density", [1.5, -1, float("nan"), "0.1", None, True])
def test_reset_collapsed_checks_min_density(min_density):
    model = sk.sparsify(small_net())
    with pytest.raises(ValueError, match=r"min_density must be a number in \[0, 1\]"):
        sk.reset_collapsed(model, min_density=min_density)


def test_thresholds_and_updates_finite_in_the_parameters_dtype():
    """float64 1e300 is finite but becomes inf in float32: refused after the cast, and nothing changes."""
    model = sk.sparsify(small_net())
    taus, weights = sk.thresholds(model), {k: v.clone() for k, v in model.state_dict().items()}
    huge = {name: torch.full_like(t, 1e300, dtype=torch.float64) for name, t in taus.items()}
    with pytest.raises(ValueError, match="non-finite"):
        sk.load_thresholds(model, {**taus, "4": huge["4"]})
    with pytest.raises(ValueError, match="non-finite"):
        sk.apply_threshold_update(model, huge)
    # A finite float32 delta whose update overflows the weights: refused before any layer is written.
    overflow = {name: torch.zeros_like(t) for name, t in taus.items()}
    overflow["4"] = torch.full_like(taus["4"], -3e38)  # a step of 3e38 / 8 on weights of 3.3e38
    with torch.no_grad():
        model[4].weight.fill_(3.3e38)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="updated weights"):
        sk.apply_threshold_update(model, {**overflow, "0": torch.full_like(taus["0"], 0.5)})
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    sk.apply_threshold_update(model, {name: torch.zeros_like(t) for name, t in taus.items()})
