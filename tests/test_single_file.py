"""Single-file base models (`loha_diffusion.single_file`) and the test converter that writes them
(`tests/ldm_checkpoint.py`)."""

from __future__ import annotations

import builtins
import fnmatch
import hashlib
import importlib.util
import json
import os
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_kohya_file
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from ldm_checkpoint import TEXT_ENCODER_PREFIXES, modules_to_original
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loha_diffusion import cli, tiny
from loha_diffusion import single_file as S
from loha_diffusion.errors import ConfigError
from loha_diffusion.meta_models import meta_models

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str) -> None:
    exp, act = expected.state_dict(), actual.state_dict()
    assert exp.keys() == act.keys(), f"{what}: key sets differ: {sorted(set(exp) ^ set(act))[:5]}"
    differ = [k for k in exp if exp[k].dtype != act[k].dtype or not torch.equal(exp[k], act[k])]
    assert not differ, f"{what}: tensors differ: {differ[:5]}"


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_converter_output_loads_back_with_diffusers(arch, request):
    """The converted file is what diffusers' single-file loading reads: every tensor comes back unchanged."""
    folder = request.getfixturevalue(f"tiny_{arch}_pipeline_dir")
    state = load_file(str(request.getfixturevalue(f"tiny_{arch}_single_file")))
    unet = UNet2DConditionModel.from_single_file(
        state, config=str(folder), subfolder="unet", local_files_only=True
    )
    _assert_same_weights(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), unet, "unet")
    vae = AutoencoderKL.from_single_file(state, config=str(folder), subfolder="vae", local_files_only=True)
    _assert_same_weights(AutoencoderKL.from_pretrained(folder, subfolder="vae"), vae, "vae")
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    for component, prefix in TEXT_ENCODER_PREFIXES[arch].items():
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        cls = classes[component]
        model = create_diffusers_clip_model_from_ldm(
            cls, own, subfolder=component, config=str(folder), local_files_only=True
        )
        _assert_same_weights(cls.from_pretrained(folder, subfolder=component), model, component)


# -- loading: the single file gives exactly the folder's weights ---------------------------------------------


def _components(arch: str) -> list[str]:
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    return names + (["text_encoder_2", "tokenizer_2"] if arch == "sdxl" else [])


@pytest.mark.parametrize(
    ("arch", "file_fixture"),
    [
        ("sd1", "tiny_sd1_single_file"),
        ("sd1", "tiny_sd1_ckpt"),
        ("sd2", "tiny_sd2_single_file"),
        ("sdxl", "tiny_sdxl_single_file"),
    ],
)
def test_loaded_weights_equal_the_folder_weights(arch, file_fixture, request):
    folder = request.getfixturevalue(f"tiny_{arch}_pipeline_dir")
    path = request.getfixturevalue(file_fixture)
    info = S.inspect_checkpoint(path, config_dir=folder, prediction_type="epsilon" if arch == "sd2" else None)
    assert (info.arch, info.prediction_type, info.config_dir, info.name) == (
        arch,
        "epsilon",
        folder,
        path.stem,
    )
    parts = S.load_components(info, _components(arch))
    assert list(parts) == _components(arch)
    reference = DiffusionPipeline.from_pretrained(folder)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component in parts:
            _assert_same_weights(getattr(reference, component), parts[component], component)
            assert not parts[component].training
    for component in ("tokenizer", "tokenizer_2"):
        if component in parts:
            assert parts[component].get_vocab() == getattr(reference, component).get_vocab()
            assert (
                parts[component]("a photo of a cat").input_ids
                == getattr(reference, component)("a photo of a cat").input_ids
            )
    assert isinstance(parts["scheduler"], DDPMScheduler)
    assert parts["scheduler"].config.prediction_type == "epsilon"
    assert parts["scheduler"].config.beta_schedule == reference.scheduler.config.beta_schedule


def test_load_components_dtype_and_subset(tiny_sdxl_single_file, tiny_sdxl_pipeline_dir):
    info = S.inspect_checkpoint(tiny_sdxl_single_file, config_dir=tiny_sdxl_pipeline_dir)
    parts = S.load_components(info, ["text_encoder_2", "unet"], torch_dtype=torch.float16)
    assert list(parts) == ["text_encoder_2", "unet"]
    assert {p.dtype for p in parts["unet"].parameters()} == {torch.float16}
    assert {p.dtype for p in parts["text_encoder_2"].parameters()} == {torch.float16}


def test_load_pipeline_runs_and_uses_given_components(tiny_sdxl_single_file, tiny_sdxl_pipeline_dir):
    info = S.inspect_checkpoint(tiny_sdxl_single_file, config_dir=tiny_sdxl_pipeline_dir)
    unet = S.load_components(info, ["unet"])["unet"]
    pipe = S.load_pipeline(info, unet=unet)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.unet is unet
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the folder's, not the training DDPM
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    with pytest.raises(ConfigError, match="not components"):
        S.load_pipeline(info, safety_checker=None)


def test_sd1_pipeline_from_single_file(tiny_sd1_single_file, tiny_sd1_pipeline_dir):
    pipe = S.load_pipeline(S.inspect_checkpoint(tiny_sd1_single_file, config_dir=tiny_sd1_pipeline_dir))
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_unknown_and_absent_components(tiny_sd1_single_file, tiny_sd1_pipeline_dir):
    info = S.inspect_checkpoint(tiny_sd1_single_file, config_dir=tiny_sd1_pipeline_dir)
    with pytest.raises(ConfigError, match="unknown components"):
        S.load_components(info, ["unet", "safety_checker"])
    with pytest.raises(ConfigError, match="SDXL only"):
        S.load_components(info, ["text_encoder_2"])


# -- architecture and prediction type ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_arch_is_detected_from_tensor_names(arch, request):
    path = request.getfixturevalue(f"tiny_{arch}_single_file")
    shapes = S.read_shapes(path)
    assert S.detect_arch(shapes) == arch
    # Without text encoders only the UNet's width could tell; the tiny widths are not the real ones.
    unet_only = {k: v for k, v in shapes.items() if k.startswith(S.UNET_PREFIX)}
    assert S.detect_arch(unet_only) is None


def test_arch_override_must_fit_the_config(
    tiny_sd1_single_file, tiny_sd1_pipeline_dir, tiny_sdxl_pipeline_dir
):
    info = S.inspect_checkpoint(tiny_sd1_single_file, arch="sd1", config_dir=tiny_sd1_pipeline_dir)
    assert info.arch == "sd1"
    with pytest.raises(ConfigError, match="does not fit") as err:
        S.inspect_checkpoint(tiny_sd1_single_file, arch="sdxl", config_dir=tiny_sdxl_pipeline_dir)
    assert str(tiny_sd1_single_file) in str(err.value) and "--model-config" in str(err.value)
    with pytest.raises(ConfigError, match="model_arch"):
        S.inspect_checkpoint(tiny_sd1_single_file, arch="sd3")
    with pytest.raises(ConfigError, match="prediction_type"):
        S.inspect_checkpoint(tiny_sd1_single_file, prediction_type="sample")


def test_tiny_file_does_not_fit_the_shipped_configs(tiny_sd1_single_file):
    """The shipped configs are for the real models: a tiny file is refused with the fix, not loaded wrong."""
    with pytest.raises(ConfigError, match="cross-attention width: file 32, config 768") as err:
        S.inspect_checkpoint(tiny_sd1_single_file)
    assert "--model-config" in str(err.value)


def test_config_dir_missing_files(tiny_sd1_single_file, tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        S.inspect_checkpoint(tiny_sd1_single_file, config_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        S.inspect_checkpoint(tiny_sd1_single_file, config_dir=tmp_path / "nope")


class _FakeUNet(torch.nn.Module):
    """Answers x + offset: an epsilon model answers about x at t=999, a v model far below (A1111's test)."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(offset))
        self.config = SimpleNamespace(in_channels=4, cross_attention_dim=1024)

    def forward(self, x, t, encoder_hidden_states):
        assert t.tolist() == [999] and encoder_hidden_states.shape == (1, 2, 1024)
        assert torch.all(x == 0.5)
        return SimpleNamespace(sample=x + self.offset)


def test_detect_v_prediction_is_a1111s_rule():
    assert S.detect_v_prediction(_FakeUNet(-1.5)) is True
    assert S.detect_v_prediction(_FakeUNet(-0.5)) is False
    assert S.detect_v_prediction(_FakeUNet(0.0)) is False


def test_sd2_prediction_type_decided_by_the_weights(tiny_sd2_single_file, tiny_sd2_pipeline_dir):
    info = S.inspect_checkpoint(tiny_sd2_single_file, config_dir=tiny_sd2_pipeline_dir)
    assert info.prediction_type is None  # names cannot tell SD2 512-base from 768-v
    parts = S.load_components(info, ["unet", "scheduler"])
    expected = "v_prediction" if S.detect_v_prediction(parts["unet"]) else "epsilon"
    assert parts["scheduler"].config.prediction_type == expected
    resolved = S.resolve_prediction_type(info)
    assert resolved.prediction_type == expected and resolved.config_dir == tiny_sd2_pipeline_dir
    # An explicit setting wins (kohya's --v_parameterization).
    forced = S.inspect_checkpoint(
        tiny_sd2_single_file, config_dir=tiny_sd2_pipeline_dir, prediction_type="v_prediction"
    )
    assert S.load_components(forced, ["scheduler"])["scheduler"].config.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ('model:\n  params:\n    parameterization: "v"\n', "v_prediction"),
        ("model:\n  params: {}\n", "epsilon"),
    ],
)
def test_sd2_yaml_beside_the_file(yaml_text, expected, tiny_sd2_single_file, tiny_sd2_pipeline_dir, tmp_path):
    """A1111 reads a same-named .yaml beside the checkpoint as its config."""
    link = tmp_path / "model.safetensors"
    link.symlink_to(tiny_sd2_single_file)
    (tmp_path / "model.yaml").write_text(yaml_text)
    assert S.inspect_checkpoint(link, config_dir=tiny_sd2_pipeline_dir).prediction_type == expected
    (tmp_path / "model.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="model.yaml"):
        S.inspect_checkpoint(link, config_dir=tiny_sd2_pipeline_dir)


def test_v_pred_key_marks_v_prediction(tiny_sdxl_single_file, tiny_sdxl_pipeline_dir, tmp_path):
    """ComfyUI's marker: a `v_pred` tensor in the file means a v-prediction model (e.g. v-pred SDXL fine-tunes)."""
    tensors = load_file(str(tiny_sdxl_single_file))
    save_file({**tensors, "v_pred": torch.tensor([])}, str(tmp_path / "vpred.safetensors"))
    info = S.inspect_checkpoint(tmp_path / "vpred.safetensors", config_dir=tiny_sdxl_pipeline_dir)
    assert info.prediction_type == "v_prediction"
    assert S.load_components(info, ["scheduler"])["scheduler"].config.prediction_type == "v_prediction"


# -- the shipped configs -------------------------------------------------------------------------------------

SHIPPED = {"sd15": "sd1", "sd2-base": "sd2", "sd2-v": "sd2", "sdxl-base": "sdxl"}


def _pyproject_package_data() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["tool"]["setuptools"]["package-data"]["loha_diffusion"]


def test_shipped_files_are_package_data_found_by_importlib_resources():
    root = resources.files("loha_diffusion") / "base_configs"
    assert S.base_configs_dir() == Path(str(root))
    for name, arch in SHIPPED.items():
        folder = root / name
        for rel in [
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "scheduler/scheduler_config.json",
        ]:
            assert (folder / rel).is_file(), f"{name}/{rel}"
        encoders = ["", "_2"] if arch == "sdxl" else [""]
        for suffix in encoders:
            assert (folder / f"text_encoder{suffix}" / "config.json").is_file()
            assert (folder / f"tokenizer{suffix}" / "tokenizer_config.json").is_file()
    assert (root / "clip_tokenizer" / "vocab.json").is_file() and (
        root / "clip_tokenizer" / "merges.txt"
    ).is_file()
    assert "OpenRAIL" in (root / "README.md").read_text() and "MIT" in (root / "README.md").read_text()
    # Every file there is matched by pyproject's package-data, so `pip install .` ships it.
    patterns = _pyproject_package_data()
    package = Path(str(resources.files("loha_diffusion")))
    files = [p.relative_to(package).as_posix() for p in S.base_configs_dir().rglob("*") if p.is_file()]
    unshipped = [
        f
        for f in files
        if not any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/") for pat in patterns)
    ]
    assert files and not unshipped


def test_shipped_configs_are_tiny_full_size_configs():
    """The shipped SD1.5/SDXL UNet and text-encoder configs are tiny.py's real ones, as make_base_configs writes."""
    for name, arch in (("sd15", "sd1"), ("sdxl-base", "sdxl")):
        folder = S.base_configs_dir() / name
        unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
        for key, value in tiny.full_size_unet_config(arch).items():
            assert unet[key] == (list(value) if isinstance(value, tuple) else value), (name, key)
        for index, sub in enumerate(
            ["text_encoder", "text_encoder_2"][: 2 if arch == "sdxl" else 1], start=1
        ):
            shipped = CLIPTextConfig.from_pretrained(folder / sub).to_dict()
            expected = tiny.full_size_text_encoder_config(arch, index).to_dict()
            for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
                shipped.pop(key, None), expected.pop(key, None)
            assert shipped == expected, name
    scaling = {
        n: AutoencoderKL.load_config(S.base_configs_dir() / n, subfolder="vae")["scaling_factor"]
        for n in SHIPPED
    }
    assert scaling == {"sd15": 0.18215, "sd2-base": 0.18215, "sd2-v": 0.18215, "sdxl-base": 0.13025}
    assert (
        AutoencoderKL.load_config(S.base_configs_dir() / "sdxl-base", subfolder="vae")["force_upcast"] is True
    )
    for name in SHIPPED:
        scheduler = DDPMScheduler.from_pretrained(S.base_configs_dir() / name, subfolder="scheduler")
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
        assert (
            scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
        )
        assert scheduler.config.prediction_type == ("v_prediction" if name == "sd2-v" else "epsilon")


def test_make_base_configs_script_reproduces_the_shipped_json():
    spec = importlib.util.spec_from_file_location("make_base_configs", SCRIPTS / "make_base_configs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name in SHIPPED:
        for rel, value in script.model_files(name).items():
            assert (S.base_configs_dir() / name / rel).read_text(encoding="utf-8") == script.dump(value), rel


def _meta_models(name: str) -> dict:
    folder = S.base_configs_dir() / name
    models = meta_models(folder)
    with torch.device("meta"):
        models["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
    return models


# Names and shapes the real release files have (sd-v1-5, v2-1_768, sd_xl_base_1.0), and their tensor counts.
REAL_TENSORS = {
    "sd15": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    },
    "sd2-v": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    },
    "sdxl-base": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    },
}
REAL_COUNTS = {
    "sd15": {"model.": 686, "first_stage_model.": 248},
    "sdxl-base": {"model.": 1680, "first_stage_model.": 248, "conditioner.embedders.1.": 389},
}


@pytest.mark.parametrize("name", ["sd15", "sd2-v", "sdxl-base"])
def test_shipped_configs_fit_full_size_checkpoints(name, tmp_path):
    """Full-size models built on `meta` from a shipped config convert to the names, shapes and counts of the
    real release files; such a file (a `.ckpt` of meta tensors: shapes without data) is detected and fits the
    shipped configs; diffusers' loader maps its UNet and VAE names back onto the shipped-config models."""
    models = _meta_models(name)
    arch = SHIPPED[name]
    state = modules_to_original(arch, **models)
    for key, shape in REAL_TENSORS[name].items():
        assert tuple(state[key].shape) == shape, key
    for prefix, count in REAL_COUNTS.get(name, {}).items():
        assert sum(k.startswith(prefix) for k in state) == count, prefix
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": state}, path)
    info = S.inspect_checkpoint(path)
    assert info.arch == arch and info.config_dir == S.base_configs_dir() / name
    assert info.prediction_type == (None if arch == "sd2" else "epsilon")
    unet = convert_ldm_unet_checkpoint(state, models["unet"].config)
    assert {k: tuple(v.shape) for k, v in unet.items()} == {
        k: tuple(v.shape) for k, v in models["unet"].state_dict().items()
    }
    vae = convert_ldm_vae_checkpoint(state, models["vae"].config)
    assert {k: tuple(v.shape) for k, v in vae.items()} == {
        k: tuple(v.shape) for k, v in models["vae"].state_dict().items()
    }
    if arch == "sd2":
        state.update(_sd2_release_extras())
    for component, prefix in TEXT_ENCODER_PREFIXES[arch].items():
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        model = models[component]
        if prefix.endswith(".model."):
            converted = convert_open_clip_checkpoint(model, own, prefix=prefix)
        else:
            converted = convert_ldm_clip_checkpoint(own)
        if not hasattr(model, "text_model"):  # transformers 5's flat CLIPTextModel, as diffusers' loader does
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == {
            k: tuple(v.shape) for k, v in model.state_dict().items()
        }, component


def _sd2_release_extras() -> dict[str, torch.Tensor]:
    """What v2-1_768-ema-pruned has beyond the 23 layers SD2 uses: OpenCLIP-H's last layer (SD2 conditions on
    the penultimate one), the text projection and logit scale, which diffusers' loader leaves out."""
    shapes = {
        "ln_1.weight": (1024,),
        "ln_1.bias": (1024,),
        "attn.in_proj_weight": (3072, 1024),
        "attn.in_proj_bias": (3072,),
        "attn.out_proj.weight": (1024, 1024),
        "attn.out_proj.bias": (1024,),
        "ln_2.weight": (1024,),
        "ln_2.bias": (1024,),
        "mlp.c_fc.weight": (4096, 1024),
        "mlp.c_fc.bias": (4096,),
        "mlp.c_proj.weight": (1024, 4096),
        "mlp.c_proj.bias": (1024,),
    }
    with torch.device("meta"):
        extras = {
            f"cond_stage_model.model.transformer.resblocks.23.{k}": torch.empty(v) for k, v in shapes.items()
        }
        extras["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024)
        extras["cond_stage_model.model.logit_scale"] = torch.empty(())
    return extras


def test_shipped_sd2_folder_follows_the_prediction_type(tmp_path):
    state = modules_to_original("sd2", **_meta_models("sd2-v"))
    torch.save({"state_dict": state}, tmp_path / "sd2.ckpt")
    assert (
        S.inspect_checkpoint(tmp_path / "sd2.ckpt", prediction_type="epsilon").config_dir.name == "sd2-base"
    )
    assert (
        S.inspect_checkpoint(tmp_path / "sd2.ckpt", prediction_type="v_prediction").config_dir.name == "sd2-v"
    )


# -- the CLIP tokenizer ----------------------------------------------------------------------------------------

KNOWN_CLIP_IDS = {  # ids of openai/clip-vit-large-patch14's tokenizer
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "hello!!": [49406, 3306, 748, 49407],
    "A Photo of a CAT": [49406, 320, 1125, 539, 320, 2368, 49407],
}


@pytest.mark.parametrize(
    ("name", "component", "pad"),
    [
        ("sd15", "tokenizer", 49407),
        ("sd2-base", "tokenizer", 0),
        ("sdxl-base", "tokenizer", 49407),
        ("sdxl-base", "tokenizer_2", 0),
    ],
)
def test_shipped_tokenizers_give_clip_ids(name, component, pad):
    info = S.CheckpointInfo(
        path=Path("x.safetensors"),
        arch=SHIPPED[name],
        prediction_type="epsilon",
        config_dir=S.base_configs_dir() / name,
        name="x",
    )
    tokenizer = S.load_components(info, [component])[component]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    for text, ids in KNOWN_CLIP_IDS.items():
        if pad == 0 and "!" in text:
            # A pad token "!" is a special token to transformers, split out before BPE: the hub's SD2 and
            # SDXL tokenizer_2 files give the same under transformers (not OpenCLIP's "!!" = 748).
            ids = [49406, 3306, 0, 0, 49407]
        assert tokenizer(text).input_ids == ids, text
    assert tokenizer.pad_token_id == pad  # "<|endoftext|>" (SD1.5, SDXL te1) or "!" (OpenCLIP: SD2, SDXL te2)
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {pad}


def test_clip_vocab_follows_simple_tokenizers_rule():
    """vocab.json is CLIP's SimpleTokenizer vocabulary rebuilt from merges.txt: bytes, bytes + </w>, merges,
    then the two special tokens (openai/CLIP simple_tokenizer.py)."""
    folder = S.base_configs_dir() / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = lines[1:-1]
    assert len(merges) == 48894
    alphabet = list(tiny._bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert vocab == {t: i for i, t in enumerate(tokens)}


# -- .ckpt pickles and bad files -------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs code: `weights_only` loading must refuse it before it does."""

    def __reduce__(self):
        return (exec, ("import builtins; builtins._loha_single_file_pwned = True",))


def test_ckpt_is_read_weights_only(tiny_sd1_ckpt, tiny_sd1_pipeline_dir, tmp_path):
    info = S.inspect_checkpoint(tiny_sd1_ckpt, config_dir=tiny_sd1_pipeline_dir)
    assert info.arch == "sd1"
    state = S.load_state_dict(tiny_sd1_ckpt)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # "global_step" left out
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callback": _RunsCode()}, evil)
    for call in (
        lambda: S.inspect_checkpoint(evil, config_dir=tiny_sd1_pipeline_dir),
        lambda: S.load_state_dict(evil),
    ):
        with pytest.raises(ConfigError, match="weights_only") as err:
            call()
        assert str(evil) in str(err.value) and ".safetensors" in str(err.value)
    assert not hasattr(builtins, "_loha_single_file_pwned")


def _lora_file(path: Path) -> Path:
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


def test_bad_files_name_the_file_and_the_fix(
    tiny_sd1_single_file, tiny_sd1_ckpt, tiny_sd1_pipeline_dir, tmp_path
):
    cases = {}
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all" * 100)
    cases[junk] = "not a readable"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_sd1_single_file.read_bytes()[:-1000])
    cases[cut] = "download the file again"
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(tiny_sd1_ckpt.read_bytes()[: tiny_sd1_ckpt.stat().st_size // 2])
    cases[cut_ckpt] = "not a readable"
    cases[_lora_file(tmp_path / "my_lora.safetensors")] = "adapter"
    diffusers_unet = tmp_path / "diffusion_pytorch_model.safetensors"
    diffusers_unet.write_bytes(
        (tiny_sd1_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    cases[diffusers_unet] = "diffusers names"
    vae_only = tmp_path / "vae.safetensors"
    save_file(
        {k: v for k, v in load_file(str(tiny_sd1_single_file)).items() if k.startswith("first_stage_model.")},
        str(vae_only),
    )
    cases[vae_only] = "no model.diffusion_model"
    cases[tmp_path / "missing.safetensors"] = "does not exist"
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            S.inspect_checkpoint(path, config_dir=tiny_sd1_pipeline_dir)
        assert str(path) in str(err.value), path
    with pytest.raises(ConfigError, match="single-file base model is a"):
        S.inspect_checkpoint(tmp_path / "model.bin")
    assert not S.is_single_file(junk.with_suffix(".bin")) and S.is_single_file(junk)
    assert not S.is_single_file(tmp_path) and not S.is_single_file(tmp_path / "missing.ckpt")


def test_missing_component_tensors(tiny_sd1_single_file, tiny_sd1_pipeline_dir, tmp_path):
    tensors = load_file(str(tiny_sd1_single_file))
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, str(no_vae))
    info = S.inspect_checkpoint(no_vae, config_dir=tiny_sd1_pipeline_dir)
    with pytest.raises(ConfigError, match="no vae weights") as err:
        S.load_components(info, ["vae"])
    assert "--vae" in str(err.value)
    partial = tmp_path / "partial.safetensors"
    dropped = "model.diffusion_model.out.2.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(partial))
    with pytest.raises(ConfigError, match="conv_out.weight"):
        S.load_components(S.inspect_checkpoint(partial, config_dir=tiny_sd1_pipeline_dir), ["unet"])


# -- hashes ----------------------------------------------------------------------------------------------------


def test_checkpoint_hashes_follow_a1111_and_kohya(tiny_sd1_single_file, tmp_path):
    data = tiny_sd1_single_file.read_bytes()
    assert len(data) > 0x110000  # the legacy hash reads 64 KiB at 1 MiB
    hashes = S.checkpoint_hashes(tiny_sd1_single_file)
    assert hashes == {
        "sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "new_sd_model_hash": hashlib.sha256(data).hexdigest(),
    }
    # Cached per (path, size, mtime): a changed file is hashed again.
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(data)
    assert S.checkpoint_hashes(copy) == hashes
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(copy, ns=(1, 10**18))
    changed = S.checkpoint_hashes(copy)
    assert changed["new_sd_model_hash"] != hashes["new_sd_model_hash"]
    assert changed["sd_model_hash"] == hashes["sd_model_hash"]  # the legacy hash does not see the last byte
    small = tmp_path / "small.ckpt"
    small.write_bytes(b"x" * 10)  # shorter than 1 MiB: the legacy hash is of no bytes, as A1111's
    assert S.checkpoint_hashes(small)["sd_model_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    with pytest.raises(ConfigError, match="missing.safetensors"):
        S.checkpoint_hashes(tmp_path / "missing.safetensors")


def test_missing_text_encoder_tensors(tiny_sdxl_single_file, tiny_sdxl_pipeline_dir, tmp_path):
    tensors = load_file(str(tiny_sdxl_single_file))
    partial = tmp_path / "partial.safetensors"
    dropped = "conditioner.embedders.1.model.ln_final.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(partial))
    info = S.inspect_checkpoint(partial, config_dir=tiny_sdxl_pipeline_dir)
    with pytest.raises(ConfigError, match="final_layer_norm.weight"):
        S.load_components(info, ["text_encoder_2"])
    no_te2 = tmp_path / "no_te2.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}, str(no_te2))
    info = S.inspect_checkpoint(no_te2, arch="sdxl", config_dir=tiny_sdxl_pipeline_dir)
    with pytest.raises(ConfigError, match="no text_encoder_2 tensors"):
        S.load_components(info, ["text_encoder_2"])


# -- the command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_loha_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("single_cli") / "style.safetensors"
    write_kohya_file(path, tiny.build_tiny_pipeline("sd1"), algo="loha", rank=4, alpha=2.0, seed=3)
    return path


def test_cli_verify_with_a_single_file_base(
    tiny_sd1_single_file, tiny_sd1_pipeline_dir, sd1_loha_file, capsys
):
    base = ["--pipeline", str(tiny_sd1_single_file), "--model-config", str(tiny_sd1_pipeline_dir)]
    assert cli.main(["verify", str(sd1_loha_file), *base]) == 0
    assert "PASS:" in capsys.readouterr().out
    # Without --model-config the shipped SD1.5 configs are used, which a tiny file does not fit: the fix is named.
    assert cli.main(["verify", str(sd1_loha_file), "--pipeline", str(tiny_sd1_single_file)]) == 1
    assert "--model-config" in capsys.readouterr().err
    assert cli.main(["verify", str(sd1_loha_file), "--pipeline", str(sd1_loha_file)]) == 1
    assert "adapter" in capsys.readouterr().err
    assert (
        cli.main(
            ["verify", str(sd1_loha_file), "--pipeline", str(tiny_sd1_pipeline_dir), "--model-arch", "sd1"]
        )
        == 1
    )
    assert "single-file --pipeline" in capsys.readouterr().err


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_cli_generate_and_merge_with_a_single_file_base(
    tiny_sd1_single_file, tiny_sd1_pipeline_dir, sd1_loha_file, tmp_path, capsys
):
    """The single file renders and merges exactly as the folder it was written from."""
    single = ["--pipeline", str(tiny_sd1_single_file), "--model-config", str(tiny_sd1_pipeline_dir)]
    folder = ["--pipeline", str(tiny_sd1_pipeline_dir)]
    images = {}
    for name, base in (("single", single), ("folder", folder)):
        render = ["--prompt", "a photo of a cat", "--steps", "2", "--width", "64", "--height", "64"]
        args = [
            "generate",
            *base,
            "--adapter",
            f"{sd1_loha_file}:0.8",
            *render,
            "--out",
            str(tmp_path / f"{name}.png"),
        ]
        assert cli.main(args) == 0, capsys.readouterr().err
        images[name] = _image(tmp_path / f"{name}.png")
        assert cli.main(["merge", *base, "--adapter", str(sd1_loha_file), "--out", str(tmp_path / name)]) == 0
    np.testing.assert_array_equal(images["single"], images["folder"])
    assert str(tiny_sd1_single_file) in capsys.readouterr().out
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        merged, reference = (load_file(str(tmp_path / n / weights)) for n in ("single", "folder"))
        assert merged.keys() == reference.keys()
        assert all(torch.equal(merged[k], reference[k]) for k in merged), weights


def test_stored_dtypes_of_a_single_file(
    tiny_sdxl_single_file, tiny_sdxl_pipeline_dir, tiny_sd1_ckpt, tiny_sd1_pipeline_dir, tmp_path
):
    info = S.inspect_checkpoint(tiny_sdxl_single_file, config_dir=tiny_sdxl_pipeline_dir)
    assert S.stored_dtypes(info) == dict.fromkeys(
        ["unet", "vae", "text_encoder", "text_encoder_2"], torch.float32
    )
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(str(tiny_sdxl_single_file)).items()}, str(half))
    info = S.inspect_checkpoint(half, config_dir=tiny_sdxl_pipeline_dir)
    assert set(S.stored_dtypes(info).values()) == {torch.float16}
    ckpt = S.inspect_checkpoint(tiny_sd1_ckpt, config_dir=tiny_sd1_pipeline_dir)
    assert S.stored_dtypes(ckpt) == {"unet": None, "vae": None, "text_encoder": None}


def test_extras_of_real_files_are_ignored(tiny_sd1_single_file, tiny_sd1_pipeline_dir, tmp_path):
    """Release files also hold CLIP's position_ids, EMA counters and the LDM noise-schedule buffers."""
    tensors = load_file(str(tiny_sd1_single_file))
    extras = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1, dtype=torch.int32),
    }
    save_file({**tensors, **extras}, str(tmp_path / "release.safetensors"))
    info = S.inspect_checkpoint(tmp_path / "release.safetensors", config_dir=tiny_sd1_pipeline_dir)
    parts = S.load_components(info, ["unet", "text_encoder"])
    reference = DiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir)
    _assert_same_weights(reference.text_encoder, parts["text_encoder"], "text_encoder")


def test_sdxl_refiner_is_refused(tmp_path):
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8),
        },
        str(tmp_path / "refiner.safetensors"),
    )
    with pytest.raises(ConfigError, match="SDXL refiner"):
        S.inspect_checkpoint(tmp_path / "refiner.safetensors")


def test_sd2_pipeline_tests_the_given_unet(tiny_sd2_single_file, tiny_sd2_pipeline_dir, monkeypatch):
    info = S.inspect_checkpoint(tiny_sd2_single_file, config_dir=tiny_sd2_pipeline_dir)
    unet = S.load_components(info, ["unet"])["unet"]
    loaded = []
    original = S._load_model
    monkeypatch.setattr(
        S, "_load_model", lambda cls, i, st, c, d: loaded.append(c) or original(cls, i, st, c, d)
    )
    pipe = S.load_pipeline(info, unet=unet)
    assert loaded == ["vae"]  # no second UNet for the prediction-type test
    assert pipe.unet is unet and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == (
        "v_prediction" if S.detect_v_prediction(unet) else "epsilon"
    )


def test_old_clip_names_without_text_model(tiny_sd1_single_file, tiny_sd1_pipeline_dir, tmp_path):
    """Files saved with transformers 3 name the SD1 encoder without `text_model.` (A1111 renames them too)."""
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in load_file(str(tiny_sd1_single_file)).items()
    }
    save_file(old, str(tmp_path / "old.safetensors"))
    info = S.inspect_checkpoint(tmp_path / "old.safetensors", config_dir=tiny_sd1_pipeline_dir)
    encoder = S.load_components(info, ["text_encoder"])["text_encoder"]
    _assert_same_weights(
        CLIPTextModel.from_pretrained(tiny_sd1_pipeline_dir, subfolder="text_encoder"), encoder, "te"
    )
