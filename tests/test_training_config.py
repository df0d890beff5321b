"""TrainConfig: TOML + flags merging, kohya aliases, typed errors naming the key, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from loha_diffusion.errors import ConfigError
from loha_diffusion.training import config as config_module
from loha_diffusion.training.config import TrainConfig, load_config

REQUIRED = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data", "--max_train_steps", "10"]


def write_toml(tmp_path, text: str):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_defaults_and_flags():
    cfg = load_config(REQUIRED + ["--rank", "4", "--learning_rate", "3e-4", "--gradient_checkpointing"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.rank, cfg.learning_rate, cfg.gradient_checkpointing) == (4, 3e-4, True)
    assert cfg.algo == "loha" and cfg.effective_alpha == 4.0 and cfg.effective_conv_rank == 4
    assert cfg.name == "loha"


def test_flags_override_toml(tmp_path):
    path = write_toml(
        tmp_path,
        'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nmax_train_steps = 5\n'
        'rank = 16\nrandom_flip = true\nvalidation_prompt = ["a", "b"]\n[rank_pattern]\n"to_k" = 2\n',
    )
    cfg = load_config(["--config", str(path), "--rank", "2", "--random_flip", "false"])
    assert cfg.rank == 2 and cfg.random_flip is False
    assert (
        cfg.max_train_steps == 5 and cfg.validation_prompt == ["a", "b"] and cfg.rank_pattern == {"to_k": 2}
    )


def test_kohya_aliases(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "_installed", lambda module: True)  # --xformers: as if installed
    cfg = load_config(
        REQUIRED
        + ["--network_dim", "4", "--network_alpha", "2", "--conv_dim", "2", "--conv_alpha", "1"]
        + [
            "--min_snr_gamma",
            "5",
            "--max_train_epochs",
            "3",
            "--v_parameterization",
            "--use_tucker",
            "--xformers",
        ]
    )
    assert (cfg.rank, cfg.alpha, cfg.conv_rank, cfg.conv_alpha, cfg.snr_gamma) == (4, 2.0, 2, 1.0, 5.0)
    assert cfg.num_train_epochs == 3 and cfg.prediction_type == "v_prediction"
    assert cfg.use_effective_conv2d and cfg.enable_xformers_memory_efficient_attention
    path = write_toml(
        tmp_path, 'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nnetwork_dim = 4\n'
    )
    assert load_config(["--config", str(path), "--max_train_steps", "1"]).rank == 4


@pytest.mark.parametrize(
    "toml, key",
    [
        ("rnak = 4", "rnak"),
        ('rank = "four"', "rank"),
        ("rank = 0", "rank"),
        ("resolution = 500", "resolution"),
        ("learning_rate = -1.0", "learning_rate"),
        ('algo = "lokr"', "algo"),
        ("random_flip = 1", "random_flip"),
        ("caption_dropout_rate = 1.5", "caption_dropout_rate"),
        ('[rank_pattern]\n"to_k" = 0', "rank_pattern"),
        ("rank = 4\nnetwork_dim = 8", "rank"),
    ],
)
def test_bad_toml_names_the_key(tmp_path, toml, key):
    path = write_toml(
        tmp_path, 'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nmax_train_steps = 1\n' + toml
    )
    with pytest.raises(ConfigError, match=key):
        load_config(["--config", str(path)])


def test_unknown_key_suggests_a_name(tmp_path):
    path = write_toml(tmp_path, "learnig_rate = 1e-4")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--rank", "x"], "rank"),
        (["--nosuchflag", "1"], "nosuchflag"),
        (["--mixed_precision", "fp8"], "mixed_precision"),
        (["--rank_pattern", "to_k"], "rank_pattern"),
        (["--gradient_checkpointing", "maybe"], "gradient_checkpointing"),
        (["--rank", "4", "--network_dim", "8"], "both set rank"),
        (["--seed", "1", "--seed", "2"], "both set seed"),
    ],
)
def test_bad_flags_name_the_flag(flags, key):
    with pytest.raises(ConfigError, match=key):
        load_config(REQUIRED + flags)


def test_missing_required_settings():
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path"):
        load_config(["--train_data_dir", "d", "--max_train_steps", "1"])
    with pytest.raises(ConfigError, match="max_train_steps or num_train_epochs"):
        load_config(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    with pytest.raises(ConfigError, match="config file"):
        load_config(["--config", "/nonexistent/train.toml"])


def test_toml_round_trip(tmp_path):
    cfg = load_config(
        REQUIRED
        + [
            "--alpha_pattern",
            "to_k=0.5",
            "--validation_prompt",
            'a "quoted" cat',
            "--target_modules",
            "to_q",
            "to_v",
        ]
    )
    path = tmp_path / "again.toml"
    path.write_text(cfg.to_toml())
    assert load_config(["--config", str(path)]) == cfg


def test_keyword_overrides_win(tmp_path):
    cfg = load_config(REQUIRED + ["--rank", "4"], rank=2, network_alpha=1)
    assert cfg.rank == 2 and cfg.alpha == 1.0


def test_python_310_reads_toml_with_tomli(monkeypatch, tmp_path):
    """On Python 3.10 (no tomllib) the config module takes the same parser from the `tomli` package."""
    import importlib.util
    import sys
    import types

    import tomllib

    from loha_diffusion.training import config

    tomli = types.ModuleType("tomli")
    tomli.loads, tomli.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    name = "loha_diffusion.training._config_py310"
    spec = importlib.util.spec_from_file_location(name, config.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.tomllib is tomli
    path = write_toml(tmp_path, 'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nrank = 3\n')
    assert module.load_config(["--config", str(path), "--max_train_steps", "1"]).rank == 3
    with pytest.raises(ConfigError, match="not valid TOML"):
        module.read_toml(write_toml(tmp_path, "rank = = 3"))


def test_parsing_imports_no_torch():
    """`training.config` (what the script parses with) imports neither torch nor diffusers."""
    import subprocess
    import sys

    code = (
        "import sys, loha_diffusion.training.config as c\n"
        "c.load_config(['--pretrained_model_name_or_path', 'm', '--train_data_dir', 'd', '--max_train_steps', '1'])\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'transformers') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("..", "is a path"),
        (".", "is a path"),
        ("sub/style", "is a path"),
        ("../style", "is a path"),
        ("/tmp/style", "is a path"),
        ("sub\\style", "is a path"),
        ("sty:le", "':'"),
        ("style?", "'?'"),
        ("sty\x00le", "'\\x00'"),
        ("style.", "ends with"),
        ("NUL", "device name"),
        ("com1.v2", "device name"),
        ("x" * 201, "at most 200"),
    ],
)
def test_output_name_must_be_a_plain_file_name(name, problem):
    """Refused at config validation, naming the setting, the problem and the fix."""
    with pytest.raises(ConfigError) as info:
        load_config(REQUIRED, output_name=name)
    message = str(info.value)
    assert "output_name" in message and problem in message
    if problem != f"at most {config_module.MAX_FILE_NAME_BYTES}":
        assert "plain file name" in message


@pytest.mark.parametrize("name", ["my_style", "style-v2.1", "sks dog", "ünïcode", "a" * 200])
def test_ordinary_output_names_are_accepted(name):
    assert load_config(REQUIRED, output_name=name).name == name


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(ConfigError, match="output_dir = .* is a file"):
        load_config(REQUIRED, output_dir=str(target))
    with pytest.raises(ConfigError, match=f"is inside {target}, which is a file"):
        load_config(REQUIRED, output_dir=str(target / "run1"))


def test_output_dir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root may write anywhere: let access() answer as for a normal user
        real_access = os.access
        monkeypatch.setattr(
            config_module.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
        )
    try:
        with pytest.raises(
            ConfigError, match=f"the folder {locked} that would hold output_dir is not writable"
        ):
            load_config(REQUIRED, output_dir=str(locked / "run"))
        with pytest.raises(ConfigError, match="output_dir = .*: output_dir is not writable"):
            load_config(REQUIRED, output_dir=str(locked))
    finally:
        locked.chmod(0o700)


def test_outputs_of_the_wrong_kind_are_refused(tmp_path):
    """A folder where the exported file goes, a file where the PEFT folder or the tracker folder goes."""
    (tmp_path / "style.safetensors").mkdir()
    with pytest.raises(ConfigError, match="style.safetensors exists and is a folder.*change output_name"):
        load_config(REQUIRED, output_dir=str(tmp_path), output_name="style")
    (tmp_path / "other_peft").write_text("")
    with pytest.raises(ConfigError, match="other_peft exists and is a file.*change output_name"):
        load_config(REQUIRED, output_dir=str(tmp_path), output_name="other")
    assert load_config(REQUIRED, output_dir=str(tmp_path), output_name="other", save_peft_format=False)
    (tmp_path / "logs").write_text("")
    with pytest.raises(ConfigError, match="logs exists and is a file.*change logging_dir"):
        load_config(REQUIRED, output_dir=str(tmp_path), output_name="fresh")
    fresh = tmp_path / "new" / "deeper"
    assert load_config(REQUIRED, output_dir=str(fresh)).output_dir == str(fresh)  # created later, by the run
