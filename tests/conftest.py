"""Shared fixtures: tiny SD1/SDXL-shaped models and pipelines built offline from configs (loha_diffusion.tiny).

Models that tests may mutate (inject adapters, merge, move) are function-scoped and built fresh: they are tiny.
Saved pipeline folders are session-scoped; tests must treat them as read-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ldm_checkpoint import save_tiny_sd2_pipeline, write_single_file

from loha_diffusion import tiny
from loha_diffusion.formats.reference import reference_delta as format_reference_delta

# The test models are tiny: intra-op threads buy nothing, and on a small shared machine (several test runs at
# once) spinning OpenMP threads made a 2-step pipeline run take 27 s instead of 0.5 s. Set OMP_NUM_THREADS to
# choose another count.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_sd1_unet():
    """A fresh tiny UNet with the SD1.5 block layout (Conv2d 1x1 proj_in/proj_out, cross-attention dim 32)."""
    return tiny.build_tiny_unet("sd1")


@pytest.fixture
def tiny_sdxl_unet():
    """A fresh tiny UNet with the SDXL block layout (Linear proj_in/proj_out, text-time embedding)."""
    return tiny.build_tiny_unet("sdxl")


@pytest.fixture
def tiny_sd1_text_encoder():
    """A fresh tiny `CLIPTextModel` (module paths `encoder.layers.N...`, no `.text_model` in transformers 5)."""
    return tiny.build_tiny_text_encoder("sd1", 1)


@pytest.fixture
def tiny_sdxl_text_encoders():
    """Fresh tiny SDXL text encoders: (`CLIPTextModel` te1, `CLIPTextModelWithProjection` te2)."""
    return tiny.build_tiny_text_encoder("sdxl", 1), tiny.build_tiny_text_encoder("sdxl", 2)


@pytest.fixture
def tiny_sd1_pipeline():
    """A fresh in-memory tiny `StableDiffusionPipeline`."""
    return tiny.build_tiny_pipeline("sd1")


@pytest.fixture
def tiny_sdxl_pipeline():
    """A fresh in-memory tiny `StableDiffusionXLPipeline`."""
    return tiny.build_tiny_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_sd1_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SD1 diffusers folder (read-only for tests: copy it before changing anything)."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd1") / "pipeline", "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SDXL diffusers folder (read-only for tests: copy it before changing anything)."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline", "sdxl")


# -- single-file base models (original LDM/SGM layout), converted from the tiny diffusers folders above -----
# The file holds exactly the folder's weights (tests/ldm_checkpoint.py), so a model loaded from the file must
# equal the one loaded from the folder; load it with the folder as its config (`single_file` `config_dir`).


@pytest.fixture(scope="session")
def tiny_sd1_single_file(tiny_sd1_pipeline_dir, tmp_path_factory) -> Path:
    """`tiny_sd1_pipeline_dir`'s weights as one LDM-layout `.safetensors` file (read-only)."""
    return write_single_file(
        tiny_sd1_pipeline_dir, tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    )


@pytest.fixture(scope="session")
def tiny_sd1_ckpt(tiny_sd1_pipeline_dir, tmp_path_factory) -> Path:
    """`tiny_sd1_pipeline_dir`'s weights as a `.ckpt` (torch pickle of `{"state_dict": ...}`), read-only."""
    return write_single_file(tiny_sd1_pipeline_dir, tmp_path_factory.mktemp("single") / "tiny-sd1.ckpt")


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tiny_sdxl_pipeline_dir, tmp_path_factory) -> Path:
    """`tiny_sdxl_pipeline_dir`'s weights as one SGM-layout `.safetensors` file (read-only)."""
    return write_single_file(
        tiny_sdxl_pipeline_dir, tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    )


@pytest.fixture(scope="session")
def tiny_sd2_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SD2-shaped diffusers folder (linear projections, OpenCLIP-style encoder), read-only."""
    return save_tiny_sd2_pipeline(tmp_path_factory.mktemp("tiny_sd2") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd2_single_file(tiny_sd2_pipeline_dir, tmp_path_factory) -> Path:
    """`tiny_sd2_pipeline_dir`'s weights as one LDM-layout `.safetensors` file (OpenCLIP names), read-only."""
    return write_single_file(
        tiny_sd2_pipeline_dir, tmp_path_factory.mktemp("single") / "tiny-sd2.safetensors"
    )


# -- adapter files written by hand ----------------------------------------------------------------------
# Tests of loading and verifying need Kohya files that do not come from our own exporter: these are written
# directly with safetensors from the layouts of docs/kohya-format.md (sections 3 and 4), and the matching
# weight change is computed from the same plain formulas (loha_diffusion.formats.reference).

UNET_TRANSFORMER_LEAVES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def reference_delta(tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one Kohya module from its file tensors, `alpha` entry included (fp64): the library's plain
    formulas of the format (`loha_diffusion.formats.reference`, independent of our adapter classes)."""
    alpha = tensors["alpha"].item() if "alpha" in tensors else None
    return format_reference_delta(tensors, alpha, weight_shape)


def _factor_tensors(algo: str, weight: torch.Tensor, rank: int, cp: bool, gen: torch.Generator) -> dict:
    out, in_ = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    k = 1
    for side in kernel:
        k *= side
    std = 0.2

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std

    use_cp = cp and k > 1
    if algo == "loha":
        if use_cp:
            return {
                "hada_w1_a": rand(rank, out),
                "hada_w1_b": rand(rank, in_),
                "hada_t1": rand(rank, rank, *kernel),
                "hada_w2_a": rand(rank, out),
                "hada_w2_b": rand(rank, in_),
                "hada_t2": rand(rank, rank, *kernel),
            }
        return {
            "hada_w1_a": rand(out, rank),
            "hada_w1_b": rand(rank, in_ * k),
            "hada_w2_a": rand(out, rank),
            "hada_w2_b": rand(rank, in_ * k),
        }
    pointwise = (1,) * len(kernel)
    if use_cp:
        return {
            "lora_down.weight": rand(rank, in_, *pointwise),
            "lora_mid.weight": rand(rank, rank, *kernel),
            "lora_up.weight": rand(out, rank, *pointwise),
        }
    return {"lora_down.weight": rand(rank, in_, *kernel), "lora_up.weight": rand(out, rank, *pointwise)}


def kohya_targets(pipe, convs: bool = True) -> dict[str, tuple[str, str]]:
    """`{kohya module name: (component, module path)}` for Kohya's usual targets of a tiny SD1/SDXL pipeline:
    transformer Linear/1x1 layers, ResNet conv1 (3x3) when `convs`, and the text encoders' q/k/v/out/fc1/fc2."""
    from loha_diffusion.formats import naming

    targets: dict[str, tuple[str, str]] = {}
    unet = pipe.unet
    arch = naming.detect_architecture(unet)
    unet_naming = naming.default_unet_naming(arch)
    layout = naming.UNetLayout.from_config(unet)
    for path, module in unet.named_modules():
        wanted = ".transformer_blocks." in path and path.endswith(UNET_TRANSFORMER_LEAVES)
        wanted |= path.endswith(("proj_in", "proj_out"))
        wanted |= convs and ".resnets." in path and path.endswith("conv1")
        if wanted and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            targets[naming.unet_kohya_name(path, unet_naming, layout)] = ("unet", path)
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    for component, prefix in zip(encoders, naming.text_encoder_prefixes(len(encoders))):
        for path, module in getattr(pipe, component).named_modules():
            if path.endswith(TE_LEAVES) and isinstance(module, torch.nn.Linear):
                targets[naming.text_encoder_kohya_name(path, prefix)] = (component, path)
    return targets


def data_only_flags(data: Path) -> list[str]:
    """The least command line that loads a config for the data folder `data` (a model name that is never
    loaded, one step): for tests of the scan and the config alone."""
    return ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(data), "--max_train_steps", "1"]


def write_kohya_file(
    path,
    pipe,
    *,
    algo: str = "loha",
    rank: int = 4,
    alpha: float = 2.0,
    cp: bool = False,
    convs: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
) -> dict[str, tuple[str, str]]:
    """Write a Kohya-format file with random non-zero factors for `pipe`; return its module map."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    targets = kohya_targets(pipe, convs=convs)
    tensors = {}
    for kohya_name, (component, module_path) in targets.items():
        weight = getattr(pipe, component).get_submodule(module_path).weight
        for tensor_name, tensor in _factor_tensors(algo, weight, rank, cp, gen).items():
            tensors[f"{kohya_name}.{tensor_name}"] = tensor.to(dtype).contiguous()
        tensors[f"{kohya_name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(tensors, str(path), metadata=metadata or {"ss_network_module": "lycoris.kohya"})
    return targets


def patch_by_hand(pipe, file_path, targets: dict[str, tuple[str, str]], multiplier: float = 1.0) -> None:
    """Add `multiplier` × each module's ΔW, computed from the file's tensors with the plain formulas, to the
    pipeline's weights in place."""
    from safetensors.torch import load_file

    tensors = load_file(str(file_path))
    with torch.no_grad():
        for kohya_name, (component, module_path) in targets.items():
            layer = getattr(pipe, component).get_submodule(module_path)
            prefix = kohya_name + "."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            delta = reference_delta(own, tuple(layer.weight.shape))
            layer.weight += (multiplier * delta).to(layer.weight.dtype)


@pytest.fixture
def kohya_files():
    """Helpers to write hand-made Kohya files and patch weights from them: `.write(...)`, `.patch(...)`,
    `.targets(pipe)`, `.delta(tensors, shape)`."""

    class Helpers:
        write = staticmethod(write_kohya_file)
        patch = staticmethod(patch_by_hand)
        targets = staticmethod(kohya_targets)
        delta = staticmethod(reference_delta)

    return Helpers
