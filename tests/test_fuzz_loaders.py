"""Fuzzing the loaders (issue 10): mutated Kohya files and PEFT folders through every entry point.

A fixed seed builds a few hundred mutants of small valid files (Kohya LoHa, LoRA and LoKr files of the tiny SD1
pipeline, and LoHa/LoRA PEFT pipeline folders): truncation, header corruption, odd shapes and dtypes, NaN/Inf
and huge values, odd alphas, config fields of the wrong type or range, missing files. Each goes through
`read_kohya`, `load_kohya`, `pipeline.load_adapter`, `load_peft` and `loha-diffusion inspect` / `verify`.

Asserted for every case: a failure is a `LoHaDiffusionError` whose message names the file; the pipeline's
weights, `requires_grad` flags and adapter list are unchanged after a failure; after a success every adapter
tensor and delta is finite; a file with NaN/Inf or overflowing values is reported by `inspect` and fails
`verify`; no case takes more than `CASE_LIMIT_S` (hang guard: a timer interrupts a case that runs away).

`LOHA_FUZZ_CASES=5000 pytest tests/test_fuzz_loaders.py -s` runs a larger campaign and prints its figures
(cases, outcomes by kind, slowest case).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loha_diffusion import cli, pipeline, tiny
from loha_diffusion.adapters import LayerSpec, LoKrAdapter
from loha_diffusion.errors import LoHaDiffusionError
from loha_diffusion.formats.kohya import load_kohya, read_kohya, save_kohya
from loha_diffusion.formats.peft import load_peft, save_peft
from loha_diffusion.model import adapter_layers, add_adapter, inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset

SEED = 10_2026
CASES = int(os.environ.get("LOHA_FUZZ_CASES", "250"))
VERIFY_SHARE = 0.3  # of the cases without bad values (those always run verify)
CASE_LIMIT_S = 10.0  # generous for a loaded 2-core CI machine; a hang (a 64 GB allocation) takes minutes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float64)
ODD_DTYPES = (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool)
ODD_ALPHAS = [float("nan"), float("inf"), float("-inf"), -4.0, 3e38, 1e5, 0.0, 65504.0]
ODD_VALUES = [
    None,
    True,
    False,
    -4,
    0,
    3,
    1_000_000,
    10**9,
    2.5,
    "x",
    "[(",
    "4",
    [],
    {},
    [1, "a"],
    ["to_q", 3],
    {"(": 4},
    {"to_q": "x"},
    {"to_q": 10**9},
    {"to_q": -1},
    {"to_q": True},
    float("nan"),
    float("inf"),
    1e300,
    -1e-3,
]
CONFIG_FIELDS = [
    "r",
    "alpha",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "peft_type",
    "use_effective_conv2d",
    "layers_to_transform",
    "layers_pattern",
    "rank_dropout",
    "module_dropout",
    "modules_to_save",
    "init_weights",
    "init_lora_weights",
    "use_dora",
]


# -- the valid files the mutants come from ---------------------------------------------------------------


def _lokr_file(path: Path, pipe) -> None:
    """A LoKr file (factorized w2, full w1; one conv with both halves full) written by save_kohya."""
    torch.manual_seed(1)
    unet = tiny.build_tiny_unet("sd1")
    forms = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": dict(decompose_w2=True),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": dict(decompose_w1=True),
        "down_blocks.0.resnets.0.conv2": dict(decompose_w2=False),
    }
    for module_path, kwargs in forms.items():
        spec = LayerSpec.from_module(unet.get_submodule(module_path))
        add_adapter(unet, module_path, "default", LoKrAdapter(spec, 2, 2.0, init_weights=False, **kwargs))
    save_kohya(path, unet=unet, dtype=torch.float32, model_hash=False)


def _peft_folder(path: Path, kind: str) -> None:
    torch.manual_seed(2)
    unet, te = tiny.build_tiny_unet("sd1"), tiny.build_tiny_text_encoder("sd1", 1)
    inject_adapter(unet, unet_preset("attn", algo=kind, r=2, init_weights=False))
    inject_adapter(te, text_encoder_preset(algo=kind, r=2, init_weights=False))
    save_peft(path, unet=unet, text_encoder=te)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from conftest import write_kohya_file

    root = tmp_path_factory.mktemp("fuzz_sources")
    pipe = tiny.build_tiny_pipeline("sd1")
    out = {
        "loha": root / "loha.safetensors",
        "lora": root / "lora.safetensors",
        "lokr": root / "lokr.safetensors",
        "peft_loha": root / "peft_loha",
        "peft_lora": root / "peft_lora",
    }
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2"}
    write_kohya_file(out["loha"], pipe, algo="loha", cp=True, metadata=meta)
    write_kohya_file(out["lora"], pipe, algo="lora", convs=False, metadata=meta)
    _lokr_file(out["lokr"], pipe)
    _peft_folder(out["peft_loha"], "loha")
    _peft_folder(out["peft_lora"], "lora")
    return out


# -- mutations: each writes one mutant under `dst` and returns its path and a label ---------------------


def _header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Damage a safetensors file at the byte level."""
    header, body = _header(data)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    choice = rng.randrange(11)
    if choice == 0:
        return data[: rng.randrange(len(data))], "truncated"
    if choice == 1:
        return b"", "empty"
    if choice == 2:
        size = rng.choice([0, 7, len(data), 2**40, 2**64 - 1])
        return struct.pack("<Q", size) + data[8:], "header length"
    if choice == 3:
        pos = rng.randrange(8, 8 + len(json.dumps(header)))
        return data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :], "header byte"
    if choice == 4:
        return data[:9] + b"\xff\xfe" + data[11:], "header not UTF-8"
    if choice == 5:
        header[key]["dtype"] = rng.choice(["I64", "BOOL", "U8", "F64", "F8_E4M3", "XX", 5])
        return _with_header(header, body), "header dtype"
    if choice == 6:
        header[key]["shape"] = rng.choice([[], [0], [10**9, 10**9], [-1], ["a"], [3, 5, 7]])
        return _with_header(header, body), "header shape"
    if choice == 7:
        header[key]["data_offsets"] = rng.choice([[0, 10**12], [5, 1], [-1, 4], [0], "x"])
        return _with_header(header, body), "header offsets"
    if choice == 8:
        header["__metadata__"] = rng.choice([[1, 2], {"a": 1}, {"ss_network_args": {"x": 1}}, "x"])
        return _with_header(header, body), "header metadata"
    if choice == 9:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "garbage"
    return data + bytes(rng.randrange(256) for _ in range(17)), "trailing bytes"


def mutate_tensors(
    tensors: dict[str, torch.Tensor], rng: random.Random, alphas: bool
) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Change the tensors of a state dict; the flag says whether the mutant holds values that must be
    refused by default (NaN/Inf, an overflowing delta or a bad alpha)."""
    factor_keys = [k for k in tensors if not k.endswith(".alpha")]
    key = rng.choice(factor_keys)
    t = tensors[key]
    choice = rng.randrange(10 if alphas else 8)
    if choice == 0:
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        tensors[key] = t
        return tensors, "NaN/Inf factor", True
    if choice == 1:
        tensors[key] = t * rng.choice([1e18, 1e30, 3e38])
        return tensors, "huge factor", True
    if choice == 2:
        tensors[key] = t.to(rng.choice(ODD_DTYPES))
        return tensors, "odd dtype", False
    if choice == 3:
        tensors[key] = t.to(rng.choice(FLOAT_DTYPES))
        return tensors, "other float dtype", False
    if choice == 4:
        shapes = [t.t() if t.dim() == 2 else t.squeeze(), t.unsqueeze(0), t.reshape(-1), t[:0], t.sum()]
        tensors[key] = rng.choice(shapes).contiguous()
        return tensors, "odd shape", False
    if choice == 5:
        del tensors[key]
        return tensors, "tensor removed", False
    if choice == 6:
        module = key.split(".")[0]
        tensors[
            rng.choice([f"{module}.hada_w3_a", "no_dot_key", f"{module}.lora_down.weight", "x.alpha"])
        ] = t
        return tensors, "extra key", False
    if choice == 7:
        tensors[key.replace("lora_", "lorb_", 1).replace("down_blocks", "downn_blocks")] = tensors.pop(key)
        return tensors, "renamed key", False
    alpha_keys = [k for k in tensors if k.endswith(".alpha")] or [key.split(".")[0] + ".alpha"]
    alpha_key = rng.choice(alpha_keys)
    if choice == 8:
        value = rng.choice(ODD_ALPHAS)
        tensors[alpha_key] = torch.tensor(value)
        bad = not (0 <= value <= 65504)
        return tensors, "odd alpha value", bad
    tensors[alpha_key] = rng.choice(
        [torch.tensor(True), torch.tensor(3), torch.ones(2), torch.ones(0), torch.tensor([[2.0]])]
    )
    return tensors, "odd alpha type", False


def mutate_config(text: str, rng: random.Random) -> tuple[bytes, str]:
    config = json.loads(text)
    choice = rng.randrange(8)
    if choice == 0:
        return text[: rng.randrange(len(text))].encode(), "config truncated"
    if choice == 1:
        return b"\xff\xfe\x00{", "config not UTF-8"
    if choice == 2:
        return rng.choice([b"[]", b"3", b'"x"', b"null", b""]), "config not an object"
    if choice == 3:
        return text.encode("utf-16"), "config UTF-16"
    field = rng.choice(CONFIG_FIELDS)
    config[field] = rng.choice(ODD_VALUES)
    try:
        return json.dumps(config).encode(), f"config {field}"
    except ValueError:
        return text.encode(), "config unchanged"


# -- running a case -----------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the timer inside a case that runs past the limit (not an Exception: nothing swallows it)."""


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` (a hang becomes a failure, not a stuck CI job). Where there is no
    interval timer (Windows), the per-case time check after the block is the only guard."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def interrupt(signum, frame):
        raise CaseTimeout(f"case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(pipe, copy: bool = True) -> tuple[dict[str, torch.Tensor], list[bool], dict]:
    """The pipeline's weights (copies unless `copy=False`), `requires_grad` flags and adapter list."""
    state = {}
    flags = []
    for name, component in pipeline.adapter_components(pipe).items():
        state.update({f"{name}.{k}": v.clone() if copy else v for k, v in component.state_dict().items()})
        flags += [p.requires_grad for p in component.parameters()]
    return state, flags, pipeline.list_adapters(pipe)


def changes(pipe, before) -> list[str]:
    """What differs from the snapshot `before`: weights (by key), requires_grad flags, the adapter list."""
    state, flags, adapters = snapshot(pipe, copy=False)
    old_state, old_flags, old_adapters = before
    found = [k for k in state.keys() | old_state.keys() if k not in state or k not in old_state]
    found += [k for k in state.keys() & old_state.keys() if not torch.equal(state[k], old_state[k])]
    if flags != old_flags:
        found.append(f"requires_grad of {sum(a != b for a, b in zip(flags, old_flags))} parameters")
    if adapters != old_adapters:
        found.append(f"adapters {adapters}")
    return sorted(found)


def finite_adapters(pipe) -> bool:
    """Every factor and delta of adapter "fz" is finite."""
    for component in pipeline.adapter_components(pipe).values():
        for layer in adapter_layers(component).values():
            if "fz" not in layer.adapters:
                continue
            adapter = layer.adapters["fz"]
            tensors = [*adapter.state_tensors().values(), adapter.delta_weight()]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                return False
    return True


class Campaign:
    def __init__(self, pipe, pipeline_dir: Path):
        self.pipe = pipe
        self.pipeline_dir = pipeline_dir
        self.before = snapshot(pipe)
        self.rng = random.Random(SEED + 1)
        self.outcomes: Counter = Counter()
        self.mutations: Counter = Counter()
        self.failures: list[str] = []
        self.slowest = (0.0, "")

    def call(self, label: str, entry: str, path: Path, fn: Callable[[], object]) -> str:
        """Run one entry point; record its outcome; return "ok", "refused" or "bug"."""
        try:
            fn()
        except LoHaDiffusionError as err:
            if str(path) not in str(err):
                self.failures.append(f"{label} / {entry}: message does not name {path}: {err}")
            changed = changes(self.pipe, self.before)
            if changed:
                self.failures.append(
                    f"{label} / {entry}: the pipeline changed after a refused load: {changed[:3]}"
                )
            self.outcomes[f"{entry}: {type(err).__name__}"] += 1
            return "refused"
        except Exception:
            self.failures.append(f"{label} / {entry}: {traceback.format_exc(limit=-3)}")
            self.outcomes[f"{entry}: BUG"] += 1
            return "bug"
        self.outcomes[f"{entry}: loaded"] += 1
        return "ok"

    def load(self, label: str, entry: str, path: Path, fn: Callable[[], object]) -> str:
        outcome = self.call(label, entry, path, fn)
        if outcome == "ok":
            if not finite_adapters(self.pipe):
                self.failures.append(f"{label} / {entry}: loaded non-finite factors or deltas silently")
            pipeline.delete_adapter(self.pipe, "fz")
            # A successful PEFT load freezes the base model (as PEFT's inject does); thaw it for the next case.
            params = [p for c in pipeline.adapter_components(self.pipe).values() for p in c.parameters()]
            for param, flag in zip(params, self.before[1]):
                param.requires_grad_(flag)
            changed = changes(self.pipe, self.before)
            if changed:
                self.failures.append(
                    f"{label} / {entry}: deleting the adapter did not restore: {changed[:3]}"
                )
        return outcome

    def cli(self, label: str, path: Path, args: list[str], must_fail: bool) -> None:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(args)
        except Exception:
            self.failures.append(f"{label} / cli {args[0]}: {traceback.format_exc(limit=-3)}")
            self.outcomes[f"cli {args[0]}: BUG"] += 1
            return
        self.outcomes[f"cli {args[0]}: exit {rc}"] += 1
        if err.getvalue() and str(path) not in err.getvalue():
            self.failures.append(f"{label} / cli {args[0]}: error does not name the file: {err.getvalue()}")
        if must_fail and rc != 1:
            self.failures.append(f"{label} / cli {args[0]}: exit {rc} for a file with bad values")

    def kohya_case(self, label: str, path: Path, bad_values: bool) -> None:
        """read_kohya, inspect, then load_kohya or pipeline.load_adapter (one of the two, by turns: they share
        the path from the file to the layers), and verify for a share of the cases."""
        pipe = self.pipe
        models = pipeline.adapter_components(pipe)
        self.call(label, "read_kohya", path, lambda: read_kohya(path))
        if self.rng.random() < 0.5:
            outcome = self.load(
                label, "load_kohya", path, lambda: load_kohya(path, adapter_name="fz", **models)
            )
        else:
            outcome = self.load(label, "load_adapter", path, lambda: pipeline.load_adapter(pipe, path, "fz"))
        if bad_values and outcome == "ok":
            self.failures.append(f"{label}: a file with bad values was loaded")
        self.cli(label, path, ["inspect", str(path)], bad_values)
        if bad_values or self.rng.random() < VERIFY_SHARE:  # verify builds the base models: the costly part
            self.cli(label, path, ["verify", str(path), "--pipeline", str(self.pipeline_dir)], bad_values)

    def peft_case(self, label: str, path: Path, bad_values: bool) -> None:
        """load_peft or pipeline.load_adapter (by turns)."""
        pipe = self.pipe
        models = pipeline.adapter_components(pipe)
        if self.rng.random() < 0.5:
            outcome = self.load(
                label, "load_peft", path, lambda: load_peft(path, adapter_name="fz", **models)
            )
        else:
            outcome = self.load(label, "load_adapter", path, lambda: pipeline.load_adapter(pipe, path, "fz"))
        if bad_values and outcome == "ok":
            self.failures.append(f"{label}: a folder with bad values was loaded")

    def run(self, label: str, case: Callable[[str, Path, bool], None], path: Path, bad: bool) -> None:
        start = time.perf_counter()
        try:
            with hang_guard(CASE_LIMIT_S * 3), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                case(label, path, bad)
        except CaseTimeout:
            self.failures.append(f"{label}: hung (interrupted after {CASE_LIMIT_S * 3} s)")
        took = time.perf_counter() - start
        if took > CASE_LIMIT_S:
            self.failures.append(f"{label}: took {took:.1f} s")
        self.slowest = max(self.slowest, (took, label))


def make_kohya_mutant(source: Path, dst: Path, rng: random.Random) -> tuple[str, bool]:
    data = source.read_bytes()
    if rng.random() < 0.4:
        mutant, what = mutate_bytes(data, rng)
        dst.write_bytes(mutant)
        return what, False
    tensors = load_file(str(source))
    tensors, what, bad = mutate_tensors(tensors, rng, alphas=True)
    tensors = {
        k: v.contiguous().clone() for k, v in tensors.items()
    }  # no shared storage (safetensors refuses)
    save_file(tensors, str(dst), metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": "4"})
    return what, bad


def make_peft_mutant(source: Path, dst: Path, rng: random.Random) -> tuple[str, bool]:
    shutil.copytree(source, dst)
    component = dst / rng.choice(["unet", "text_encoder"])
    config, weights = component / "adapter_config.json", component / "adapter_model.safetensors"
    choice = rng.random()
    if choice < 0.45:
        mutant, what = mutate_config(config.read_text(), rng)
        config.write_bytes(mutant)
        return what, False
    if choice < 0.6:
        mutant, what = mutate_bytes(weights.read_bytes(), rng)
        weights.write_bytes(mutant)
        return f"weights {what}", False
    if choice < 0.7:
        victim = rng.choice([config, weights])
        victim.unlink()
        return f"{victim.name} deleted", False
    tensors = load_file(str(weights))
    tensors, what, bad = mutate_tensors(tensors, rng, alphas=False)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return f"weights {what}", bad


def run_campaign(sources: dict[str, Path], work: Path, pipeline_dir: Path, cases: int) -> Campaign:
    rng = random.Random(SEED)
    pipe = tiny.build_tiny_pipeline("sd1")
    campaign = Campaign(pipe, pipeline_dir)
    kinds = ["loha", "lora", "lokr", "peft_loha", "peft_lora"]
    for index in range(cases):
        source_kind = kinds[index % len(kinds)]
        case_dir = work / f"case{index:05d}"
        case_dir.mkdir()
        if source_kind.startswith("peft"):
            path = case_dir / "adapter"
            what, bad = make_peft_mutant(sources[source_kind], path, rng)
            label = f"case {index} ({source_kind}: {what})"
            campaign.run(label, campaign.peft_case, path, bad)
        else:
            path = case_dir / f"{source_kind}.safetensors"
            what, bad = make_kohya_mutant(sources[source_kind], path, rng)
            label = f"case {index} ({source_kind}: {what})"
            campaign.run(label, campaign.kohya_case, path, bad)
        campaign.mutations[what] += 1
    return campaign


def test_fuzzed_adapter_files_fail_cleanly(sources, tmp_path, tiny_sd1_pipeline_dir):
    # The unmutated sources load everywhere (so the campaign measures the mutations, not the sources).
    clean = run_campaign(sources, tmp_path / "clean", tiny_sd1_pipeline_dir, 0)
    for kind, path in sources.items():
        load = lambda p=path: pipeline.load_adapter(clean.pipe, p, "fz")  # noqa: E731
        assert clean.load(kind, "load_adapter", path, load) == "ok", clean.failures
    assert not clean.failures, clean.failures

    (tmp_path / "work").mkdir()
    campaign = run_campaign(sources, tmp_path / "work", tiny_sd1_pipeline_dir, CASES)
    print(f"\nfuzz: {CASES} cases, slowest {campaign.slowest[0]:.2f} s ({campaign.slowest[1]})")
    for outcome, count in sorted(campaign.outcomes.items()):
        print(f"  {outcome}: {count}")
    print("  mutations: " + ", ".join(f"{k} {n}" for k, n in sorted(campaign.mutations.items())))
    assert not campaign.failures, "\n\n".join(campaign.failures[:10]) + f"\n({len(campaign.failures)} in all)"
    refused = sum(n for k, n in campaign.outcomes.items() if "Error" in k)
    assert refused > CASES  # the mutants are mostly refused: the campaign did exercise the checks


# -- the cases the issue names, each asserted on its own ------------------------------------------------------

NAN = float("nan")
PEFT_FIELD_CASES = [
    # (source, field, value, what the message says)
    ("peft_loha", "r", 1_000_000, "r=1000000"),  # hung: a 1e6-rank factor per layer
    ("peft_loha", "r", 10**9, "r=1000000000"),  # hung: a 64 GB allocation
    ("peft_loha", "r", 0, "r must be an integer >= 1"),
    ("peft_loha", "r", True, "r must be an integer >= 1"),
    ("peft_loha", "r", "4", "r must be an integer >= 1"),
    ("peft_loha", "alpha", NAN, "alpha must be a finite number >= 0"),
    ("peft_loha", "alpha", float("inf"), "alpha must be a finite number >= 0"),
    ("peft_loha", "alpha", -4, "alpha must be a finite number >= 0"),
    ("peft_loha", "alpha", 3e38, "beyond float16's range"),
    ("peft_loha", "alpha", True, "alpha must be a number"),
    ("peft_lora", "lora_alpha", NAN, "lora_alpha must be a finite number >= 0"),
    ("peft_loha", "target_modules", "[(", "not a valid regular expression"),
    ("peft_loha", "target_modules", 5, "target_modules must be a regex string or a list"),
    ("peft_loha", "rank_pattern", {"(": 4}, "not a valid regular expression"),
    ("peft_loha", "rank_pattern", {"to_q": "x"}, "must be an integer >= 1"),
    ("peft_loha", "rank_pattern", {"to_q": 10**9}, "r=1000000000"),
    ("peft_loha", "alpha_pattern", {"to_q": NAN}, "must be a finite number >= 0"),
    ("peft_loha", "alpha_pattern", {"[": 1.0}, "not a valid regular expression"),
    ("peft_loha", "use_effective_conv2d", "yes", "must be true or false"),
    ("peft_loha", "layers_to_transform", "x", "layers_to_transform must be an integer"),
    ("peft_loha", "rank_dropout", 2, "rank_dropout must be a number in [0, 1)"),
    ("peft_loha", "rank_dropout", None, "rank_dropout must be a number"),  # found by the 5000-case run
    ("peft_loha", "peft_type", 5, "peft_type must be a string"),
]


@pytest.mark.parametrize("source,field,value,message", PEFT_FIELD_CASES, ids=lambda v: repr(v)[:20])
def test_peft_config_fields_are_checked_before_anything_is_allocated(
    sources, tmp_path, tiny_sd1_pipeline_dir, source, field, value, message
):
    folder = tmp_path / "adapter"
    shutil.copytree(sources[source], folder)
    config_path = folder / "unet" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, field: value}))
    campaign = Campaign(tiny.build_tiny_pipeline("sd1"), tiny_sd1_pipeline_dir)
    start = time.perf_counter()
    with hang_guard(CASE_LIMIT_S * 3), pytest.raises(LoHaDiffusionError, match=re.escape(message)) as info:
        load_peft(folder, adapter_name="fz", **pipeline.adapter_components(campaign.pipe))
    assert time.perf_counter() - start < CASE_LIMIT_S
    assert str(folder) in str(info.value)
    assert not changes(campaign.pipe, campaign.before)


@pytest.mark.parametrize("victim", ["text_encoder/adapter_config.json", "unet/adapter_model.safetensors"])
def test_incomplete_peft_pipeline_folder_is_refused_not_half_loaded(
    sources, tmp_path, tiny_sd1_pipeline_dir, victim
):
    folder = tmp_path / "adapter"
    shutil.copytree(sources["peft_lora"], folder)
    (folder / victim).unlink()
    campaign = Campaign(tiny.build_tiny_pipeline("sd1"), tiny_sd1_pipeline_dir)
    with pytest.raises(LoHaDiffusionError, match=re.escape(str(folder / victim))):
        pipeline.load_adapter(campaign.pipe, folder, "fz")
    assert not changes(campaign.pipe, campaign.before)


KOHYA_CASES = [
    # (tensor to change: "alpha" or "factor", new value, what the message says)
    ("alpha", torch.tensor(NAN), "alpha is nan"),
    ("alpha", torch.tensor(float("inf")), "alpha is inf"),
    ("alpha", torch.tensor(-4.0), "alpha -4 is negative"),
    ("alpha", torch.tensor(3e38), "beyond float16's range"),
    ("alpha", torch.tensor(True), "alpha must be a real number"),
    ("alpha", torch.ones(2), "alpha must be a 0-dim or 1-element tensor"),
    ("factor", NAN, "NaN or infinite values in ['hada_w1_a']"),
    ("factor", 1e30, "beyond float16's range"),
]


@pytest.mark.parametrize("target,value,message", KOHYA_CASES, ids=lambda v: repr(v)[:20])
def test_kohya_bad_values_are_refused_by_every_entry_point(
    sources, tmp_path, tiny_sd1_pipeline_dir, target, value, message
):
    tensors = load_file(str(sources["loha"]))
    module = sorted(k for k in tensors if k.endswith(".hada_w1_a"))[0].rsplit(".", 1)[0]
    if target == "alpha":
        tensors[f"{module}.alpha"] = value
    elif isinstance(value, float) and value != value:
        tensors[f"{module}.hada_w1_a"] = tensors[f"{module}.hada_w1_a"].clone()
        tensors[f"{module}.hada_w1_a"][0, 0] = value
    else:
        tensors[f"{module}.hada_w1_a"] = tensors[f"{module}.hada_w1_a"] * value
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    campaign = Campaign(tiny.build_tiny_pipeline("sd1"), tiny_sd1_pipeline_dir)
    models = pipeline.adapter_components(campaign.pipe)
    for load in (
        lambda: load_kohya(path, adapter_name="fz", **models),
        lambda: pipeline.load_adapter(campaign.pipe, path, "fz"),
    ):
        with pytest.raises(LoHaDiffusionError, match=re.escape(message)) as info:
            load()
        assert str(path) in str(info.value) and module in str(info.value)
        assert not changes(campaign.pipe, campaign.before)
    campaign.cli("bad", path, ["inspect", str(path)], must_fail=True)
    campaign.cli("bad", path, ["verify", str(path), "--pipeline", str(tiny_sd1_pipeline_dir)], must_fail=True)
    assert not campaign.failures, campaign.failures
    if target == "factor" or value.dtype != torch.bool and value.numel() == 1:
        # The opt-in loads what the default refuses (the caller then owns the NaN/Inf).
        assert load_kohya(path, adapter_name="fz", allow_non_finite=True, **models) == "fz"
        assert pipeline.load_adapter(campaign.pipe, path, "fz2", allow_non_finite=True) == "fz2"
