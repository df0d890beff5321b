"""formats.convert as a library: SVD factors, LoRA layout, renaming, the errors it raises, Kohya <-> PEFT."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loha_diffusion.errors import CLIError, KohyaFormatError, LoHaDiffusionError
from loha_diffusion.formats import convert
from loha_diffusion.formats.kohya import addnet_hash_file, read_kohya
from loha_diffusion.meta_models import meta_models
from loha_diffusion.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def sd1_loha(tmp_path_factory):
    from conftest import write_kohya_file

    path = tmp_path_factory.mktemp("convert") / "loha.safetensors"
    write_kohya_file(path, build_tiny_pipeline("sd1"), cp=True, metadata={"ss_base_model_version": "sd_v1"})
    return path


def test_convert_knows_nothing_of_the_command_line():
    tree = ast.parse(Path(convert.__file__).read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "CLIError" not in names and "cli" not in modules and "print" not in names


def test_svd_factors_are_exact_at_full_rank_and_report_the_tail():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    s = torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    delta = (u[:, :5] * s) @ v.T
    exact = convert.svd_factors(delta.float(), 3)
    assert exact.up.shape == (6, 3) and exact.down.shape == (3, 5) and exact.up.dtype == torch.float64
    assert exact.relative_error < 1e-6
    low = convert.svd_factors(delta, 1)
    assert low.relative_error == pytest.approx(5.0 / (25 + 16 + 9) ** 0.5)
    torch.testing.assert_close(low.up @ low.down, 5.0 * u[:, :1] @ v[:, :1].T)


def test_lora_tensors_use_the_kohya_conv_layout():
    factors = convert.svd_factors(torch.randn(8, 4, 3, 3), 2)
    tensors = convert.lora_tensors(factors, (8, 4, 3, 3), torch.float16)
    assert tensors["lora_down.weight"].shape == (2, 4, 3, 3)
    assert tensors["lora_up.weight"].shape == (8, 2, 1, 1)
    assert tensors["alpha"].shape == () and tensors["alpha"].item() == 2.0
    assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_conversions_raise_library_errors(tmp_path, sd1_loha, tiny_sdxl_pipeline_dir):
    kfile = read_kohya(sd1_loha)
    out = tmp_path / "out.safetensors"
    with pytest.raises(KohyaFormatError, match="needs the base model"):
        convert.convert_kohya(kfile, out, to="lora")
    with pytest.raises(KohyaFormatError, match="SDXL files only"):
        convert.renamed_modules(kfile, "ldm", meta_models(arch="sd1"))
    with pytest.raises(KohyaFormatError, match="name no layer of the base model") as info:
        convert.convert_kohya(kfile, out, to="lora", models=meta_models(tiny_sdxl_pipeline_dir))
    assert isinstance(info.value, LoHaDiffusionError) and not isinstance(info.value, CLIError)
    assert not out.exists()


def test_convert_kohya_to_lora_keeps_the_deltas(tmp_path, sd1_loha, tiny_sd1_pipeline_dir):
    kfile = read_kohya(sd1_loha)
    models = meta_models(tiny_sd1_pipeline_dir)
    seen = []
    result = convert.convert_kohya(
        kfile,
        tmp_path / "lora.safetensors",
        to="lora",
        rank=16,
        models=models,
        progress=lambda *a: seen.append(a),
    )
    assert result.modules == len(kfile.modules) == len(seen) == len(result.errors)
    assert result.total_error < 1e-5 and result.dtype == torch.float32
    lora = read_kohya(result.path)
    assert set(lora.kinds) == {"lora"}
    with safe_open(str(result.path), framework="pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == addnet_hash_file(result.path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    targets = convert.module_targets(kfile, models)
    for name in list(kfile.modules)[:30]:
        shape = tuple(targets[name].layer.weight.shape)
        torch.testing.assert_close(
            lora.modules[name].delta_weight(shape),
            kfile.modules[name].delta_weight(shape),
            rtol=1e-4,
            atol=1e-5,
        )


def test_kohya_peft_round_trip_with_weightless_models(tmp_path, sd1_loha, tiny_sd1_pipeline_dir):
    kfile = read_kohya(sd1_loha)
    written = convert.kohya_to_peft_folders(kfile, tmp_path / "peft", meta_models(tiny_sd1_pipeline_dir))
    assert written == ["text_encoder", "unet"]
    back = tmp_path / "back.safetensors"
    dtype = convert.peft_folder_to_kohya(tmp_path / "peft", back, meta_models(tiny_sd1_pipeline_dir))
    assert dtype == torch.float32
    original, returned = load_file(str(sd1_loha)), load_file(str(back))
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_converted_files_carry_names_not_local_paths(tmp_path):
    """Metadata another tool wrote with local paths (base model, VAE, dataset folders) is passed on as names
    only, as kohya sd-scripts writes them; hub ids and other values are kept."""
    import json

    from conftest import write_kohya_file

    from loha_diffusion.formats.kohya import read_metadata

    source = tmp_path / "paths.safetensors"
    write_kohya_file(
        source,
        build_tiny_pipeline("sd1"),
        metadata={
            "ss_base_model_version": "sd_v1",
            "ss_sd_model_name": "/home/bob/models/sd15-pruned.safetensors",
            "ss_vae_name": "C:\\Users\\bob\\vae\\kl-f8.ckpt",
            "ss_output_name": "/home/bob/out/style",
            "ss_dataset_dirs": json.dumps({"/home/bob/data/10_cat": {"n_repeats": 10, "img_count": 3}}),
            "ss_tag_frequency": json.dumps({"/home/bob/data/10_cat": {"cat": 3}}),
            "ss_training_comment": "made with care",
        },
    )
    out = convert.convert_kohya(read_kohya(source), tmp_path / "out.safetensors", dtype=torch.float16).path
    meta = read_metadata(out)
    assert meta["ss_sd_model_name"] == "sd15-pruned" and meta["ss_vae_name"] == "kl-f8"
    assert meta["ss_output_name"] == "style" and meta["ss_training_comment"] == "made with care"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 3}}
    assert not [v for v in meta.values() if "bob" in v]


@pytest.mark.parametrize(
    "value, name",
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("sd15", "sd15"),
        ("/data/models/my-model", "my-model"),
        ("/data/models/my-model/", "my-model"),
        ("~/models/sd15.safetensors", "sd15"),
        ("./models/base", "base"),
        ("D:/models/base.ckpt", "base"),
        ("style / v2 / final", "style / v2 / final"),
    ],
)
def test_public_name_keeps_hub_ids_and_reduces_paths(value, name):
    from loha_diffusion.formats.kohya.metadata import public_name

    assert public_name(value) == name


def test_overwritten_peft_output_keeps_no_old_component(tmp_path, sd1_loha, tiny_sd1_pipeline_dir):
    """A PEFT output folder is written whole: replacing one drops components the new adapter lacks, and a
    failed write leaves the old folder as it was (no temporary folder left behind)."""
    import shutil

    kfile = read_kohya(sd1_loha)
    out, unet_only = tmp_path / "peft", tmp_path / "unet_only"
    convert.kohya_to_peft_folders(kfile, out, meta_models(tiny_sd1_pipeline_dir))
    shutil.copytree(out / "unet", unet_only / "unet")
    written = convert.peft_folder_to_peft(unet_only, out, meta_models(tiny_sd1_pipeline_dir))
    assert written == ["unet"] and sorted(p.name for p in out.iterdir()) == ["unet"]
    written = convert.peft_folder_to_peft(out, out, meta_models(tiny_sd1_pipeline_dir), dtype=torch.float16)
    assert written == ["unet"]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "save_peft", fail)
        with pytest.raises(OSError, match="no space left"):
            convert.peft_folder_to_peft(out, out, meta_models(tiny_sd1_pipeline_dir))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft", "unet_only"]


def test_peft_output_errors_name_the_folder_not_its_temporary(tmp_path):
    """A failure inside the whole-folder write names the folder the user asked for."""
    from loha_diffusion.errors import NonFiniteError

    out = tmp_path / "style_peft"
    with pytest.raises(NonFiniteError) as info:
        with convert.peft_output_folder(out) as tmp:
            raise NonFiniteError(
                f"refusing to write {tmp / 'unet' / 'adapter_model.safetensors'}: NaN in to_q"
            )
    assert str(info.value) == f"refusing to write {out / 'unet' / 'adapter_model.safetensors'}: NaN in to_q"
    assert list(tmp_path.iterdir()) == []


def test_a_value_beyond_the_output_dtype_is_named_as_an_overflow(tmp_path, sd1_loha):
    """fp32 -> fp16 with a factor above 65,504: refused before the cast as an overflow naming the module and
    the fix (not as "NaN or infinite", which is what the cast would make of it); nothing is written."""
    tensors = load_file(str(sd1_loha))
    key = sorted(k for k in tensors if k.endswith("hada_w1_a"))[0]
    tensors = {k: v.float() for k, v in tensors.items()}
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 1e6
    src = tmp_path / "big.safetensors"
    save_file(tensors, str(src))
    dst = tmp_path / "half.safetensors"
    with pytest.raises(LoHaDiffusionError, match="beyond float16's range") as info:
        convert.convert_kohya(read_kohya(src), dst, dtype=torch.float16)
    assert key.rsplit(".", 1)[0] in str(info.value) and "float32 or bfloat16" in str(info.value)
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    kept = convert.convert_kohya(read_kohya(src), tmp_path / "full.safetensors", dtype=torch.float32)
    assert load_file(str(kept.path))[key][0, 0] == 1e6
