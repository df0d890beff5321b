"""One error family, one adapter-name rule checked before anything changes, one problem-list format."""

from __future__ import annotations

import pytest
import torch

from loha_diffusion import LoHaDiffusionError, errors
from loha_diffusion import pipeline as lp
from loha_diffusion.config import LoHaConfig
from loha_diffusion.formats import save_kohya
from loha_diffusion.layers import check_adapter_name
from loha_diffusion.model import delete_adapter, get_adapter_state_dict, inject_adapter, set_adapter_scale
from loha_diffusion.targeting import unet_preset


def snapshot(module: torch.nn.Module) -> tuple[list, dict]:
    """The module tree (paths and types) and a copy of every tensor of the state dict."""
    tree = [(name, type(m).__name__) for name, m in module.named_modules()]
    return tree, {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(before: tuple[list, dict], module: torch.nn.Module) -> None:
    tree, state = snapshot(module)
    assert tree == before[0]
    assert state.keys() == before[1].keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, before[1][key]), key


ERRORS = [
    errors.ConfigError,
    errors.DataError,
    errors.KohyaFormatError,
    errors.PeftFormatError,
    errors.CLIError,
    errors.AdapterNameError,
    errors.AdapterNotFoundError,
    errors.AdapterStateError,
    errors.AdapterMergedError,
    errors.AdapterFileNotFoundError,
    errors.TrainingDivergedError,
]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_user_error_is_one_family_and_a_value_error(cls):
    assert issubclass(cls, LoHaDiffusionError) and issubclass(cls, ValueError)


def test_old_exception_types_still_catch():
    # Callers written against the old KeyError / RuntimeError / FileNotFoundError keep working.
    assert issubclass(errors.AdapterNotFoundError, KeyError)
    assert issubclass(errors.AdapterMergedError, RuntimeError)
    assert issubclass(errors.AdapterFileNotFoundError, FileNotFoundError)
    assert issubclass(errors.TrainingDivergedError, FloatingPointError)
    # ... and the message reads as a sentence, not KeyError's quoted repr.
    assert str(errors.AdapterNotFoundError("No adapter named 'x'.")) == "No adapter named 'x'."


def test_old_homes_reexport_the_same_classes():
    from loha_diffusion.formats.kohya import KohyaFormatError
    from loha_diffusion.formats.peft import PeftFormatError
    from loha_diffusion.training.config import ConfigError
    from loha_diffusion.training.data import DataError

    assert KohyaFormatError is errors.KohyaFormatError and PeftFormatError is errors.PeftFormatError
    assert ConfigError is errors.ConfigError and DataError is errors.DataError


def test_format_problems_counts_and_truncates():
    text = errors.format_problems(
        "Title:", [("bad keys", [f"k{i}" for i in range(7)]), ("empty", [])], ["fix"]
    )
    assert text.splitlines() == [
        "Title:",
        "  hint: fix",
        "  7 bad keys:",
        *[f"    - k{i}" for i in range(5)],
        "    ... and 2 more",
    ]


@pytest.mark.parametrize(
    "name", ["half", "to", "train", "keys", "items", "values", "base_layer", "a b", "x.y", ""]
)
def test_check_adapter_name_refuses(name):
    with pytest.raises(errors.AdapterNameError):
        check_adapter_name(name)


@pytest.mark.parametrize("name", ["default", "style_v2", "my-lora", "half_1", "Keys"])
def test_check_adapter_name_accepts(name):
    check_adapter_name(name)


@pytest.mark.parametrize("name", ["keys", "half", "items"])
def test_inject_adapter_refuses_a_bad_name_before_any_change(tiny_sd1_unet, name):
    before = snapshot(tiny_sd1_unet)
    with pytest.raises(errors.AdapterNameError, match=repr(name)):
        inject_adapter(tiny_sd1_unet, unet_preset("attn", r=2), name)
    assert_unchanged(before, tiny_sd1_unet)


def test_load_adapter_refuses_a_bad_name_before_any_change(tiny_sd1_pipeline, tmp_path):
    pipe = tiny_sd1_pipeline
    inject_adapter(pipe.unet, unet_preset("attn", r=2, init_weights=False), "src")
    path = save_kohya(tmp_path / "a.safetensors", unet=pipe.unet, adapter_name="src")
    delete_adapter(pipe.unet, "src")
    before_unet, before_te = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    for name in ("items", "half", "keys"):
        with pytest.raises(errors.AdapterNameError):
            lp.load_adapter(pipe, path, adapter_name=name)
    assert_unchanged(before_unet, pipe.unet)
    assert_unchanged(before_te, pipe.text_encoder)
    # A file called half.safetensors gets a usable default name.
    half = tmp_path / "half.safetensors"
    half.write_bytes(path.read_bytes())
    assert lp.load_adapter(pipe, half) == "half_1"


def test_missing_adapter_and_merged_adapter_errors(tiny_sd1_unet):
    inject_adapter(tiny_sd1_unet, LoHaConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(errors.AdapterNotFoundError, match="no adapter named 'other'"):
        get_adapter_state_dict(tiny_sd1_unet, "other")
    from loha_diffusion.model import merge_adapters

    merge_adapters(tiny_sd1_unet)
    with pytest.raises(errors.AdapterMergedError, match="unmerge"):
        set_adapter_scale(tiny_sd1_unet, "default", 0.5)


def test_config_errors_are_config_errors():
    with pytest.raises(errors.ConfigError, match="r must be an integer"):
        LoHaConfig(r=0)
    with pytest.raises(errors.ConfigError):
        unet_preset("nope")
