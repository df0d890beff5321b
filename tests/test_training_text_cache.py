"""The text-encoder output cache (`training/text_cache.py`): which captions a run can produce, each encoded once as
the training step encodes it, served per batch, kept on disk under a key that changes with the tokens, the
encoding and the text encoders' weights; and a cached run's losses equal an uncached run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_loop import base_flags, make_dataset

from loha_diffusion.training import loop
from loha_diffusion.training.cache_store import CacheStore
from loha_diffusion.training.conditioning import TextEncoding, encode_prompts
from loha_diffusion.training.config import TrainConfig, load_config
from loha_diffusion.training.models import Models
from loha_diffusion.training.scan import ImageRecord
from loha_diffusion.training.text_cache import cache_text_encoder_outputs, run_captions

CAPTIONS = ["a red car", "a photo of a dog", "a red car", "a cat"]


def record(caption: str, name: str = "x.png") -> ImageRecord:
    return ImageRecord(path=Path("/data/1_a") / name, caption=caption, repeats=1)


class ForwardCounter:
    def __init__(self, *modules):
        self.calls = 0
        for module in modules:
            module.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1


def test_run_captions_are_the_processed_distinct_captions():
    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", caption_prefix="photo of")
    records = [record("sks dog"), record("sks dog", "y.png"), record("a cat", "z.png")]
    assert run_captions(cfg, records) == ["photo of a cat", "photo of sks dog"]
    cfg.caption_dropout_rate = 0.1
    assert run_captions(cfg, records) == ["", "photo of a cat", "photo of sks dog"]
    cfg.shuffle_caption = True
    with pytest.raises(ValueError, match="cannot be cached"):
        run_captions(cfg, records)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@torch.no_grad()
def test_cached_states_equal_the_encoders(arch, tiny_sd1_pipeline, tiny_sdxl_pipeline):
    pipe = tiny_sd1_pipeline if arch == "sd1" else tiny_sdxl_pipeline
    models = Models.from_pipeline(pipe) if arch == "sd1" else Models.from_pipeline(pipe)
    encoding = TextEncoding(max_token_length=150)
    counter = ForwardCounter(*models.text_encoders)
    cache = cache_text_encoder_outputs(models, CAPTIONS, encoding=encoding, device="cpu", batch_size=2)
    assert len(cache) == 3 and counter.calls == 2 * len(models.text_encoders)  # 3 captions in batches of 2
    states, pooled = cache.lookup(CAPTIONS, "cpu")
    expected, expected_pooled = encode_prompts(
        models.tokenizers, models.text_encoders, CAPTIONS, device="cpu", encoding=encoding
    )
    assert states.shape == expected.shape == (4, 152, expected.shape[-1])
    torch.testing.assert_close(states, expected)
    if arch == "sd1":
        assert pooled is None and expected_pooled is None
    else:
        torch.testing.assert_close(pooled, expected_pooled)
    assert cache.misses == 0
    assert cache.lookup(["a red car", "never seen"], "cpu") is None and cache.misses == 1


@torch.no_grad()
def test_disk_cache_is_read_back_and_keyed_by_encoding_and_weights(tiny_sd1_pipeline, tmp_path):
    models = Models.from_pipeline(tiny_sd1_pipeline)
    store = CacheStore(tmp_path / "cache", "text")
    first = cache_text_encoder_outputs(models, CAPTIONS, encoding=TextEncoding(), device="cpu", store=store)
    assert len(list((tmp_path / "cache").glob("text-*.safetensors"))) == 3
    counter = ForwardCounter(models.text_encoder)
    again = cache_text_encoder_outputs(models, CAPTIONS, encoding=TextEncoding(), device="cpu", store=store)
    assert counter.calls == 0  # every caption read from disk
    for caption in set(CAPTIONS):
        assert torch.equal(again.entries[caption][0], first.entries[caption][0])
    # clip_skip 2 is another key: encoded, not served the last hidden states.
    skipped = cache_text_encoder_outputs(
        models, CAPTIONS, encoding=TextEncoding(clip_skip=2), device="cpu", store=store
    )
    assert counter.calls == 1 and not torch.equal(skipped.entries["a cat"][0], first.entries["a cat"][0])
    # Other text-encoder weights (another base model) are another key too.
    models.text_encoder.final_layer_norm.bias.add_(1.0)
    changed = cache_text_encoder_outputs(models, CAPTIONS, encoding=TextEncoding(), device="cpu", store=store)
    assert counter.calls == 2
    torch.testing.assert_close(changed.entries["a cat"][0], first.entries["a cat"][0] + 1.0)
    assert len(list((tmp_path / "cache").glob("text-*.safetensors"))) == 9


def run_losses(monkeypatch, flags: list[str], encoding: TextEncoding) -> tuple[list[float], int]:
    """The micro-batch losses of a tiny training run, and how many times the text encoders ran in its steps."""
    losses: list[float] = []
    encodings: set[TextEncoding] = set()
    encoder_calls = 0
    batch_loss, unet_conditioning = loop.batch_loss, loop.unet_conditioning

    def recording_loss(run, batch):
        loss = batch_loss(run, batch)
        losses.append(loss.item())
        encodings.add(TextEncoding.from_config(run.cfg))
        return loss

    def counting_conditioning(*args, **kwargs):
        nonlocal encoder_calls
        encoder_calls += 1
        return unet_conditioning(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", recording_loss)
    monkeypatch.setattr(loop, "unet_conditioning", counting_conditioning)
    loop.train(load_config(flags))
    monkeypatch.undo()
    assert encodings == {encoding}
    return losses, encoder_calls


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "to_disk"), [("sd1", False), ("sd1", True), ("sdxl", False)], ids=["sd1", "sd1-disk", "sdxl"]
)
def test_cached_and_uncached_runs_give_the_same_losses(monkeypatch, request, tmp_path, arch, to_disk):
    """Long prompts, a prefix and caption dropout (SD1 also clip skip), with and without the cache: the same
    losses, and no text encoder in the cached run's steps."""
    model = request.getfixturevalue(f"tiny_{arch}_pipeline_dir")
    data = make_dataset(tmp_path / "data", 3)
    toml = tmp_path / "long.toml"
    toml.write_text("max_token_length = 150\n")  # in a TOML: the command line compares the flag's string
    clip_skip = 2 if arch == "sd1" else None
    common = {
        "max_train_steps": "4",
        "train_batch_size": "2",
        "caption_prefix": "photo of",
        "caption_dropout_rate": "0.5",
        "cache_dir": str(tmp_path / "cache"),
        "config": str(toml),
        **({"clip_skip": str(clip_skip)} if clip_skip else {}),
    }
    encoding = TextEncoding(max_token_length=150, clip_skip=clip_skip)
    plain, plain_calls = run_losses(monkeypatch, base_flags(model, data, tmp_path / "a", **common), encoding)
    cache_flag = "cache_text_encoder_outputs_to_disk" if to_disk else "cache_text_encoder_outputs"
    flags = base_flags(model, data, tmp_path / "b", **common, **{cache_flag: "true"})
    cached, cached_calls = run_losses(monkeypatch, flags, encoding)
    assert plain_calls == len(plain) == 4 and cached_calls == 0
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain))
    assert len(list((tmp_path / "cache").glob("text-*.safetensors"))) == (
        4 if to_disk else 0
    )  # 3 captions and ""


@pytest.mark.slow
def test_resume_with_the_cache_is_exact(tiny_sd1_pipeline_dir, tmp_path):
    """A cached run killed at step 2 and resumed equals the straight cached run bit for bit; the cache may be
    turned on at the resume (caches are free to change): the result then equals to float rounding."""
    data = make_dataset(tmp_path / "data", 3)
    toml = tmp_path / "long.toml"
    toml.write_text("max_token_length = 150\n")
    common = {
        "max_train_steps": "4",
        "train_batch_size": "2",
        "checkpointing_steps": "2",
        "clip_skip": "2",
        "caption_dropout_rate": "0.5",
        "cache_dir": str(tmp_path / "cache"),
        "config": str(toml),
    }
    cached = {"cache_text_encoder_outputs_to_disk": "true"}

    def run(out: str, stop: int | None = None, resume: bool = False, **extra: str):
        flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / out, **common, **extra)
        if resume:
            flags += ["--resume_from_checkpoint", "latest"]
        return loop.train(load_config(flags), stop_at_step=stop)

    run("straight", **cached)
    run("killed", stop=2, **cached)
    run("killed", resume=True, **cached)
    run("switched", stop=2)
    run("switched", resume=True, **cached)
    straight = load_file(str(tmp_path / "straight" / "loha.safetensors"))
    killed = load_file(str(tmp_path / "killed" / "loha.safetensors"))
    switched = load_file(str(tmp_path / "switched" / "loha.safetensors"))
    assert straight.keys() == killed.keys() == switched.keys()
    for key in straight:
        assert torch.equal(straight[key], killed[key]), key
        torch.testing.assert_close(switched[key], straight[key])
