"""The README's commands, run as a new user runs them: every fenced bash block, in order, in a fresh folder.

A block that cannot run here (a GPU, a hub download, `make demo`'s 13 minutes) carries a marker on the line before
its fence, `<!-- readme-test: skip (REASON) -->`; any other block is run and must exit 0. A block that is neither run
nor marked (a block in another language, or one with no language) fails the test, so an example cannot drift from the
code unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNABLE = {"bash", "sh", "shell"}
MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
# What the README's commands read from the repository root; they write only under the folder they run in.
REPO_PATHS = ("recipes", "ds_configs", "train")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the marker's reason, None when the block runs


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text; raises ValueError for a block that is neither runnable nor marked, and
    for a marker that does not stand right before a fence."""
    lines = text.split("\n")
    blocks, i, pending = [], 0, None
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("<!--") and "readme-test" in line:
            match = MARKER.match(line)
            if not match:
                raise ValueError(f"line {i + 1}: a readme-test marker reads `<!-- readme-test: skip (REASON) -->`")
            pending = (i + 1, match["reason"].strip())
        elif line.startswith("```"):
            lang, start, body = line[3:].strip().lower(), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            skip = pending[1] if pending and pending[0] == start - 1 else None
            if pending and pending[0] != start - 1:
                raise ValueError(f"line {pending[0]}: a readme-test marker must stand on the line right before a fence")
            pending = None
            if skip is None and lang not in RUNNABLE:
                raise ValueError(f"line {start}: a ```{lang or '(no language)'} block is neither run by this test "
                                 "(```bash) nor marked `<!-- readme-test: skip (REASON) -->` on the line before")
            blocks.append(Block(start, lang, "\n".join(body), skip))
        elif line and pending:
            raise ValueError(f"line {pending[0]}: a readme-test marker must stand on the line right before a fence")
        i += 1
    if pending:
        raise ValueError(f"line {pending[0]}: a readme-test marker must stand on the line right before a fence")
    return blocks


def test_every_block_is_run_or_marked_with_a_reason():
    blocks = readme_blocks((REPO / "README.md").read_text())
    run = [b for b in blocks if b.skip is None]
    assert run and any("sfn train" in b.text for b in run), "the quick start's commands must be run"
    assert blocks[0].skip and "make demo" in blocks[0].text and "make test" in blocks[0].text, \
        "the README starts with the two commands that work on a fresh machine"


def test_readme_stays_short():
    """What a new user reads first; the rest belongs in a page under docs/ (issue 23)."""
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move detail to a page under docs/ and link it"


@pytest.mark.parametrize("text, error", [
    ("```python\nprint(1)\n```", "neither run"),
    ("```\nsfn train\n```", "no language"),
    ("<!-- readme-test: skip -->\n```bash\nsfn x\n```", "marker reads"),
    ("<!-- readme-test: skip (GPU) -->\n\ntext\n```bash\nsfn x\n```", "right before a fence"),
    ("<!-- readme-test: skip (GPU) -->", "right before a fence"),
])
def test_a_block_neither_run_nor_marked_fails(text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        readme_blocks(text)


def test_marked_blocks_are_skipped_and_bash_blocks_run():
    text = ("<!-- readme-test: skip (GPU) -->\n```bash\ntorchrun x\n```\n\n```bash\nsfn select m\n```\n"
            "<!-- readme-test: skip (a recipe, not a command) -->\n```yaml\nbase: x\n```\n")
    assert [(b.line, b.lang, b.skip) for b in readme_blocks(text)] == [
        (2, "bash", "GPU"), (6, "bash", None), (10, "yaml", "a recipe, not a command")]


@pytest.mark.slow
def test_readme_commands_run_in_order_in_a_fresh_folder(tmp_path):
    for name in REPO_PATHS:
        shutil.copytree(REPO / name, tmp_path / name)
    bin_dir = str(Path(sys.executable).parent)  # this environment's `sfn` and `python`, as `source .venv/bin/activate`
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in (
               str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    for block in readme_blocks((REPO / "README.md").read_text()):
        if block.skip is not None:
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"README.md line {block.line}: the block exited {proc.returncode}\n{block.text}\n"
                        f"--- output (tail) ---\n{(proc.stdout + proc.stderr)[-3000:]}", pytrace=False)
