"""The tiny offline models mirror the real SD1.5/SDXL topology, run end to end, and round-trip through disk."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from loha_diffusion import tiny

KOHYA_TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _module_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules()}


def _transformer_layer_count(unet: torch.nn.Module) -> int:
    """Linear/Conv2d layers inside Transformer2DModel blocks: what Kohya's default LoRA targets in a UNet."""
    count = 0
    for _, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            count += sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in module.modules())
    return count


def _te_layer_count(te: torch.nn.Module) -> int:
    return sum(name.endswith(KOHYA_TE_SUFFIXES) for name, _ in te.named_modules())


def _run(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of a cat", num_inference_steps=2, generator=generator, output_type="np", **kwargs)
    return out.images


def test_tokenizer_words_and_limits():
    tok = tiny.build_tiny_tokenizer()
    vocab, _ = tiny.tiny_vocab_and_merges()
    assert tok.model_max_length == 77
    ids = tok("a photo of a cat").input_ids
    # bos + one token per known word + eos
    assert ids == [
        vocab["<|startoftext|>"],
        vocab["a</w>"],
        vocab["photo</w>"],
        vocab["of</w>"],
        vocab["a</w>"],
        vocab["cat</w>"],
        vocab["<|endoftext|>"],
    ]
    for word in tiny.TINY_WORDS:
        assert len(tok(word).input_ids) == 3, word
    # Words outside the small vocabulary still tokenize (byte-level pieces), never to nothing.
    unknown = tok("zebra").input_ids
    assert len(unknown) > 3 and all(0 <= i < len(vocab) for i in unknown)
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77


def test_written_tokenizer_loads_with_same_ids(tmp_path):
    tiny.write_tiny_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    text = "a beautiful painting of a red house, detailed"
    assert loaded(text).input_ids == tiny.build_tiny_tokenizer()(text).input_ids
    assert loaded.model_max_length == 77


def test_sd1_unet_has_the_real_module_names():
    unet = tiny.build_tiny_unet("sd1")
    full = tiny.build_unet_from_config(tiny.full_size_unet_config("sd1"))
    assert _module_names(unet) == _module_names(full)
    assert _transformer_layer_count(unet) == _transformer_layer_count(full) == 192
    proj_in = unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert isinstance(proj_in, torch.nn.Conv2d) and proj_in.kernel_size == (1, 1)
    assert unet.config.cross_attention_dim == tiny.build_tiny_text_encoder("sd1").config.hidden_size


def test_sdxl_unet_mirrors_the_real_layout():
    unet = tiny.build_tiny_unet("sdxl")
    full = tiny.build_unet_from_config(tiny.full_size_unet_config("sdxl"))
    names, full_names = _module_names(unet), _module_names(full)
    assert names <= full_names
    # The only modules the tiny model lacks are the extra transformer blocks (real: 10 per attention in level 2).
    missing = {re.sub(r"\.transformer_blocks\.\d+.*", "", n) for n in full_names - names}
    assert all(".attentions." in n for n in missing)
    assert _transformer_layer_count(full) == 722
    assert isinstance(unet.get_submodule("down_blocks.1.attentions.0.proj_in"), torch.nn.Linear)
    assert not hasattr(unet.down_blocks[0], "attentions")
    te1, te2 = tiny.build_tiny_text_encoder("sdxl", 1), tiny.build_tiny_text_encoder("sdxl", 2)
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    time_ids = 6 * unet.config.addition_time_embed_dim
    assert unet.add_embedding.linear_1.in_features == te2.config.projection_dim + time_ids


def test_text_encoder_classes_and_paths():
    te = tiny.build_tiny_text_encoder("sd1", 1)
    te2 = tiny.build_tiny_text_encoder("sdxl", 2)
    assert type(te) is CLIPTextModel and type(te2) is CLIPTextModelWithProjection
    # transformers 5: CLIPTextModel has no `.text_model`, the projection model still has one.
    assert "encoder.layers.0.self_attn.q_proj" in _module_names(te)
    assert "text_model.encoder.layers.0.self_attn.q_proj" in _module_names(te2)
    assert te.config.vocab_size == len(tiny.build_tiny_tokenizer())
    assert _te_layer_count(te) == 6 * te.config.num_hidden_layers
    with pytest.raises(ValueError, match="no text encoder 2"):
        tiny.build_tiny_text_encoder("sd1", 2)


def test_full_size_text_encoders_count_like_kohya():
    assert _te_layer_count(tiny.build_full_size_text_encoder("sd1", 1)) == 72
    assert _te_layer_count(tiny.build_full_size_text_encoder("sdxl", 2)) == 192


def test_seeds_are_reproducible_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny.build_tiny_unet("sd1", seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = tiny.build_tiny_unet("sd1", seed=0)
    c = tiny.build_tiny_unet("sd1", seed=1)
    assert torch.equal(a.conv_in.weight, b.conv_in.weight)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    pipe = tiny.build_tiny_pipeline("sdxl")
    assert not torch.equal(
        pipe.text_encoder.encoder.layers[0].self_attn.q_proj.weight,
        pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight,
    )


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="sd2"):
        tiny.build_tiny_unet("sd2")


@pytest.mark.parametrize(
    ("arch", "cls"), [("sd1", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)]
)
def test_pipeline_runs_and_round_trips(arch, cls, tmp_path):
    pipe = tiny.build_tiny_pipeline(arch)
    assert type(pipe) is cls
    images = _run(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert images.std() > 0  # random weights still give a non-constant image

    out = tiny.save_tiny_pipeline(tmp_path / arch, arch)
    loaded = cls.from_pretrained(out)
    assert type(loaded) is cls
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            continue
        before, after = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), name
    # Same weights; tensors loaded from safetensors can sit at unaligned addresses, which changes the float
    # summation order of some CPU kernels by ~1 ulp, so compare images with a tolerance.
    np.testing.assert_allclose(_run(loaded), images, atol=1e-5)


def test_fixture_dirs_load(tiny_sd1_pipeline_dir, tiny_sdxl_pipeline_dir):
    assert (tiny_sd1_pipeline_dir / "model_index.json").is_file()
    sd1 = StableDiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir)
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    assert sd1.unet.config.sample_size * sd1.vae_scale_factor == 64
    assert sdxl.text_encoder_2.config.projection_dim == sdxl.unet.config.cross_attention_dim // 2


def test_killed_save_leaves_no_half_folder(tmp_path, monkeypatch):
    """The folder is written whole: a failure part-way (a kill, a full disk) leaves neither a half pipeline
    nor temporary files, and an existing pipeline folder is kept until the new one is complete."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "tiny"
    real_save = DiffusionPipeline.save_pretrained

    def save_then_fail(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        assert any(Path(directory).rglob("*.safetensors"))  # weights were written, into the temporary folder
        raise KeyboardInterrupt  # as a Ctrl-C / kill would stop it here

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionPipeline, "save_pretrained", save_then_fail)
        with pytest.raises(KeyboardInterrupt):
            tiny.save_tiny_pipeline(out, "sd1")
    assert list(tmp_path.iterdir()) == []
    tiny.save_tiny_pipeline(out, "sd1")
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    with monkeypatch.context() as patch:
        patch.setattr(DiffusionPipeline, "save_pretrained", save_then_fail)
        with pytest.raises(KeyboardInterrupt):
            tiny.save_tiny_pipeline(out, "sd1", seed=1)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_make_tiny_overwrite_replaces_only_a_pipeline_folder(tmp_path, capsys):
    from loha_diffusion import cli

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert cli.main(["make-tiny", str(notes), "--overwrite"]) == 1
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["make-tiny", str(afile)]) == 1
    assert "is a file" in capsys.readouterr().err

    out = tmp_path / "tiny"
    assert cli.main(["make-tiny", str(out)]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    (out / "stray.txt").write_text("left from before")
    assert cli.main(["make-tiny", str(out), "--overwrite", "--seed", "1"]) == 0
    assert (out / "model_index.json").is_file() and not (out / "stray.txt").exists()
