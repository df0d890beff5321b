"""LoKr: our rebuild of every factorized form against LyCORIS' LokrModule, and the scale rules."""

from __future__ import annotations

import pytest
import torch
from lycoris.modules.lokr import LokrModule
from torch import nn

from loha_diffusion.adapters.base import LayerSpec
from loha_diffusion.adapters.lokr import LoKrAdapter
from loha_diffusion.functional import lokr as lokr_fn

CASES = {
    "linear_w2_factorized": (nn.Linear(64, 96), dict(lora_dim=4, alpha=2.0)),
    "linear_both_factorized": (nn.Linear(64, 96), dict(lora_dim=2, alpha=3.0, decompose_both=True)),
    "linear_full": (nn.Linear(64, 96), dict(lora_dim=4, alpha=2.0, full_matrix=True)),
    "linear_factor_4": (nn.Linear(64, 96), dict(lora_dim=4, alpha=8.0, factor=4)),
    "conv3x3_flat": (nn.Conv2d(32, 48, 3, padding=1), dict(lora_dim=2, alpha=1.0)),
    "conv3x3_tucker": (nn.Conv2d(32, 48, 3, padding=1), dict(lora_dim=2, alpha=1.5, use_tucker=True)),
    "conv3x3_tucker_both": (
        nn.Conv2d(32, 48, 3, padding=1),
        dict(lora_dim=2, alpha=1.5, use_tucker=True, decompose_both=True),
    ),
    "conv3x3_full": (nn.Conv2d(32, 48, 3, padding=1), dict(lora_dim=4, alpha=2.0, full_matrix=True)),
    "conv1x1": (nn.Conv2d(32, 48, 1), dict(lora_dim=2, alpha=4.0, use_tucker=True)),
}


def _lycoris_module(layer: nn.Module, kwargs: dict) -> tuple[LokrModule, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = LokrModule("m", layer, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            if p is not layer.weight and p is not layer.bias:
                p.normal_()
    sd = {k: v.detach().clone() for k, v in module.custom_state_dict().items()}
    return module, sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_lokr_delta_matches_lycoris(case):
    layer, kwargs = CASES[case]
    module, sd = _lycoris_module(layer, kwargs)
    with torch.no_grad():
        expected = module.get_weight(module.shape)  # scale applied once (get_diff_weight applies it twice)
    alpha = float(sd.pop("alpha"))
    adapter = LoKrAdapter.from_tensors(LayerSpec.from_module(layer), sd, alpha)
    got = adapter.delta_weight().detach()
    assert got.shape == layer.weight.shape
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    # The same delta from the pure function on the file tensors.
    scaling = lokr_fn.lokr_scaling(alpha, lokr_fn.lokr_rank(sd))
    assert torch.allclose(
        lokr_fn.delta_weight(sd, layer.weight.shape, scaling), expected, rtol=1e-5, atol=1e-6
    )
    # Tensors come back under the file names with the file's shapes.
    assert {k: tuple(v.shape) for k, v in adapter.state_tensors().items()} == {
        k: tuple(v.shape) for k, v in sd.items()
    }
    # The user scale multiplies the delta.
    adapter.scale = 0.5
    assert torch.allclose(adapter.delta_weight().detach(), 0.5 * got)


def test_lokr_scale_rules():
    layer = nn.Linear(64, 96)
    spec = LayerSpec.from_module(layer)
    _, sd = _lycoris_module(layer, dict(lora_dim=4, alpha=2.0))
    sd.pop("alpha")
    with_alpha = LoKrAdapter.from_tensors(spec, sd, 2.0)
    no_alpha = LoKrAdapter.from_tensors(spec, sd, None)
    assert with_alpha.scaling == pytest.approx(0.5)
    assert no_alpha.scaling == 1.0  # missing alpha: scaling 1, as ComfyUI and A1111
    assert torch.allclose(with_alpha.delta_weight(), 0.5 * no_alpha.delta_weight())
    # Both halves full: alpha is ignored (scaling 1).
    _, full = _lycoris_module(layer, dict(lora_dim=4, alpha=2.0, full_matrix=True))
    full.pop("alpha")
    assert LoKrAdapter.from_tensors(spec, full, 7.0).scaling == 1.0


def test_lokr_rejects_bad_tensors():
    layer = nn.Linear(64, 96)
    spec = LayerSpec.from_module(layer)
    _, sd = _lycoris_module(layer, dict(lora_dim=2, alpha=1.0, decompose_both=True))
    sd.pop("alpha")
    bad = dict(
        sd,
        lokr_w2_b=torch.randn(3, sd["lokr_w2_b"].shape[1]),
        lokr_w2_a=torch.randn(sd["lokr_w2_a"].shape[0], 3),
    )
    with pytest.raises(ValueError, match="rank"):
        LoKrAdapter.from_tensors(spec, bad, 1.0)
    with pytest.raises(ValueError, match="missing"):
        LoKrAdapter.from_tensors(spec, {k: v for k, v in sd.items() if k != "lokr_w2_b"}, 1.0)
    with pytest.raises(ValueError, match="does not divide"):
        LoKrAdapter.from_tensors(spec, dict(sd, lokr_w1_a=torch.randn(7, 2)), 1.0)
    with pytest.raises(ValueError, match="wrong shapes"):
        LoKrAdapter.from_tensors(spec, dict(sd, lokr_w2_a=torch.randn(5, 2)), 1.0)


def test_new_lokr_adapter_starts_at_zero():
    spec = LayerSpec.from_module(nn.Conv2d(32, 48, 3, padding=1))
    adapter = LoKrAdapter(spec, 2, 2.0, use_tucker=True)
    assert adapter.is_cp and set(adapter.state_tensors()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    assert adapter.delta_weight().abs().max() == 0
    assert lokr_fn.factorization(96) == (8, 12) and lokr_fn.factorization(128, 4) == (4, 32)
