"""What is checked before any model loads, and what a run publishes (issue 10): trackers and optional packages,
hub ids without network (HF_HUB_OFFLINE, no retry storm, honest hints), a mistyped model path, names instead of
local paths in the exported file, atomic adapter configs, and one-line errors of the command line."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from loha_diffusion import cli
from loha_diffusion.config import LoHaConfig
from loha_diffusion.errors import ConfigError, NonFiniteError, OutputWriteError
from loha_diffusion.training import loop, models
from loha_diffusion.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["--train_data_dir", "data", "--max_train_steps", "1"]
HANG_GUARD_S = 10  # these cases answer in well under a second; the guard only catches a retry storm


def flags(model: str | Path, *more: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), *REQUIRED, *more]


# -- trackers and optional packages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "report_to, modules", [("wandb", ["wandb"]), ("tensorboard", ["tensorboard", "tensorboardX"])]
)
def test_tracker_without_its_package_is_refused(monkeypatch, report_to, modules):
    for module in modules:
        monkeypatch.setitem(
            sys.modules, module, None
        )  # `import` fails as for a package that is not installed
    with pytest.raises(ConfigError) as info:
        load_config(flags("m", "--report_to", report_to))
    message = str(info.value)
    assert f"report_to = '{report_to}' needs {modules[0]}" in message
    assert f"pip install {modules[0]}" in message and "report_to = 'none'" in message


def test_installed_tracker_is_accepted(monkeypatch):
    from loha_diffusion.training import config

    assert load_config(flags("m", "--report_to", "tensorboard")).report_to == "tensorboard"  # a dependency
    monkeypatch.setattr(config, "_installed", lambda module: module == "wandb")
    assert load_config(flags("m", "--report_to", "wandb")).report_to == "wandb"


def test_missing_tracker_stops_the_run_before_any_model_loads(monkeypatch, tmp_path, capsys):
    """Before: the run trained and exported, then crashed at the final validation grid."""

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setitem(sys.modules, "wandb", None)
    for name in ("base_model_arch", "load_tokenizers", "load_models"):
        monkeypatch.setattr(loop, name, no_model)
    code = loop.main(flags(tmp_path / "model", "--output_dir", str(tmp_path / "out"), "--report_to", "wandb"))
    assert code == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- hub ids without network ----------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache and no remembered probe of the hub."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(models, "_probes", {})
    return cache


def no_network(*args, **kwargs):
    raise AssertionError("the hub was contacted although HF_HUB_OFFLINE is set")


def assert_options_hint(message: str, path: str) -> None:
    """The hint names the real options, and offers make-tiny only as the demo, never for the user's path."""
    assert "a local diffusers folder" in message and "HF_HUB_OFFLINE=1" in message
    assert f"make-tiny {models.DEMO_MODEL_PATH}" in message and "RANDOM weights" in message
    if path != models.DEMO_MODEL_PATH:
        assert f"make-tiny {path}" not in message


def test_hub_id_offline_and_not_cached_fails_at_once(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_unreachable", no_network)
    cfg = load_config(flags("someorg/not-a-cached-model"))
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        models.load_tokenizer(cfg)
    assert time.monotonic() - start < HANG_GUARD_S
    message = str(info.value)
    assert "'someorg/not-a-cached-model'" in message and "HF_HUB_OFFLINE is set" in message
    assert "not in the local Hugging Face cache" in message
    assert_options_hint(message, "someorg/not-a-cached-model")


def test_hub_id_offline_loads_from_the_local_cache(monkeypatch, empty_hub_cache, tiny_sd1_pipeline_dir):
    """With HF_HUB_OFFLINE only the cache is read: a cached model loads without contacting the hub."""
    import shutil

    repo = empty_hub_cache / "models--someorg--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_sd1_pipeline_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_unreachable", no_network)
    cfg = load_config(flags("someorg/tiny-sd"))
    assert models.resolve_base_model(cfg.pretrained_model_name_or_path) == str(repo / "snapshots" / commit)
    assert len(models.load_tokenizer(cfg)) > 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch, empty_hub_cache):
    """Without HF_HUB_OFFLINE: one quick request to the endpoint, then the cache; no minutes of retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    cfg = load_config(flags("someorg/unreachable-model"))
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        models.load_tokenizer(cfg)
    assert time.monotonic() - start < HANG_GUARD_S
    message = str(info.value)
    assert "cannot load the base model 'someorg/unreachable-model'" in message
    assert f"the Hugging Face hub ({hf_constants.ENDPOINT}) cannot be reached" in message
    assert "not in the local Hugging Face cache" in message
    assert_options_hint(message, "someorg/unreachable-model")


def test_reachable_hub_is_used(monkeypatch, empty_hub_cache):
    """The probe is no blanket refusal: an endpoint that answers lets a hub id through to the loaders."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert models.hub_unreachable() is None
        assert models.resolve_base_model("someorg/some-model") == "someorg/some-model"
    finally:
        server.shutdown()
        server.server_close()


def test_mistyped_local_path_names_the_near_folder(tmp_path):
    (tmp_path / "my-model").mkdir()
    typo = tmp_path / "my-modle"
    cfg = load_config(flags(typo))
    with pytest.raises(ConfigError) as info:
        models.load_tokenizer(cfg)
    message = str(info.value)
    assert f"{str(typo)!r} does not exist; did you mean {str(tmp_path / 'my-model')!r}?" in message
    assert_options_hint(message, str(typo))
    with pytest.raises(ConfigError, match="nor does the folder"):
        models.resolve_base_model(str(tmp_path / "no" / "such" / "model"))


@pytest.mark.slow
def test_hub_id_offline_script_answers_in_a_few_lines(tmp_path):
    """The real command line with HF_HUB_OFFLINE=1: status 2, the hint, and none of the retry warnings that
    filled 272 lines before."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_loha_sd.py")]
        + flags("someorg/not-a-cached-model", "--output_dir", str(tmp_path / "out"), "--report_to", "none"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a hang guard; the answer comes after the imports
    )
    assert run.returncode == 2, run.stderr
    assert "HF_HUB_OFFLINE is set" in run.stderr and "Retrying" not in run.stderr
    assert_options_hint(run.stderr, "someorg/not-a-cached-model")
    assert len(run.stderr.splitlines()) < 15


# -- names, not paths, in the exported file -------------------------------------------------------------


def test_exported_file_names_the_base_model_without_its_path(tmp_path, tiny_sd1_pipeline_dir):
    """A run from <tmp>/some/deep/path/my-model writes `my-model`; no metadata value holds the tmp path."""
    from test_training_loop import base_flags, make_dataset

    from loha_diffusion.formats.kohya import read_metadata
    from loha_diffusion.training.loop import train

    model = tmp_path / "some" / "deep" / "path" / "my-model"
    model.parent.mkdir(parents=True)
    model.symlink_to(tiny_sd1_pipeline_dir, target_is_directory=True)
    data = make_dataset(tmp_path / "data" / "2_red circle", 2)
    cfg = load_config(
        base_flags(model, data.parent, tmp_path / "out", output_name="style") + ["--max_train_steps", "1"]
    )
    meta = read_metadata(train(cfg).kohya_file)
    assert meta["ss_sd_model_name"] == "my-model" and meta["ss_output_name"] == "style"
    assert '"2_red circle"' in meta["ss_dataset_dirs"]
    leaks = {k: v for k, v in meta.items() if str(tmp_path) in v or os.path.realpath(tmp_path) in v}
    assert not leaks


def test_training_metadata_keeps_a_hub_id(tmp_path):
    from loha_diffusion.training.data import DatasetSummary, Schedule
    from loha_diffusion.training.export import training_metadata

    schedule = Schedule(
        num_samples=0,
        num_processes=1,
        batches_per_epoch=1,
        update_steps_per_epoch=1,
        max_train_steps=1,
        num_epochs=1,
        total_batch_size=1,
    )
    summary = DatasetSummary(root=tmp_path, layout="flat", records=(), skipped=(), small_images=0)

    for model, name in [("org/base-model", "org/base-model"), (str(tmp_path / "x" / "my-base"), "my-base")]:
        cfg = load_config(flags(model))
        info = training_metadata(
            cfg,
            schedule,
            summary,
            prediction_type="epsilon",
            mixed_precision="no",
            started_at=0.0,
            step=1,
            epoch=1,
        )
        assert info["sd_model_name"] == name


# -- atomic adapter config, command-line errors ------------------------------------------------------------


def test_adapter_config_is_written_atomically_with_a_normal_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = LoHaConfig(r=4, alpha=2.0, target_modules=["to_q"]).save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    assert path == tmp_path / "adapter" / "adapter_config.json"
    assert LoHaConfig.from_pretrained(path.parent).r == 4
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(path.parent) == ["adapter_config.json"]  # no temporary file left


@pytest.mark.parametrize(
    "error",
    [
        OutputWriteError(
            "no space left on device while writing out/x.safetensors (1 MiB needed, 0 B free)", 28
        ),
        NonFiniteError("refusing to write out/x.safetensors: non-finite values in unet.down.0 (NaN)"),
    ],
)
def test_cli_prints_write_and_non_finite_errors_as_one_line(monkeypatch, capsys, tmp_path, error):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_make_tiny", fail)
    assert cli.main(["make-tiny", str(tmp_path / "tiny")]) == 1
    err = capsys.readouterr().err
    assert err == f"loha-diffusion make-tiny: error: {error}\n"
    assert "Traceback" not in err


def test_tracker_accelerate_left_out_is_switched_off_not_fatal(tmp_path, caplog):
    """Should accelerate drop a tracker it cannot use, the run logs a warning at start and goes on without
    logging, instead of crashing at its end on the validation grid."""
    from accelerate import Accelerator
    from PIL import Image

    from loha_diffusion.training.tracker import Tracker

    cfg = load_config(flags("m", "--report_to", "tensorboard", "--output_dir", str(tmp_path)))
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    tracker = Tracker(accelerator, cfg)
    tracker.start(cfg)
    assert tracker.enabled  # tensorboard is a dependency: started
    accelerator.end_training()

    class Dropped:  # what accelerate leaves after filtering out a tracker whose package it cannot import
        trackers: list = []

        def init_trackers(self, project, config=None):
            pass

        def log(self, values, step=None):
            raise AssertionError("logged to a tracker that was not started")

    cfg.report_to = "wandb"
    tracker = Tracker(Dropped(), cfg)
    with caplog.at_level("WARNING", logger="loha_diffusion.training.tracker"):
        tracker.start(cfg)
    assert not tracker.enabled and "did not start this tracker" in caplog.text
    tracker.log({"train/loss": 0.1}, step=1)
    tracker.log_validation({}, Image.new("RGB", (8, 8)), step=1)
