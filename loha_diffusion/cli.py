"""The `loha-diffusion` command: inspect, convert, merge, verify and try adapter files; write tiny pipelines.

Every subcommand has `--help` with examples. Errors print one message that names the file and the fix, and
the exit status is 1 (2 for command-line usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

PROG = "loha-diffusion"
PARTS = {"lora_unet": "unet", "lycoris": "unet", "lora_te": "te", "lora_te1": "te1", "lora_te2": "te2"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


# -- helpers ---------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Keep library chatter (torchvision hints, progress bars of loading) out of the command's output."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


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
            f"{path} is not a diffusers pipeline folder (no model_index.json). Use a folder written by "
            f"`save_pretrained` or `{PROG} make-tiny`."
        )
    return path


def _load_pipeline(path: Path, dtype_name: str | None = None, device: str | None = None):
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": _torch_dtype(dtype_name)} if dtype_name else {}
    with warnings.catch_warnings():
        # diffusers >= 0.36 renames torch_dtype to dtype; the old name works in every supported version.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device:
        pipe.to(device)
    return pipe


def skeleton_models(pipeline: Path | None, arch: str | None) -> dict[str, Any]:
    """Models with a base's module names and weight shapes but no weights (meta device, built in well under a
    second): from a pipeline folder's configs, else the real SD1.5 / SDXL configs for `arch`."""
    import torch
    import transformers
    from diffusers import UNet2DConditionModel

    from . import tiny

    if pipeline is None:
        if arch not in ("sd1", "sdxl"):
            raise CLIError(
                "Cannot tell which base model the file is for (no ss_base_model_version, ambiguous names); "
                "pass --pipeline DIR with the base model's diffusers folder."
            )
        models = {
            "unet": tiny.build_unet_from_config(tiny.full_size_unet_config(arch)),
            "text_encoder": tiny.build_full_size_text_encoder(arch, 1),
        }
        if arch == "sdxl":
            models["text_encoder_2"] = tiny.build_full_size_text_encoder(arch, 2)
        return models
    index = json.loads((pipeline / "model_index.json").read_text())
    models = {}
    with torch.device("meta"):
        models["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(pipeline / "unet"))
        for component in ("text_encoder", "text_encoder_2"):
            library, class_name = (index.get(component) or [None, None])[:2]
            if class_name is None:
                continue
            cls = getattr(transformers, class_name, None)
            if library != "transformers" or cls is None:
                raise CLIError(
                    f"{pipeline}: {component} is a {library}.{class_name}, not a transformers model."
                )
            config = transformers.AutoConfig.from_pretrained(pipeline / component)
            models[component] = cls(config)
    return models


def kohya_targets(kfile, models: dict[str, Any]) -> dict[str, Any]:
    """`{module name: ModuleTarget}` for the modules of `kfile` that name a layer of `models`."""
    from .formats.kohya import kohya_name_map

    names = kohya_name_map(**models)
    return {name: names[name] for name in kfile.modules if name in names}


# -- the plain formulas of kohya-format.md section 3-5 (independent of our adapter classes) ----------


def reference_delta(tensors: dict[str, Any], alpha: float | None, weight_shape: tuple[int, ...]):
    """ΔW of one file module in float64, straight from the tensors with the loaders' formulas (einsum for CP),
    scale `alpha / rank` (1 without alpha; LoKr: only when a half is factorized)."""
    import torch

    t = {k: v.to(torch.float64) for k, v in tensors.items()}
    kernel = tuple(weight_shape[2:])
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1 = torch.einsum("o r, r i -> o i", t["hada_w1_a"], t["hada_w1_b"])
            m2 = torch.einsum("o r, r i -> o i", t["hada_w2_a"], t["hada_w2_b"])
        delta = (m1 * m2).reshape(weight_shape)
    elif "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in t:
            delta = torch.einsum(
                "o a, a b h w, b i -> o i h w", up.flatten(1), t["lora_mid.weight"], down.flatten(1)
            )
        else:
            delta = torch.einsum("o r, r i -> o i", up.flatten(1), down.flatten(1)).reshape(weight_shape)
    elif "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)).reshape(t["lokr_w2_a"].shape[0], -1, *kernel)
        if kernel and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *kernel)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        # torch.kron raises on some non-contiguous inputs (e.g. einsum outputs).
        delta = torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight_shape)
        ranks = [t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t]
        rank = ranks[-1] if ranks else None
        return delta * (alpha / rank if alpha is not None and rank else 1.0)
    else:
        raise ValueError(f"no LoHa, LoRA or LoKr tensors in {sorted(t)}")
    return delta * (alpha / rank if alpha is not None else 1.0)


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


def _number(value: float) -> str:
    return f"{value:g}"


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
    print(f"file:        {path} ({_human_size(path.stat().st_size)})")
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
    alphas = Counter("none (scale 1)" if m.alpha is None else _number(m.alpha) for m in modules)
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
        return 1
    return 0


# -- verify ----------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .adapters import LayerSpec
    from .formats import naming

    kfile = _read_kohya(args.file)
    models = skeleton_models(_pipeline_dir(args.pipeline), None)
    targets = kohya_targets(kfile, models)
    rows, failures = [], 0
    for name, module in kfile.modules.items():
        target = targets.get(name)
        where = f"{target.component}.{target.path}" if target else "-"
        status, detail = "PASS", ""
        if module.problems:
            status, detail = "FAIL", "; ".join(module.problems)
        elif target is None:
            status, detail = "FAIL", "no module of this base model has this name"
        else:
            shape = tuple(target.layer.weight.shape)
            try:
                ours = module.to_adapter(LayerSpec.from_module(target.layer)).delta_weight().detach()
                plain = reference_delta(module.tensors, module.alpha, shape)
            except (ValueError, RuntimeError) as err:
                status, detail = "FAIL", f"does not fit weight {shape}: {err}"
            else:
                peak = plain.abs().max().item()
                diff = (ours.double() - plain).abs().max().item()
                rel = diff / peak if peak > 0 else diff
                detail = f"max|dW| {peak:.3g}  rel.diff {rel:.1e}"
                if not math.isfinite(rel) or rel > args.rtol:
                    status = "FAIL"
        failures += status == "FAIL"
        rows.append((status, name, where, module.kind, detail))
    width = max(len(r[1]) for r in rows)
    print(f"{'':4}  {'MODULE':<{width}}  {'KIND':<5} TARGET  CHECK")
    for status, name, where, kind, detail in rows:
        if args.failures_only and status == "PASS":
            continue
        print(f"{status}  {name:<{width}}  {kind:<5} {where}  {detail}")
    module_failures = failures
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


def _svd_lora(delta, rank: int):
    """Best rank-`rank` factors of ΔW (Eckart-Young): `up (out, k)`, `down (k, in·kh·kw)` with the singular
    values split evenly, and the relative Frobenius error of the approximation."""
    import torch

    matrix = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up, down = u[:, :k] * root, root[:, None] * vh[:k]
    norm = matrix.norm().item()
    err = (matrix - up @ down).norm().item()
    return up, down, (err / norm if norm > 0 else 0.0), norm, err


def _lora_tensors(up, down, weight_shape: tuple[int, ...], dtype) -> dict[str, Any]:
    """Kohya LoRA/LoCon layout: Linear 2-D; conv `lora_down (k, in, kh, kw)`, `lora_up (out, k, 1, 1)`."""
    k = up.shape[1]
    if len(weight_shape) > 2:
        down = down.reshape(k, *weight_shape[1:])
        up = up.reshape(*up.shape, *([1] * (len(weight_shape) - 2)))
    return {"lora_down.weight": down.to(dtype).contiguous(), "lora_up.weight": up.to(dtype).contiguous()}


def _write_kohya(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    from safetensors.torch import save as safetensors_save

    from .formats.kohya import addnet_hash

    metadata = dict(metadata)
    metadata.pop("sshs_legacy_hash", None)
    metadata["sshs_model_hash"] = addnet_hash(safetensors_save(tensors))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_save(tensors, metadata=metadata))


def _renamed(kfile, style: str | None, models: dict[str, Any] | None) -> dict[str, str]:
    """New module names: UNet names in `style` ("diffusers" | "ldm"), text-encoder names in the portable
    `text_model_` form; unchanged without a style."""
    from .formats import naming

    if style is None:
        return {name: name for name in kfile.modules}
    targets = kohya_targets(kfile, models)
    missing = [n for n in kfile.modules if n not in targets]
    if missing:
        raise CLIError(
            f"{len(missing)} modules of {kfile.path} name no layer of the base model (e.g. {missing[0]}); "
            "pass --pipeline DIR of the model the file was made for."
        )
    layout = naming.UNetLayout.from_config(models["unet"])
    out = {}
    for name, target in targets.items():
        module = kfile.modules[name]
        if target.component == "unet":
            out[name] = naming.unet_kohya_name(target.path, style, layout)
        else:
            out[name] = naming.text_encoder_kohya_name(target.path, module.prefix)
    return out


def _stand_in_weights(models: dict[str, Any], paths: dict[str, set[str]]) -> None:
    """Give the named meta-device layers a CPU weight of the right shape that stores one number (an expanded
    scalar): importers need the layers' shapes and device, never their values."""
    import torch
    from torch import nn

    for component, component_paths in paths.items():
        for path in component_paths:
            layer = models[component].get_submodule(path)
            if layer.weight.is_meta:
                stand_in = torch.zeros((), dtype=torch.float32).expand(layer.weight.shape)
                layer.weight = nn.Parameter(stand_in, requires_grad=False)


def _peft_paths(src: Path, models: dict[str, Any]) -> dict[str, set[str]]:
    """Module paths of each PEFT adapter folder under `src` (or of `src` itself), by component."""
    from .formats.peft import read_peft

    def module_path(key: str) -> str:
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_mid.weight"):
            if key.endswith(suffix):
                return key[: -len(suffix)]
        return key.rpartition(".")[0]

    folders = {c: src / c for c in models if (src / c / "adapter_config.json").is_file()}
    if (src / "adapter_config.json").is_file():
        folders = {c: src for c in models}  # one adapter folder: load_peft picks the component that fits
    if not folders:
        raise CLIError(
            f"{src} holds no PEFT adapter (adapter_config.json in it or in unet/, text_encoder/, "
            "text_encoder_2/ subfolders)."
        )
    paths = {}
    for component, folder in folders.items():
        _, state = read_peft(folder)
        names = {name for name, _ in models[component].named_modules()}
        paths[component] = {p for p in map(module_path, state) if p in names}
    return paths


def _peft_dtype(src: Path):
    from safetensors import safe_open

    for weights in sorted(src.rglob("adapter_model.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                return f.get_slice(key).get_dtype()
    return None


def _convert_peft(args: argparse.Namespace, src: Path, dst: Path, to_peft: bool) -> int:
    """Kohya -> PEFT folders, or PEFT folders -> Kohya, through models with stand-in weights."""
    import torch

    from .formats.kohya import load_kohya
    from .formats.peft import load_peft, peft_to_kohya, save_peft

    pipeline = _pipeline_dir(args.pipeline) if args.pipeline else None
    dtype = _torch_dtype(args.dtype) if args.dtype else None
    if src.is_dir():
        arch = args.arch or ("sdxl" if (src / "text_encoder_2").is_dir() else None)
        if pipeline is None and arch is None:
            raise CLIError(
                "Pass --pipeline DIR or --arch sd1|sdxl: a PEFT folder does not say its base model."
            )
        models = skeleton_models(pipeline, arch)
        _stand_in_weights(models, _peft_paths(src, models))
        if to_peft:
            load_peft(src, adapter_name="convert", **models)
        else:
            if dtype is None:
                file_dtype = _peft_dtype(src)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(str(file_dtype), torch.float32)
            peft_to_kohya(src, dst, dtype=dtype, unet_naming=args.unet_names or "auto", **models)
            print(f"wrote {dst} from the PEFT adapter in {src} ({str(dtype).replace('torch.', '')})")
            return 0
    else:
        kfile = _read_kohya(src)
        models = skeleton_models(pipeline, args.arch or kfile.guess_architecture())
        paths: dict[str, set[str]] = {}
        for target in kohya_targets(kfile, models).values():
            paths.setdefault(target.component, set()).add(target.path)
        _stand_in_weights(models, paths)
        try:
            load_kohya(kfile, adapter_name="convert", **models)
        except ValueError as err:
            hint = (
                "" if pipeline else f"\nhint: pass --pipeline DIR of the base model {src.name} was made for."
            )
            raise CLIError(f"{err}{hint}") from None
    if dtype is None and not src.is_dir():
        dtype = next(iter(kfile.modules.values())).dtype
    save_peft(dst, adapter_name="convert", dtype=dtype, **models)
    written = sorted(p.parent.name for p in dst.rglob("adapter_config.json"))
    print(f"wrote PEFT adapter folders {', '.join(written)} under {dst}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    _quiet_libraries()
    src, dst = Path(args.input), Path(args.output)
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
    if src.is_dir() or to == "peft":
        return _convert_peft(args, src, dst, to_peft=to == "peft")

    kfile = _read_kohya(src)
    if kfile.all_problems:
        raise CLIError(
            f"{src} has problems; run `{PROG} inspect {src}`:\n  " + "\n  ".join(kfile.all_problems[:10])
        )
    pipeline = _pipeline_dir(args.pipeline) if args.pipeline else None
    needs_model = to == "lora" or args.unet_names is not None
    models = skeleton_models(pipeline, args.arch or kfile.guess_architecture()) if needs_model else None
    if args.unet_names and (models is None or "text_encoder_2" not in models):
        raise CLIError("--unet-names applies to SDXL files only (SD1/SD2 files always use diffusers names).")
    names = _renamed(kfile, args.unet_names, models)
    first = next(iter(kfile.modules.values()))
    dtype = _torch_dtype(args.dtype) if args.dtype else first.dtype

    tensors: dict[str, torch.Tensor] = {}
    metadata = dict(kfile.metadata)
    if to == "lora":
        targets = kohya_targets(kfile, models)
        total_norm2 = total_err2 = 0.0
        print(f"{'relative error':>14}  module")
        for name, module in kfile.modules.items():
            target = targets.get(name)
            if target is None:
                raise CLIError(
                    f"{name} names no layer of the base model; pass --pipeline DIR of the model the file was made for."
                )
            shape = tuple(target.layer.weight.shape)
            try:
                delta = module.delta_weight(shape)
            except RuntimeError as err:
                raise CLIError(
                    f"{name} does not fit {target.component}.{target.path} {shape} ({err}); pass --pipeline DIR "
                    "of the model the file was made for."
                ) from None
            up, down, rel, norm, err = _svd_lora(delta, args.rank)
            total_norm2, total_err2 = total_norm2 + norm**2, total_err2 + err**2
            print(f"{rel:14.2e}  {names[name]}")
            for tensor_name, tensor in _lora_tensors(up, down, shape, dtype).items():
                tensors[f"{names[name]}.{tensor_name}"] = tensor
            tensors[f"{names[name]}.alpha"] = torch.tensor(float(up.shape[1]), dtype=dtype)
        total = math.sqrt(total_err2 / total_norm2) if total_norm2 > 0 else 0.0
        print(
            f"{total:14.2e}  TOTAL (sqrt of summed squared errors / summed squared norms), rank {args.rank}"
        )
        convs = any(
            t.dim() == 4 and t.shape[-1] > 1 for k, t in tensors.items() if k.endswith("lora_down.weight")
        )
        metadata.update(
            {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(args.rank),
                "ss_network_alpha": str(args.rank),
                "ss_network_args": json.dumps(
                    {"conv_dim": str(args.rank), "conv_alpha": str(args.rank)} if convs else {}
                ),
                "loha_diffusion.converted_from": f"{Counter(m.kind for m in kfile.modules.values()).most_common(1)[0][0]} ({src.name})",
                "loha_diffusion.svd_relative_error": f"{total:.3e}",
            }
        )
    else:
        for name, module in kfile.modules.items():
            for tensor_name, tensor in module.tensors.items():
                tensors[f"{names[name]}.{tensor_name}"] = tensor.to(dtype).contiguous()
            if module.alpha is not None:
                tensors[f"{names[name]}.alpha"] = torch.tensor(module.alpha, dtype=dtype)
    _write_kohya(dst, tensors, metadata)
    print(f"wrote {dst} ({len(kfile.modules)} modules, {str(dtype).replace('torch.', '')})")
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
    _quiet_libraries()
    from . import model as core
    from .pipeline import adapter_components

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"{out} exists and is not empty; choose a new folder or pass --overwrite.")
    source = _pipeline_dir(args.pipeline)
    pipe = _load_pipeline(source)
    names = _load_adapters(pipe, args.adapter)
    # Merge in fp32 (the loaded pipeline), then cast: rounding happens once, on the final weights.
    for module in adapter_components(pipe).values():
        core.merge_and_unload(module)
    if args.dtype:
        pipe.to(_torch_dtype(args.dtype))
    pipe.save_pretrained(out)
    print(f"wrote {out}: {source} with {', '.join(names)} merged into the weights")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    _quiet_libraries()
    pipe = _load_pipeline(_pipeline_dir(args.pipeline), args.dtype, args.device)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(
        f"wrote {out} ({image.width}x{image.height}, seed {args.seed}, adapters: {', '.join(names) or 'none'})"
    )
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .tiny import save_tiny_pipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"{out} exists and is not empty; choose a new folder or pass --overwrite.")
    save_tiny_pipeline(out, args.arch, seed=args.seed)
    print(f"wrote a tiny random-weight {args.arch} pipeline to {out} (64x64 images; not a real model)")
    return 0


# -- parser ----------------------------------------------------------------------------------------


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {PROG} {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `loha-diffusion` and its subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, convert, merge, verify and try LoHa/LoRA/LoKr adapter files for Stable Diffusion.",
        formatter_class=raw,
        epilog=_examples(
            "make-tiny ./tiny-sd",
            "inspect my_loha.safetensors",
            "verify my_loha.safetensors --pipeline ./tiny-sd",
            "generate --pipeline ./tiny-sd --adapter my_loha.safetensors:0.8 --prompt 'a photo of a cat' --out cat.png",
        )
        + "\nRun `loha-diffusion COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="summarize an adapter file (algorithm, modules, ranks, metadata)",
        formatter_class=raw,
        description="Summarize a Kohya/LyCORIS .safetensors adapter: algorithm(s), module count by part (unet, "
        "te, te1, te2) and block, ranks and alphas, dtype, base model version, parameter count, file size and "
        "the training facts in its metadata. Exit status 1 when the file has problems a loader would trip on.",
        epilog=_examples("inspect my_loha.safetensors"),
    )
    p.add_argument("file", help="a Kohya/LyCORIS .safetensors file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="check that a file fits a base model and that its deltas are what loaders compute",
        formatter_class=raw,
        description="Check every module of FILE against the base model in --pipeline: the name maps to a layer, "
        "the tensors fit its weight, and the delta our adapters compute equals the plain formula of the Kohya "
        "format (computed separately in float64). Prints a PASS/FAIL table; exit status 1 on any FAIL. Only the "
        "model configs are read (no weights are loaded).",
        epilog=_examples(
            "verify my_loha.safetensors --pipeline ./stable-diffusion-v1-5",
            "verify my_sdxl_loha.safetensors --pipeline ./sdxl-base --failures-only",
        ),
    )
    p.add_argument("file", help="a Kohya/LyCORIS .safetensors file")
    p.add_argument("--pipeline", required=True, metavar="DIR", help="diffusers folder of the base model")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance on max|ΔW| (default 1e-5)")
    p.add_argument("--failures-only", action="store_true", help="print only the FAIL rows and the summary")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "convert",
        help="change dtype or SDXL name style, or turn LoHa/LoKr into LoRA by truncated SVD",
        formatter_class=raw,
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
        "--dtype", choices=sorted(DTYPES), help="tensor dtype of the output (default: the input's)"
    )
    p.add_argument("--unet-names", choices=["ldm", "diffusers"], help="SDXL UNet name style of the output")
    p.add_argument("--pipeline", metavar="DIR", help="diffusers folder of the base model (module shapes)")
    p.add_argument("--arch", choices=["sd1", "sdxl"], help="without --pipeline: the real SD1.5/SDXL shapes")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "merge",
        help="write a diffusers pipeline folder with adapters baked into the weights",
        formatter_class=raw,
        description="Load the pipeline in --pipeline, apply each --adapter FILE[:scale] and write a plain "
        "diffusers folder with the deltas baked into the weights (merged in float32).",
        epilog=_examples(
            "merge --pipeline ./sd15 --adapter style.safetensors --out ./sd15-style",
            "merge --pipeline ./sd15 --adapter style.safetensors:0.7 --adapter face.safetensors:0.5 --out ./mix --dtype fp16",
        ),
    )
    p.add_argument("--pipeline", required=True, metavar="DIR", help="diffusers folder of the base model")
    p.add_argument("--adapter", action="append", required=True, metavar="FILE[:SCALE]", help="repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="save the merged weights in this dtype")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "generate",
        help="render one image with adapters for a quick look",
        formatter_class=raw,
        description="Load the pipeline in --pipeline, add each --adapter FILE[:scale] and render one image.",
        epilog=_examples(
            "generate --pipeline ./sd15 --adapter style.safetensors --prompt 'a red house' --out house.png",
            "generate --pipeline ./sdxl --adapter a.safetensors:0.8 --prompt 'a cat' --negative-prompt blurry "
            "--steps 30 --seed 7 --device cuda --dtype fp16 --out cat.png",
        ),
    )
    p.add_argument("--pipeline", required=True, metavar="DIR", help="diffusers folder of the base model")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:SCALE]", help="repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument("--device", help="cpu, cuda, mps, ... (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="run the pipeline in this dtype (default fp32)")
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "make-tiny",
        help="write a tiny random-weight pipeline for offline demos and tests",
        formatter_class=raw,
        description="Write a tiny diffusers pipeline with random weights and the real SD1.5 or SDXL block "
        "layout (UNet, VAE, CLIP text encoder(s), a tokenizer from a small vocabulary, scheduler). It makes "
        "64x64 noise-like images in well under a second on a CPU; module names match the real models.",
        epilog=_examples("make-tiny ./tiny-sd", "make-tiny ./tiny-sdxl --arch sdxl"),
    )
    p.add_argument("out", help="folder to write")
    p.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1", help="model layout (default sd1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loha-diffusion` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
