"""The README's Python snippets that use the library run as written, offline on the tiny model, and print no
warning (issue 13, item 7): each group of snippets runs in a fresh interpreter with `-W error` (any Python
warning, such as diffusers' `torch_dtype` FutureWarning, fails it), and its stderr must hold no library notice
(transformers' torchvision notice, diffusers' float32-modules warning, any "warning" line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loha_diffusion.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"(?i)warn|deprecat|\[transformers\]|requires torchvision|kept in float32")


def readme_snippets() -> list[str]:
    """The ```python blocks of README.md that use the library, in order."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    return [b for b in blocks if "loha_diffusion" in b]


def _group(first_line: str) -> list[str]:
    """The snippet that starts with `first_line`'s block and the ones after it that need its variables or files."""
    snippets = readme_snippets()
    starts = [i for i, s in enumerate(snippets) if first_line in s]
    assert len(starts) == 1, f"README snippet with {first_line!r}: found {len(starts)}"
    return snippets[starts[0] :]


# (a line of the first snippet of a group, how many snippets the group has): each group is what a reader runs
# in one session; later snippets use the files and variables of earlier ones.
GROUPS = {
    "core_kohya_peft": ('config = unet_preset("full"', 4),
    "pipelines": ("# Make two small LoHa files to play with", 2),
}


def test_every_library_snippet_is_in_a_group():
    covered = set()
    for marker, count in GROUPS.values():
        covered.update(_group(marker)[:count])
    assert covered == set(readme_snippets())


@pytest.mark.slow  # a fresh interpreter per group (imports torch and diffusers): about 15 s each
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_readme_snippets_run_without_warnings(tmp_path, group):
    marker, count = GROUPS[group]
    script = "\n\n".join(_group(marker)[:count])
    if "./tiny-sd" in script:
        save_tiny_pipeline(tmp_path / "tiny-sd", "sd1")  # what `loha-diffusion make-tiny ./tiny-sd` writes
    (tmp_path / "snippets.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "snippets.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"README snippets ({group}) failed:\n{proc.stderr[-3000:]}"
    noise = [line for line in proc.stderr.splitlines() if NOISE.search(line)]
    assert not noise, f"README snippets ({group}) print warnings:\n" + "\n".join(noise)
