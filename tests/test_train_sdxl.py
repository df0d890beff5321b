"""SDXL training and single-file base models on the training side: the conditioning SDXL was trained with (as
the SDXL pipeline computes it), the settings and their defaults, both text encoders' adapters with their own
learning rate, the fp32 VAE rule, gradients through checkpointed text encoders, bit-exact resume, and runs from
single-file checkpoints."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training_loop import RESUME_FLAGS, base_flags, make_dataset

from loha_diffusion import tiny
from loha_diffusion.errors import ConfigError
from loha_diffusion.formats.kohya import read_metadata
from loha_diffusion.training.checkpoint import read_checkpoint_state, refused_changes, run_settings
from loha_diffusion.training.conditioning import encode_prompts, sdxl_time_ids, unet_conditioning
from loha_diffusion.training.config import build_arg_parser, load_config
from loha_diffusion.training.data import CaptionedImageDataset, collate, scan_dataset
from loha_diffusion.training.loop import train
from loha_diffusion.training.models import (
    Models,
    add_adapters,
    base_model_arch,
    freeze_base_models,
    load_models,
    resolve_arch_defaults,
    text_encoder_adapter_config,
    unet_adapter_config,
    vae_in_float32,
)
from loha_diffusion.training.optimizers import group_learning_rates, trainable_param_groups

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a blue square on a black background, drawn with thick lines"]


# -- the conditioning ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_sdxl_prompt_conditioning_equals_the_pipelines(tiny_sdxl_pipeline):
    """Both encoders' penultimate states concatenated and te2's pooled projection: exactly what
    StableDiffusionXLPipeline.encode_prompt gives the UNet at inference."""
    pipe = tiny_sdxl_pipeline
    states, pooled = encode_prompts(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], CAPTIONS, device="cpu"
    )
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        CAPTIONS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert states.shape == (2, 77, width) == expected.shape
    assert pipe.unet.config.cross_attention_dim == width
    assert torch.equal(states, expected) and torch.equal(pooled, expected_pooled)
    assert pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)


@torch.no_grad()
def test_sd1_conditioning_is_the_last_hidden_state(tiny_sd1_pipeline):
    pipe = tiny_sd1_pipeline
    models = Models.from_pipeline(pipe)
    states, added = unet_conditioning(models, CAPTIONS, device="cpu", target_size=(64, 64))
    expected = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)[0]
    assert added is None and torch.equal(states, expected)


def test_time_ids_follow_the_pipelines_order(tiny_sdxl_pipeline):
    """[orig_h, orig_w, crop_top, crop_left, target_h, target_w] per sample, as the SDXL pipeline's
    `_get_add_time_ids` builds them."""
    pipe = tiny_sdxl_pipeline
    ids = sdxl_time_ids([(600, 800), (1024, 512)], [(0, 17), (3, 0)], (64, 96))
    assert ids.dtype == torch.float32 and ids.shape == (2, 6)
    expected = pipe._get_add_time_ids(
        (600, 800), (0, 17), (64, 96), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(ids[:1], expected)
    assert ids[1].tolist() == [1024, 512, 3, 0, 64, 96]
    with pytest.raises(ValueError, match="2 original sizes but 1 crop"):
        sdxl_time_ids([(1, 2), (3, 4)], [(0, 0)], (8, 8))


def test_unet_conditioning_for_sdxl(tiny_sdxl_pipeline):
    """The added kwargs the SDXL UNet needs; sizes default to an uncropped image of the target size; the
    given text encoders are used instead of the models' (the loop's prepared ones)."""
    models = Models.from_pipeline(tiny_sdxl_pipeline)
    states, added = unet_conditioning(
        models,
        CAPTIONS,
        device="cpu",
        original_sizes=torch.tensor([[40, 48], [40, 40]]),
        crops_top_left=torch.tensor([[0, 8], [0, 0]]),
        target_size=(32, 32),
    )
    assert set(added) == {"text_embeds", "time_ids"}
    assert added["time_ids"].tolist() == [[40, 48, 0, 8, 32, 32], [40, 40, 0, 0, 32, 32]]
    _, default = unet_conditioning(models, CAPTIONS, device="cpu", target_size=(32, 32))
    assert default["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        out = models.unet(latents, torch.tensor([10, 500]), states, added_cond_kwargs=added).sample
    assert out.shape == latents.shape
    with pytest.raises(ValueError, match="target_size"):
        unet_conditioning(models, CAPTIONS, device="cpu")
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(type(self.inner).__name__)
            return self.inner(*args, **kwargs)

    spies = [Spy(models.text_encoder), Spy(models.text_encoder_2)]
    unet_conditioning(models, CAPTIONS, device="cpu", target_size=(32, 32), text_encoders=spies)
    assert calls == ["CLIPTextModel", "CLIPTextModelWithProjection"]


def test_samples_carry_original_size_and_crop(tmp_path):
    for i, size in enumerate([(48, 40), (40, 64)]):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}")
    records = scan_dataset(tmp_path, resolution=32).records
    dataset = CaptionedImageDataset(records, resolution=32, center_crop=True)
    batch = collate([dataset[0], dataset[1]])
    assert batch["original_sizes"].dtype == torch.int64
    assert batch["original_sizes"].tolist() == [[40, 48], [64, 40]]  # (height, width) before resizing
    assert batch["crops_top_left"].tolist() == [[0, 3], [9, 0]]  # center crops of 38x32 and 32x51


# -- settings ----------------------------------------------------------------------------------------------


def test_sdxl_settings_and_kohya_aliases(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
    base += ["--output_dir", str(tmp_path / "out")]
    cfg = load_config(base + ["--v2", "--vae", "some/vae", "--no_half_vae", "--text_encoder_2_lr", "2e-5"])
    assert cfg.model_arch == "sd2" and cfg.pretrained_vae_model_name_or_path == "some/vae"
    assert cfg.no_half_vae is True and cfg.text_encoder_2_lr == 2e-5
    assert cfg.resolution is None  # the architecture's, once the model is known
    toml = tmp_path / "kohya.toml"
    toml.write_text('v2 = true\nvae = "x"\nno_half_vae = false\n')
    cfg = load_config(base + ["--config", str(toml)])
    assert (
        cfg.model_arch == "sd2" and cfg.pretrained_vae_model_name_or_path == "x" and cfg.no_half_vae is False
    )
    assert load_config(base + ["--v2", "false"]).model_arch is None
    with pytest.raises(ConfigError, match="--v2 and --model_arch both set model_arch"):
        load_config(base + ["--v2", "--model_arch", "sdxl"])
    with pytest.raises(ConfigError, match="model_arch = 'sd3'"):
        load_config(base, model_arch="sd3")
    with pytest.raises(ConfigError, match="text_encoder_2_lr = -1.0 must be > 0"):
        load_config(base + ["--text_encoder_2_lr", "-1"])
    with pytest.raises(ConfigError, match="model_config = .* is not a folder"):
        load_config(base + ["--model_config", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="resolution = 0 must be >= 1"):
        load_config(base + ["--resolution", "0"])
    helptext = build_arg_parser().format_help()
    for flag in ("--model_config", "--model_arch", "--vae", "--no_half_vae", "--text_encoder_2_lr", "--v2"):
        assert flag in helptext


def test_resolution_defaults_by_architecture(
    tiny_sd1_pipeline_dir, tiny_sd2_pipeline_dir, tiny_sdxl_pipeline_dir, tmp_path
):
    def cfg(model, **kw):
        return load_config(
            base_flags(model, tmp_path, tmp_path / "out", resolution="none") + ["--max_train_steps", "1"],
            **kw,
        )

    sdxl = cfg(tiny_sdxl_pipeline_dir)
    resolve_arch_defaults(sdxl, base_model_arch(sdxl))
    assert sdxl.resolution == 1024
    sd1 = cfg(tiny_sd1_pipeline_dir)
    resolve_arch_defaults(sd1, base_model_arch(sd1))
    assert sd1.resolution == 512
    sd2 = cfg(tiny_sd2_pipeline_dir)  # its scheduler config says v_prediction, as SD2.1 768-v's does
    assert base_model_arch(sd2) == "sd2"
    resolve_arch_defaults(sd2, "sd2")
    assert sd2.resolution == 768
    for prediction_type, expected in (("v_prediction", 768), ("epsilon", 512)):
        sd2 = cfg(tiny_sd1_pipeline_dir, prediction_type=prediction_type)
        resolve_arch_defaults(sd2, "sd2")
        assert sd2.resolution == expected
    given = cfg(tiny_sdxl_pipeline_dir, resolution=256)
    resolve_arch_defaults(given, "sdxl")
    assert given.resolution == 256
    with pytest.raises(ConfigError, match="model_arch = 'sd1', but .* is a diffusers sdxl model"):
        base_model_arch(cfg(tiny_sdxl_pipeline_dir, model_arch="sd1"))


def test_resume_refuses_another_architecture_or_vae(tiny_sdxl_pipeline_dir, tmp_path):
    cfg = load_config(
        base_flags(tiny_sdxl_pipeline_dir, tmp_path, tmp_path / "o") + ["--max_train_steps", "1"]
    )
    old = run_settings(cfg, num_processes=1, mixed_precision="no", arch="sdxl")
    assert old["model_arch"] == "sdxl" and old["no_half_vae"] is True and old["text_encoder_2_lr"] is None
    cfg.pretrained_vae_model_name_or_path = "madebyollin/sdxl-vae-fp16-fix"
    new = run_settings(cfg, num_processes=1, mixed_precision="no", arch="sd1")
    problems = refused_changes(old, new)
    assert any(p.startswith("model_arch: sdxl → sd1") for p in problems)
    assert any(p.startswith("pretrained_vae_model_name_or_path: none → madebyollin") for p in problems)
    assert not any(p.startswith("no_half_vae") for p in problems)  # applied from the resumed step on


# -- models -------------------------------------------------------------------------------------------------


def test_load_sdxl_folder_with_a_separate_vae(tiny_sdxl_pipeline_dir, tmp_path):
    flags = base_flags(tiny_sdxl_pipeline_dir, tmp_path, tmp_path / "o") + ["--max_train_steps", "1"]
    models = load_models(load_config(flags))
    assert models.arch == "sdxl" and len(models.tokenizers) == 2
    assert type(models.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    vae_folder = shutil.copytree(tiny_sdxl_pipeline_dir / "vae", tmp_path / "my-vae")
    config = json.loads((vae_folder / "config.json").read_text())
    (vae_folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    separate = load_models(load_config(flags + ["--vae", str(vae_folder)]))
    assert separate.vae.config.scaling_factor == 0.5 and models.vae.config.scaling_factor != 0.5
    file = tmp_path / "vae.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ConfigError, match="pretrained_vae_model_name_or_path = .* is a file"):
        load_models(load_config(flags + ["--vae", str(file)]))
    with pytest.raises(ConfigError, match="pretrained_vae_model_name_or_path = .* does not exist"):
        load_models(load_config(flags + ["--vae", str(tmp_path / "no-vae")]))


def test_vae_precision_rule(tiny_sdxl_pipeline, tmp_path):
    """SDXL's VAE stays fp32 under mixed precision (it overflows in fp16) unless a separate VAE is given;
    no_half_vae decides when set; the UNet and text encoders take the weight dtype."""
    cfg = load_config(base_flags(tmp_path, tmp_path, tmp_path / "o") + ["--max_train_steps", "1"])
    assert vae_in_float32(cfg, "sdxl") and not vae_in_float32(cfg, "sd1")
    cfg.pretrained_vae_model_name_or_path = "madebyollin/sdxl-vae-fp16-fix"
    assert not vae_in_float32(cfg, "sdxl")
    cfg.no_half_vae = True
    assert vae_in_float32(cfg, "sdxl") and vae_in_float32(cfg, "sd1")
    models = Models.from_pipeline(tiny_sdxl_pipeline)
    freeze_base_models(models, torch.device("cpu"), torch.bfloat16, vae_float32=True)
    assert next(models.vae.parameters()).dtype == torch.float32
    for model in (models.unet, models.text_encoder, models.text_encoder_2):
        assert next(model.parameters()).dtype == torch.bfloat16
        assert not any(p.requires_grad for p in model.parameters())


def test_text_encoder_adapters_get_gradients_with_gradient_checkpointing(tiny_sdxl_pipeline, tmp_path):
    """Issue 14: with reentrant checkpointing a text-encoder adapter inside a checkpointed layer gets no
    gradient (its frozen inputs need none). Both SDXL encoders' adapters, and the UNet's, get one here."""
    flags = base_flags(tmp_path, tmp_path, tmp_path / "o", train_text_encoder="true")
    cfg = load_config(flags + ["--max_train_steps", "1", "--gradient_checkpointing"])
    models = Models.from_pipeline(tiny_sdxl_pipeline)
    freeze_base_models(models, torch.device("cpu"), torch.float32)
    add_adapters(models, cfg, unet_adapter_config(cfg), text_encoder_adapter_config(cfg))
    for model in models.text_encoders:
        assert model.is_gradient_checkpointing and model.training
    assert models.unet.is_gradient_checkpointing
    # LoHa starts as a zero update with w2_a zero: give every factor a value so each gets a gradient.
    with torch.no_grad():
        for group in trainable_param_groups(cfg, models):
            for p in group["params"]:
                p.normal_(0, 0.1)
    states, added = unet_conditioning(models, CAPTIONS, device="cpu", target_size=(32, 32))
    latents = torch.randn(2, 4, 8, 8)  # 2x2 tokens in the deepest block: self-attention q/k matter
    out = models.unet(latents, torch.tensor([1, 900]), states, added_cond_kwargs=added).sample
    out.square().mean().backward()
    assert len(trainable_param_groups(cfg, models)) == 3
    # SDXL conditions on te1's penultimate layer: its last layer's adapter has no part in the loss.
    unused = f"layers.{models.text_encoder.config.num_hidden_layers - 1}."
    for name, model in (("unet", models.unet), ("te1", models.text_encoder), ("te2", models.text_encoder_2)):
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        used = {n: p for n, p in trained.items() if not (name == "te1" and unused in n)}
        assert len(used) >= len(trained) / 2 > 0
        missing = [n for n, p in used.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (name, missing[:3])


def test_text_encoder_2_learning_rate(tmp_path):
    flags = base_flags(tmp_path, tmp_path, tmp_path / "o", train_text_encoder="true", learning_rate="1e-3")
    cfg = load_config(flags + ["--max_train_steps", "1", "--text_encoder_lr", "1e-4"])
    assert group_learning_rates(cfg, 2) == [1e-3, 1e-4, 1e-4]  # te2 defaults to text_encoder_lr
    assert group_learning_rates(cfg, 1) == [1e-3, 1e-4]
    cfg.text_encoder_2_lr = 5e-5
    assert group_learning_rates(cfg, 2) == [1e-3, 1e-4, 5e-5]
    cfg.train_text_encoder = False
    assert group_learning_rates(cfg, 2) == [1e-3]


# -- training runs ------------------------------------------------------------------------------------------

RESUME_EXTRA = [
    *RESUME_FLAGS,
    "--prediction_type", "v_prediction",
    "--train_text_encoder",
    "--text_encoder_lr", "5e-3",
    "--text_encoder_2_lr", "2e-3",
]  # fmt: skip
ADAPTER_FILES = ("unet_adapter", "text_encoder_adapter", "text_encoder_2_adapter")


def test_sdxl_resume_is_bit_exact_with_both_text_encoders(tiny_sdxl_pipeline_dir, tmp_path):
    """6 SDXL steps straight == 4 steps, stop, resume from the step-4 checkpoint to 6 (mid-epoch, accumulation,
    v-prediction, min-SNR, noise offset, random crops of non-square images, both text encoders trained)."""
    data = make_dataset(tmp_path / "data", 5)
    straight = train(load_config(base_flags(tiny_sdxl_pipeline_dir, data, tmp_path / "a") + RESUME_EXTRA))
    assert straight.global_step == 6
    flags = base_flags(tiny_sdxl_pipeline_dir, data, tmp_path / "b") + RESUME_EXTRA
    assert train(load_config(flags), stop_at_step=4).global_step == 4
    assert train(load_config(flags + ["--resume_from_checkpoint", "latest"])).global_step == 6
    for name in ADAPTER_FILES:
        a = load_file(str(tmp_path / "a" / "checkpoint-6" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoint-6" / f"{name}.safetensors"))
        start = load_file(str(tmp_path / "b" / "checkpoint-2" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(start[k], a[k]) for k in a), f"{name} did not train"
    optimizer = read_checkpoint_state(tmp_path / "a" / "checkpoint-6", "optimizer")
    assert [g["initial_lr"] for g in optimizer["param_groups"]] == [1e-2, 5e-3, 2e-3]
    fa, fb = load_file(str(straight.kohya_file)), load_file(str(tmp_path / "b" / "loha.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    prefixes = {key.split("_", 2)[1] for key in fa if key.startswith("lora_")}
    assert prefixes == {"unet", "te1", "te2"}  # sd-scripts' SDXL names
    assert read_metadata(straight.kohya_file)["ss_resolution"] == "(32, 32)"


def test_sdxl_resume_applies_a_new_text_encoder_2_lr(tiny_sdxl_pipeline_dir, tmp_path, caplog):
    data = make_dataset(tmp_path / "data", 2)
    flags = base_flags(tiny_sdxl_pipeline_dir, data, tmp_path / "out", train_text_encoder="true")
    flags += ["--checkpointing_steps", "1", "--text_encoder_2_lr", "1e-3"]
    train(load_config(flags + ["--max_train_steps", "1"]))
    flags[-1] = "1e-4"
    with caplog.at_level("INFO", logger="loha_diffusion"):
        train(load_config(flags + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]))
    assert "resume: text_encoder_2_lr 0.001 → 0.0001, applied from step 2 on" in caplog.text
    optimizer = read_checkpoint_state(tmp_path / "out" / "checkpoint-2", "optimizer")
    assert [g["initial_lr"] for g in optimizer["param_groups"]] == [1e-2, 1e-2, 1e-4]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_training_from_a_single_file_checkpoint(arch, request, tmp_path):
    """A few steps from the tiny `.safetensors` checkpoint (its folder's configs as `model_config`) train the
    same adapter as from the diffusers folder. The loaded weights are the folder's exactly (tests of
    single_file); the UNet's CPU kernels still differ in the last bits (about 1e-6) between tensors loaded one
    way or the other (memory alignment), and Adam's first steps magnify that in near-zero gradients, so the
    trained adapters are compared by relative distance."""
    folder = request.getfixturevalue(f"tiny_{arch}_pipeline_dir")
    single = request.getfixturevalue(f"tiny_{arch}_single_file")
    data = make_dataset(tmp_path / "data", 2)
    extra = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--train_text_encoder"]
    from_folder = train(load_config(base_flags(folder, data, tmp_path / "folder") + extra))
    flags = base_flags(single, data, tmp_path / "file") + extra + ["--model_config", str(folder)]
    from_file = train(load_config(flags))
    assert from_file.global_step == 2
    names = ADAPTER_FILES if arch == "sdxl" else ADAPTER_FILES[:2]
    for name in names:
        a = load_file(str(tmp_path / "folder" / "checkpoint-2" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "file" / "checkpoint-2" / f"{name}.safetensors"))
        assert a.keys() == b.keys(), name
        diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
        size = torch.cat([a[k].flatten() for k in a]).norm()
        assert diff <= 1e-4 * size, name  # measured: 1e-7 to 5e-6
    assert from_file.eval_losses == pytest.approx(from_folder.eval_losses, rel=1e-5)
    assert from_file.eval_losses[2] != from_file.eval_losses[0]


def test_quickstart_sdxl_config_is_valid():
    cfg = load_config(["--config", str(REPO / "sample_configs" / "quickstart_sdxl.toml")])
    assert (
        cfg.pretrained_model_name_or_path == "outputs/tiny-sdxl"
        and cfg.train_data_dir == "sample_data/shapes"
    )
    for name in ("sdxl_loha.toml", "sdxl_lora.toml"):
        real = load_config(["--config", str(REPO / "sample_configs" / name)])
        assert real.resolution == 1024 and real.pretrained_model_name_or_path.endswith(
            "stable-diffusion-xl-base-1.0"
        )


@pytest.mark.slow
def test_quickstart_sdxl_learns(tmp_path, monkeypatch, capsys):
    """The tiny-SDXL quick start (`loha-diffusion make-tiny --arch sdxl outputs/tiny-sdxl`): the fixed-set
    denoising loss falls by at least 30% on the bundled shapes."""
    model = tiny.save_tiny_pipeline(tmp_path / "tiny-sdxl", "sdxl")
    monkeypatch.chdir(REPO)  # the config's data path is relative to the repository root, as in the README
    cfg = load_config(
        ["--config", "sample_configs/quickstart_sdxl.toml"],
        pretrained_model_name_or_path=str(model),
        output_dir=str(tmp_path / "quickstart"),
    )
    started = time.monotonic()
    result = train(cfg)
    elapsed = time.monotonic() - started
    start, end = result.eval_losses[0], result.eval_losses[cfg.max_train_steps]
    print(f"tiny SDXL quick start: fixed-set loss {start:.4f} -> {end:.4f} in {elapsed:.0f} s")
    assert end <= 0.7 * start, f"fixed-set denoising loss {start:.4f} -> {end:.4f}: less than a 30% drop"
    meta = read_metadata(result.kohya_file)
    assert meta["ss_base_model_version"].startswith("sdxl")
    assert (tmp_path / "quickstart" / "validation").is_dir()
