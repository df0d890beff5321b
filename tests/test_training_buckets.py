"""Aspect-ratio buckets (kohya's rules): the bucket list, the assignment of a mixed-aspect set, no-upscale, the
settings refused, one bucket per batch in a (seed, epoch) order that survives accelerate's sharding and
skipping, the dataset's latent-cache path and batch keys, the dry-run table, and an exact resume with buckets."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from conftest import data_only_flags
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_training_loop import adapter_tensors, base_flags, run_two_processes

from loha_diffusion.errors import ConfigError, DataError
from loha_diffusion.training import loop
from loha_diffusion.training.buckets import (
    BucketBatchSampler,
    BucketChoice,
    BucketSettings,
    assign_bucket,
    assign_records,
    bucket_resolutions,
    bucket_table,
)
from loha_diffusion.training.caption_tools import CaptionOptions
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import (
    CacheEntry,
    CaptionedImageDataset,
    ImageRecord,
    collate,
    compute_schedule,
    make_dataloader,
    scan_dataset,
    scan_training_data,
    training_dataloader,
    transform_image,
)
from loha_diffusion.training.loop import main, train

# kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked by hand: for each width w the largest
# height in steps of 64 with w*h <= 512², and its transpose; the square side 512.
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip
SD_512 = BucketSettings(resolution=512, min_reso=256, max_reso=1024, steps=64)


def settings_of(**flags: str):
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
    base += ["--enable_bucket"]
    for key, value in flags.items():
        base += [f"--{key}", value]
    return load_config(base)


def write_images(folder: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (240, 240, 240))
        ImageDraw.Draw(image).rectangle(
            (w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(30 * i % 255, 90, 200)
        )
        ImageDraw.Draw(image).line((0, 0, w, h), fill=(10, 10, 10))  # not symmetric: a flip shows
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(captions[i] if captions else f"a, b{i}, c, d")
    return folder


def test_bucket_resolutions_equal_kohyas():
    assert bucket_resolutions(512, 256, 1024, 64) == KOHYA_512
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in KOHYA_512)
    # SDXL's usual setting: the square 1024 and the familiar 1216x832 / 832x1216 pair are buckets.
    sdxl = bucket_resolutions(1024, 512, 2048, 64)
    assert {(1024, 1024), (1216, 832), (832, 1216), (2048, 512)} <= set(sdxl)


def test_mixed_aspect_set_gets_the_hand_computed_buckets():
    """Nearest aspect ratio among KOHYA_512, resized to cover (the relatively shorter side fits exactly)."""
    table = {
        (200, 100): BucketChoice((704, 320), (704, 352)),  # 2.0: 704/320 = 2.2 beats 640/384 = 1.67
        (100, 200): BucketChoice((320, 704), (352, 704)),  # 0.5: 320/704 = 0.45 beats 384/640 = 0.6
        (300, 300): BucketChoice((512, 512), (512, 512)),
        (640, 360): BucketChoice((640, 384), (683, 384)),  # 1.78: 640/384 = 1.67; 640 x 384/360 = 682.7
        (704, 320): BucketChoice((704, 320), (704, 320)),  # a bucket's own size is its bucket
        (1000, 1000): BucketChoice((512, 512), (512, 512)),  # downscaled
    }
    for size, expected in table.items():
        assert assign_bucket(size, SD_512) == expected, size


def test_dataset_resizes_to_cover_and_crops_the_centre(tmp_path):
    data = write_images(tmp_path, [(200, 100), (100, 200), (300, 300), (640, 360)])
    records = scan_dataset(data, resolution=512).records
    dataset = CaptionedImageDataset(records, resolution=512, center_crop=True, buckets=SD_512)
    expected = {  # (target (h, w), original (h, w), crop (top, left))
        "img0.png": ((320, 704), (100, 200), (16, 0)),  # 704x352 cropped to 704x320
        "img1.png": ((704, 320), (200, 100), (0, 16)),
        "img2.png": ((512, 512), (300, 300), (0, 0)),
        "img3.png": ((384, 640), (360, 640), (0, 21)),  # 683x384: (683 - 640) // 2
    }
    for i, record in enumerate(dataset.records):
        sample = dataset[(0, i)]
        target, original, crop = expected[record.path.name]
        assert sample["target_size"] == target and sample["pixel_values"].shape == (3, *target)
        assert sample["original_size"] == original and sample["crop_top_left"] == crop
        # The latent cache's pixels of this entry are the same centre crop.
        entry = CacheEntry(i, record, target, False)
        assert torch.equal(dataset.entry_image(entry).pixels, sample["pixel_values"])


def test_no_upscale_keeps_small_images_at_their_size():
    small = BucketSettings(512, 256, 1024, 64, no_upscale=True)
    assert assign_bucket((200, 100), small) == BucketChoice((192, 64), (200, 100))  # cropped, not enlarged
    assert assign_bucket((300, 200), small) == BucketChoice((256, 192), (300, 200))
    assert assign_bucket((640, 360), small) == BucketChoice((640, 320), (640, 360))  # 230400 px <= 512²
    assert assign_bucket((1000, 1000), small) == BucketChoice((512, 512), (512, 512))  # shrunk to the area
    # 2000x1000 shrinks to about 724x362; sides rounded down to the steps: the height's 320 keeps 2:1
    # (640x320), the width's 704 would not (704x320).
    assert assign_bucket((2000, 1000), small) == BucketChoice((640, 320), (640, 320))
    with pytest.raises(DataError, match="shorter than bucket_reso_steps = 64"):
        assign_bucket((300, 40), small)


def test_no_upscale_names_the_images_without_a_bucket(tmp_path):
    data = write_images(tmp_path, [(300, 40), (128, 128)])
    records = scan_dataset(data, resolution=512).records
    with pytest.raises(DataError, match=r"img0\.png.*bucket_no_upscale"):
        assign_records(records, BucketSettings(512, 256, 1024, 64, no_upscale=True))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"resolution": "512", "min_bucket_reso": "640"}, "min_bucket_reso = 640 is larger than resolution = 512"),
        ({"resolution": "512", "max_bucket_reso": "448"}, "max_bucket_reso = 448 is smaller than resolution = 512"),
        ({"resolution": "512", "min_bucket_reso": "200"}, "min_bucket_reso = 200 is not a multiple of bucket_reso_steps = 64 .*use 192 or 256"),
        ({"resolution": "512", "max_bucket_reso": "1000"}, "max_bucket_reso = 1000 is not a multiple"),
        ({"resolution": "32"}, "resolution = 32 is smaller than bucket_reso_steps = 64"),
    ],
)  # fmt: skip
def test_settings_that_do_not_fit_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        BucketSettings.from_config(settings_of(**flags))


def test_default_limits_are_half_and_twice_the_resolution():
    assert BucketSettings.from_config(settings_of(resolution="512")) == SD_512
    sdxl = BucketSettings.from_config(settings_of(resolution="1024", bucket_no_upscale="true"))
    assert (sdxl.min_reso, sdxl.max_reso, sdxl.no_upscale) == (512, 2048, True)
    odd = BucketSettings.from_config(settings_of(resolution="520"))  # rounded to the steps
    assert (odd.min_reso, odd.max_reso) == (256, 1088)


def test_every_batch_is_one_bucket_and_the_order_is_seeded_by_epoch():
    sample_buckets = ["a"] * 7 + ["b"] * 4 + ["c"] * 1
    sampler = BucketBatchSampler(sample_buckets, 3, seed=5)
    assert len(sampler) == 3 + 2 + 1

    def epoch(n: int, s: BucketBatchSampler = sampler) -> list[list[tuple[int, int]]]:
        s.set_position(n)
        return list(s)

    first = epoch(0)
    assert len(first) == len(sampler)
    for batch in first:
        assert len({sample_buckets[i] for _, i in batch}) == 1 and {e for e, _ in batch} == {0}
    assert sorted(i for batch in first for _, i in batch) == list(range(12))  # each sample once
    assert epoch(0, BucketBatchSampler(sample_buckets, 3, seed=5)) == first  # a new process, a resume
    assert [[i for _, i in b] for b in epoch(1)] != [[i for _, i in b] for b in first]
    assert epoch(0, BucketBatchSampler(sample_buckets, 3, seed=6)) != first
    assert not hasattr(sampler, "batch_size")  # accelerate must pad with whole batches (see the class)


def test_accelerate_sharding_and_skipping_keep_batches_whole():
    """Two processes take alternate batches of one bucket each (an odd count: the first batch again pads the
    second process), and a resume's skip drops exactly the batches already trained."""
    sample_buckets = [(32, 32)] * 5 + [(24, 40)] * 2 + [(40, 24)] * 2
    sampler = BucketBatchSampler(sample_buckets, 2, seed=1)
    sampler.set_position(3)
    batches = list(sampler)
    assert len(batches) == 5
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p)) for p in (0, 1)]
    assert shards[0] == batches[0::2] and shards[1] == [*batches[1::2], batches[0]]
    assert list(SkipBatchSampler(sampler, skip_batches=3)) == batches[3:]
    schedule = compute_schedule(settings_of(resolution="32"), 9, num_processes=2, num_batches=len(sampler))
    assert schedule.batches_per_epoch == 3 == len(shards[0])


def test_schedule_counts_batches_per_bucket():
    cfg = settings_of(resolution="512", train_batch_size="4")
    assert compute_schedule(cfg, 10).batches_per_epoch == 3  # without buckets: ceil(10 / 4)
    assert compute_schedule(cfg, 10, num_batches=4).batches_per_epoch == 4  # buckets of 5, 3 and 2 samples


def test_loader_batches_share_the_target_size(tmp_path):
    data = write_images(
        tmp_path / "data", [(64, 32), (32, 64), (40, 40), (48, 27), (27, 48), (36, 36), (100, 30)]
    )
    cfg = load_config(
        base_flags(tmp_path, data, tmp_path / "out", bucket_reso_steps="8", train_batch_size="2")
        + ["--enable_bucket", "--max_train_steps", "1"]
    )
    summary = scan_dataset(data, resolution=32)
    loader, sampler = training_dataloader(cfg, summary)
    assert isinstance(sampler, BucketBatchSampler) and len(loader) == 4  # 2 + 2 + 2 + 1 images
    sizes = []
    for batch in loader:
        height, width = batch["target_size"]
        assert batch["pixel_values"].shape[1:] == (3, height, width)
        assert batch["loss_weights"].tolist() == [1.0] * len(batch["captions"])
        sizes.append((height, width))
    assert sorted(sizes) == [(16, 56), (24, 40), (32, 32), (40, 24)]
    table = bucket_table(cfg, summary.records)
    assert "4 used of 9" in table and "40x24" in table and "56x16" in table
    assert re.search(r"\n  total +7 +7 +4\n", table)


def test_without_buckets_the_loader_is_unchanged(tmp_path):
    data = write_images(tmp_path, [(40, 32), (32, 40), (48, 48)])
    dataset = CaptionedImageDataset(scan_dataset(data, resolution=16).records, resolution=16)
    loader, sampler = make_dataloader(dataset, batch_size=2)
    assert type(sampler).__name__ == "EpochSampler" and loader.batch_size == 2
    batch = next(iter(loader))
    assert batch["target_size"] == (16, 16) and batch["pixel_values"].shape == (2, 3, 16, 16)


class FakeLatentCache:
    """Answers every entry with a tensor that encodes the entry, and records the entries asked for."""

    def __init__(self):
        self.asked: list[CacheEntry] = []

    def get(self, entry: CacheEntry) -> torch.Tensor:
        self.asked.append(entry)
        h, w = entry.size
        return torch.full((8, h // 8, w // 8), float(entry.record_index * 10 + entry.flip))


def test_latent_cache_serves_samples_without_reading_images(tmp_path):
    """Same draws, sizes, offsets, captions and seeds as the uncached samples; no image is opened."""
    data = write_images(tmp_path / "data", [(64, 32), (40, 40), (30, 60)])
    records = scan_dataset(data, resolution=32).records
    settings = BucketSettings(32, 16, 64, 8)
    options = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    kwargs = dict(
        resolution=32, center_crop=True, random_flip=True, caption_dropout_rate=0.3, seed=4, buckets=settings
    )
    plain = CaptionedImageDataset(records, caption_options=options, **kwargs)
    cached = CaptionedImageDataset(records, caption_options=options, **kwargs)
    cached.latent_cache = FakeLatentCache()
    entries = cached.cache_entries()
    assert [(e.record_index, e.flip) for e in entries] == [(i, f) for i in range(3) for f in (False, True)]
    expected = [plain[(epoch, i)] for epoch in range(3) for i in range(3)]
    for path in data.glob("*.png"):
        path.unlink()  # the cached dataset must not need them
    got = [cached[(epoch, i)] for epoch in range(3) for i in range(3)]
    for want, have in zip(expected, got):
        assert "pixel_values" not in have and have["latent_params"].shape[1:] == tuple(
            s // 8 for s in want["target_size"]
        )
        for key in ("caption", "sample_seed", "original_size", "crop_top_left", "target_size", "loss_weight"):
            assert have[key] == want[key], key
    flips = [e.flip for e in cached.latent_cache.asked]
    assert True in flips and False in flips  # both flips were asked for over the epochs
    batch = collate(got[:1])
    assert "pixel_values" not in batch and batch["latent_params"].dtype == torch.float32


def test_entry_image_is_the_flipped_centre_crop(tmp_path):
    data = write_images(tmp_path, [(64, 32)])
    records = scan_dataset(data, resolution=32).records
    dataset = CaptionedImageDataset(records, resolution=32, center_crop=True, random_flip=True)
    entries = dataset.cache_entries()
    plain, flipped = (dataset.entry_image(e) for e in entries)
    assert torch.equal(flipped.pixels, plain.pixels.flip(-1))
    assert plain.crop_top_left == flipped.crop_top_left == (0, 16)  # 64x32 centre crop, symmetric


def test_regularization_samples_carry_the_prior_loss_weight(tmp_path):
    data = write_images(tmp_path, [(40, 40), (40, 40)])
    train_record, reg_record = scan_dataset(data, resolution=32).records
    records = [
        train_record,
        ImageRecord(reg_record.path, "a dog", 1, reg_record.reader, (40, 40), is_reg=True),
    ]
    dataset = CaptionedImageDataset(records, resolution=32, prior_loss_weight=0.25)
    batch = collate([dataset[0], dataset[1]])
    assert batch["loss_weights"].tolist() == [1.0, 0.25]


def test_caption_tools_draw_from_the_sample_generator(tmp_path):
    data = write_images(tmp_path, [(40, 40)], ["first, b, c, d, e, f, g"])
    records = scan_dataset(data, resolution=32).records
    options = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    dataset = CaptionedImageDataset(records, resolution=32, caption_options=options, seed=2)
    captions = [dataset[(epoch, 0)]["caption"] for epoch in range(6)]
    assert all(c.startswith("first, ") for c in captions) and len(set(captions)) > 1
    again = CaptionedImageDataset(records, resolution=32, caption_options=options, seed=2)
    assert [again[(epoch, 0)]["caption"] for epoch in range(6)] == captions


def test_sdxl_time_ids_get_the_bucket_size(tmp_path, tiny_sdxl_pipeline):
    from loha_diffusion.training.loop import batch_conditioning
    from loha_diffusion.training.models import Models

    data = write_images(tmp_path / "data", [(64, 32)])
    records = scan_dataset(data, resolution=32).records
    dataset = CaptionedImageDataset(
        records, resolution=32, center_crop=True, buckets=BucketSettings(32, 16, 64, 8)
    )
    batch = collate([dataset[0]])
    assert batch["target_size"] == (24, 40)
    models = Models.from_pipeline(tiny_sdxl_pipeline)
    cfg = load_config(base_flags(tmp_path, data, tmp_path / "out") + ["--max_train_steps", "1"])
    run = SimpleNamespace(
        cfg=cfg,
        models=models,
        accelerator=SimpleNamespace(device="cpu"),
        text_encoders=models.text_encoders,
        text_cache=None,
    )
    _, added = batch_conditioning(run, batch)
    # [orig_h, orig_w, crop_top, crop_left, target_h, target_w]: 64x32 covers 40x24 at 48x24, centre crop 4.
    assert added["time_ids"].tolist() == [[32.0, 64.0, 0.0, 4.0, 24.0, 40.0]]


def test_dry_run_prints_the_bucket_table(tiny_sd1_pipeline_dir, tmp_path, capsys):
    data = write_images(tmp_path / "data", [(64, 32), (32, 64), (40, 40), (100, 30)])
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", bucket_reso_steps="8")
    assert (
        main(flags + ["--enable_bucket", "--dry_run", "--num_train_epochs", "1", "--train_batch_size", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "Buckets (about 32x32 pixels, sides 16-64 in steps of 8, 4 used of 9):" in out
    for line in ("24x40", "40x24", "32x32", "56x16"):
        assert f"  {line} " in out
    assert "4 optimizer steps = 1 epoch of 4 steps" in out  # not ceil(4 images / 2) = 2
    assert (
        main(flags + ["--enable_bucket", "--dry_run", "--max_train_steps", "1", "--min_bucket_reso", "40"])
        == 2
    )
    assert "min_bucket_reso = 40 is larger than resolution = 32" in capsys.readouterr().err


@pytest.mark.slow
def test_bucketed_resume_is_bit_exact(tiny_sd1_pipeline_dir, tmp_path):
    """7 steps straight == 3 steps, stop, resume mid-epoch to 7: random crops and flips, caption shuffling
    and dropout, batches of four buckets (one of a single image), on the tiny SD1 model."""
    sizes = [(64, 32), (32, 64), (40, 40), (48, 27), (27, 48), (36, 36), (100, 30)]
    data = write_images(tmp_path / "data", sizes)
    extra = [
        "--enable_bucket", "--bucket_reso_steps", "8", "--center_crop", "false",
        "--max_train_steps", "7", "--train_batch_size", "2", "--checkpointing_steps", "3",
        "--random_flip", "--caption_dropout_rate", "0.2", "--shuffle_caption",
    ]  # fmt: skip
    straight = train(load_config(base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "a") + extra))
    assert straight.global_step == 7
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "b") + extra
    assert train(load_config(flags), stop_at_step=3).global_step == 3
    assert train(load_config(flags + ["--resume_from_checkpoint", "latest"])).global_step == 7
    a, b = adapter_tensors(tmp_path / "a" / "checkpoint-6"), adapter_tensors(tmp_path / "b" / "checkpoint-6")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = adapter_tensors(tmp_path / "b" / "checkpoint-3")
    assert any(not torch.equal(start[k], a[k]) for k in a)
    assert math.isfinite(straight.last_loss)


@pytest.mark.slow
def test_two_processes_take_alternate_bucket_batches(tiny_sd1_pipeline_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 2 == 1 process, batch 2, 2 accumulation steps: each
    optimizer step averages the same two one-bucket batches (process 0 takes batch 0, process 1 batch 1)."""
    data = write_images(
        tmp_path / "data", [(64, 32), (32, 64), (40, 40), (48, 27), (27, 48), (36, 36), (100, 30)]
    )
    common = [
        "--enable_bucket",
        "--bucket_reso_steps",
        "8",
        "--max_train_steps",
        "4",
        "--train_batch_size",
        "2",
    ]
    single = train(
        load_config(
            base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "one")
            + common
            + ["--gradient_accumulation_steps", "2"]
        )
    )
    assert single.global_step == 4  # 4 bucket batches per epoch: 2 optimizer steps per epoch
    run_two_processes([*base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "two"), *common])
    one = load_file(str(tmp_path / "one" / "loha.safetensors"))
    two = load_file(str(tmp_path / "two" / "loha.safetensors"))
    assert one.keys() == two.keys() and len(one) > 0
    # LoHa starts with w2_a = 0 (a zero update): the runs trained.
    assert any(v.abs().sum() > 0 for k, v in one.items() if k.endswith("hada_w2_a"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)


def _square_transform_before_buckets(image, resolution, *, center_crop, random_flip, generator):
    """`data.transform_image` as it was before buckets (square targets only): the reference the new code
    must reproduce exactly, draws included."""
    original_size = (image.height, image.width)
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    if random_flip and flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - resolution - left
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, original_size, (top, left)


@pytest.mark.parametrize("center_crop", [True, False])
@pytest.mark.parametrize("random_flip", [True, False])
def test_square_samples_are_those_of_before(tmp_path, center_crop, random_flip):
    """Without buckets, `transform_image` gives the earlier pixels, offsets and generator stream exactly."""
    data = write_images(tmp_path, [(64, 32), (33, 71), (40, 40), (17, 29)])
    for path in sorted(data.glob("*.png")):
        image = Image.open(path).convert("RGB")
        for seed in range(4):
            new_gen, old_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            new = transform_image(
                image, 24, center_crop=center_crop, random_flip=random_flip, generator=new_gen
            )
            pixels, original, crop = _square_transform_before_buckets(
                image, 24, center_crop=center_crop, random_flip=random_flip, generator=old_gen
            )
            assert (
                torch.equal(new.pixels, pixels)
                and new.original_size == original
                and new.crop_top_left == crop
            )
            assert torch.equal(torch.rand(3, generator=new_gen), torch.rand(3, generator=old_gen))


def test_transform_to_a_height_width_target(tmp_path):
    image = Image.new("RGB", (100, 30), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((0, 0, 9, 29), fill=(255, 255, 255))  # a white left edge
    gen = torch.Generator().manual_seed(0)
    out = transform_image(image, (16, 56), center_crop=True, random_flip=True, generator=gen)
    assert out.pixels.shape == (3, 16, 56) and out.original_size == (30, 100)
    # Covers 16x56 at 56x17 (the width fits), one row cropped at the bottom; the white left edge stays, on the
    # right when the sample's flip coin (the first draw of a centre crop) says flip.
    assert out.crop_top_left == (0, 0)
    flipped = bool(torch.rand((), generator=torch.Generator().manual_seed(0)) < 0.5)
    assert out.pixels[:, :, -1 if flipped else 0].min() > 0.9
    assert out.pixels[:, :, 0 if flipped else -1].max() < -0.9


@pytest.mark.slow
def test_bucketed_resume_with_caches_is_bit_exact(tiny_sd1_pipeline_dir, tmp_path, monkeypatch):
    """Buckets with the latent and text-encoder caches on (flips cached both ways, caption dropout served by
    the text cache's empty caption): 5 steps straight == 2 steps, stop, resume to 5 (the caches built again)."""
    data = write_images(tmp_path / "data", [(64, 32), (32, 64), (40, 40), (48, 27), (100, 30)])
    extra = [
        "--enable_bucket", "--bucket_reso_steps", "8", "--cache_latents", "--cache_text_encoder_outputs",
        "--max_train_steps", "5", "--train_batch_size", "2", "--checkpointing_steps", "2",
        "--random_flip", "--caption_dropout_rate", "0.3",
    ]  # fmt: skip
    seen: list[tuple[tuple[int, int], bool]] = []  # per micro-batch: target size, served by the latent cache
    original = loop.batch_loss

    def batch_loss(run, batch):
        seen.append((batch["target_size"], "latent_params" in batch and "pixel_values" not in batch))
        return original(run, batch)

    monkeypatch.setattr(loop, "batch_loss", batch_loss)
    assert (
        train(load_config(base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "a") + extra)).global_step == 5
    )
    assert len({size for size, _ in seen}) == 4 and all(cached for _, cached in seen)
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "b") + extra
    assert train(load_config(flags), stop_at_step=2).global_step == 2
    assert train(load_config(flags + ["--resume_from_checkpoint", "latest"])).global_step == 5
    a, b = adapter_tensors(tmp_path / "a" / "checkpoint-4"), adapter_tensors(tmp_path / "b" / "checkpoint-4")
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (
        load_file(str(tmp_path / "a" / "loha.safetensors")),
        load_file(str(tmp_path / "b" / "loha.safetensors")),
    )
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_scan_reports_no_square_crop_with_buckets_and_no_upscale_with_bucket_no_upscale(tmp_path):
    write_images(tmp_path, [(200, 100), (32, 32)])
    base = data_only_flags(tmp_path)
    base += [
        "--resolution",
        "64",
        "--min_bucket_reso",
        "32",
        "--max_bucket_reso",
        "128",
        "--bucket_reso_steps",
        "16",
    ]
    plain = scan_training_data(load_config(base), log=False)
    assert [p.name for p, _ in plain.crop_losses] == ["img0.png"] and plain.small_images == 1
    bucketed = scan_training_data(load_config(base + ["--enable_bucket"]), log=False)
    assert bucketed.crop_losses == () and bucketed.small_images == 1  # cropped to its bucket, not a square
    assert "square crop" not in bucketed.report()
    kept = scan_training_data(load_config(base + ["--enable_bucket", "--bucket_no_upscale"]), log=False)
    assert kept.small_images == 0 and "upscaled" not in kept.report()
