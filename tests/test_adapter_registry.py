"""The registry of adapter kinds: what each kind declares, that the file formats are driven by it alone (a kind
defined here, outside the package, reads, loads and saves through the unchanged Kohya code), and that a refused
adapter name changes nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from loha_diffusion import adapters as adapters_module
from loha_diffusion.adapters import (
    ADAPTER_KINDS,
    Adapter,
    LayerSpec,
    LoHaAdapter,
    LoKrAdapter,
    LoRAAdapter,
    adapter_class,
    detect_kind,
    kind_titles,
    state_tensor_names,
)
from loha_diffusion.errors import AdapterNameError, AdapterStateError
from loha_diffusion.formats.kohya import (
    KohyaModule,
    classify_module,
    load_kohya,
    parse_kohya_state_dict,
    read_kohya,
    read_metadata,
    save_kohya,
)
from loha_diffusion.formats.peft import load_peft, save_peft
from loha_diffusion.model import adapter_layers, inject_adapter
from loha_diffusion.targeting import unet_preset
from loha_diffusion.tiny import build_tiny_unet

LINEAR = nn.Linear(12, 20)
CONV = nn.Conv2d(8, 12, 3, padding=1)


def _adapters() -> dict[str, Adapter]:
    """One adapter of every kind and form, with random factors."""
    torch.manual_seed(0)
    lin, conv = LayerSpec.from_module(LINEAR), LayerSpec.from_module(CONV)
    made = {
        "loha_linear": LoHaAdapter(lin, 3, 2.0, init_weights=False),
        "loha_conv": LoHaAdapter(conv, 2, 1.0, init_weights=False),
        "loha_cp": LoHaAdapter(conv, 2, 3.0, use_effective_conv2d=True, init_weights=False),
        "lora_linear": LoRAAdapter(lin, 4, 2.0, init_weights=False),
        "lora_conv": LoRAAdapter(conv, 2, 1.0, init_weights=False),
        "lora_tucker": LoRAAdapter(conv, 2, 4.0, use_effective_conv2d=True, init_weights=False),
        "lokr_linear": LoKrAdapter(lin, 2, 1.0, init_weights=False),
        "lokr_both": LoKrAdapter(lin, 2, 3.0, decompose_w1=True, init_weights=False),
        "lokr_full": LoKrAdapter(lin, 2, 5.0, decompose_w2=False, init_weights=False),
        "lokr_tucker": LoKrAdapter(conv, 2, 1.5, use_tucker=True, init_weights=False),
    }
    return made


ADAPTER_CASES = sorted(_adapters())


def test_registry_lists_each_kind_once():
    kinds = [cls.kind for cls in ADAPTER_KINDS]
    assert kinds == ["loha", "lora", "lokr"]
    for cls in ADAPTER_KINDS:
        assert adapter_class(cls.kind) is cls
        assert cls.title and cls.lycoris_algo and cls.detect_tensors
        declared = set(cls.file_tensors) | set(cls.optional_file_tensors)
        assert set(cls.kohya_names.values()) == declared
        assert set(cls.detect_tensors) <= declared and set(cls.cp_file_tensors) <= declared
    assert kind_titles() == "LoHa, LoRA or LoKr"
    assert {"hada_w1_a", "lora_A.weight", "lokr_t2"} <= state_tensor_names()
    with pytest.raises(ValueError, match="known kinds"):
        adapter_class("dora")


def test_detect_kind_uses_the_loaders_keys_in_order():
    t = torch.zeros(1)
    assert detect_kind({"hada_w1_a": t, "hada_w1_b": t}) == "loha"
    assert detect_kind({"lora_down.weight": t}) == "lora"
    assert detect_kind({"lora_up.weight": t}) == "lora"
    assert detect_kind({"lokr_w1": t}) == "lokr"
    assert detect_kind({"lokr_w1_a": t}) == "lokr"
    # LoHa is tested first, as ComfyUI and A1111 do.
    assert detect_kind({"hada_w1_a": t, "lora_down.weight": t}) == "loha"
    assert detect_kind({"diff": t}) is None
    assert detect_kind({}) is None


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_file_form_round_trips_every_kind(case):
    adapter = _adapters()[case]
    cls = type(adapter)
    tensors = adapter.file_state_tensors()
    assert set(tensors) <= set(cls.file_tensors) | set(cls.optional_file_tensors)
    assert detect_kind(tensors) == cls.kind
    assert cls.file_problems(tensors) == []
    assert cls.file_is_cp(tensors) == adapter.is_cp
    # The file's scaling is the adapter's (user scale 1), and the file rebuild gives the adapter's delta.
    scaling = cls.file_scaling(adapter.alpha, tensors)
    assert scaling == pytest.approx(adapter.scaling)
    expected = adapter.delta_weight().detach()
    rebuilt = cls.file_delta_weight(tensors, adapter.spec.weight_shape, scaling)
    assert torch.allclose(rebuilt, expected, rtol=1e-5, atol=1e-6)
    # from_file_tensors builds the same adapter back.
    back = cls.from_file_tensors(adapter.spec, tensors, adapter.alpha)
    assert type(back) is cls and back.alpha == adapter.alpha
    if cls.file_rank(tensors) is not None:  # LoKr with two full halves has no rank in the file
        assert back.r == adapter.r
    assert torch.equal(back.delta_weight().detach(), expected)
    # Through a file record: the same rank, scaling and delta (fp32).
    record = classify_module("lora_unet_x", {**tensors, "alpha": torch.tensor(adapter.alpha)})
    assert record.kind == cls.kind and not record.problems
    assert record.rank == cls.file_rank(tensors) and record.scaling == pytest.approx(scaling)
    assert torch.allclose(record.delta_weight(adapter.spec.weight_shape), expected, rtol=1e-5, atol=1e-6)


def test_file_tensor_names_of_lora_are_kohya_names():
    adapter = _adapters()["lora_tucker"]
    assert set(adapter.state_tensors()) == {"lora_A.weight", "lora_B.weight", "lora_mid.weight"}
    assert set(adapter.file_state_tensors()) == {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
    assert all(not t.requires_grad for t in adapter.file_state_tensors().values())


def test_file_scaling_rules():
    t = _adapters()
    lora = t["lora_linear"].file_state_tensors()  # rank 4
    assert LoRAAdapter.file_rank(lora) == 4
    assert LoRAAdapter.file_scaling(2.0, lora) == 0.5
    assert (
        LoRAAdapter.file_scaling(None, lora) == 1.0
    )  # no alpha: scaling 1 (not 1/rank), as ComfyUI and A1111
    loha = t["loha_linear"].file_state_tensors()  # rank 3
    assert LoHaAdapter.file_scaling(1.5, loha) == 0.5 and LoHaAdapter.file_scaling(None, loha) == 1.0
    full = t["lokr_full"].file_state_tensors()  # both halves full: no rank, alpha ignored
    assert LoKrAdapter.file_rank(full) is None and LoKrAdapter.file_scaling(5.0, full) == 1.0
    lokr = t["lokr_linear"].file_state_tensors()
    assert LoKrAdapter.file_scaling(1.0, lokr) == 0.5 and LoKrAdapter.file_scaling(None, lokr) == 1.0


def test_file_problems_and_refusals():
    t = _adapters()
    loha = t["loha_cp"].file_state_tensors()
    assert LoHaAdapter.file_problems({k: v for k, v in loha.items() if k != "hada_t2"}) == [
        "CP LoHa needs both hada_t1 and hada_t2, has only ['hada_t1']"
    ]
    lora = t["lora_linear"].file_state_tensors()
    problems = LoRAAdapter.file_problems({"lora_down.weight": lora["lora_down.weight"], "x": torch.zeros(1)})
    assert problems == [
        "lora module is missing ['lora_up.weight']",
        "unsupported tensors ['x'] in a lora module",
    ]
    with pytest.raises(AdapterStateError, match="missing"):
        LoRAAdapter.from_file_tensors(
            t["lora_linear"].spec, {"lora_down.weight": lora["lora_down.weight"]}, 1.0
        )
    with pytest.raises(ValueError, match="without a spatial kernel"):  # a Tucker core on a Linear
        LoRAAdapter.from_file_tensors(
            t["lora_linear"].spec, {**lora, "lora_mid.weight": torch.zeros(4, 4, 3, 3)}, 1.0
        )
    # A 2-D lora_down on a 1x1 conv is accepted, as A1111 and ComfyUI do.
    spec = LayerSpec.from_module(nn.Conv2d(8, 12, 1))
    flat = {"lora_down.weight": torch.randn(2, 8), "lora_up.weight": torch.randn(12, 2)}
    adapter = LoRAAdapter.from_file_tensors(spec, flat, 2.0)
    assert adapter.lora_A.shape == (2, 8, 1, 1)


def test_kohya_module_scale_is_a_deprecated_alias_of_scaling():
    tensors = _adapters()["lora_linear"].file_state_tensors()
    record = KohyaModule("lora_unet_x", "lora", tensors, alpha=2.0)
    assert record.scaling == 0.5 and record.adapter_class is LoRAAdapter
    with pytest.warns(DeprecationWarning, match="scaling"):
        assert record.scale == 0.5
    unknown = KohyaModule("lora_unet_y", "unknown", {"diff": torch.zeros(2, 2)}, alpha=None)
    assert unknown.adapter_class is None and unknown.rank is None and unknown.scaling == 1.0
    assert not unknown.is_cp


# -- a kind from outside the package -----------------------------------------------------------------------


class FullDiffAdapter(Adapter):
    """LyCORIS' "full" algo reduced to its weight: `ΔW = scale · diff`, one `diff` tensor shaped like the weight,
    no rank (alpha ignored). Written here to show a new kind needs its class and one registry entry only."""

    kind = "full"
    title = "Full"
    file_tensors = ("diff",)
    kohya_names = {"diff": "diff"}
    detect_tensors = ("diff",)
    file_alpha_optional = True
    lycoris_algo = "full"

    def __init__(self, spec, r=1, alpha=1.0, *, use_effective_conv2d=False, init_weights=True, **dropouts):
        super().__init__(spec, 1, alpha, **dropouts)
        self.diff = nn.Parameter(
            torch.zeros(spec.weight_shape) if init_weights else torch.randn(spec.weight_shape)
        )

    @property
    def scaling(self) -> float:
        return self.scale

    def state_tensors(self):
        return {"diff": self.diff}

    def delta_weight(self):
        return self.diff * self.scaling

    @classmethod
    def file_rank(cls, tensors):
        return 1

    @classmethod
    def file_scaling(cls, alpha, tensors):
        return 1.0

    @classmethod
    def file_delta_weight(cls, tensors, weight_shape, scaling):
        return (tensors["diff"] * scaling).reshape(weight_shape)


def test_a_new_kind_runs_through_the_formats_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(adapters_module, "ADAPTER_KINDS", (*ADAPTER_KINDS, FullDiffAdapter))
    unet = build_tiny_unet("sd1")
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    diff = torch.randn_like(layer.weight)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    kfile = parse_kohya_state_dict({f"{name}.diff": diff})
    assert kfile.kinds == {"full": 1} and not kfile.all_problems
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no alpha is normal for this kind: no warning
        load_kohya(kfile, unet=unet)
    wrapped = adapter_layers(unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    x = torch.randn(2, layer.in_features)
    assert torch.allclose(wrapped(x), layer(x) + x @ diff.T, atol=1e-5)
    path = save_kohya(tmp_path / "full.safetensors", unet=unet, dtype=torch.float32)
    back = read_kohya(path)
    assert back.kinds == {"full": 1} and torch.equal(back.modules[name].tensors["diff"], diff)
    assert '"algo": "full"' in read_metadata(path)["ss_network_args"]


# -- a refused adapter name changes nothing ------------------------------------------------------------------


def _snapshot(model: nn.Module):
    tree = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    return tree, state, grads


def _assert_unchanged(model: nn.Module, before) -> None:
    tree, state, grads = _snapshot(model)
    assert tree == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert grads == before[2]


def test_load_kohya_refuses_a_module_attribute_name_before_wrapping(tmp_path):
    source = build_tiny_unet("sd1")
    inject_adapter(source, unet_preset("attn", init_weights=False))
    path = save_kohya(tmp_path / "a.safetensors", unet=source)
    unet = build_tiny_unet("sd1")
    before = _snapshot(unet)
    for bad in ("half", "items", "a.b", ""):
        with pytest.raises(AdapterNameError):
            load_kohya(path, unet=unet, adapter_name=bad)
        _assert_unchanged(unet, before)


def test_load_peft_refuses_a_module_attribute_name_before_wrapping(tmp_path):
    source = build_tiny_unet("sd1")
    inject_adapter(source, unet_preset("attn", init_weights=False))
    directory = save_peft(tmp_path / "peft", source)
    unet = build_tiny_unet("sd1")
    before = _snapshot(unet)
    for bad in ("items", "half", "to"):
        with pytest.raises(AdapterNameError):
            load_peft(directory, unet, adapter_name=bad)
        _assert_unchanged(unet, before)


def test_savers_check_the_name_first(tmp_path):
    unet = build_tiny_unet("sd1")
    with pytest.raises(AdapterNameError):
        save_kohya(tmp_path / "x.safetensors", unet=unet, adapter_name="half")
    with pytest.raises(AdapterNameError):
        save_peft(tmp_path / "x", unet, adapter_name="keys")
    assert not any(tmp_path.iterdir())
