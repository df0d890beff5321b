"""A training process killed (SIGKILL) while it saves a checkpoint, while it exports the final file, and between
an update and its checkpoint, then resumed with `resume_from_checkpoint = "latest"`: the final Kohya file
holds the same tensors (bit for bit) and metadata as an uninterrupted run, no kill loses the previous
checkpoint (also with `checkpoints_total_limit = 1`), and no half-written file or folder is left.

The kill points are set by monkeypatching inside the child process (see `RUNNER`), not by hooks in the
package: `checkpoint._write_file` (every file of a checkpoint goes through it), `os.replace` (the renames
that publish a checkpoint folder or an exported file), `shutil.rmtree` (pruning) and `loop.after_step`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_loop import base_flags, make_dataset, run_two_processes

from loha_diffusion.formats.kohya import read_metadata
from loha_diffusion.training.checkpoint import list_checkpoints, read_checkpoint_state, verify_checkpoint
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import train

REPO = Path(__file__).resolve().parents[1]

# `python -c RUNNER <point> <argument> <training flags...>`: install the kill point, then train.
RUNNER = """
import os, shutil, signal, sys
import loha_diffusion.training.checkpoint as checkpoint
import loha_diffusion.training.loop as loop

point, argument = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "file":  # half of file <name> of checkpoint <folder> written, then killed
    folder_name, file_name = argument.split("/")
    write = checkpoint._write_file
    def killing_write(folder, name, data):
        if folder.name.startswith(f".{folder_name}.") and name == file_name:
            (folder / name).write_bytes(data[: len(data) // 2])
            die()
        write(folder, name, data)
    checkpoint._write_file = killing_write
elif point == "rename":  # everything written, killed before the rename that publishes <argument>
    replace = os.replace
    def killing_replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == argument:
            die()
        return replace(src, dst, *args, **kwargs)
    os.replace = killing_replace
elif point == "prune":  # the new checkpoint complete; killed while removing the old one <argument>
    rmtree = shutil.rmtree
    def killing_rmtree(path, *args, **kwargs):
        if os.path.basename(path).startswith(f".{argument}."):
            victims = sorted(os.listdir(path))
            os.unlink(os.path.join(path, victims[0]))
            die()
        rmtree(path, *args, **kwargs)
    shutil.rmtree = killing_rmtree
elif point == "step":  # killed after the update of optimizer step <argument>, before its checkpoint
    after_step = loop.after_step
    def killing_after_step(run):
        if run.state.global_step == int(argument):
            die()
        after_step(run)
    loop.after_step = killing_after_step
sys.exit(loop.main(sys.argv[3:]))
"""

# (kill point, argument, the complete checkpoints the kill must leave) for 6 steps, a checkpoint every 2,
# checkpoints_total_limit = 1.
KILLS = [
    ("file", "checkpoint-4/optimizer.safetensors", ["checkpoint-2"]),
    ("file", "checkpoint-4/checkpoint.json", ["checkpoint-2"]),
    ("rename", "checkpoint-4", ["checkpoint-2"]),
    ("prune", "checkpoint-2", ["checkpoint-4"]),
    ("step", "5", ["checkpoint-4"]),
    ("rename", "loha.safetensors", ["checkpoint-6"]),
]
# Fields that record when a file was written, not what it holds.
TIME_FIELDS = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date")


def flags(model_dir: Path, data: Path, out: Path) -> list[str]:
    extra = {"max_train_steps": "6", "checkpointing_steps": "2", "lr_scheduler": "cosine"}
    return base_flags(model_dir, data, out, **extra)


@pytest.fixture(scope="module")
def reference(tiny_sd1_pipeline_dir, tmp_path_factory):
    """An uninterrupted run (every checkpoint kept): its data folder and output folder."""
    root = tmp_path_factory.mktemp("reference")
    data = make_dataset(root / "data", 3)
    train(load_config(flags(tiny_sd1_pipeline_dir, data, root / "out")))
    return data, root / "out"


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("point, argument, survivors", KILLS, ids=[f"{p}:{a}" for p, a, _ in KILLS])
def test_killed_run_resumes_to_the_same_file(
    tiny_sd1_pipeline_dir, reference, tmp_path, point, argument, survivors
):
    data, expected = reference
    out = tmp_path / "out"
    run_flags = flags(tiny_sd1_pipeline_dir, data, out) + ["--checkpoints_total_limit", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", RUNNER, point, argument, *run_flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    # The previous checkpoint survives, whole and equal to the uninterrupted run's.
    assert [p.name for p in list_checkpoints(out)] == survivors
    for name in survivors:
        verify_checkpoint(out / name)
        assert same_tensors(
            out / name / "unet_adapter.safetensors", expected / name / "unet_adapter.safetensors"
        )
    assert not (out / "loha.safetensors").exists()

    resumed = train(load_config(run_flags + ["--resume_from_checkpoint", "latest"]))
    assert resumed.global_step == 6
    assert same_tensors(resumed.kohya_file, expected / "loha.safetensors")
    got, want = read_metadata(resumed.kohya_file), read_metadata(expected / "loha.safetensors")
    assert {k: v for k, v in got.items() if k not in TIME_FIELDS} == {
        k: v for k, v in want.items() if k not in TIME_FIELDS
    }
    # What the kill left half-written was cleared; only the newest checkpoint is kept.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "loha.safetensors", "train_config.toml"]


@pytest.mark.slow
def test_two_processes_resume_with_their_own_random_states(tiny_sd1_pipeline_dir, tmp_path):
    """torchrun with 2 CPU processes: 2 steps with a checkpoint, then grown to 4 steps with `latest`; each
    process restores its own `random_states_<rank>`, and the result matches one process at batch 4."""
    data = make_dataset(tmp_path / "data", 8)
    common = ["--checkpointing_steps", "2", "--lr_scheduler", "constant"]
    single = train(
        load_config(
            base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "one")
            + common
            + ["--train_batch_size", "4", "--max_train_steps", "4"]
        )
    )
    out = tmp_path / "two"
    two = [*base_flags(tiny_sd1_pipeline_dir, data, out), *common, "--train_batch_size", "2"]
    for extra in (
        ["--max_train_steps", "2"],
        ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"],
    ):
        run = run_two_processes([*two, *extra])
        if "--resume_from_checkpoint" in extra:
            assert "resumed from" in run.stderr and "checkpoint-2 at step 2" in run.stderr
    for rank in (0, 1):
        state = read_checkpoint_state(out / "checkpoint-2", f"random_states_{rank}")
        assert state["torch"].dtype == torch.uint8
    assert read_checkpoint_state(out / "checkpoint-4", "train_state")["global_step"] == 4
    a, b = load_file(str(single.kohya_file)), load_file(str(out / "loha.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
