"""`loha-diffusion merge` keeps the base model's precision unless told otherwise (issue 13, item 4).

Each merged weight is computed in fp32 from the base weight and rounded once to the dtype the base model stores
it in: for an fp16 base, exactly `(W0.float() + ΔW).half()`; `--dtype` picks another. The folder is written
atomically and the command prints each component's dtype and size.
"""

from __future__ import annotations

import errno
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from loha_diffusion import cli
from loha_diffusion import pipeline as lp
from loha_diffusion.model import adapter_layers
from loha_diffusion.tiny import build_tiny_pipeline

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def fp16_pipeline_dir(tmp_path_factory):
    """A saved tiny SD1 pipeline with every model component in float16 (read-only for tests)."""
    folder = tmp_path_factory.mktemp("fp16") / "pipeline"
    build_tiny_pipeline("sd1").to(torch.float16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from conftest import write_kohya_file

    path = tmp_path_factory.mktemp("merge_lora") / "style.safetensors"
    write_kohya_file(path, build_tiny_pipeline("sd1"), algo="lora", rank=4, alpha=4.0, seed=5)
    return path


def merge(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["merge", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dtypes_in(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def expected_unet(pipeline_dir, lora, scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet state dict a merge must write: every adapted weight `(W0.float() + ΔW).to(dtype)` with ΔW from
    the adapter as loaded (fp32), every other tensor `W0.to(dtype)`."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)  # fp16 files, fp32 modules: W0.float()
    lp.load_adapter(pipe, lora, adapter_name="style", scale=scale)
    deltas = {
        f"{path}.weight": layer.adapters["style"].delta_weight().float()
        for path, layer in adapter_layers(pipe.unet).items()
    }
    state = {
        k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if ".adapters." not in k
    }
    return {k: (v.float() + deltas[k] if k in deltas else v).to(dtype) for k, v in state.items()}


def test_merge_keeps_a_half_precision_base_in_half_precision(tmp_path, capsys, fp16_pipeline_dir, lora_file):
    out = tmp_path / "merged"
    code, stdout, _ = merge(
        capsys, "--pipeline", fp16_pipeline_dir, "--adapter", f"{lora_file}:0.7", "--out", out
    )
    assert code == 0
    written = load_file(str(out / UNET_FILE))
    want = expected_unet(fp16_pipeline_dir, lora_file, 0.7, torch.float16)
    assert written.keys() == want.keys()
    assert {t.dtype for t in written.values()} == {torch.float16}
    differ = [k for k in want if not torch.equal(written[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from (W0.float() + ΔW).half(), e.g. {differ[:3]}"
    assert len([k for k in want if "lora" not in k]) > 0
    before = (fp16_pipeline_dir / UNET_FILE).stat().st_size
    assert abs((out / UNET_FILE).stat().st_size - before) < 0.01 * before  # not doubled
    for component in ("text_encoder", "vae"):
        assert all(dtypes_in(f) == {"F16"} for f in (out / component).glob("*.safetensors"))
    assert "style (0.7)" in stdout and str(out) in stdout
    assert any(line.split()[:2] == ["unet", "float16"] for line in stdout.splitlines())
    assert "MiB" in stdout and "total" in stdout
    # The merged folder is a plain working pipeline (no adapter layers).
    merged = StableDiffusionPipeline.from_pretrained(out)
    assert lp.list_adapters(merged) == {}


@pytest.mark.parametrize(
    ("flag", "dtype", "name"), [("fp32", torch.float32, "F32"), ("bf16", torch.bfloat16, "BF16")]
)
def test_merge_dtype_flag_chooses_another(tmp_path, capsys, fp16_pipeline_dir, lora_file, flag, dtype, name):
    out = tmp_path / "merged"
    code, stdout, _ = merge(
        capsys, "--pipeline", fp16_pipeline_dir, "--adapter", lora_file, "--out", out, "--dtype", flag
    )
    assert code == 0
    written = load_file(str(out / UNET_FILE))
    want = expected_unet(fp16_pipeline_dir, lora_file, 1.0, dtype)
    assert all(torch.equal(written[k], want[k]) for k in want)
    assert all(dtypes_in(f) == {name} for f in out.rglob("*.safetensors"))
    assert "(base model: float16)" in stdout


def test_merge_of_a_float32_base_stays_float32(tmp_path, capsys, tiny_sd1_pipeline_dir, lora_file):
    out = tmp_path / "merged"
    assert merge(capsys, "--pipeline", tiny_sd1_pipeline_dir, "--adapter", lora_file, "--out", out)[0] == 0
    assert dtypes_in(out / UNET_FILE) == {"F32"}


def test_stored_dtypes_reads_only_headers(fp16_pipeline_dir, tiny_sd1_pipeline_dir):
    assert lp.stored_dtypes(fp16_pipeline_dir) == {
        "text_encoder": torch.float16,
        "unet": torch.float16,
        "vae": torch.float16,
    }
    assert set(lp.stored_dtypes(tiny_sd1_pipeline_dir).values()) == {torch.float32}


def test_a_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch, fp16_pipeline_dir, lora_file):
    def full_disk(self, folder, **kwargs):
        (folder / "partial").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_disk)
    out = tmp_path / "merged"
    code, _, stderr = merge(capsys, "--pipeline", fp16_pipeline_dir, "--adapter", lora_file, "--out", out)
    assert code == 1 and "merged" in stderr and "space" in stderr.lower()
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary


def test_merge_refuses_to_write_over_its_base(capsys, fp16_pipeline_dir, lora_file):
    code, _, stderr = merge(
        capsys,
        "--pipeline",
        fp16_pipeline_dir,
        "--adapter",
        lora_file,
        "--out",
        fp16_pipeline_dir,
        "--overwrite",
    )
    assert code == 1 and "base model's folder" in stderr


def test_pipelines_load_in_a_dtype_without_a_future_warning(
    tmp_path, capsys, tiny_sd1_pipeline_dir, lora_file
):
    # diffusers 0.40 renamed from_pretrained's torch_dtype to dtype (the old name warns); older ones know only
    # torch_dtype.
    assert set(lp.from_pretrained_dtype(torch.float16)) in ({"dtype"}, {"torch_dtype"})
    image = tmp_path / "cat.png"
    args = ["generate", "--pipeline", tiny_sd1_pipeline_dir, "--adapter", lora_file, "--prompt", "a cat"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = cli.main([*map(str, args), "--steps", "1", "--dtype", "bf16", "--out", str(image)])
    assert code == 0 and image.is_file()


@pytest.mark.parametrize(
    ("flag", "loaded"), [(None, "fp16"), ("fp16", "fp16"), ("fp32", None), ("bf16", None)]
)
def test_merge_loads_in_the_base_dtype_only_when_that_is_written(
    tmp_path, capsys, monkeypatch, fp16_pipeline_dir, lora_file, flag, loaded
):
    # Same bits as a float32 load (the test above), half the memory; a wider or different --dtype needs fp32.
    seen = []
    real = cli._load_pipeline
    monkeypatch.setattr(
        cli, "_load_pipeline", lambda path, precision=None: seen.append(precision) or real(path, precision)
    )
    extra = ["--dtype", flag] if flag else []
    assert (
        merge(
            capsys, "--pipeline", fp16_pipeline_dir, "--adapter", lora_file, "--out", tmp_path / "m", *extra
        )[0]
        == 0
    )
    assert seen == [loaded]
