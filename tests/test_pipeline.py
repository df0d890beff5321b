"""Adapters on diffusers pipelines: loading files, scales, several adapters, disable, fuse/unfuse, unload, dtypes."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from loha_diffusion import pipeline as lp
from loha_diffusion.layers import AdapterLayer
from loha_diffusion.model import adapter_layers, inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset
from loha_diffusion.tiny import build_tiny_pipeline


def run(pipe, **kwargs) -> torch.Tensor:
    """Final latents of a 2-step run with a fixed seed (no VAE decode, so differences are not squashed)."""
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of a cat", num_inference_steps=2, generator=generator, output_type="latent", **kwargs)
    return out.images.float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal up to float summation order: max abs error relative to the largest magnitude."""
    err = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def inject(pipe, name: str, seed: int) -> None:
    """Give the pipeline an adapter with random non-zero factors through the core API (no file involved)."""
    torch.manual_seed(seed)
    inject_adapter(pipe.unet, unet_preset("full", r=4, alpha=2, init_weights=False), name)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            inject_adapter(
                getattr(pipe, component), text_encoder_preset(r=4, alpha=2, init_weights=False), name
            )
    # He-uniform factors make LoHa deltas tiny; scale them so the adapter visibly changes the output.
    with torch.no_grad():
        for module in lp.adapter_components(pipe).values():
            for layer in adapter_layers(module).values():
                for tensor in layer.adapters[name].state_tensors().values():
                    tensor.mul_(1.5)


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """Copies of every non-adapter tensor, keyed by the original module paths (wrapped or not)."""
    return {
        f"{c}.{k.replace('.base_layer', '')}": v.clone()
        for c, m in lp.adapter_components(pipe).items()
        for k, v in m.state_dict().items()
        if "adapters." not in k
    }


def patch_with_adapter_deltas(pipe, adapted, names_scales: dict[str, float]) -> None:
    """Add each named adapter's ΔW (from `adapted`, at the given scale) to the plain `pipe`'s weights."""
    with torch.no_grad():
        for component, module in lp.adapter_components(adapted).items():
            for path, layer in adapter_layers(module).items():
                target = getattr(pipe, component).get_submodule(path)
                for name, scale in names_scales.items():
                    if name in layer.adapters:
                        adapter = layer.adapters[name]
                        target.weight += (
                            scale / adapter.scale * adapter.delta_weight().to(target.weight.dtype)
                        )


# -- pipeline operations (adapters added through the core API) -----------------------------------------


def test_scales_disable_and_two_adapters_add():
    pipe = build_tiny_pipeline("sd1")
    base = run(pipe)
    inject(pipe, "a", seed=1)
    inject(pipe, "b", seed=2)
    assert lp.list_adapters(pipe) == {"a": ["unet", "text_encoder"], "b": ["unet", "text_encoder"]}
    both = run(pipe)
    assert (both - base).abs().max() > 1e-2

    expected = build_tiny_pipeline("sd1")
    patch_with_adapter_deltas(expected, pipe, {"a": 1.0, "b": 1.0})
    assert_close(both, run(expected))

    lp.set_adapter_scales(pipe, {"a": 0.5, "b": 0.0})
    expected = build_tiny_pipeline("sd1")
    patch_with_adapter_deltas(expected, pipe, {"a": 0.5})
    assert_close(run(pipe), run(expected))

    lp.set_adapter_scales(pipe, {"a": 0.0})
    assert torch.equal(run(pipe), base)  # scale 0 is exactly the base model

    lp.set_adapter_scales(pipe, {"a": 1.0, "b": 1.0})
    lp.disable_adapters(pipe)
    assert torch.equal(run(pipe), base)
    lp.enable_adapters(pipe)
    assert torch.equal(run(pipe), both)

    lp.set_active_adapters(pipe, ["b"])
    expected = build_tiny_pipeline("sd1")
    patch_with_adapter_deltas(expected, pipe, {"b": 1.0})
    assert_close(run(pipe), run(expected))


def test_fuse_then_unfuse_is_bit_exact():
    pipe = build_tiny_pipeline("sd1")
    original = base_weights(pipe)
    inject(pipe, "a", seed=1)
    unfused = run(pipe)

    lp.fuse(pipe)
    assert lp.fused_adapters(pipe) == ["a"]
    fused_weights = base_weights(pipe)
    assert fused_weights.keys() == original.keys()
    changed = [k for k in original if not torch.equal(original[k], fused_weights[k])]
    assert len(changed) == len(adapter_layers(pipe.unet)) + len(
        adapter_layers(pipe.text_encoder)
    )  # the deltas really went into the weights
    assert_close(run(pipe), unfused)
    with pytest.raises(RuntimeError, match="unfuse"):
        lp.set_adapter_scales(pipe, {"a": 0.5})

    lp.unfuse(pipe)
    assert lp.fused_adapters(pipe) == []
    restored = base_weights(pipe)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert torch.equal(run(pipe), unfused)


def test_fuse_selected_adapters_only():
    pipe = build_tiny_pipeline("sd1")
    inject(pipe, "a", seed=1)
    inject(pipe, "b", seed=2)
    both = run(pipe)
    lp.fuse(pipe, ["a"])
    assert lp.fused_adapters(pipe) == ["a"]
    assert_close(run(pipe), both)  # "a" from the weights, "b" still applied on the fly
    with pytest.raises(KeyError, match="nope"):
        lp.fuse(pipe, ["nope"])


def test_unload_one_and_all():
    pipe = build_tiny_pipeline("sd1")
    original = base_weights(pipe)
    base = run(pipe)
    inject(pipe, "a", seed=1)
    inject(pipe, "b", seed=2)
    lp.fuse(pipe, ["a"])

    lp.unload_adapter(pipe, "a")
    assert list(lp.list_adapters(pipe)) == ["b"]
    expected = build_tiny_pipeline("sd1")
    patch_with_adapter_deltas(expected, pipe, {"b": 1.0})
    assert_close(run(pipe), run(expected))

    lp.unload_adapter(pipe)
    assert lp.list_adapters(pipe) == {}
    assert not any(isinstance(m, AdapterLayer) for m in pipe.unet.modules())
    assert all(torch.equal(original[k], v) for k, v in base_weights(pipe).items())
    assert torch.equal(run(pipe), base)


def test_refused_calls_change_nothing():
    pipe = build_tiny_pipeline("sd1")
    inject(pipe, "a", seed=1)
    with pytest.raises(KeyError, match="missing"):
        lp.set_adapter_scales(pipe, {"a": 0.3, "missing": 1.0})
    layer = next(iter(adapter_layers(pipe.unet).values()))
    assert layer.adapters["a"].scale == 1.0
    with pytest.raises(KeyError, match="missing"):
        lp.unload_adapter(pipe, "missing")
    with pytest.raises(KeyError, match="missing"):
        lp.set_active_adapters(pipe, ["missing"])
    with pytest.raises(TypeError, match="unet"):
        lp.adapter_components(object())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_cpu_offload_moves_adapters():
    pipe = build_tiny_pipeline("sd1")
    inject(pipe, "a", seed=1)
    reference = run(pipe)
    pipe.to(torch.float16)
    pipe.enable_model_cpu_offload()
    offloaded = run(pipe)
    assert torch.isfinite(offloaded).all()
    assert (offloaded.cpu() - reference).abs().max() < 0.25 * reference.abs().max()


# -- loading files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "algo", "cp"),
    [("sd1", "loha", False), ("sd1", "loha", True), ("sd1", "lora", True), ("sdxl", "loha", True)],
)
def test_loaded_file_equals_weights_patched_by_hand(tmp_path, kohya_files, arch, algo, cp):
    pipe = build_tiny_pipeline(arch)
    file = tmp_path / "style.safetensors"
    targets = kohya_files.write(file, pipe, algo=algo, cp=cp)
    assert any(c != "unet" for c, _ in targets.values())

    name = lp.load_adapter(pipe, file)
    assert name == "style"
    components = sorted({c for c, _ in targets.values()})
    assert lp.list_adapters(pipe) == {"style": [c for c in lp.ADAPTER_COMPONENTS if c in components]}
    loaded = run(pipe)

    expected = build_tiny_pipeline(arch)
    kohya_files.patch(expected, file, targets)
    assert_close(loaded, run(expected))
    assert (loaded - run(build_tiny_pipeline(arch))).abs().max() > 1e-2


def test_two_files_with_scales_add(tmp_path, kohya_files):
    pipe = build_tiny_pipeline("sd1")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    targets_a = kohya_files.write(a, pipe, seed=1)
    targets_b = kohya_files.write(b, pipe, algo="lora", seed=2, convs=False)
    assert lp.load_adapter(pipe, a, scale=0.8) == "a"
    assert lp.load_adapter(pipe, b, adapter_name="second") == "second"
    lp.set_adapter_scales(pipe, {"second": 0.5})

    expected = build_tiny_pipeline("sd1")
    kohya_files.patch(expected, a, targets_a, multiplier=0.8)
    kohya_files.patch(expected, b, targets_b, multiplier=0.5)
    assert_close(run(pipe), run(expected))

    # Loading the same file again without a name gets a fresh one; an explicit duplicate is refused.
    assert lp.load_adapter(pipe, a) == "a_2"
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        lp.load_adapter(pipe, b, adapter_name="second")
    # Names that are torch Module attributes cannot be ModuleDict keys: refused up front, or avoided by default.
    with pytest.raises(ValueError, match="Module attribute"):
        lp.load_adapter(pipe, b, adapter_name="half")
    half = tmp_path / "half.safetensors"
    half.write_bytes(b.read_bytes())
    assert lp.load_adapter(pipe, half) == "half_1"
    assert sorted(lp.list_adapters(pipe)) == ["a", "a_2", "half_1", "second"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_pipelines(tmp_path, kohya_files, dtype):
    file = tmp_path / "half_precision.safetensors"
    targets = kohya_files.write(file, build_tiny_pipeline("sd1"), dtype=torch.float16)
    expected = build_tiny_pipeline("sd1")
    kohya_files.patch(expected, file, targets)
    reference = run(expected)
    # What rounding alone costs: the hand-patched weights cast to `dtype`.
    expected.to(dtype)
    rounding = (run(expected) - reference).abs().max()

    # Loaded into a pipeline already in `dtype`: the adapter sits on the layers' device, applies in `dtype`.
    pipe = build_tiny_pipeline("sd1").to(dtype)
    lp.load_adapter(pipe, file)
    layer = next(iter(adapter_layers(pipe.unet).values()))
    assert next(iter(layer.adapters.values())).hada_w1_a.device == layer.base_layer.weight.device
    low = run(pipe)
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() <= 1.5 * rounding

    original = base_weights(pipe)
    lp.fuse(pipe)
    assert (run(pipe) - reference).abs().max() <= 1.5 * rounding
    lp.unfuse(pipe)
    assert all(torch.equal(original[k], v) for k, v in base_weights(pipe).items())

    # Loaded in fp32, then moved: the factors follow the module's dtype (they are submodules).
    moved = build_tiny_pipeline("sd1")
    lp.load_adapter(moved, file)
    moved.to(dtype)
    layer = next(iter(adapter_layers(moved.unet).values()))
    assert all(t.dtype == dtype for t in next(iter(layer.adapters.values())).state_tensors().values())
    assert (run(moved) - reference).abs().max() <= 1.5 * rounding
    moved.to(torch.float32)
    assert_close(run(moved), reference, rtol=2e-2)


def test_img2img_and_inpaint_pipelines(tmp_path, kohya_files):
    sd = build_tiny_pipeline("sd1")
    file = tmp_path / "style.safetensors"
    targets = kohya_files.write(file, sd)
    image = Image.new("RGB", (64, 64), (120, 60, 200))
    mask = Image.new("L", (64, 64), 255)
    for cls, extra in (
        (StableDiffusionImg2ImgPipeline, {"image": image, "strength": 1.0}),
        (StableDiffusionInpaintPipeline, {"image": image, "mask_image": mask, "strength": 1.0}),
    ):
        pipe = cls(**build_tiny_pipeline("sd1").components)
        lp.load_adapter(pipe, file)
        expected = cls(**build_tiny_pipeline("sd1").components)
        kohya_files.patch(expected, file, targets)
        assert_close(run(pipe, **extra), run(expected, **extra))


def test_wrong_base_model_raises_before_any_change(tmp_path, kohya_files):
    sd1_file = tmp_path / "sd1.safetensors"
    kohya_files.write(sd1_file, build_tiny_pipeline("sd1"))
    sdxl = build_tiny_pipeline("sdxl")
    before = base_weights(sdxl)
    with pytest.raises(ValueError):
        lp.load_adapter(sdxl, sd1_file)
    assert lp.list_adapters(sdxl) == {}
    assert not any(
        isinstance(m, AdapterLayer) for c in lp.adapter_components(sdxl).values() for m in c.modules()
    )
    assert all(torch.equal(before[k], v) for k, v in base_weights(sdxl).items())


def test_bad_paths(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        lp.load_adapter(pipe, tmp_path / "nothing.safetensors")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        lp.load_adapter(pipe, other)
