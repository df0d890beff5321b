"""Validation renders from the run's own modules (no second UNet/text encoder), with the exported file loaded as a
second adapter, and leaves the trained adapter, its optimizer and the modules' modes exactly as they were; the
fixed-set denoising loss conditions as training does (SDXL micro-conditioning from each image's crop)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, PNDMScheduler
from PIL import Image
from safetensors.torch import load_file
from test_training_loop import base_flags, make_dataset

from loha_diffusion.config import LoHaConfig
from loha_diffusion.errors import ConfigError
from loha_diffusion.formats.kohya import save_kohya
from loha_diffusion.model import adapter_layers, get_adapter_state_dict, inject_adapter
from loha_diffusion.pipeline import list_adapters, load_adapter
from loha_diffusion.targeting import text_encoder_preset
from loha_diffusion.training import loop
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import ImageRecord
from loha_diffusion.training.loop import train
from loha_diffusion.training.models import Models, load_models
from loha_diffusion.training.sample_prompts import read_sample_prompts
from loha_diffusion.training.validation import (
    VALIDATION_ADAPTER,
    ValidationPrompt,
    fixed_denoising_loss,
    inference_scheduler,
    make_validator,
    resolve_validation_prompts,
    validation_adapter,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
PROMPT = "a red square"


def run_models(pipeline_dir: Path, arch: str) -> Models:
    """The tiny model's parts as `models.load_models` gives them (DDPM noise scheduler)."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    models = Models.from_pipeline(pipe, DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler"))
    assert models.arch == arch
    return models


def randomize(models: list[torch.nn.Module], seed: int) -> None:
    """Give the trained adapter weights large enough to change the images (a fresh LoHa has ΔW = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.4)


def add_trained_adapters(models: Models) -> list[torch.nn.Module]:
    """Inject the "default" adapter (with rank dropout, so train mode would change the output) into the UNet and
    every text encoder, as `models.add_adapters` does; returns the adapted models."""
    for model in (models.unet, *models.text_encoders, models.vae):
        model.requires_grad_(False)
    inject_adapter(models.unet, LoHaConfig(r=4, alpha=4, target_modules=UNET_TARGETS, rank_dropout=0.5))
    for text_encoder in models.text_encoders:
        inject_adapter(text_encoder, text_encoder_preset(algo="loha", r=4, alpha=4, rank_dropout=0.5))
    trained = [models.unet, *models.text_encoders]
    randomize(trained, seed=1)
    return trained


def export(models: Models, path: Path) -> Path:
    te1, te2 = models.text_encoder, models.text_encoder_2
    return save_kohya(path, unet=models.unet, text_encoder=te1, text_encoder_2=te2, dtype=torch.float32)


def snapshot(models: Models, trained: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Everything validation must leave exactly as it was."""
    modules = [models.unet, *models.text_encoders, models.vae]
    return {
        "tensors": [
            {k: v.clone() for k, v in get_adapter_state_dict(model, "default").items()} for model in trained
        ],
        "params": [(id(p), p.requires_grad, p.dtype, p.device) for m in modules for p in m.parameters()],
        "active": [
            (path, list(layer.active_adapters)) for m in trained for path, layer in adapter_layers(m).items()
        ],
        "modes": [(name, sub.training) for m in modules for name, sub in m.named_modules()],
        "optimizer": [id(p) for group in optimizer.param_groups for p in group["params"]],
        "optimizer_state": {
            k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()
        },
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    for old, new in zip(before["tensors"], after["tensors"], strict=True):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    for key in ("params", "active", "modes", "optimizer"):
        assert before[key] == after[key], key
    for k, state in before["optimizer_state"].items():
        assert all(torch.equal(t, after["optimizer_state"][k][n]) for n, t in state.items())
    assert torch.equal(before["rng"], after["rng"])


def validation_config(pipeline_dir: Path, tmp_path: Path, *flags: str):
    return load_config(
        [
            "--pretrained_model_name_or_path",
            str(pipeline_dir),
            "--train_data_dir",
            str(tmp_path),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "1",
            "--resolution",
            "64",
            "--validation_prompt",
            PROMPT,
            "--num_validation_images",
            "1",
            "--validation_num_inference_steps",
            "3",
            "--validation_guidance_scale",
            "3.0",
            *flags,
        ]
    )


def fresh_render(pipeline_dir: Path, adapter_file: Path | None, seed: int) -> np.ndarray:
    """The same prompt through a pipeline loaded fresh from the folder (with `adapter_file`), as a user would."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    if adapter_file is not None:
        load_adapter(pipe, adapter_file)
    image = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_validation_renders_the_file_on_the_runs_modules_and_restores_them(
    arch, tiny_sd1_pipeline_dir, tiny_sdxl_pipeline_dir, tmp_path
):
    pipeline_dir = tiny_sd1_pipeline_dir if arch == "sd1" else tiny_sdxl_pipeline_dir
    models = run_models(pipeline_dir, arch)
    trained = add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "step.safetensors")
    randomize(trained, seed=2)  # training went on: the trained adapter now differs from the file
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    for model in trained:
        model.train()
    models.unet.conv_in.eval()  # an odd mode on one submodule must come back as it was too
    before = snapshot(models, trained, optimizer)

    validator = make_validator(
        validation_config(pipeline_dir, tmp_path), SimpleNamespace(is_main_process=True), models
    )
    (rendered,) = validator.render(adapter_file, step=3)
    grid, path = rendered.grid, rendered.path

    assert_same(before, snapshot(models, trained, optimizer))
    assert list_adapters(validator.pipeline()) == {
        "default": ["unet", "text_encoder", "text_encoder_2"][: len(trained)]
    }
    # The pipeline is made of the run's modules: nothing of the base model is held twice.
    pipe = validator.pipeline()
    assert pipe.unet is models.unet and pipe.vae is models.vae and pipe.text_encoder is models.text_encoder
    assert getattr(pipe, "text_encoder_2", None) is models.text_encoder_2
    expected_scheduler = {"sd1": PNDMScheduler, "sdxl": "EulerDiscreteScheduler"}[arch]
    assert type(pipe.scheduler).__name__ == getattr(expected_scheduler, "__name__", expected_scheduler)
    assert path == tmp_path / "out" / "validation" / "step-000003-prompt-00.png" and path.is_file()
    # Same image as a user's fresh pipeline with the file loaded; different from the base model's.
    ours = np.asarray(grid, dtype=np.int16)
    assert np.abs(ours - fresh_render(pipeline_dir, adapter_file, validator.prompts[0].seed)).max() <= 1
    assert np.abs(ours - fresh_render(pipeline_dir, None, validator.prompts[0].seed)).max() > 8


def test_validation_adapter_is_removed_after_an_error(tiny_sd1_pipeline_dir, tmp_path):
    models = run_models(tiny_sd1_pipeline_dir, "sd1")
    trained = add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "a.safetensors")
    optimizer = torch.optim.AdamW([p for m in trained for p in m.parameters() if p.requires_grad])
    for model in trained:
        model.train()
    before = snapshot(models, trained, optimizer)
    validator = make_validator(
        validation_config(tiny_sd1_pipeline_dir, tmp_path), SimpleNamespace(is_main_process=True), models
    )
    with pytest.raises(RuntimeError, match="while rendering"):
        with validation_adapter(validator.pipeline(), adapter_file):
            assert list_adapters(validator.pipeline()) == {
                "default": ["unet", "text_encoder"],
                VALIDATION_ADAPTER: ["unet", "text_encoder"],
            }
            assert not models.unet.training and all(
                layer.active_adapters == [VALIDATION_ADAPTER]
                for layer in adapter_layers(models.unet).values()
            )
            raise RuntimeError("while rendering")
    assert_same(before, snapshot(models, trained, optimizer))
    assert VALIDATION_ADAPTER not in list_adapters(validator.pipeline())


@pytest.mark.parametrize("vae_dtype", [torch.float32, torch.float16])
def test_half_precision_modules_render_in_their_dtypes(vae_dtype, tiny_sdxl_pipeline_dir, tmp_path):
    """bf16 base weights with fp32 adapters, and an fp32 VAE (SDXL's default) or an fp16 one with `force_upcast`:
    the render runs in the modules' dtypes (the fp16 VAE decodes in fp32, as the SDXL pipeline's `upcast_vae`)
    and leaves every weight and dtype as it was (the pipeline would leave that VAE upcast)."""
    models = run_models(tiny_sdxl_pipeline_dir, "sdxl")
    add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "a.safetensors")
    for model in (models.unet, *models.text_encoders):
        model.to(torch.bfloat16)
        for layer in adapter_layers(model).values():
            layer.adapters.float()  # as in training: base weights in the weight dtype, adapters fp32
    models.vae.to(vae_dtype)
    assert models.vae.config.force_upcast
    weights = {name: p.clone() for m in (models.unet, models.vae) for name, p in m.named_parameters()}
    validator = make_validator(
        validation_config(tiny_sdxl_pipeline_dir, tmp_path), SimpleNamespace(is_main_process=True), models
    )
    (images,) = validator.images(adapter_file)
    assert len(images) == 1 and np.asarray(images[0]).std() > 0
    after = {name: p for m in (models.unet, models.vae) for name, p in m.named_parameters()}
    assert weights.keys() == after.keys()
    assert all(weights[k].dtype == after[k].dtype and torch.equal(weights[k], after[k]) for k in weights)


def test_inference_scheduler_from_model_index_else_dpm_solver(tmp_path):
    ddpm = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"scheduler": ["diffusers", "PNDMScheduler"]}))
    pndm = inference_scheduler(ddpm, index)
    assert isinstance(pndm, PNDMScheduler) and pndm.config.prediction_type == "v_prediction"
    assert isinstance(inference_scheduler(ddpm, None), DPMSolverMultistepScheduler)
    assert isinstance(inference_scheduler(ddpm, tmp_path / "missing.json"), DPMSolverMultistepScheduler)
    index.write_text(json.dumps({"scheduler": ["diffusers", "NoSuchScheduler"]}))
    dpm = inference_scheduler(ddpm, index)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.rescale_betas_zero_snr


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fixed_denoising_loss_conditions_like_training(
    arch, tiny_sd1_pipeline_dir, tiny_sdxl_pipeline_dir, tmp_path
):
    """Deterministic, modes restored; SDXL's micro-conditioning comes from each image's original size and crop:
    a 128x64 image and its 64x64 center crop give the same pixels but different time ids (SD1: same loss)."""
    models = run_models(tiny_sd1_pipeline_dir if arch == "sd1" else tiny_sdxl_pipeline_dir, arch)
    trained = add_trained_adapters(models)
    for model in trained:
        model.train()
    wide = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide[:, 32:96]).save(tmp_path / "crop.png")
    wide_record = [ImageRecord(tmp_path / "wide.png", PROMPT)]
    crop_record = [ImageRecord(tmp_path / "crop.png", PROMPT)]
    kwargs = {"resolution": 64, "prediction_type": "epsilon", "seed": 5, "timesteps_per_image": 2}
    modes = [(name, m.training) for name, m in models.unet.named_modules()]
    first = fixed_denoising_loss(models, wide_record, **kwargs)
    assert fixed_denoising_loss(models, wide_record, **kwargs) == first and np.isfinite(first)
    assert modes == [(name, m.training) for name, m in models.unet.named_modules()]
    cropped = fixed_denoising_loss(models, crop_record, **kwargs)
    if arch == "sd1":
        assert cropped == pytest.approx(first, rel=1e-6)
    else:
        assert abs(cropped - first) > 1e-6 * abs(first)
    randomize(trained, seed=3)
    assert fixed_denoising_loss(models, wide_record, **kwargs) != first


def test_validation_of_a_single_file_base(tiny_sd1_single_file, tiny_sd1_pipeline_dir, tmp_path):
    """A single-file base: the pipeline is built from the run's modules (nothing more is loaded), the sampler
    comes from the config folder's model_index.json, and the image is the diffusers folder's with the file."""
    cfg = validation_config(tiny_sd1_single_file, tmp_path, "--model_config", str(tiny_sd1_pipeline_dir))
    models = load_models(cfg)
    add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "single.safetensors")
    validator = make_validator(cfg, SimpleNamespace(is_main_process=True), models)
    assert isinstance(validator.pipeline().scheduler, PNDMScheduler)
    image = np.asarray(validator.images(adapter_file)[0][0], dtype=np.int16)
    assert (
        np.abs(image - fresh_render(tiny_sd1_pipeline_dir, adapter_file, validator.prompts[0].seed)).max()
        <= 1
    )


def test_validation_during_training_does_not_change_what_is_trained(tiny_sd1_pipeline_dir, tmp_path):
    """A run that validates every 2 steps (adapter dropout on, text encoder trained) ends with exactly the
    tensors of the same run without validation: rendering leaves modes, adapters and random states alone."""
    data = make_dataset(tmp_path / "data", 4)
    common = {"max_train_steps": "4", "rank_dropout": "0.2", "train_batch_size": "2"}
    plain = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "plain", **common)
    validated = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "validated", **common)
    validated += ["--validation_prompt", PROMPT, "--validation_steps", "2", "--num_validation_images", "1"]
    validated += ["--validation_num_inference_steps", "2"]
    results = [train(load_config(flags + ["--train_text_encoder"])) for flags in (plain, validated)]
    assert not results[0].validation_images and len(results[1].validation_images) == 2
    first, second = (load_file(str(result.kohya_file)) for result in results)
    assert first.keys() == second.keys() and any(k.startswith("lora_te_") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_each_prompt_renders_with_its_own_settings(tiny_sd1_pipeline_dir, tmp_path):
    """`validation_prompt` (run-wide settings) then `[[validation_prompts]]` tables: one file per prompt at its
    size with its image count; the same prompt and seed give the same image, another seed or a negative
    prompt another; prompts without a seed get seed + index; prompts.json lists what each index is."""
    tables = [
        {"prompt": PROMPT, "seed": 7, "width": 64, "height": 32},
        {"prompt": PROMPT, "seed": 7, "width": 64, "height": 32},
        {"prompt": PROMPT, "seed": 8, "width": 64, "height": 32},
        {"prompt": PROMPT, "seed": 7, "width": 64, "height": 32, "negative_prompt": "a blue circle"},
        {"prompt": "a green square", "width": 32, "height": 48, "num_images": 2, "guidance_scale": 1.0},
    ]
    cfg = validation_config(tiny_sd1_pipeline_dir, tmp_path, "--seed", "100")
    cfg.validation_prompts = tables
    models = run_models(tiny_sd1_pipeline_dir, "sd1")
    add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "a.safetensors")
    validator = make_validator(cfg, SimpleNamespace(is_main_process=True), models)
    assert [p.seed for p in validator.prompts] == [100, 7, 7, 8, 7, 105]
    assert validator.prompts[0] == ValidationPrompt(PROMPT, "", 100, 64, 64, 3, 3.0, 1)
    assert validator.prompts[5] == ValidationPrompt("a green square", "", 105, 32, 48, 3, 1.0, 2)

    rendered = validator.render(adapter_file, step=12)
    assert [r.path.name for r in rendered] == [f"step-000012-prompt-{i:02d}.png" for i in range(6)]
    sizes = [Image.open(r.path).size for r in rendered]
    assert sizes == [(64, 64), (64, 32), (64, 32), (64, 32), (64, 32), (64, 48)]  # 2 images of 32x48 in a row
    pixels = [np.asarray(Image.open(r.path), dtype=np.int16) for r in rendered]
    assert np.array_equal(pixels[1], pixels[2])  # same prompt, seed and settings
    assert np.abs(pixels[1] - pixels[3]).max() > 8  # another seed
    assert np.abs(pixels[1] - pixels[4]).max() > 8  # a negative prompt
    assert np.abs(pixels[5][:, :32] - pixels[5][:, 32:]).max() > 8  # two different draws of one prompt
    described = json.loads((tmp_path / "out" / "validation" / "prompts.json").read_text())
    assert [d["index"] for d in described] == list(range(6))
    assert described[4]["negative_prompt"] == "a blue circle"
    # The same seed renders the same image at every validation: the files of a later step equal these.
    again = validator.render(adapter_file, step=13)
    assert all(
        np.array_equal(np.asarray(r.grid, dtype=np.int16), p) for r, p in zip(again, pixels, strict=True)
    )


def test_kohya_sample_prompts_file(tmp_path):
    """kohya's `--sample_prompts` .txt lines (`--n --w --h --d --l --s`), .toml ([prompt] + [[prompt.subset]])
    and .json become validation prompt tables with kohya's rounding; mistakes name the file and line."""
    txt = tmp_path / "prompts.txt"
    txt.write_text(
        "# my prompts\n\na photo of sks dog --n blurry, low quality --w 516 --h 768 --d 42 --l 7.5 --s 28\n"
        "sks dog in the snow --ss euler_a\n",
        encoding="utf-8",
    )
    assert read_sample_prompts(txt) == [
        {
            "prompt": "a photo of sks dog",
            "negative_prompt": "blurry, low quality",
            "width": 512,  # kohya rounds down to a multiple of 8
            "height": 768,
            "seed": 42,
            "guidance_scale": 7.5,
            "num_inference_steps": 28,
        },
        {"prompt": "sks dog in the snow"},  # the sampler is dropped (the base model's sampler renders)
    ]
    toml = tmp_path / "prompts.toml"
    toml.write_text(
        '[prompt]\nnegative_prompt = "ugly"\nsample_steps = 20\nwidth = 512\nheight = 512\nscale = 6\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nseed = 1\n\n[[prompt.subset]]\nprompt = "a cat"\nwidth = 768\n',
        encoding="utf-8",
    )
    shared = {"negative_prompt": "ugly", "num_inference_steps": 20, "height": 512, "guidance_scale": 6}
    assert read_sample_prompts(toml) == [
        {**shared, "prompt": "a dog", "seed": 1, "width": 512},
        {**shared, "prompt": "a cat", "width": 768},
    ]
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps([{"prompt": "a dog", "scale": 5, "sample_steps": 2000}, "a cat --d 3"]))
    assert read_sample_prompts(js) == [
        {"prompt": "a dog", "guidance_scale": 5, "num_inference_steps": 1000},
        {"prompt": "a cat", "seed": 3},
    ]
    txt.write_text("a dog --w wide\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"prompts.txt line 1: --w 'wide' is not an integer"):
        read_sample_prompts(txt)
    txt.write_text("a dog\na cat --x 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"prompts.txt line 2: unknown or empty option '--x'"):
        read_sample_prompts(txt)
    with pytest.raises(ConfigError, match="use a .txt, .toml or .json file"):
        read_sample_prompts(tmp_path / "prompts.yaml")


def test_sample_prompts_join_the_validation_prompts(tiny_sd1_pipeline_dir, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a dog --n cat --w 72 --h 80\na cat --d 5\n", encoding="utf-8")
    cfg = validation_config(tiny_sd1_pipeline_dir, tmp_path, "--seed", "10", "--sample_prompts", str(txt))
    cfg.validation_prompts = [{"prompt": "a bird", "num_images": 3}]
    prompts = resolve_validation_prompts(cfg)
    assert [(p.prompt, p.negative_prompt, p.seed, p.width, p.height, p.num_images) for p in prompts] == [
        (PROMPT, "", 10, 64, 64, 1),
        ("a bird", "", 11, 64, 64, 3),
        ("a dog", "cat", 12, 72, 80, 1),
        ("a cat", "", 5, 64, 64, 1),
    ]
    txt.write_text("a dog --w 32 --s 0\n", encoding="utf-8")  # steps are clamped to >= 1 as kohya does
    assert resolve_validation_prompts(cfg)[2].num_inference_steps == 1


def tensorboard_images(logging_dir: Path) -> dict[str, list[int]]:
    """Image tag -> the steps it was logged at, read back from the TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[int]] = {}
    for folder in sorted({path.parent for path in logging_dir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            found.setdefault(tag, []).extend(event.step for event in accumulator.Images(tag))
    return found


def test_validation_every_n_epochs_to_disk_and_tensorboard(tiny_sd1_pipeline_dir, tmp_path):
    """Every epoch (`validation_epochs`, kohya's `sample_every_n_epochs`) and every 4 steps: steps 2 and 4 (the
    epoch and step triggers of step 4 validate once), and the end (step 6); images to disk and TensorBoard (one
    image per prompt, the prompt in its tag); the trained tensors equal those of a run without validation."""
    data = make_dataset(tmp_path / "data", 4)
    common = {"max_train_steps": "6", "rank_dropout": "0.2", "train_batch_size": "2"}
    plain = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "plain", **common)
    validated = base_flags(
        tiny_sd1_pipeline_dir, data, tmp_path / "validated", report_to="tensorboard", **common
    )
    validated += [
        "--sample_every_n_epochs",
        "1",
        "--validation_steps",
        "4",
        "--validation_num_inference_steps",
        "2",
    ]
    tables = [
        {"prompt": PROMPT, "num_images": 1},
        {"prompt": "a blue/green square", "width": 48, "num_images": 1},
    ]
    results = [train(load_config(plain)), train(load_config(validated, validation_prompts=tables))]
    assert sorted(results[0].eval_losses) == [0, 6] and not results[0].validation_images
    assert sorted(results[1].eval_losses) == [0, 2, 4, 6]
    assert [p.name for p in results[1].validation_images] == [
        f"step-{s:06d}-prompt-{i:02d}.png" for s in (2, 4, 6) for i in range(2)
    ]
    assert tensorboard_images(results[1].logging_dir) == {
        f"validation/00 {PROMPT}": [2, 4, 6],
        "validation/01 a blue|green square": [2, 4, 6],
    }
    first, second = (load_file(str(result.kohya_file)) for result in results)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_long_prompts_render_whole_with_max_token_length(tiny_sd1_pipeline_dir, tmp_path):
    """Validation encodes prompts as training encodes captions: with max_token_length = 150 the words after the
    first 75 tokens change the image; without it they are cut off (CLIP's 77), as in a plain pipeline."""
    head = " ".join(["a"] * 80)
    tables = [{"prompt": f"{head} {'red circle ' * 30}"}, {"prompt": f"{head} {'blue square ' * 30}"}]
    models = run_models(tiny_sd1_pipeline_dir, "sd1")
    add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "a.safetensors")
    pixels = {}
    for flags in ((), ("--max_token_length", "150")):
        cfg = validation_config(tiny_sd1_pipeline_dir, tmp_path, *flags)
        cfg.validation_prompt, cfg.validation_prompts = [], [{**t, "seed": 1} for t in tables]
        validator = make_validator(cfg, SimpleNamespace(is_main_process=True), models)
        pixels[flags] = [np.asarray(images[0], dtype=np.int16) for images in validator.images(adapter_file)]
    cut, whole = pixels[()], pixels[("--max_token_length", "150")]
    assert np.array_equal(cut[0], cut[1])
    assert np.abs(whole[0] - whole[1]).max() > 0  # exactly equal if the second window were cut


def test_sdxl_prompt_tables(tiny_sdxl_pipeline_dir, tmp_path):
    """SDXL: a non-square prompt renders at its size; an empty negative prompt is the pipeline's "none" (zeros,
    `force_zeros_for_empty_prompt`), so the image equals a user's pipeline call without one; a negative prompt
    changes it."""
    models = run_models(tiny_sdxl_pipeline_dir, "sdxl")
    add_trained_adapters(models)
    adapter_file = export(models, tmp_path / "a.safetensors")
    cfg = validation_config(tiny_sdxl_pipeline_dir, tmp_path)
    cfg.validation_prompt = []
    cfg.validation_prompts = [
        {"prompt": PROMPT, "seed": 3, "width": 64, "height": 32},
        {"prompt": PROMPT, "seed": 3, "width": 64, "height": 32, "negative_prompt": "a blue circle"},
    ]
    validator = make_validator(cfg, SimpleNamespace(is_main_process=True), models)
    plain, negative = (np.asarray(images[0], dtype=np.int16) for images in validator.images(adapter_file))
    assert plain.shape == (32, 64, 3) and np.abs(plain - negative).max() > 8
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    load_adapter(pipe, adapter_file)
    generator = torch.Generator("cpu").manual_seed(3)
    kwargs = {
        "height": 32,
        "width": 64,
        "num_inference_steps": 3,
        "guidance_scale": 3.0,
        "generator": generator,
    }
    users = np.asarray(pipe(PROMPT, **kwargs).images[0], dtype=np.int16)
    assert np.abs(plain - users).max() <= 1


def test_validation_epochs_policy(monkeypatch):
    """`after_epoch` validates after every `validation_epochs`-th epoch but not after the last (`finish` does),
    nor at a step `validation_steps` already validated; only the main process validates."""
    validated = []
    monkeypatch.setattr(loop, "validate", lambda run, file: validated.append(run.state.global_step))
    cfg = SimpleNamespace(validation_epochs=2, save_every_n_epochs=None)
    run = SimpleNamespace(
        cfg=cfg,
        is_main=True,
        schedule=SimpleNamespace(num_epochs=7, max_train_steps=14),
        state=SimpleNamespace(global_step=0),
        result=SimpleNamespace(eval_losses={8: 0.1}),  # step 8 was validated by validation_steps
    )
    for epoch in range(7):
        run.epoch, run.state.global_step = epoch, 2 * (epoch + 1)
        loop.after_epoch(run)
    assert validated == [4, 12]  # epochs 2 and 6; epoch 4 (step 8) was validated already
    run.is_main, validated[:] = False, []
    run.epoch, run.state.global_step = 1, 4
    loop.after_epoch(run)
    assert validated == []
