"""The latent cache (`training/latent_cache.py`) and the keyed safetensors store under it (`cache_store.py`)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from test_training_buckets import write_images
from test_training_loop import base_flags, make_dataset, run_two_processes

from loha_diffusion import tiny
from loha_diffusion.training import loop
from loha_diffusion.training.cache_store import CacheStore, file_sha256, make_key, tensors_sha256
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import scan_training_data, training_dataloader
from loha_diffusion.training.images import ImageReader
from loha_diffusion.training.latent_cache import build_latent_cache, entry_disk_key, resize_rule, vae_identity
from loha_diffusion.training.loop import train
from loha_diffusion.training.step import encode_latents, sample_latents


def test_store_round_trip_and_missing(tmp_path):
    store = CacheStore(tmp_path / "cache", "latents")
    key = make_key("a", 1, [2, 3])
    assert store.get(key) is None
    tensors = {"params": torch.randn(8, 4, 4), "half": torch.randn(3).to(torch.bfloat16)}
    path = store.put(key, tensors, {"note": "x"})
    assert path == tmp_path / "cache" / f"latents-{key}.safetensors"
    loaded = store.get(key)
    assert loaded is not None and set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert make_key("a", 1, [2, 3]) == key and make_key("a", 1, [3, 2]) != key


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "empty", "renamed"])
def test_store_damaged_file_is_missing_with_a_warning(tmp_path, caplog, damage):
    store = CacheStore(tmp_path, "latents")
    key, other = make_key("k"), make_key("other")
    path = store.put(key, {"params": torch.arange(64, dtype=torch.float32)})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "flip_byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a whole, valid file under another key's name
        store.path(other).write_bytes(data)
        key = other
    with caplog.at_level(logging.WARNING, logger="loha_diffusion.training"):
        assert store.get(key) is None
    assert str(store.path(key)) in caplog.text
    store.put(key, {"params": torch.ones(2)})  # the caller recomputes: the file is replaced and usable again
    assert torch.equal(store.get(key)["params"], torch.ones(2))


def test_store_refuses_bad_names(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        CacheStore(tmp_path, "../x")
    store = CacheStore(tmp_path, "text")
    with pytest.raises(ValueError, match="key"):
        store.path("../../etc")
    with pytest.raises(ValueError, match="sha256"):
        store.put(make_key(1), {"a": torch.ones(1)}, {"sha256": "x"})


def test_hashes_follow_content(tmp_path):
    (tmp_path / "a").write_bytes(b"one")
    first = file_sha256(tmp_path / "a")
    (tmp_path / "a").write_bytes(b"two")
    assert file_sha256(tmp_path / "a") != first
    a = {"w": torch.zeros(3)}
    assert tensors_sha256(a) == tensors_sha256({"w": torch.zeros(3)})
    assert tensors_sha256(a) != tensors_sha256({"w": torch.zeros(3, dtype=torch.float64)})
    assert tensors_sha256(a) != tensors_sha256({"v": torch.zeros(3)})


@pytest.mark.parametrize("batch", [1, 3])
def test_sample_latents_draws_as_encode_latents(batch):
    vae = tiny.build_tiny_vae()
    pixels = torch.rand(batch, 3, 32, 32) * 2 - 1
    seeds = torch.tensor([11, 12, 13][:batch])
    expected = encode_latents(vae, pixels, seeds)
    with torch.no_grad():
        params = vae.encode(pixels).latent_dist.parameters
    assert params.shape[:2] == (batch, 8)
    got = sample_latents(params.clone(), seeds, vae.config.scaling_factor)
    assert torch.equal(got, expected)


# --- the cache in runs and on disk (tiny SD1 model) ---


class OneProcess:
    """The two things `build_latent_cache` asks of the accelerator, for one process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def run_flags(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return base_flags(
        model_dir,
        data,
        out,
        train_batch_size="2",
        random_flip="true",
        center_crop="true",
        max_train_steps="4",
    ) + list(extra)


def record_losses(monkeypatch) -> tuple[list[float], set[str]]:
    """Every micro-batch loss of the runs that follow, in order, and which image keys the batches had."""
    losses: list[float] = []
    kinds: set[str] = set()
    original = loop.batch_loss

    def batch_loss(run, batch):
        kinds.update({"pixel_values", "latent_params"} & set(batch))
        loss = original(run, batch)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "batch_loss", batch_loss)
    return losses, kinds


def test_cached_and_uncached_runs_train_alike(tiny_sd1_pipeline_dir, tmp_path, monkeypatch):
    """The same loss sequence and adapter tensors with the cache (in memory; on disk with 3 images per VAE call)
    as without, up to float rounding: the VAE's output is not bitwise the same from call to call (the CPU
    attention kernel it gets, and so the memory layout of the convolutions after it, depends on where its
    inputs were allocated). With the cache the training batches carry latent parameters, never pixels."""
    data = make_dataset(tmp_path / "data", 3)
    losses, batch_kinds = record_losses(monkeypatch)
    plain = train(load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "a")))
    assert batch_kinds == {"pixel_values"}
    plain_losses = list(losses)
    expected = load_file(str(plain.kohya_file))
    variants = {"memory": ["--cache_latents"], "disk": ["--cache_latents_to_disk", "--vae_batch_size", "3"]}
    for name, extra in variants.items():
        losses.clear()
        batch_kinds.clear()
        result = train(load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / name, *extra)))
        assert batch_kinds == {"latent_params"}  # the cache served every batch: no image read, no VAE call
        got = load_file(str(result.kohya_file))
        assert len(losses) == len(plain_losses) == 4 and got.keys() == expected.keys()
        np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
        for key in expected:
            # AdamW divides by the gradient RMS, so float noise of a near-zero gradient can move a weight by
            # up to ~lr * 1e-2 in 4 steps; typical weights agree to ~1e-7.
            torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-4)
            assert (got[key] - expected[key]).abs().mean() < 2e-6
    assert len(list((data / ".loha_cache").glob("latents-*.safetensors"))) == 6  # 3 images, both flips


def test_cached_sample_equals_uncached_sample(tiny_sd1_pipeline_dir, tmp_path):
    """The dataset's cached sample carries the parameters of the pixels the uncached sample has (the same
    flip, sizes and crop offsets), so `sample_latents` of them equals `encode_latents` of those pixels."""
    data = make_dataset(tmp_path / "data", 3)
    cfg = load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", "--cache_latents"))
    dataset, vae = make_dataset_and_vae(cfg)
    uncached = [dataset[(epoch, i)] for epoch in range(3) for i in range(len(dataset))]
    dataset.latent_cache = build_latent_cache(cfg, dataset, vae, OneProcess())
    cached = [dataset[(epoch, i)] for epoch in range(3) for i in range(len(dataset))]
    for before, after in zip(uncached, cached):
        assert "pixel_values" not in after and after["latent_params"].shape == (
            8,
            16,
            16,
        )  # the tiny VAE halves
        assert after["original_size"] == before["original_size"]
        assert after["crop_top_left"] == before["crop_top_left"]
        seeds = [before["sample_seed"]]
        expected = encode_latents(vae, before["pixel_values"][None], seeds)
        got = sample_latents(after["latent_params"][None], seeds, vae.config.scaling_factor)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # VAE calls round alike, not bitwise


def make_dataset_and_vae(cfg):
    summary = scan_training_data(cfg, tiny.build_tiny_tokenizer(), log=False)
    loader, _ = training_dataloader(cfg, summary)
    vae = AutoencoderKL.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="vae").eval()
    return loader.dataset, vae


class CountingEncoder:
    """Counts the images that go through `vae.encode`."""

    def __init__(self, vae) -> None:
        self.images = 0
        self.encode = vae.encode
        vae.encode = self

    def __call__(self, pixels):
        self.images += len(pixels)
        return self.encode(pixels)


def test_disk_cache_is_reused_and_invalidated_by_content_and_vae(tiny_sd1_pipeline_dir, tmp_path, caplog):
    data = make_dataset(tmp_path / "data", 3)
    cfg = load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", "--cache_latents_to_disk"))
    dataset, vae = make_dataset_and_vae(cfg)
    counter = CountingEncoder(vae)
    first = build_latent_cache(cfg, dataset, vae, OneProcess())
    assert counter.images == 6 and len(first) == 6  # 3 images x 2 flips
    files = sorted((data / ".loha_cache").glob("latents-*.safetensors"))
    assert len(files) == 6

    again = build_latent_cache(cfg, dataset, vae, OneProcess())
    assert counter.images == 6  # all read from disk
    for entry in dataset.cache_entries():
        assert torch.equal(again.get(entry), first.get(entry))

    # img1.png rewritten in place, same name (and same size in bytes is not needed: the content is hashed).
    image = Image.new("RGB", (48, 40), (10, 200, 30))
    image.save(data / "img1.png")
    changed = build_latent_cache(cfg, dataset, vae, OneProcess())
    assert counter.images == 8  # only its two flips
    for entry in dataset.cache_entries():
        same = torch.equal(changed.get(entry), first.get(entry))
        assert same == (entry.record.path.name != "img1.png")

    # A damaged file is encoded again with a warning, and rewritten.
    entry = dataset.cache_entries()[0]  # img0, unflipped: still in use
    key = entry_disk_key(entry, file_sha256(entry.record.path), vae_identity(vae), resize_rule(dataset))
    victim = CacheStore(data / ".loha_cache", "latents").path(key)
    assert victim in files
    victim.write_bytes(victim.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="loha_diffusion.training"):
        repaired = build_latent_cache(cfg, dataset, vae, OneProcess())
    assert counter.images == 9 and str(victim) in caplog.text
    for entry in dataset.cache_entries():
        assert torch.equal(repaired.get(entry), changed.get(entry))
    assert CacheStore(victim.parent, "latents").get(key) is not None  # rewritten whole

    # Another VAE (one weight changed) misses every entry.
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.01)
    build_latent_cache(cfg, dataset, vae, OneProcess())
    assert counter.images == 15


def test_disk_key_follows_every_input(tiny_sd1_pipeline_dir, tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    cfg = load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", "--cache_latents_to_disk"))
    dataset, _ = make_dataset_and_vae(cfg)
    entry = dataset.cache_entries()[0]
    key = entry_disk_key(entry, "0" * 64, "1" * 64)
    others = [
        entry_disk_key(entry, "f" * 64, "1" * 64),
        entry_disk_key(entry, "0" * 64, "2" * 64),
        entry_disk_key(replace(entry, size=(64, 32)), "0" * 64, "1" * 64),
        entry_disk_key(replace(entry, flip=not entry.flip), "0" * 64, "1" * 64),
        entry_disk_key(
            replace(entry, record=replace(entry.record, reader=ImageReader(background_color=(0, 0, 0)))),
            "0" * 64,
            "1" * 64,
        ),
        entry_disk_key(entry, "0" * 64, "1" * 64, {"buckets": {"no_upscale": True}}),
    ]
    assert len({key, *others}) == len(others) + 1
    # Where the file lives does not matter (a moved dataset keeps its cache), nor the reader's size limit.
    moved = replace(entry, record=replace(entry.record, path=tmp_path / "elsewhere.png"))
    limited = replace(entry, record=replace(entry.record, reader=ImageReader(max_image_pixels=10**6)))
    assert entry_disk_key(moved, "0" * 64, "1" * 64) == key == entry_disk_key(limited, "0" * 64, "1" * 64)


def test_flips_are_cached_both_ways(tiny_sd1_pipeline_dir, tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    cfg = load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", "--cache_latents"))
    dataset, vae = make_dataset_and_vae(cfg)
    cache = build_latent_cache(cfg, dataset, vae, OneProcess())
    entries = dataset.cache_entries()
    assert sorted((e.record_index, e.flip) for e in entries) == [(0, False), (0, True), (1, False), (1, True)]
    for entry in entries:
        pixels = dataset.entry_image(entry).pixels
        unflipped = dataset.entry_image(replace(entry, flip=False)).pixels
        assert torch.equal(pixels, unflipped.flip(-1) if entry.flip else unflipped)
        with torch.no_grad():
            expected = vae.encode(pixels[None]).latent_dist.parameters[0]
        torch.testing.assert_close(cache.get(entry), expected, rtol=1e-5, atol=1e-6)
    by_flip = {e.flip: cache.get(e) for e in entries if e.record_index == 0}
    assert not torch.allclose(by_flip[True], by_flip[False])
    with pytest.raises(KeyError, match="cache_entries"):
        cache.get(replace(entries[0], size=(64, 64)))


def test_the_scan_passes_the_cache_folder_by(tiny_sd1_pipeline_dir, tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    (data / ".loha_cache").mkdir()
    (data / ".loha_cache" / "latents-00.safetensors").write_bytes(b"x")
    (data / ".other").write_text("x")
    cfg = load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out"))
    summary = scan_training_data(cfg, tiny.build_tiny_tokenizer(), log=False)
    assert len(summary.records) == 2
    assert not any(".loha_cache" in note for note in summary.ignored)
    assert any(".other" in note for note in summary.ignored)


def test_resume_with_the_disk_cache_is_bit_exact(tiny_sd1_pipeline_dir, tmp_path):
    """A run stopped at step 2 and resumed (the resume reads the latents the first part wrote) ends with the
    tensors of an uninterrupted run, both with the disk cache; the cache folder in the data does not make the
    resume see changed data."""
    data = make_dataset(tmp_path / "data", 3)
    extra = ["--cache_latents_to_disk", "--checkpointing_steps", "2"]
    straight = train(load_config(run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "a", *extra)))
    shutil.rmtree(data / ".loha_cache")
    flags = run_flags(tiny_sd1_pipeline_dir, data, tmp_path / "b", *extra)
    train(load_config(flags), stop_at_step=2)
    assert (data / ".loha_cache").is_dir()
    resumed = train(load_config(flags + ["--resume_from_checkpoint", "latest"]))
    assert resumed.global_step == 4
    for name in ("checkpoint-4",):
        a = load_file(str(tmp_path / "a" / name / "unet_adapter.safetensors"))
        b = load_file(str(tmp_path / "b" / name / "unet_adapter.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(str(straight.kohya_file)), load_file(str(resumed.kohya_file))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bucketed_cached_run_trains_as_uncached(tiny_sd1_pipeline_dir, tmp_path, monkeypatch, caplog):
    """Mixed-aspect images in buckets, both flips: the cached run (disk, 4 images per VAE call, each call one
    bucket) has the uncached run's losses, and a second cached run reads every latent from disk."""
    data = write_images(tmp_path / "data", [(64, 32), (32, 64), (40, 40), (48, 27), (100, 30)])

    def flags(out: str, *extra: str) -> list[str]:
        settings = {"train_batch_size": "2", "random_flip": "true", "max_train_steps": "4"}
        return base_flags(tiny_sd1_pipeline_dir, data, tmp_path / out, **settings) + [
            "--enable_bucket", "--bucket_reso_steps", "8", *extra
        ]  # fmt: skip

    losses, batch_kinds = record_losses(monkeypatch)
    train(load_config(flags("a")))
    plain_losses = list(losses)
    for out in ("b", "c"):
        losses.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loha_diffusion.training"):
            train(load_config(flags(out, "--cache_latents_to_disk", "--vae_batch_size", "4")))
        read, encoded = (0, 10) if out == "b" else (10, 0)
        assert (
            f"latent cache: 10 entries, {read} read from" in caplog.text
            and f"{encoded} encoded" in caplog.text
        )
        np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
    assert batch_kinds == {"pixel_values", "latent_params"}
    files = list((data / ".loha_cache").glob("latents-*.safetensors"))
    assert len(files) == 10  # 5 images x 2 flips, written once


@pytest.mark.slow
def test_two_processes_with_the_disk_cache_equal_one_without(tiny_sd1_pipeline_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 2 with cache_latents_to_disk (rank 0 encodes and writes,
    rank 1 waits and reads) == 1 process x batch 4 without a cache."""
    data = make_dataset(tmp_path / "data", 8)
    common = ["--max_train_steps", "3", "--random_flip", "true", "--center_crop", "true"]
    single = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "one") + common + ["--train_batch_size", "4"]
    train(load_config(single))
    run = run_two_processes(
        [*base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "two"), *common, "--train_batch_size", "2"]
        + ["--cache_latents_to_disk", "--vae_batch_size", "4"]
    )
    assert "0 read from" in run.stderr  # rank 0 encoded them ...
    distinct = {file_sha256(path) for path in data.glob("*.png")}  # equal images share their entries
    assert len(list((data / ".loha_cache").glob("latents-*.safetensors"))) == 2 * len(
        distinct
    )  # ... both flips
    one = load_file(str(tmp_path / "one" / "loha.safetensors"))
    two = load_file(str(tmp_path / "two" / "loha.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)  # Adam amplifies noise


def test_sdxl_cached_run_trains_as_uncached(tiny_sdxl_pipeline_dir, tmp_path, monkeypatch):
    """SDXL (its VAE kept in float32, micro-conditioning from the cached sample's sizes and crop): the same
    losses with the latent cache as without."""
    data = make_dataset(tmp_path / "data", 2)
    losses, batch_kinds = record_losses(monkeypatch)
    runs = {}
    for name, extra in {"plain": [], "cached": ["--cache_latents"]}.items():
        losses.clear()
        flags = run_flags(tiny_sdxl_pipeline_dir, data, tmp_path / name, *extra)
        train(load_config(flags))
        runs[name] = list(losses)
    assert batch_kinds == {"pixel_values", "latent_params"} and len(runs["plain"]) == 4
    np.testing.assert_allclose(runs["cached"], runs["plain"], rtol=1e-6)
