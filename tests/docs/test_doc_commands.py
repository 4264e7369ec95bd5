"""Every command the README and docs/ show runs as pasted, and prints what the page says it prints.

Each `bash` or `console` block of README.md, docs/*.md and docs/learn/*.md is one test
(doc_blocks.py says how a page marks a shorter form, a skip, or the output to expect). A page's
blocks run in order in one copy of the checkout, with the project's .venv activated as the README
says, so a command may use what an earlier one on the same page wrote (the tour trains, then
exports that run) and nothing lands in the checkout. Blocks marked `fast` run in `make test`; the
whole set runs with `--docs` (`make test-docs`, which .ci/run runs too).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import missing_output, parse_doc

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "learn").glob("*.md"))]
BLOCKS = [b for page in PAGES for b in parse_doc(page, ROOT)]


def params():
    """One pytest param per block: a page's blocks share an xdist group (one worker, in order)."""
    for b in BLOCKS:
        marks = [pytest.mark.xdist_group(b.doc)]
        if "fast" not in b.marker:
            marks.append(pytest.mark.docs)
        if "torchrun" in b.commands() or "verify" in b.commands():
            marks.append(pytest.mark.world)
        yield pytest.param(b, id=b.name, marks=marks)


def venv_bin() -> Path:
    """The project's .venv (as the README activates it), else the environment running pytest."""
    return ROOT / ".venv" / "bin" if (ROOT / ".venv" / "bin" / "activate").exists() else Path(sys.executable).parent


def copy_checkout(dest: Path) -> Path:
    """The tracked files (git ls-files), plus the prepared default corpus so that no page pays for it."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    files = [f for f in listed.stdout.decode().split("\0") if f] if listed.returncode == 0 else None
    if files is None:  # not a git checkout (an unpacked source tree): everything but what runs write
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "__pycache__"))
    else:
        for f in files:
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    for prepared in (ROOT / "data").glob("*.nanotrain"):
        shutil.copytree(prepared, dest / "data" / prepared.name, dirs_exist_ok=True)
    (dest / ".venv").symlink_to(venv_bin().parent)  # `source .venv/bin/activate` works in the copy
    return dest


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """One fresh copy of the checkout per page, made on first use."""
    made = {}

    def get(doc: str) -> Path:
        if doc not in made:
            made[doc] = copy_checkout(tmp_path_factory.mktemp(doc.replace("/", "_")))
        return made[doc]
    return get


def run_block(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """bash with the .venv activated, stopping at the first failing command, as a reader would."""
    activate = cwd / ".venv" / "bin" / "activate"
    prelude = f"source {activate}\n" if activate.exists() else f"export PATH={venv_bin()}:$PATH\n"
    env = {**os.environ, "PYTHONPATH": str(cwd / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", prelude + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("block", list(params()))
def test_documented_command(block, workspace):
    if "skip" in block.marker:
        pytest.skip(f"{block.name}: {block.marker['skip']}")
    timeout = float(block.marker.get("timeout", 180))
    try:
        done = run_block(block.commands(), workspace(block.doc), timeout)
    except subprocess.TimeoutExpired as e:
        printed = "".join(t.decode(errors="replace") if isinstance(t, bytes) else t or "" for t in (e.stdout, e.stderr))
        pytest.fail(f"{block.name} ran past its {timeout:.0f} s (`timeout:` in its marker):\n{printed[-3000:]}")
    printed = done.stdout + done.stderr
    tail = printed[-3000:]
    if "error" in block.marker:
        assert done.returncode != 0, f"{block.name} should fail, exited 0:\n{tail}"
        assert block.marker["error"] in printed, f"{block.name} did not print {block.marker['error']!r}:\n{tail}"
    else:
        assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{tail}"
    absent = [e for e in block.marker.get("expect", []) if e not in printed]
    assert not absent, f"{block.name} no longer prints {absent}:\n{tail}"
    missing = missing_output(block.output, printed, block.marker)
    assert not missing, f"{block.name}: the page shows lines the command no longer prints: {missing}\n{tail}"
