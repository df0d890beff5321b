"""The latent cache (`training/latent_cache.py`) and the keyed safetensors store under it (`cache_store.py`)."""

from __future__ import annotations

import logging

import pytest
import torch

from loha_diffusion import tiny
from loha_diffusion.training.cache_store import CacheStore, file_sha256, make_key, tensors_sha256
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
