"""The `loha-diffusion` command: inspect, convert, merge, verify and try adapter files; write tiny pipelines.

Every subcommand has `--help` with examples. A user error (`LoHaDiffusionError`: a bad file, base model or
argument) prints one message that names the file and the fix, and a file-system error prints the path; the exit
status is then 1 (2 for command-line usage errors, as argparse does). Anything else is a bug and shows its
traceback. The work is done by library modules (`formats.convert`, `formats.reference`, `meta_models`, ...);
this module parses arguments, prints and picks exit codes, and imports the heavy libraries only when a
subcommand needs them (start-up time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CLIError, LoHaDiffusionError
from .utils import PRECISIONS, human_size, torch_dtype

__all__ = ["CLIError", "build_parser", "main"]

PROG = "loha-diffusion"
PARTS = {"lora_unet": "unet", "lycoris": "unet", "lora_te": "te", "lora_te1": "te1", "lora_te2": "te2"}


# -- helpers ---------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Keep library chatter out of the command's output: the loading progress bars, and the exact messages
    `quiet.quiet_library_noise` lists (torchvision notice, diffusers' empty float32-modules warning). Every
    other warning of transformers and diffusers still shows."""
    import diffusers
    import transformers

    from .quiet import quiet_library_noise

    quiet_library_noise()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _read_kohya(path: str | Path):
    from .formats.kohya import read_kohya

    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{path} is a folder; this command reads a Kohya/LyCORIS .safetensors file.")
    if not path.exists():
        raise CLIError(f"{path}: no such file.")
    return read_kohya(path)


def _parse_adapter_arg(value: str) -> tuple[Path, float]:
    """`FILE` or `FILE:scale` (the scale is taken only when the text after the last ':' is a number)."""
    path, sep, scale = value.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(value), 1.0


def _pipeline_dir(value: str | Path) -> Path:
    path = Path(value)
    if not (path / "model_index.json").is_file():
        raise CLIError(
            f"{path} is not a diffusers pipeline folder (no model_index.json) nor a single-file checkpoint "
            f"(.safetensors/.ckpt). Use a folder written by `save_pretrained` or `{PROG} make-tiny`, or a base "
            "model file such as v1-5-pruned-emaonly.safetensors."
        )
    return path


def _base_source(args: argparse.Namespace) -> Any:
    """--pipeline as given: a diffusers folder (Path), or a single-file checkpoint (`single_file.CheckpointInfo`,
    configs from --model-config or the shipped ones, --model-arch / --prediction-type overriding detection)."""
    from . import single_file

    value = Path(os.path.expanduser(args.pipeline))
    if single_file.is_single_file(value):
        return single_file.inspect_checkpoint(
            value,
            arch=getattr(args, "model_arch", None),
            prediction_type=getattr(args, "prediction_type", None),
            config_dir=getattr(args, "model_config", None),
        )
    if value.suffix.lower() in single_file.SINGLE_FILE_SUFFIXES and not value.exists():
        raise CLIError(f"--pipeline {value}: no such file.")
    if getattr(args, "model_config", None) or getattr(args, "model_arch", None):
        raise CLIError(
            "--model-config and --model-arch are for a single-file --pipeline (.safetensors/.ckpt)."
        )
    return _pipeline_dir(value)


def _base_label(source: Any) -> Path:
    return getattr(source, "path", source)


def _config_folder(source: Any) -> Path:
    """The folder with the base model's configs: the pipeline folder, or a single file's config folder."""
    return getattr(source, "config_dir", source)


def _load_pipeline(source: Any, precision: str | None = None, device: str | None = None):
    from diffusers import DiffusionPipeline

    from . import single_file
    from .pipeline import from_pretrained_dtype

    if isinstance(source, single_file.CheckpointInfo):
        pipe = single_file.load_pipeline(source, torch_dtype=torch_dtype(precision) if precision else None)
    else:
        # `dtype` from diffusers 0.40 (`torch_dtype` then warns), `torch_dtype` before: no FutureWarning.
        kwargs = from_pretrained_dtype(torch_dtype(precision)) if precision else {}
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    if device:
        pipe.to(device)
    return pipe


def _base_models(pipeline: Any, arch: str | None) -> dict[str, Any]:
    """Weightless (meta-device) UNet and text encoder(s) of the base model: from the pipeline folder's (or the
    single file's config folder's) configs, else the real SD1.5 / SDXL configs for `arch`."""
    from .meta_models import meta_models

    if pipeline is None and arch not in ("sd1", "sdxl"):
        raise CLIError(
            "Cannot tell which base model the file is for (no ss_base_model_version, ambiguous names); "
            "pass --pipeline DIR with the base model's diffusers folder (or its single-file checkpoint)."
        )
    return meta_models(_config_folder(pipeline) if pipeline is not None else None, arch=arch)


@contextlib.contextmanager
def _base_model_hint(src: Path, pipeline: Any) -> Iterator[None]:
    """Add a hint about --pipeline to the format errors raised inside (a file and a base model that differ)."""
    try:
        yield
    except LoHaDiffusionError as err:
        if pipeline is None:
            hint = f"pass --pipeline DIR of the base model {src.name} was made for."
        else:
            hint = f"is {_base_label(pipeline)} the base model {src.name} was made for?"
        raise CLIError(f"{err}\nhint: {hint}") from None


# -- inspect ---------------------------------------------------------------------------------------


def _part(module) -> str:
    return PARTS.get(module.prefix, module.prefix)


def _block(module) -> str:
    """Where a module sits: a UNet block (`down_blocks.1`, `input_blocks.4`, `mid_block`, `conv_in`, ...) or a
    text-encoder layer (`layers.3`)."""
    rest = module.name[len(module.prefix) + 1 :]
    te = re.search(r"encoder_layers_(\d+)_", rest)
    if te:
        return f"layers.{te.group(1)}"
    block = re.match(r"(down_blocks|up_blocks|input_blocks|output_blocks)_(\d+)", rest)
    if block:
        return f"{block.group(1)}.{block.group(2)}"
    if rest.startswith(("mid_block", "middle_block")):
        return rest.split("_block")[0] + "_block"
    return re.match(r"[a-z]+(?:_[a-z]+)*", rest).group(0) if re.match(r"[a-z]", rest) else rest


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _counts(counter: Counter, unit: str = "") -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], _natural(str(kv[0]))))
    return ", ".join(f"{k}{unit} ({v})" for k, v in items)


def _fmt_timestamp(value: str) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(value)).isoformat(sep=" ", timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return value


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return None


METADATA_LABELS = {
    "ss_output_name": "output name",
    "ss_sd_model_name": "trained on",
    "ss_resolution": "resolution",
    "ss_num_train_images": "training images",
    "ss_num_reg_images": "regularization images",
    "ss_num_epochs": "epochs",
    "ss_epoch": "epoch",
    "ss_steps": "steps",
    "ss_max_train_steps": "max steps",
    "ss_batch_size_per_device": "batch size",
    "ss_learning_rate": "learning rate",
    "ss_unet_lr": "UNet learning rate",
    "ss_text_encoder_lr": "text-encoder learning rate",
    "ss_optimizer": "optimizer",
    "ss_lr_scheduler": "LR scheduler",
    "ss_clip_skip": "clip skip",
    "ss_mixed_precision": "mixed precision",
    "ss_seed": "seed",
    "ss_noise_offset": "noise offset",
    "ss_min_snr_gamma": "min-SNR gamma",
    "ss_training_started_at": "started",
    "ss_training_finished_at": "finished",
    "modelspec.title": "title",
    "modelspec.architecture": "architecture",
    "modelspec.date": "date",
    "modelspec.prediction_type": "prediction type",
}
_SHOWN_ELSEWHERE = {
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_v2",
    "ss_tag_frequency",
    "ss_dataset_dirs",
    "sshs_model_hash",
    "sshs_legacy_hash",
}


def _metadata_lines(meta: dict[str, str], path: Path) -> list[str]:
    lines = []
    if "ss_network_module" in meta:
        args = _json(meta.get("ss_network_args", "")) or {}
        facts = [meta["ss_network_module"]]
        facts += [
            f"{label} {meta[key]}"
            for key, label in (("ss_network_dim", "dim"), ("ss_network_alpha", "alpha"))
            if key in meta
        ]
        if isinstance(args, dict) and args:
            facts.append("args: " + ", ".join(f"{k}={v}" for k, v in args.items()))
        lines.append("  network: " + ", ".join(facts))
    for key, label in METADATA_LABELS.items():
        if meta.get(key) not in (None, "", "None"):
            value = meta[key]
            if key in ("ss_training_started_at", "ss_training_finished_at"):
                value = _fmt_timestamp(value)
            lines.append(f"  {label}: {value}")
    dirs = _json(meta.get("ss_dataset_dirs", ""))
    if isinstance(dirs, dict) and dirs:
        parts = [
            f"{d} ({info.get('img_count', '?')} images x {info.get('n_repeats', '?')} repeats)"
            if isinstance(info, dict)
            else str(d)
            for d, info in dirs.items()
        ]
        lines.append("  dataset: " + "; ".join(parts))
    tags = _json(meta.get("ss_tag_frequency", ""))
    if isinstance(tags, dict) and tags:
        total: Counter = Counter()
        for per_dir in tags.values():
            if isinstance(per_dir, dict):
                total.update({str(k).strip(): int(v) for k, v in per_dir.items() if str(v).isdigit()})
        top = ", ".join(f"{t} ({n})" for t, n in total.most_common(10))
        lines.append(f"  top tags ({len(total)} distinct): {top}")
    if "sshs_model_hash" in meta:
        from .formats.kohya import addnet_hash_file

        ok = addnet_hash_file(path) == meta["sshs_model_hash"]
        state = "matches the tensors" if ok else "DOES NOT match the tensors (file edited after saving?)"
        lines.append(f"  sshs_model_hash: {meta['sshs_model_hash'][:16]}... {state}")
    others = {k: v for k, v in meta.items() if k not in METADATA_LABELS and k not in _SHOWN_ELSEWHERE}
    for key, value in sorted(others.items()):
        value = value if len(value) <= 80 else value[:77] + "..."
        lines.append(f"  {key}: {value}")
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    """`inspect FILE`: print the summary; 1 when the file has problems a loader would trip on, or values that
    give NaN/Inf (non-finite factors, bad alphas, deltas beyond float16's range: printed as warnings).

    Raises:
        CLIError: FILE is missing, a folder or holds no modules. KohyaFormatError: FILE is not readable.
    """
    kfile = _read_kohya(args.file)
    path = Path(args.file)
    modules = list(kfile.modules.values())
    if not modules:
        raise CLIError(f"{path} holds no adapter modules.")
    meta = kfile.metadata
    version = meta.get("ss_base_model_version")
    guessed = kfile.guess_architecture()
    base = version or (f"{guessed} (guessed from the module names)" if guessed else "unknown")

    kinds = Counter(m.kind + (" (CP/Tucker)" if m.is_cp else "") for m in modules)
    parts = Counter(_part(m) for m in modules)
    print(f"file:        {path} ({human_size(path.stat().st_size)})")
    print(f"algorithm:   {_counts(kinds)}")
    print(f"base model:  {base}")
    print(f"dtype:       {', '.join(kfile.dtypes)}")
    print(f"modules:     {len(modules)}: {_counts(parts)}")
    for part in sorted(parts, key=_natural):
        blocks = Counter(_block(m) for m in modules if _part(m) == part)
        ordered = sorted(blocks.items(), key=lambda kv: _natural(kv[0]))
        text = ", ".join(f"{b} {n}" for b, n in ordered)
        print(textwrap.fill(text, 108, initial_indent=f"  {part:<5} ", subsequent_indent=" " * 8))
    print(f"ranks:       {_counts(Counter(m.rank for m in modules))}")
    alphas = Counter("none (scale 1)" if m.alpha is None else f"{m.alpha:g}" for m in modules)
    print(f"alphas:      {_counts(alphas)}")
    print(f"parameters:  {sum(m.num_params() for m in modules):,}")
    meta_lines = _metadata_lines(meta, path)
    print("metadata:" + ("" if meta_lines else "    none"))
    for line in meta_lines:
        print(line)
    problems = kfile.all_problems
    if problems:
        print(f"problems:    {len(problems)}")
        for problem in problems[:20]:
            print(f"  - {problem}")
    # What loads refuse by default (allow_non_finite): NaN/Inf, bad alphas, deltas beyond float16's range.
    from .formats.kohya.load import MAX_DELTA

    warned = kfile.value_problems + [
        f"{m.name}: the delta reaches {peak:.3g}, beyond float16's range ({MAX_DELTA:g}): Inf in half precision"
        for m in modules
        if not m.value_problems and (peak := m.peak_delta(MAX_DELTA)) > MAX_DELTA
    ]
    if warned:
        print(f"warnings:    {len(warned)} (NaN/Inf or overflowing values: loaders refuse or output Inf)")
        for warning in warned[:20]:
            print(f"  - {warning}")
    return 1 if problems or warned else 0


# -- verify ----------------------------------------------------------------------------------------


def _check_module(module, target, rtol: float) -> tuple[str, str]:
    """PASS/FAIL and the detail of one file module: it maps to a layer, fits it, has finite factors and a usable
    alpha, its ΔW fits float16 (and the base's dtype), and our adapter's ΔW equals the plain formula of the
    format (`formats.reference`, float64) within `rtol` of max|ΔW|."""
    import torch

    from .adapters import LayerSpec
    from .formats.reference import reference_delta

    if module.problems or module.value_problems:
        return "FAIL", "; ".join(module.problems + module.value_problems)
    if target is None:
        return "FAIL", "no module of this base model has this name"
    shape = tuple(target.layer.weight.shape)
    try:
        ours = module.to_adapter(LayerSpec.from_module(target.layer)).delta_weight().detach()
        plain = reference_delta(module.tensors, module.alpha, shape)
    except (
        ValueError,
        RuntimeError,
    ) as err:  # shapes that do not fit (ours: ValueError; torch: RuntimeError)
        return "FAIL", f"does not fit weight {shape}: {err}"
    peak = plain.abs().max().item()
    diff = (ours.double() - plain).abs().max().item()
    rel = diff / peak if peak > 0 else diff
    detail = f"max|dW| {peak:.3g}  rel.diff {rel:.1e}"
    # A delta beyond float16's range (or the base's dtype) is Inf in half precision (ComfyUI/A1111 default).
    dtype = target.layer.weight.dtype
    limit = min(
        torch.finfo(torch.float16).max, torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    )
    if not math.isfinite(peak) or peak > limit:
        dtype_name = str(dtype).removeprefix("torch.")
        return "FAIL", f"{detail}: beyond the range of float16/{dtype_name} ({limit:g})"
    status = "FAIL" if not math.isfinite(rel) or rel > rtol else "PASS"
    return status, detail


def cmd_verify(args: argparse.Namespace) -> int:
    """`verify FILE --pipeline DIR`: print the PASS/FAIL table; 1 on any FAIL (also for a file without
    modules, NaN/Inf factors, bad alphas, or a delta beyond float16's range or the base's dtype).

    Raises:
        CLIError: FILE or DIR is not what it should be (missing, not a pipeline folder).
    """
    _quiet_libraries()
    from .formats import naming
    from .formats.convert import module_targets

    kfile = _read_kohya(args.file)
    models = _base_models(_base_source(args), None)
    targets = module_targets(kfile, models)
    rows = []
    for name, module in kfile.modules.items():
        target = targets.get(name)
        where = f"{target.component}.{target.path}" if target else "-"
        status, detail = _check_module(module, target, args.rtol)
        rows.append((status, name, where, module.kind, detail))
    if not rows:
        print(f"FAIL  file: {args.file} holds no adapter modules")
        for problem in kfile.problems:
            print(f"FAIL  file: {problem}")
        return 1
    width = max(len(r[1]) for r in rows)
    print(f"{'':4}  {'MODULE':<{width}}  {'KIND':<5} TARGET  CHECK")
    for status, name, where, kind, detail in rows:
        if not (args.failures_only and status == "PASS"):
            print(f"{status}  {name:<{width}}  {kind:<5} {where}  {detail}")
    module_failures = failures = sum(r[0] == "FAIL" for r in rows)
    for problem in kfile.problems:
        print(f"FAIL  file: {problem}")
        failures += 1
    file_arch, model_arch = kfile.guess_architecture(), naming.detect_architecture(models["unet"])
    if file_arch and model_arch and (file_arch == "sdxl") != (model_arch == "sdxl"):
        print(f"FAIL  base model: the file is for {file_arch}, the pipeline is {model_arch}-shaped")
        failures += 1
    print(
        f"{'FAIL' if failures else 'PASS'}: {len(rows) - module_failures}/{len(rows)} modules map to {args.pipeline} "
        f"and their deltas agree (ours vs the plain formula, rel. tolerance {args.rtol:g})"
    )
    return 1 if failures else 0


# -- convert ---------------------------------------------------------------------------------------


def _convert_target(args: argparse.Namespace, src: Path, dst: Path) -> str:
    """The output format ("kohya", "peft" or "lora") after checking the paths and options fit it."""
    if not src.exists():
        raise CLIError(f"{src}: no such file or folder.")
    if dst.exists() and not args.overwrite:
        raise CLIError(f"{dst} already exists; choose another output path or pass --overwrite.")
    to = args.to
    if to == "same":
        to = "kohya" if dst.suffix == ".safetensors" else "peft"
    if to in ("kohya", "lora") and dst.suffix != ".safetensors":
        raise CLIError(f"{dst}: a Kohya/LyCORIS output must be a .safetensors file.")
    if to == "peft" and dst.suffix:
        raise CLIError(f"{dst}: a PEFT output is a folder; give a path without a file extension.")
    if src.is_dir() and to == "lora":
        raise CLIError(f"--to lora reads a Kohya file; convert {src} to a .safetensors file first.")
    return to


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _convert_peft(args: argparse.Namespace, src: Path, dst: Path, to: str, pipeline: Any) -> int:
    """Kohya -> PEFT folders, PEFT folders -> Kohya (or -> PEFT), through weightless base models."""
    from .formats import convert

    dtype = torch_dtype(args.dtype) if args.dtype else None
    if src.is_dir():
        arch = args.arch or convert.guess_peft_architecture(src)
        if pipeline is None and arch is None:
            raise CLIError(
                "Pass --pipeline DIR or --arch sd1|sdxl: a PEFT folder does not say its base model."
            )
        models = _base_models(pipeline, arch)
        if to == "kohya":
            dtype = convert.peft_folder_to_kohya(src, dst, models, dtype=dtype, unet_names=args.unet_names)
            print(f"wrote {dst} from the PEFT adapter in {src} ({_dtype_name(dtype)})")
            return 0
        written = convert.peft_folder_to_peft(src, dst, models, dtype=dtype)
    else:
        kfile = _read_kohya(src)
        models = _base_models(pipeline, args.arch or kfile.guess_architecture())
        with _base_model_hint(src, pipeline):
            written = convert.kohya_to_peft_folders(kfile, dst, models, dtype=dtype)
    print(f"wrote PEFT adapter folders {', '.join(written)} under {dst}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`convert INPUT OUTPUT`: write OUTPUT through `formats.convert` and print what was written.

    Raises:
        CLIError: paths or options that do not fit (with the fix), a file with problems, a base model that
            does not fit (with a --pipeline hint). Other `LoHaDiffusionError`s and `OSError` from the library.
    """
    _quiet_libraries()
    from .formats.convert import convert_kohya

    src, dst = Path(args.input), Path(args.output)
    to = _convert_target(args, src, dst)
    pipeline = _base_source(args) if args.pipeline else None
    if src.is_dir() or to == "peft":
        return _convert_peft(args, src, dst, to, pipeline)
    kfile = _read_kohya(src)
    if kfile.all_problems:
        raise CLIError(
            f"{src} has problems; run `{PROG} inspect {src}`:\n  " + "\n  ".join(kfile.all_problems[:10])
        )
    models = None
    if to == "lora" or args.unet_names is not None:
        models = _base_models(pipeline, args.arch or kfile.guess_architecture())
    if args.unet_names and "text_encoder_2" not in models:
        raise CLIError("--unet-names applies to SDXL files only (SD1/SD2 files always use diffusers names).")
    if to == "lora":
        print(f"{'relative error':>14}  module")
    with _base_model_hint(src, pipeline):
        result = convert_kohya(
            kfile,
            dst,
            to=to,
            rank=args.rank,
            dtype=torch_dtype(args.dtype) if args.dtype else None,
            unet_names=args.unet_names,
            models=models,
            progress=(lambda name, rel: print(f"{rel:14.2e}  {name}")) if to == "lora" else None,
        )
    if to == "lora":
        print(
            f"{result.total_error:14.2e}  TOTAL (sqrt of summed squared errors / summed squared norms), "
            f"rank {args.rank}"
        )
    print(f"wrote {result.path} ({result.modules} modules, {_dtype_name(result.dtype)})")
    return 0


# -- merge / generate ------------------------------------------------------------------------------


def _load_adapters(pipe, values: list[str]) -> list[str]:
    from .pipeline import load_adapter

    names = []
    for value in values:
        path, scale = _parse_adapter_arg(value)
        if not path.exists():
            raise CLIError(f"Adapter file {path} does not exist.")
        names.append(load_adapter(pipe, path, scale=scale))
    return names


def cmd_merge(args: argparse.Namespace) -> int:
    """`merge --pipeline DIR --adapter FILE[:SCALE] ... --out DIR [--dtype P]`: write the merged pipeline folder,
    each component in the dtype the base model stores it in (or `--dtype`), and print what was written.

    Raises:
        CLIError: --out is not empty (without --overwrite) or is the base model's folder, DIR is not a
            pipeline, an adapter file is missing. `LoHaDiffusionError` from loading an adapter that does not
            fit; `OutputWriteError` when --out cannot be written (nothing is left half-written).
    """
    _quiet_libraries()
    from . import single_file
    from .pipeline import save_merged, stored_dtypes

    out = Path(args.out)
    source = _base_source(args)
    label = _base_label(source)
    if out.resolve() == label.resolve():
        raise CLIError(f"--out {out} is the base model's folder; write the merged model to a new folder.")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"{out} exists and is not empty; choose a new folder or pass --overwrite.")
    single = isinstance(source, single_file.CheckpointInfo)
    base = single_file.stored_dtypes(source) if single else stored_dtypes(source)
    wanted = {name: torch_dtype(args.dtype) for name in base} if args.dtype else base
    # Every merged weight is computed in fp32 from the loaded one and rounded once to the loaded dtype. Loading
    # in the base model's own dtype (half the memory of fp32 for an fp16 model) gives the same bits when that is
    # also the dtype written; anything else (mixed dtypes, a wider --dtype, .bin weights) loads in fp32.
    stored = set(base.values())
    precision = None
    if len(stored) == 1 and None not in stored:
        precision = next((p for p in PRECISIONS if torch_dtype(p) in stored), None)
        if args.dtype and args.dtype != precision:
            precision = None
    pipe = _load_pipeline(source, precision)
    names = _load_adapters(pipe, args.adapter)
    written = save_merged(pipe, out, wanted)
    scales = [_parse_adapter_arg(value)[1] for value in args.adapter]
    merged = ", ".join(f"{name} ({scale:g})" for name, scale in zip(names, scales))
    print(f"wrote {out}: {label} with {merged} merged into the weights")
    for name, (dtype, size) in written.items():
        note = ""
        if base.get(name) is None:
            note = (
                "  (base dtype unknown: no .safetensors weights)"
                if not single
                else "  (base dtype unknown: .ckpt)"
            )
        elif base[name] != dtype:
            note = f"  (base model: {_dtype_name(base[name])})"
        print(f"  {name:<15} {_dtype_name(dtype):<9} {human_size(size):>10}{note}")
    print(f"  {'total':<15} {'':<9} {human_size(sum(size for _, size in written.values())):>10}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """`generate --pipeline DIR --prompt TEXT --out IMAGE`: render and save one image.

    Raises:
        CLIError: DIR is not a pipeline, an adapter file is missing, or IMAGE's suffix is not an image type
            (checked before anything loads). `LoHaDiffusionError` from loading an adapter that does not fit;
            `OutputWriteError` when IMAGE cannot be written (disk full, permissions).
    """
    import torch
    from PIL import Image

    from .files import atomic_path

    out = Path(args.out)
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format is None:
        raise CLIError(
            f"--out {out}: {out.suffix or 'no suffix'} is not an image type; use .png, .jpg or .webp"
        )
    _quiet_libraries()
    pipe = _load_pipeline(_base_source(args), args.dtype, args.device)
    names = _load_adapters(pipe, args.adapter)
    generator = torch.Generator(device=args.device or "cpu").manual_seed(args.seed)
    kwargs = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "generator": generator,
    }
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.width:
        kwargs["width"] = args.width
    if args.height:
        kwargs["height"] = args.height
    image = pipe(**kwargs).images[0]
    with atomic_path(out) as tmp:  # the temporary name has no image suffix: the format is given
        image.save(tmp, format=image_format)
    print(
        f"wrote {out} ({image.width}x{image.height}, seed {args.seed}, adapters: {', '.join(names) or 'none'})"
    )
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    """`make-tiny OUT`: write a tiny random-weight pipeline folder (whole or not at all: a killed run leaves no
    half folder).

    Raises:
        CLIError: OUT is a file, or a non-empty folder without --overwrite; with --overwrite, a non-empty
            folder that is not a diffusers pipeline folder (it would be replaced whole) or the current folder.
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} is a file; give a folder to write the tiny pipeline to.")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"{out} exists and is not empty; choose a new folder or pass --overwrite.")
        if not (out / "model_index.json").is_file():
            raise CLIError(
                f"{out} is not a diffusers pipeline folder (no model_index.json), and --overwrite replaces the "
                "folder whole; choose a new folder."
            )
        if out.resolve() in (Path.cwd(), *Path.cwd().parents):
            raise CLIError(f"{out} is the current folder (or holds it); choose another folder to replace.")
    _quiet_libraries()
    from .tiny import save_tiny_pipeline

    save_tiny_pipeline(out, args.arch, seed=args.seed)
    print(
        f"wrote a tiny {args.arch} pipeline with RANDOM weights to {out} (64x64 noise-like images): for offline "
        "demos and tests only, not a real base model"
    )
    return 0


# -- parser ----------------------------------------------------------------------------------------

RAW = argparse.RawDescriptionHelpFormatter


BASE_HELP = (
    "the base model: its diffusers folder, or a single-file checkpoint (.safetensors, or a .ckpt read "
    "weights-only) with configs from --model-config or the shipped SD1.5/SD2.1/SDXL ones"
)


def _add_single_file_options(p: argparse.ArgumentParser, prediction: bool = False) -> None:
    """Options for a single-file --pipeline (`single_file.inspect_checkpoint`'s overrides)."""
    p.add_argument(
        "--model-config",
        metavar="DIR",
        help="single-file base: a local diffusers folder with its configs and tokenizer (default: the shipped "
        "configs of the detected architecture)",
    )
    p.add_argument(
        "--model-arch",
        choices=["sd1", "sd2", "sdxl"],
        help="single-file base: override the detected architecture",
    )
    if prediction:
        p.add_argument(
            "--prediction-type",
            choices=["epsilon", "v_prediction"],
            help="single-file base: override the detected prediction type (SD2.x 512-base vs 768-v)",
        )


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {PROG} {line}" for line in lines)


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize an adapter file (algorithm, modules, ranks, metadata)",
        formatter_class=RAW,
        description="Summarize a Kohya/LyCORIS .safetensors adapter: algorithm(s), module count by part (unet, "
        "te, te1, te2) and block, ranks and alphas, dtype, base model version, parameter count, file size and "
        "the training facts in its metadata. Exit status 1 when the file has problems a loader would trip on, "
        "or NaN/Inf factors, bad alphas or deltas beyond float16's range (listed as warnings).",
        epilog=_examples("inspect my_loha.safetensors"),
    )
    p.add_argument("file", help="a Kohya/LyCORIS .safetensors file")
    p.set_defaults(func=cmd_inspect)


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check that a file fits a base model and that its deltas are what loaders compute",
        formatter_class=RAW,
        description="Check every module of FILE against the base model in --pipeline: the name maps to a layer, "
        "the tensors fit its weight and are finite, its alpha is a usable number, the delta fits float16 (and "
        "the base's dtype), and the delta our adapters compute equals the plain formula of the Kohya "
        "format (computed separately in float64). Prints a PASS/FAIL table; exit status 1 on any FAIL. Only the "
        "model configs are read (no weights are loaded).",
        epilog=_examples(
            "verify my_loha.safetensors --pipeline ./stable-diffusion-v1-5",
            "verify my_sdxl_loha.safetensors --pipeline ./sdxl-base --failures-only",
            "verify my_loha.safetensors --pipeline ./v1-5-pruned-emaonly.safetensors",
        ),
    )
    p.add_argument("file", help="a Kohya/LyCORIS .safetensors file")
    p.add_argument("--pipeline", required=True, metavar="BASE", help=BASE_HELP)
    _add_single_file_options(p)
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance on max|ΔW| (default 1e-5)")
    p.add_argument("--failures-only", action="store_true", help="print only the FAIL rows and the summary")
    p.set_defaults(func=cmd_verify)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="change dtype or SDXL name style, or turn LoHa/LoKr into LoRA by truncated SVD",
        formatter_class=RAW,
        description="Convert between a Kohya/LyCORIS file and PEFT adapter folders (unet/, text_encoder/, "
        "text_encoder_2/, each with adapter_config.json + adapter_model.safetensors), or rewrite a Kohya file: "
        "another dtype (--dtype), the other SDXL UNet name style "
        "(--unet-names; text-encoder names become the portable text_model_ form), or a plain LoRA of rank N "
        "(--to lora --rank N) made from the best rank-N approximation (truncated SVD) of each module's delta, "
        "printing each module's relative error and the total, so LoRA-only tools (diffusers load_lora_weights, "
        "older UIs) can use a LoHa. The module shapes come from --pipeline, or for real SD1.5/SDXL files from "
        "the standard configs.",
        epilog=_examples(
            "convert my_loha.safetensors my_lora.safetensors --to lora --rank 16",
            "convert my_loha.safetensors my_loha_fp16.safetensors --dtype fp16",
            "convert my_loha.safetensors ./my_loha_peft --pipeline ./sd15   (Kohya -> PEFT folders)",
            "convert ./my_loha_peft my_loha.safetensors --arch sd1          (PEFT folders -> Kohya)",
            "convert sdxl_diffusers_names.safetensors sdxl_kohya.safetensors --unet-names ldm",
            "convert tiny_loha.safetensors tiny_lora.safetensors --to lora --rank 4 --pipeline ./tiny-sd",
        ),
    )
    p.add_argument("input", help="a Kohya/LyCORIS .safetensors file or a PEFT adapter folder")
    p.add_argument("output", help="a .safetensors file (Kohya) or a folder (PEFT) to write")
    p.add_argument(
        "--to",
        choices=["same", "kohya", "peft", "lora"],
        default="same",
        help="output format: kohya, peft, or lora (Kohya LoRA by truncated SVD); default: from OUTPUT's suffix",
    )
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for --to lora (default 16)")
    p.add_argument(
        "--dtype", choices=sorted(PRECISIONS), help="tensor dtype of the output (default: the input's)"
    )
    p.add_argument("--unet-names", choices=["ldm", "diffusers"], help="SDXL UNet name style of the output")
    p.add_argument("--pipeline", metavar="BASE", help=BASE_HELP + " (module shapes)")
    _add_single_file_options(p)
    p.add_argument("--arch", choices=["sd1", "sdxl"], help="without --pipeline: the real SD1.5/SDXL shapes")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="write a diffusers pipeline folder with adapters baked into the weights",
        formatter_class=RAW,
        description="Load the pipeline in --pipeline, apply each --adapter FILE[:scale] and write a plain "
        "diffusers folder with the deltas baked into the weights. Each weight is merged in float32 and rounded "
        "once to the dtype the base model stores it in (an fp16 model stays fp16), or to --dtype. The folder "
        "appears complete or not at all; the command prints each component's dtype and size.",
        epilog=_examples(
            "merge --pipeline ./sd15 --adapter style.safetensors --out ./sd15-style",
            "merge --pipeline ./my_model.safetensors --model-config ./sd15 --adapter style.safetensors --out ./mix",
            "merge --pipeline ./sd15 --adapter style.safetensors:0.7 --adapter face.safetensors:0.5 --out ./mix --dtype fp16",
        ),
    )
    p.add_argument("--pipeline", required=True, metavar="BASE", help=BASE_HELP)
    _add_single_file_options(p, prediction=True)
    p.add_argument("--adapter", action="append", required=True, metavar="FILE[:SCALE]", help="repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument(
        "--dtype",
        choices=sorted(PRECISIONS),
        help="write every component in this dtype (default: each in the dtype of the base model's files)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_merge)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="render one image with adapters for a quick look",
        formatter_class=RAW,
        description="Load the pipeline in --pipeline, add each --adapter FILE[:scale] and render one image.",
        epilog=_examples(
            "generate --pipeline ./sd15 --adapter style.safetensors --prompt 'a red house' --out house.png",
            "generate --pipeline ./sd_xl_base_1.0.safetensors --prompt 'a cat' --out cat.png",
            "generate --pipeline ./sdxl --adapter a.safetensors:0.8 --prompt 'a cat' --negative-prompt blurry "
            "--steps 30 --seed 7 --device cuda --dtype fp16 --out cat.png",
        ),
    )
    p.add_argument("--pipeline", required=True, metavar="BASE", help=BASE_HELP)
    _add_single_file_options(p, prediction=True)
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:SCALE]", help="repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument("--device", help="cpu, cuda, mps, ... (default cpu)")
    p.add_argument(
        "--dtype", choices=sorted(PRECISIONS), help="run the pipeline in this dtype (default fp32)"
    )
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg)")
    p.set_defaults(func=cmd_generate)


def _add_make_tiny(sub) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write a tiny random-weight pipeline for offline demos and tests",
        formatter_class=RAW,
        description="Write a tiny diffusers pipeline with RANDOM weights and the real SD1.5 or SDXL block "
        "layout (UNet, VAE, CLIP text encoder(s), a tokenizer from a small vocabulary, scheduler). It makes "
        "64x64 noise-like images in well under a second on a CPU; module names match the real models. For "
        "offline demos and tests only: it is no base model to train real adapters on. The folder is written "
        "whole or not at all.",
        epilog=_examples("make-tiny ./tiny-sd", "make-tiny ./tiny-sdxl --arch sdxl"),
    )
    p.add_argument("out", help="folder to write")
    p.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1", help="model layout (default sd1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing pipeline folder (written whole)"
    )
    p.set_defaults(func=cmd_make_tiny)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `loha-diffusion` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, convert, merge, verify and try LoHa/LoRA/LoKr adapter files for Stable Diffusion.",
        formatter_class=RAW,
        epilog=_examples(
            "make-tiny ./tiny-sd",
            "inspect my_loha.safetensors",
            "verify my_loha.safetensors --pipeline ./tiny-sd",
            "generate --pipeline ./tiny-sd --adapter my_loha.safetensors:0.8 --prompt 'a photo of a cat' --out cat.png",
        )
        + "\nRun `loha-diffusion COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_inspect, _add_verify, _add_convert, _add_merge, _add_generate, _add_make_tiny):
        add(sub)
    return parser


def _os_error_message(err: OSError) -> str:
    """An OSError as `PATH: reason` (both paths of a rename), else its own text."""
    if err.filename is None or not err.strerror:
        return str(err)
    paths = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
    return f"{paths}: {err.strerror}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loha-diffusion` console script; returns the exit status.

    User errors (`LoHaDiffusionError`) and file-system errors (`OSError`) print one line-led message on stderr
    and return 1; any other exception propagates (a bug: its traceback is the useful report). argparse exits
    with status 2 on usage errors and 0 after `--help`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except LoHaDiffusionError as err:
        # Before OSError: OutputWriteError (disk full, no permission) is both, and its message names the file,
        # the space and the fix; NonFiniteError (also a FloatingPointError) names the modules.
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"{PROG} {args.command}: error: {_os_error_message(err)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
