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
import signal
import subprocess
import sys
import time
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


def worker_cores() -> set[int] | None:
    """This pytest-xdist worker's share of the cores (worker i of n: every n-th core from the i-th),
    None outside xdist or with fewer cores than workers. A documented command sizes its threads to
    the cores it may use (runtime/machine.job_cores), so two workers' commands each take their own
    share: left to take every core, two 2-thread PyTorch processes on 2 cores spin against each
    other and train 10-30x slower (the default run went from 12k to 430 tokens/s beside another
    page's torchrun, past its 600 s limit)."""
    n, worker = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if n < 2 or not worker.startswith("gw") or len(cores) < n:
        return None
    return set(cores[int(worker[2:]) % n::n])


def run_block(script: str, cwd: Path, timeout: float) -> tuple[int, str]:
    """bash with the .venv activated, stopping at the first failing command, as a reader would, on
    this worker's share of the cores (worker_cores). (exit code, stdout + stderr); past `timeout`
    the whole process group (torchrun's workers included) is killed and pytest.fail names the
    block's limit."""
    activate = cwd / ".venv" / "bin" / "activate"
    prelude = f"source {activate}\n" if activate.exists() else f"export PATH={venv_bin()}:$PATH\n"
    env = {**os.environ, "PYTHONPATH": str(cwd / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    cores = worker_cores()
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", prelude + script], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=pin)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"ran past its {timeout:.0f} s (`timeout:` in its marker):\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.parametrize("block", list(params()))
def test_documented_command(block, workspace):
    if "skip" in block.marker:
        pytest.skip(f"{block.name}: {block.marker['skip']}")
    code, printed = run_block(block.commands(), workspace(block.doc), float(block.marker.get("timeout", 600)))
    tail = printed[-3000:]
    if "error" in block.marker:
        assert code != 0, f"{block.name} should fail, exited 0:\n{tail}"
        assert block.marker["error"] in printed, f"{block.name} did not print {block.marker['error']!r}:\n{tail}"
    else:
        assert code == 0, f"{block.name} exited {code}:\n{tail}"
    absent = [e for e in block.marker.get("expect", []) if e not in printed]
    assert not absent, f"{block.name} no longer prints {absent}:\n{tail}"
    missing = missing_output(block.output, printed, block.marker)
    assert not missing, f"{block.name}: the page shows lines the command no longer prints: {missing}\n{tail}"


def test_a_block_past_its_timeout_is_killed_with_its_children(tmp_path):
    """A hung `torchrun` must not outlive its test: the block's whole process group goes."""
    with pytest.raises(pytest.fail.Exception, match="ran past its 1 s"):
        run_block("sleep 60 & echo $! > child.pid; wait", tmp_path, 1)
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # (reaped by init once its parent is gone)
        if not running(child):
            return
        time.sleep(0.1)
    pytest.fail(f"the block's child {child} is still running")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has stopped
    except FileNotFoundError:
        return False
