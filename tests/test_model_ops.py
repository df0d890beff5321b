"""Adapter management: several adapters, scales, enable/disable, merge/unmerge, unload, modules_to_save,
dropouts, mixed precision, state dicts and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loha_diffusion import (
    LoHaConfig,
    LoHaModel,
    LoRAConfig,
    get_adapter_state_dict,
    inject_adapter,
    set_adapter_state_dict,
)
from loha_diffusion.model import (
    adapter_layers,
    adapter_names,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    merge_adapters,
    merge_and_unload,
    set_active_adapters,
    set_adapter_scale,
    unload,
    unmerge_adapters,
)
from loha_diffusion.targeting import unet_preset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"proj": nn.Linear(8, 8), "conv": nn.Conv2d(8, 8, 3, padding=1)})
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # x: (B, 8, H, W)
        h = self.block["conv"](x)
        h = self.block["proj"](h.permute(0, 2, 3, 1))
        return self.head(h)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _loha(**kw):
    return LoHaConfig(**{"r": 2, "alpha": 3, "target_modules": ["proj", "conv"], "init_weights": False, **kw})


X = torch.randn(2, 8, 5, 5)


def test_init_weights_true_is_identity_and_only_adapters_train():
    model = _net()
    expected = model(X)
    inject_adapter(model, LoHaConfig(target_modules=["proj", "conv"], use_effective_conv2d=True))
    torch.testing.assert_close(model(X), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.hada_" in n for n in trainable)
    assert (model.block["proj"].adapters["default"].hada_w2_b == 0).all()


def test_two_adapters_add_and_scale():
    model = _net()
    base = model(X).detach()
    inject_adapter(model, _loha(), "a")
    inject_adapter(model, LoRAConfig(r=2, target_modules=["proj"], init_weights=False), "b")
    assert adapter_names(model) == ["a", "b"]
    both = model(X).detach()
    set_active_adapters(model, ["a"])
    only_a = model(X).detach()
    set_active_adapters(model, "b")
    only_b = model(X).detach()
    # Linear head after a linear adapter: effects of adapters on different layers are not additive in general,
    # but on `proj` alone they are; compare on the proj output.
    set_active_adapters(model, ["a", "b"])
    proj = model.block["proj"]
    h = torch.randn(3, 8)
    delta_a = proj.adapters["a"].delta_weight()
    delta_b = proj.adapters["b"].delta_weight()
    torch.testing.assert_close(proj(h), proj.base_layer(h) + h @ (delta_a + delta_b).T, rtol=1e-5, atol=1e-5)
    set_adapter_scale(model, "b", 0.5)
    torch.testing.assert_close(
        proj(h), proj.base_layer(h) + h @ (delta_a + 0.5 * delta_b).T, rtol=1e-5, atol=1e-5
    )
    set_adapter_scale(model, "a", 0.0)
    set_adapter_scale(model, "b", 0.0)
    torch.testing.assert_close(model(X), base)
    assert not torch.allclose(both, only_a) and not torch.allclose(only_a, only_b)


def test_enable_disable():
    model = _net()
    base = model(X).detach()
    inject_adapter(model, _loha())
    adapted = model(X).detach()
    disable_adapters(model)
    torch.testing.assert_close(model(X), base)
    enable_adapters(model)
    torch.testing.assert_close(model(X), adapted)


def test_merge_unmerge_is_bit_exact_and_merge_matches_forward():
    model = _net()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_adapter(model, _loha(use_effective_conv2d=True))
    adapted = model(X).detach()
    merge_adapters(model)
    assert all(layer.merged_adapters == ["default"] for layer in adapter_layers(model).values())
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    for name, layer in adapter_layers(model).items():
        for pname, p in layer.base_layer.named_parameters():
            assert torch.equal(p, weights[f"{name}.{pname}"])
    torch.testing.assert_close(model(X), adapted)


def test_disable_unmerges_like_peft():
    model = _net()
    base = model(X).detach()
    inject_adapter(model, _loha())
    merge_adapters(model)
    disable_adapters(model)
    torch.testing.assert_close(model(X), base)
    assert all(not layer.merged_adapters for layer in adapter_layers(model).values())


def test_merge_and_unload_and_unload():
    model = _net()
    original = copy.deepcopy(model)
    inject_adapter(model, _loha())
    adapted = model(X).detach()
    merged = merge_and_unload(copy.deepcopy(model))
    assert not adapter_layers(merged)
    assert isinstance(merged.block["proj"], nn.Linear)
    torch.testing.assert_close(merged(X), adapted, rtol=1e-5, atol=1e-5)
    plain = unload(model)
    assert not adapter_layers(plain)
    for (n1, p1), (_, p2) in zip(plain.named_parameters(), original.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_delete_adapter_restores_plain_modules():
    model = _net()
    inject_adapter(model, _loha(), "a")
    inject_adapter(model, _loha(target_modules=["proj"]), "b")
    delete_adapter(model, "a")
    assert isinstance(model.block["conv"], nn.Conv2d) and adapter_names(model) == ["b"]
    delete_adapter(model, "b")
    assert isinstance(model.block["proj"], nn.Linear)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        delete_adapter(model, "b")


def test_modules_to_save_trainable_copy():
    model = _net()
    inject_adapter(model, _loha(modules_to_save=["head"]))
    state = get_adapter_state_dict(model)
    assert "head.weight" in state and "head.bias" in state  # PEFT's keys for modules_to_save
    head = model.head
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    changed = model(X).detach()
    disable_adapters(model)
    assert not torch.allclose(model(X), changed)
    enable_adapters(model)
    unloaded = merge_and_unload(model)
    torch.testing.assert_close(unloaded(X), changed, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_errors():
    model, other = _net(), _net()
    inject_adapter(model, _loha(use_effective_conv2d=True))
    inject_adapter(other, _loha(use_effective_conv2d=True))
    state = get_adapter_state_dict(model)
    assert set(state) == {f"block.proj.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"} | {
        f"block.conv.hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
    }
    set_adapter_state_dict(other, state)
    torch.testing.assert_close(other(X), model(X))
    bad = dict(state)
    bad.pop("block.proj.hada_w1_a")
    bad["block.proj.hada_w9"] = torch.zeros(1)
    bad["block.conv.hada_t1"] = torch.zeros(2, 2, 1, 1)
    before = get_adapter_state_dict(other)["block.conv.hada_w1_b"].clone()
    with pytest.raises(ValueError) as err:
        set_adapter_state_dict(other, bad)
    message = str(err.value)
    assert (
        "1 missing keys:\n    - block.proj.hada_w1_a" in message
        and "hada_w9" in message
        and "hada_t1" in message
    )
    assert torch.equal(get_adapter_state_dict(other)["block.conv.hada_w1_b"], before)  # nothing changed


def test_rank_dropout_drops_output_rows_and_guards_all_dropped():
    model = _net()
    inject_adapter(model, _loha(rank_dropout=0.5, target_modules=["proj"]))
    proj = model.block["proj"]
    h = torch.randn(4, 8)
    model.train()
    torch.manual_seed(3)
    out = proj(h)
    delta_out = out - proj.base_layer(h)
    full_delta = h @ proj.adapters["default"].delta_weight().T
    kept = [c for c in range(8) if delta_out[:, c].abs().sum() > 0]
    assert 0 < len(kept) < 8
    torch.testing.assert_close(delta_out[:, kept], full_delta[:, kept] * 8 / len(kept), rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(proj(h) - proj.base_layer(h), full_delta, rtol=1e-5, atol=1e-6)
    adapter = proj.adapters["default"]
    adapter.rank_dropout = 0.999999
    model.train()
    for _ in range(20):
        assert torch.isfinite(proj(h)).all()


def test_module_dropout_skips_whole_adapter_in_training_only():
    model = _net()
    inject_adapter(model, _loha(module_dropout=0.5, target_modules=["proj"]))
    proj = model.block["proj"]
    h = torch.randn(4, 8)
    base = proj.base_layer(h)
    model.train()
    torch.manual_seed(0)
    skipped = sum(torch.equal(proj(h), base) for _ in range(200))
    assert 60 < skipped < 140
    model.eval()
    assert not any(torch.equal(proj(h), base) for _ in range(10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_base_with_fp32_factors(dtype):
    model = _net()
    reference = copy.deepcopy(model)
    inject_adapter(reference, _loha())
    model.to(dtype)
    inject_adapter(model, _loha())
    set_adapter_state_dict(model, get_adapter_state_dict(reference))
    factors = [p for n, p in model.named_parameters() if "hada_" in n]
    assert all(p.dtype == torch.float32 for p in factors)
    out = model(X.to(dtype))
    assert out.dtype == dtype
    expected = reference(X)
    assert (out.float() - expected).norm() / expected.norm() < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in factors)


def test_target_matching_nothing_names_closest(tiny_sd1_unet):
    with pytest.raises(ValueError, match=r"matched no module.*'to_qq' -> closest: to_q"):
        inject_adapter(tiny_sd1_unet, LoHaConfig(target_modules=["to_qq"]))
    with pytest.raises(ValueError, match="not Linear/Conv1d/Conv2d.*to_out"):
        inject_adapter(tiny_sd1_unet, LoHaConfig(target_modules=["to_out"]))
    with pytest.raises(ValueError, match="target_modules is None"):
        inject_adapter(tiny_sd1_unet, LoHaConfig())
    assert not adapter_layers(tiny_sd1_unet)  # nothing was changed


def test_loha_model_wrapper(capsys, tiny_sd1_unet):
    model = LoHaModel(tiny_sd1_unet, unet_preset("attn", r=4))
    model.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    state = model.get_adapter_state_dict()
    assert all(".attn" in k for k in state)
    unet = model.merge_and_unload()
    assert not adapter_layers(unet)


def test_wrapped_layer_still_looks_like_its_base():
    model = _net()
    inject_adapter(model, _loha())
    proj = model.block["proj"]
    assert proj.in_features == 8 and proj.weight is proj.base_layer.weight
    assert model.block["conv"].kernel_size == (3, 3)


@pytest.mark.parametrize("name", ["half", "to", "train", "base_layer", "a.b", ""])
def test_adapter_names_that_would_break_module_dicts_are_refused(name):
    model = _net()
    with pytest.raises(ValueError, match="not allowed"):
        inject_adapter(model, _loha(), name)
    assert not adapter_layers(model)


def test_new_adapter_layers_take_the_mode_of_the_model():
    model = _net().eval()
    inject_adapter(model, _loha(rank_dropout=0.5, module_dropout=0.5))
    assert all(not m.training for m in model.modules())
    first = model(X)
    assert all(torch.equal(model(X), first) for _ in range(5))  # no dropout in eval mode
    model.train()
    inject_adapter(model, _loha(target_modules=["proj"]), "second")
    assert model.block["proj"].adapters["second"].training
