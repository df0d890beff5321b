"""formats.reference: the plain float64 formulas of the file format, checked against element-wise sums written
from docs/kohya-format.md and against the library's own rebuild (`KohyaModule.delta_weight`)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

from loha_diffusion.errors import KohyaFormatError
from loha_diffusion.formats import reference
from loha_diffusion.formats.convert import module_targets
from loha_diffusion.formats.kohya import KohyaModule, read_kohya
from loha_diffusion.pipeline import adapter_components
from loha_diffusion.tiny import build_tiny_pipeline


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_reference_is_independent_of_the_adapter_code():
    """It must not share code with what it checks: no import of adapters, functional, layers or model."""
    path = Path(reference.__file__)
    imported = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
    assert sorted(imported) == ["..errors", "__future__", "collections.abc", "torch"]


def test_loha_cp_is_the_elementwise_sum_of_the_format():
    """M[o,i,h,w] = Σ_ab t[a,b,h,w] w_b[b,i] w_a[a,o] (w_a rank-first), ΔW = M1 * M2 * alpha / r."""
    r, out, in_, kh, kw = 2, 3, 2, 3, 1
    t = {
        "hada_t1": _randn(r, r, kh, kw, seed=1),
        "hada_w1_a": _randn(r, out, seed=2),
        "hada_w1_b": _randn(r, in_, seed=3),
        "hada_t2": _randn(r, r, kh, kw, seed=4),
        "hada_w2_a": _randn(r, out, seed=5),
        "hada_w2_b": _randn(r, in_, seed=6),
    }
    expected = torch.zeros(out, in_, kh, kw, dtype=torch.float64)
    for o, i, h, w in itertools.product(range(out), range(in_), range(kh), range(kw)):
        m = [
            sum(
                t[f"hada_t{n}"][a, b, h, w] * t[f"hada_w{n}_b"][b, i] * t[f"hada_w{n}_a"][a, o]
                for a in range(r)
                for b in range(r)
            )
            for n in (1, 2)
        ]
        expected[o, i, h, w] = m[0] * m[1] * 3.0 / r
    torch.testing.assert_close(reference.reference_delta(t, 3.0, (out, in_, kh, kw)), expected)


def test_lora_tucker_and_scale_rules():
    r, out, in_ = 2, 4, 3
    down, mid, up = _randn(r, in_, 1, 1, seed=1), _randn(r, r, 3, 3, seed=2), _randn(out, r, 1, 1, seed=3)
    t = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    expected = torch.zeros(out, in_, 3, 3, dtype=torch.float64)
    for o, i, h, w in itertools.product(range(out), range(in_), range(3), range(3)):
        expected[o, i, h, w] = sum(
            up[o, a, 0, 0] * mid[a, b, h, w] * down[b, i, 0, 0] for a in range(r) for b in range(r)
        )
    torch.testing.assert_close(reference.reference_delta(t, None, (out, in_, 3, 3)), expected)  # no alpha: 1
    torch.testing.assert_close(reference.reference_delta(t, 1.0, (out, in_, 3, 3)), expected / r)


def test_lokr_scale_is_one_without_a_factorized_half():
    full = {"lokr_w1": _randn(2, 2), "lokr_w2": _randn(3, 4, seed=1)}
    expected = torch.kron(full["lokr_w1"], full["lokr_w2"])
    torch.testing.assert_close(reference.reference_delta(full, 8.0, (6, 8)), expected)
    half = {"lokr_w1": full["lokr_w1"], "lokr_w2_a": _randn(3, 2, seed=2), "lokr_w2_b": _randn(2, 4, seed=3)}
    expected = torch.kron(half["lokr_w1"], half["lokr_w2_a"] @ half["lokr_w2_b"]) * 8.0 / 2
    torch.testing.assert_close(reference.reference_delta(half, 8.0, (6, 8)), expected)


def test_unknown_tensors_raise_a_format_error():
    with pytest.raises(KohyaFormatError, match="no LoHa, LoRA or LoKr tensors"):
        reference.reference_delta({"dora_scale": torch.ones(3)}, 1.0, (3, 3))


def test_reference_matches_the_library_rebuild_of_a_loha_file(tmp_path):
    """LoHa flat and CP modules of a hand-written file: the reference agrees with `KohyaModule.delta_weight`."""
    from conftest import write_kohya_file

    path = tmp_path / "loha.safetensors"
    pipe = build_tiny_pipeline("sd1")
    write_kohya_file(path, pipe, cp=True, convs=True)
    kfile = read_kohya(path)
    targets = module_targets(kfile, adapter_components(pipe))
    assert any(m.is_cp for m in kfile.modules.values())
    for name, module in kfile.modules.items():
        shape = tuple(targets[name].layer.weight.shape)
        torch.testing.assert_close(
            reference.reference_delta(module.tensors, module.alpha, shape),
            module.delta_weight(shape).double(),
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.mark.parametrize(
    ("shape", "tensors"),
    [
        # LoKr, full w1 and factorized w2 on a Linear (out 32 = 4·8, in 64 = 8·8)
        ((32, 64), {"lokr_w1": (4, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
        # LoKr, both halves factorized, flat w2 on a 3x3 conv
        (
            (16, 8, 3, 3),
            {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 36)},
        ),
        # LoKr, CP w2 on a 3x3 conv (rank-first w2_a / w2_b)
        (
            (16, 8, 3, 3),
            {"lokr_w1": (4, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 4)},
        ),
        # LoKr, both halves full (scale 1 whatever alpha says)
        ((16, 8, 1, 1), {"lokr_w1": (4, 2), "lokr_w2": (4, 4, 1, 1)}),
        # LoRA with a Tucker core
        (
            (16, 8, 3, 3),
            {
                "lora_down.weight": (2, 8, 1, 1),
                "lora_mid.weight": (2, 2, 3, 3),
                "lora_up.weight": (16, 2, 1, 1),
            },
        ),
    ],
)
def test_reference_delta_other_kinds(shape, tensors):
    """The plain formula agrees with the library's rebuild for LoKr and Tucker LoRA modules."""
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(*s, generator=gen) for k, s in tensors.items()}
    kind = "lokr" if "lokr_w1" in tensors or "lokr_w1_a" in tensors else "lora"
    module = KohyaModule(name="lora_unet_x", kind=kind, tensors=tensors, alpha=3.0)
    expected = module.delta_weight(shape).double()
    torch.testing.assert_close(reference.reference_delta(tensors, 3.0, shape), expected, rtol=1e-5, atol=1e-6)
