"""scripts/train_loha_sd.py answers `--help`, mistyped flags and bad values without importing torch/diffusers.

Each case runs the script in a fresh interpreter whose import system refuses the heavy libraries: a
`sys.meta_path` finder prints `BLOCKED <name>` and raises ImportError for them, so any attempt shows up in
stderr even if the code catches the error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_loha_sd.py"
HEAVY = ("torch", "diffusers", "transformers", "accelerate")

# `python -c RUNNER script args...`: install the blocker, then run the script as __main__ with its args.
RUNNER = f"""
import importlib.abc, runpy, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            print(f"BLOCKED {{name}}", file=sys.stderr)
            raise ImportError(f"{{name}} is blocked by the test")
        return None

sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

REQUIRED = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_needs_no_torch():
    run = run_script("--help")
    assert run.returncode == 0, run.stderr
    assert "BLOCKED" not in run.stderr
    assert "--learning_rate" in run.stdout and "--config" in run.stdout and "--network_dim" in run.stdout


def test_mistyped_flag_suggests_the_flag_without_torch():
    run = run_script(*REQUIRED, "--learnig_rate", "1")
    assert run.returncode == 2, run.stderr
    assert "BLOCKED" not in run.stderr
    assert "did you mean --learning_rate" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rank", "x"], "--rank"),
        (["--mixed_precision", "fp8"], "mixed_precision"),
        (["--resolution", "500"], "resolution = 500"),
        (["--learning_rate", "-1"], "learning_rate"),
    ],
)
def test_bad_value_answers_without_torch(flags, named):
    run = run_script(*REQUIRED, *flags)
    assert run.returncode == 2, run.stderr
    assert "BLOCKED" not in run.stderr
    assert run.stderr.startswith("error: ") and named in run.stderr
    assert "Traceback" not in run.stderr


def test_bad_toml_answers_without_torch(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nrnak = 4\n')
    run = run_script("--config", str(config), "--max_train_steps", "1")
    assert run.returncode == 2 and "BLOCKED" not in run.stderr
    assert "did you mean 'rank'" in run.stderr


def test_valid_settings_reach_the_training_code(tmp_path):
    """The control: with valid settings the script goes on to import the training code, which the blocker
    refuses (so the cases above prove something)."""
    run = run_script(*REQUIRED, "--output_dir", str(tmp_path / "out"), "--dry_run")
    assert run.returncode != 0
    assert "BLOCKED torch" in run.stderr
