"""The `loha-diffusion` command, driven as a user would: subprocesses, files on disk, exit codes."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loha_diffusion import cli
from loha_diffusion import pipeline as lp
from loha_diffusion.errors import KohyaFormatError
from loha_diffusion.formats import convert, reference
from loha_diffusion.formats.kohya import addnet_hash_file
from loha_diffusion.layers import AdapterLayer
from loha_diffusion.tiny import build_tiny_pipeline

SUBCOMMANDS = ("inspect", "convert", "merge", "verify", "generate", "make-tiny")
TRAINING_METADATA = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_dim": "4",
    "ss_network_alpha": "2",
    "ss_network_args": '{"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}',
    "ss_base_model_version": "sd_v1",
    "ss_num_train_images": "120",
    "ss_steps": "1500",
    "ss_training_started_at": "1700000000.0",
    "ss_dataset_dirs": '{"10_cat": {"n_repeats": 10, "img_count": 12}}',
    "ss_tag_frequency": '{"10_cat": {"cat": 12, "sitting": 5}}',
}


def run_cli(*args, check: bool = True, new_process: bool = False) -> subprocess.CompletedProcess:
    """Run the command with ARGS and return its exit status and output.

    `new_process=True` runs `python -m loha_diffusion.cli ARGS` exactly as from a shell; the default calls
    `cli.main` in this process (the same code, output streams and exit status, without the seconds each new
    interpreter spends importing torch and diffusers). Each command is run in a new process at least once."""
    if not new_process:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as exit_info:  # argparse: --help, usage errors
                code = exit_info.code
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loha_diffusion.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def latents(pipe, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a cat", num_inference_steps=2, generator=generator, output_type="latent", **kwargs
    ).images


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def sd1_loha(tmp_path_factory, tiny_sd1_pipeline_dir):
    """A hand-written LoHa file (flat and CP convs, UNet + text encoder) for the saved tiny SD1 pipeline."""
    from conftest import write_kohya_file

    path = tmp_path_factory.mktemp("files") / "style.safetensors"
    write_kohya_file(path, build_tiny_pipeline("sd1"), cp=True, metadata=TRAINING_METADATA)
    return path


def test_help_lists_commands_with_examples():
    proc = run_cli("--help", new_process=True)
    for command in SUBCOMMANDS:
        assert command in proc.stdout
    assert "examples:" in proc.stdout
    parser = cli.build_parser()
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
    assert run_cli("verify", check=False).returncode == 2  # usage error: missing arguments


def test_help_text_of_each_command_has_an_example(capsys):
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert f"loha-diffusion {command}" in capsys.readouterr().out.split("examples:")[1]


def test_make_tiny_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "tiny"
    proc = run_cli("make-tiny", out, "--arch", "sdxl", new_process=True)
    assert "wrote" in proc.stdout
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert latents(pipe).shape == (1, 4, 32, 32)
    again = run_cli("make-tiny", out, check=False)
    assert again.returncode == 1
    assert str(out) in again.stderr and "--overwrite" in again.stderr


def test_inspect_summarizes_the_file(sd1_loha):
    out = run_cli("inspect", sd1_loha, new_process=True).stdout
    assert re.search(r"algorithm:\s+loha \(\d+\), loha \(CP/Tucker\) \(\d+\)", out)
    assert re.search(r"modules:\s+226: unet \(214\), te \(12\)", out)
    assert "down_blocks.0 26" in out and "mid_block 14" in out and "layers.0 6" in out
    assert re.search(r"ranks:\s+4 \(226\)", out) and re.search(r"alphas:\s+2 \(226\)", out)
    assert re.search(r"base model:\s+sd_v1", out) and re.search(r"dtype:\s+float32", out)
    params = sum(t.numel() for k, t in load_file(str(sd1_loha)).items() if not k.endswith(".alpha"))
    assert f"parameters:  {params:,}" in out
    assert "steps: 1500" in out and "training images: 120" in out
    assert "10_cat (12 images x 10 repeats)" in out and "cat (12), sitting (5)" in out
    assert "started: 2023-11-1" in out  # a date, not a raw timestamp


def test_inspect_reports_problems_with_exit_code(tmp_path, sd1_loha):
    tensors = load_file(str(sd1_loha))
    name = next(k for k in tensors if k.endswith(".hada_w2_b")).rsplit(".", 1)[0]
    del tensors[f"{name}.hada_w2_b"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    proc = run_cli("inspect", broken, check=False)
    assert proc.returncode == 1
    assert "problems:    1" in proc.stdout and name in proc.stdout and "hada_w2_b" in proc.stdout
    missing = run_cli("inspect", tmp_path / "nope.safetensors", check=False)
    assert (
        missing.returncode == 1 and "nope.safetensors" in missing.stderr and "Traceback" not in missing.stderr
    )


def test_verify_passes_a_good_file_and_fails_the_wrong_base(
    sd1_loha, tiny_sd1_pipeline_dir, tiny_sdxl_pipeline_dir
):
    proc = run_cli("verify", sd1_loha, "--pipeline", tiny_sd1_pipeline_dir, new_process=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert len(rows) == 226 and all(r.startswith("PASS") for r in rows)
    assert "PASS: 226/226 modules" in proc.stdout

    wrong = run_cli("verify", sd1_loha, "--pipeline", tiny_sdxl_pipeline_dir, "--failures-only", check=False)
    assert wrong.returncode == 1
    assert "FAIL  base model: the file is for sd1, the pipeline is sdxl-shaped" in wrong.stdout
    assert "no module of this base model has this name" in wrong.stdout
    assert "PASS " not in wrong.stdout


def test_verify_catches_a_wrong_delta(monkeypatch, capsys, sd1_loha, tiny_sd1_pipeline_dir):
    """The plain formula is independent of our adapter classes: a bug in them shows up as FAIL rows."""
    from loha_diffusion.adapters.loha import LoHaAdapter

    original = LoHaAdapter.delta_weight
    monkeypatch.setattr(LoHaAdapter, "delta_weight", lambda self: original(self) * 1.001)
    calls = []
    library_reference = reference.reference_delta

    def spy(*args):
        calls.append(args)
        return library_reference(*args)

    monkeypatch.setattr(reference, "reference_delta", spy)
    assert cli.main(["verify", str(sd1_loha), "--pipeline", str(tiny_sd1_pipeline_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 0/226 modules" in out and "rel.diff 1.0e-03" in out
    assert (
        len(calls) == 226
    )  # the library's reference formula (formats.reference) is what verify compares with
    assert not hasattr(cli, "reference_delta") and not hasattr(cli, "skeleton_models")


def test_convert_loha_to_lora_loads_in_diffusers(tmp_path, sd1_loha, tiny_sd1_pipeline_dir):
    """A LoHa of rank 4 has rank <= 16 deltas: at rank 16 the SVD is exact and diffusers' own LoRA loader gives
    the LoHa's output; at rank 2 the printed errors are the true relative errors."""
    exact = tmp_path / "lora16.safetensors"
    proc = run_cli(
        "convert",
        sd1_loha,
        exact,
        "--to",
        "lora",
        "--rank",
        16,
        "--pipeline",
        tiny_sd1_pipeline_dir,
        new_process=True,
    )
    total = float(re.search(r"^\s*(\S+)\s+TOTAL", proc.stdout, re.M).group(1))
    assert total < 1e-5

    ours = StableDiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir)
    lp.load_adapter(ours, sd1_loha)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir)
    theirs.load_lora_weights(str(exact.parent), weight_name=exact.name)
    assert rel_err(latents(theirs), latents(ours)) < 1e-4

    low = tmp_path / "lora2.safetensors"
    proc = run_cli("convert", sd1_loha, low, "--to", "lora", "--rank", 2, "--pipeline", tiny_sd1_pipeline_dir)
    printed = {
        m.group(2): float(m.group(1)) for m in re.finditer(r"^\s*(\S+)\s+(lora_\S+)$", proc.stdout, re.M)
    }
    assert len(printed) == 226
    loha, lora = lp.adapter_components(build_tiny_pipeline("sd1")), load_file(str(low))
    from loha_diffusion.formats.kohya import read_kohya

    original, converted = read_kohya(sd1_loha), read_kohya(low)
    targets = convert.module_targets(original, loha)
    for name in list(printed)[:20]:
        shape = tuple(targets[name].layer.weight.shape)
        expected = original.modules[name].delta_weight(shape)
        approx = converted.modules[name].delta_weight(shape)
        assert (approx - expected).norm().item() / expected.norm().item() == pytest.approx(
            printed[name], rel=1e-2
        )
    assert lora[f"{name}.lora_down.weight"].shape[0] == 2


def test_convert_dtype_and_sdxl_name_styles(tmp_path, tiny_sdxl_pipeline_dir, kohya_files):
    src = tmp_path / "xl.safetensors"
    kohya_files.write(src, build_tiny_pipeline("sdxl"), algo="lora")
    half = tmp_path / "xl_fp16.safetensors"
    run_cli("convert", src, half, "--dtype", "fp16")
    tensors = load_file(str(half))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert all(t.dim() == 0 for k, t in tensors.items() if k.endswith(".alpha"))
    with safe_open(str(half), framework="pt") as f:
        assert f.metadata()["sshs_model_hash"] == addnet_hash_file(half)

    diffusers_names = tmp_path / "xl_diffusers.safetensors"
    back = tmp_path / "xl_back.safetensors"
    run_cli(
        "convert", src, diffusers_names, "--unet-names", "diffusers", "--pipeline", tiny_sdxl_pipeline_dir
    )
    assert any(k.startswith("lora_unet_down_blocks_1_") for k in load_file(str(diffusers_names)))
    run_cli("convert", diffusers_names, back, "--unet-names", "ldm", "--pipeline", tiny_sdxl_pipeline_dir)
    original, returned = load_file(str(src)), load_file(str(back))
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_convert_kohya_peft_round_trip(tmp_path, sd1_loha, tiny_sd1_pipeline_dir):
    peft_dir = tmp_path / "style_peft"
    run_cli("convert", sd1_loha, peft_dir, "--pipeline", tiny_sd1_pipeline_dir, new_process=True)
    assert (peft_dir / "unet" / "adapter_config.json").is_file()
    assert (peft_dir / "text_encoder" / "adapter_model.safetensors").is_file()

    # The PEFT folders load into a pipeline and give exactly what the Kohya file gives.
    from_kohya, from_peft = build_tiny_pipeline("sd1"), build_tiny_pipeline("sd1")
    lp.load_adapter(from_kohya, sd1_loha)
    lp.load_adapter(from_peft, peft_dir)
    assert torch.equal(latents(from_peft), latents(from_kohya))

    back = tmp_path / "back.safetensors"
    run_cli("convert", peft_dir, back, "--pipeline", tiny_sd1_pipeline_dir)
    original, returned = load_file(str(sd1_loha)), load_file(str(back))
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)

    no_base = run_cli("convert", peft_dir, tmp_path / "x.safetensors", check=False)
    assert no_base.returncode == 1 and "--pipeline" in no_base.stderr


def test_merge_bakes_adapters_into_a_pipeline_folder(tmp_path, sd1_loha, tiny_sd1_pipeline_dir, kohya_files):
    second = tmp_path / "second.safetensors"
    kohya_files.write(second, build_tiny_pipeline("sd1"), algo="lora", convs=False, seed=3)
    out = tmp_path / "merged"
    before = {p: p.read_bytes() for p in tiny_sd1_pipeline_dir.rglob("*.safetensors")}
    run_cli(
        "merge",
        "--pipeline",
        tiny_sd1_pipeline_dir,
        "--adapter",
        f"{sd1_loha}:0.7",
        "--adapter",
        second,
        "--out",
        out,
        new_process=True,
    )
    assert {p: p.read_bytes() for p in tiny_sd1_pipeline_dir.rglob("*.safetensors")} == before

    merged = StableDiffusionPipeline.from_pretrained(out)
    assert not any(isinstance(m, AdapterLayer) for m in merged.unet.modules())
    expected = StableDiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir)
    lp.load_adapter(expected, sd1_loha, scale=0.7)
    lp.load_adapter(expected, second)
    assert rel_err(latents(merged), latents(expected)) < 1e-4

    refused = run_cli(
        "merge", "--pipeline", tiny_sd1_pipeline_dir, "--adapter", second, "--out", out, check=False
    )
    assert refused.returncode == 1 and "--overwrite" in refused.stderr


def test_generate_writes_an_image(tmp_path, sd1_loha, tiny_sd1_pipeline_dir):
    plain, styled, again = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "again.png"
    common = ["--pipeline", tiny_sd1_pipeline_dir, "--prompt", "a photo of a cat", "--steps", 2, "--seed", 3]
    run_cli("generate", *common, "--out", plain)
    run_cli(
        "generate", *common, "--adapter", f"{sd1_loha}:0.8", "--negative-prompt", "blurry", "--out", styled,
        new_process=True,
    )  # fmt: skip
    run_cli(
        "generate", *common, "--adapter", f"{sd1_loha}:0.8", "--negative-prompt", "blurry", "--out", again
    )
    images = [Image.open(p) for p in (plain, styled, again)]
    assert all(im.size == (64, 64) for im in images)
    assert images[1].tobytes() == images[2].tobytes()  # same seed, same image
    assert images[0].tobytes() != images[1].tobytes()  # the adapter changes it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert (plain.stat().st_mode & 0o044) == 0o044  # readable by others under the default umask
    bad_suffix = run_cli("generate", *common, "--out", tmp_path / "image.txt", check=False)
    assert bad_suffix.returncode == 1 and "not an image type" in bad_suffix.stderr


def test_errors_name_the_file_and_the_fix(tmp_path, sd1_loha, tiny_sd1_pipeline_dir, tiny_sdxl_pipeline_dir):
    missing_adapter = run_cli(
        "generate", "--pipeline", tiny_sd1_pipeline_dir, "--adapter", tmp_path / "nope.safetensors",
        "--prompt", "x", "--out", tmp_path / "x.png", check=False,
    )  # fmt: skip
    assert missing_adapter.returncode == 1 and "nope.safetensors" in missing_adapter.stderr
    not_a_pipeline = run_cli("verify", sd1_loha, "--pipeline", tmp_path, check=False)
    assert not_a_pipeline.returncode == 1 and "model_index.json" in not_a_pipeline.stderr
    wrong_base = run_cli(
        "merge",
        "--pipeline",
        tiny_sdxl_pipeline_dir,
        "--adapter",
        sd1_loha,
        "--out",
        tmp_path / "m",
        check=False,
    )
    assert wrong_base.returncode == 1
    assert "nothing was changed" in wrong_base.stderr and "Traceback" not in wrong_base.stderr
    assert not (tmp_path / "m").exists()


def test_adapter_argument_parsing():
    assert cli._parse_adapter_arg("a.safetensors:0.5") == (cli.Path("a.safetensors"), 0.5)
    assert cli._parse_adapter_arg("a.safetensors") == (cli.Path("a.safetensors"), 1.0)
    assert cli._parse_adapter_arg("C:/x/a.safetensors") == (cli.Path("C:/x/a.safetensors"), 1.0)
    assert cli._parse_adapter_arg("C:/x/a.safetensors:-1") == (cli.Path("C:/x/a.safetensors"), -1.0)


def test_convert_writes_atomically_through_the_one_kohya_writer(monkeypatch, tmp_path, sd1_loha):
    """convert writes through formats.kohya.write_kohya_file: a temporary file renamed into place (nothing
    left behind), with the sshs_model_hash A1111 computes."""
    calls = []
    writer = convert.write_kohya_file

    def spy(path, state_dict, metadata, **kwargs):
        calls.append(path)
        return writer(path, state_dict, metadata, **kwargs)

    monkeypatch.setattr(convert, "write_kohya_file", spy)
    out = tmp_path / "out" / "style_bf16.safetensors"
    proc = run_cli("convert", sd1_loha, out, "--dtype", "bf16")
    assert calls == [out] and f"wrote {out} (226 modules, bfloat16)" in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["sshs_model_hash"] == addnet_hash_file(out)
        assert f.metadata()["ss_num_train_images"] == "120"  # the metadata is kept
    assert not hasattr(cli, "_write_kohya")


def test_file_system_errors_print_the_path(tmp_path, sd1_loha):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli("convert", sd1_loha, blocker / "out.safetensors", check=False)
    assert proc.returncode == 1 and str(blocker) in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("loha-diffusion convert: error: ")


def test_user_errors_print_one_message_and_exit_1(monkeypatch, sd1_loha):
    import loha_diffusion.formats.kohya as kohya_format

    def broken(path):
        raise KohyaFormatError(f"{path}: a planted problem; fix it like this.")

    monkeypatch.setattr(kohya_format, "read_kohya", broken)
    proc = run_cli("inspect", sd1_loha, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == f"loha-diffusion inspect: error: {sd1_loha}: a planted problem; fix it like this.\n"
    assert issubclass(cli.CLIError, cli.LoHaDiffusionError)  # CLIError still importable from cli


def test_programming_errors_are_not_swallowed(monkeypatch, sd1_loha):
    """A bug (here a TypeError) surfaces with its traceback instead of a one-line 'error:' message."""
    import loha_diffusion.formats.kohya as kohya_format

    def buggy(path):
        raise TypeError("a planted bug")

    monkeypatch.setattr(kohya_format, "read_kohya", buggy)
    with pytest.raises(TypeError, match="a planted bug"):
        cli.main(["inspect", str(sd1_loha)])


def test_inspect_warns_and_verify_fails_on_non_finite_and_overflowing_values(
    tmp_path, capsys, sd1_loha, tiny_sd1_pipeline_dir
):
    """NaN/Inf factors, an alpha loaders cannot use, and a delta beyond float16's range (Inf in ComfyUI/A1111
    at half precision): inspect lists them as warnings (exit 1), verify FAILs the module."""
    tensors = load_file(str(sd1_loha))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".hada_w1_a")})
    nan, huge, bad_alpha = names[:3]
    tensors[f"{nan}.hada_w2_a"] = tensors[f"{nan}.hada_w2_a"].clone()
    tensors[f"{nan}.hada_w2_a"][0, 0] = float("nan")
    tensors[f"{huge}.hada_w1_a"] = tensors[f"{huge}.hada_w1_a"] * 1e9  # finite factors, delta > 65,504
    tensors[f"{bad_alpha}.alpha"] = torch.tensor(-4.0)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))

    assert cli.main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    warnings_part = out.split("warnings:")[1]
    assert "3 (NaN/Inf or overflowing values" in warnings_part
    assert f"{nan}: NaN or infinite values in ['hada_w2_a']" in warnings_part
    assert re.search(rf"{huge}: the delta reaches \S+, beyond float16's range \(65504\)", warnings_part)
    assert f"{bad_alpha}: alpha -4 is negative" in warnings_part

    assert cli.main(["verify", str(bad), "--pipeline", str(tiny_sd1_pipeline_dir), "--failures-only"]) == 1
    out = capsys.readouterr().out
    fails = {line.split()[1]: line for line in out.splitlines() if line.startswith("FAIL  lora_")}
    assert set(fails) == {nan, huge, bad_alpha}
    assert "NaN or infinite values" in fails[nan] and "alpha -4 is negative" in fails[bad_alpha]
    assert "beyond the range of float16/float32 (65504)" in fails[huge]
    assert "FAIL: 223/226 modules" in out


def test_inspect_and_verify_of_empty_files(tmp_path, capsys, tiny_sd1_pipeline_dir):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    no_modules = tmp_path / "no_modules.safetensors"
    save_file({}, str(no_modules), metadata={"ss_network_module": "networks.lora"})
    for command in (["inspect"], ["verify", "--pipeline", str(tiny_sd1_pipeline_dir)]):
        assert cli.main([command[0], str(empty), *command[1:]]) == 1
        err = capsys.readouterr().err
        assert f"{empty} is empty (0 bytes)" in err and "Traceback" not in err
    assert cli.main(["inspect", str(no_modules)]) == 1
    assert f"{no_modules} holds no adapter modules" in capsys.readouterr().err
    assert cli.main(["verify", str(no_modules), "--pipeline", str(tiny_sd1_pipeline_dir)]) == 1
    assert f"FAIL  file: {no_modules} holds no adapter modules" in capsys.readouterr().out
