"""Shared test helpers: a tiny config that trains in a second on the shipped corpus."""

import contextlib
import os
import sys
from pathlib import Path

import pytest

from nanotrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
for _sub in ("unit", "parity", "faults"):  # shared tiny model configs between test files
    sys.path.insert(0, str(Path(__file__).resolve().parent / _sub))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"


def pytest_addoption(parser):
    parser.addoption("--train-device", default="cpu", choices=["cpu", "cuda"],
                     help="train.device of the engine runs built by tiny_config (bench/gpu_check.sh passes cuda)")
    parser.addoption("--docs", action="store_true",
                     help="run every documented command (tests/docs; `make test-docs`), not only the fast ones")


def pytest_configure(config):
    check_groups_hold(config)
    os.environ["NANOTRAIN_TEST_DEVICE"] = config.getoption("--train-device")
    # The machine's matmul rates are kept between runs (runtime/machine_cache.py): the tests keep
    # theirs in a folder of their own, never in the user's cache; the processes they start inherit it.
    import tempfile

    os.environ["NANOTRAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanotrain-cache-")


def check_groups_hold(config) -> None:
    """`make test` keeps the tests of one xdist_group on one worker (--dist loadgroup): a module's
    shared fixture runs once, and a page's documented commands run in order in one folder. pytest
    9.2 keeps a test's id where pytest-xdist 3.8 cannot add its group to it, and the groups are then
    split silently: refuse that pair in one line (pyproject.toml pins pytest<9.2)."""
    if getattr(config.option, "dist", "no") != "loadgroup" or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from importlib.metadata import version

    def release(name):
        return tuple(int(p) for p in version(name).split(".")[:2] if p.isdigit())

    if release("pytest") >= (9, 2) and release("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} does not "
                                "keep an xdist_group on one worker (--dist loadgroup): pip install 'pytest<9.2'")


def pytest_unconfigure(config):
    import shutil

    folder = os.environ.get("NANOTRAIN_CACHE_DIR", "")
    if "nanotrain-cache-" in folder:  # the folder pytest_configure made
        shutil.rmtree(folder, ignore_errors=True)
    # Under pytest-xdist (`make test` runs two workers: -n 2), each worker gets its share of the
    # cores for the tests it runs in-process, as a world's ranks get one thread each (launch.py):
    # two workers each running PyTorch's default (every core) would oversubscribe the machine.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from nanotrain.runtime.machine import job_cores

        torch.set_num_threads(max(1, job_cores() // workers))


def pytest_collection_modifyitems(config, items):
    """Every test under tests/distributed and tests/parity starts gloo worlds: mark them `world`,
    so that `pytest -m "not slow and not world"` runs the single-process part in a minute or two.
    The documented commands marked `docs` (all but the fast ones) run only with --docs."""
    skip_docs = pytest.mark.skip(reason="a documented command outside the fast set: make test-docs runs it")
    for item in items:
        if {"distributed", "parity"} & set(Path(str(item.fspath)).parts):
            item.add_marker(pytest.mark.world)
        if item.get_closest_marker("docs") and not config.getoption("--docs"):
            item.add_marker(skip_docs)


def tiny_config(tmp_path: Path, *overrides: str):
    """A 2-layer, 32-wide model on tiny Shakespeare; everything it writes goes under tmp_path."""
    return load_config(None, tiny_overrides(tmp_path) + list(overrides))


def tiny_overrides(tmp_path: Path) -> list[str]:
    """tiny_config's command-line overrides (for a `nanotrain train` process)."""
    return [f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prepared'}",
            f"--train.out_dir={tmp_path / 'run'}", "--model.d_model=32", "--model.n_layers=2",
            "--model.n_heads=2", "--train.seq_len=16", "--train.batch_size=4",
            "--train.max_steps=20", "--train.eval_interval=10", "--train.eval_steps=2",
            "--schedule.warmup_steps=5", "--logging.log_interval=5", "--logging.progress=none",
            "--logging.peak_tflops=1", "--logging.tensorboard=false", "--logging.plot=false",
            "--train.threads=1",
            # bf16 as every test was written for; recipe=auto is machine-dependent (test_machine.py)
            "--precision.recipe=bf16", f"--train.device={os.environ.get('NANOTRAIN_TEST_DEVICE', 'cpu')}"]


@pytest.fixture
def make_config(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)


def straight_and_resumed(build, *common, stop: int = 5, end: int = 10):
    """Train `end` steps in one go, and `stop` steps then a resume from the checkpoint at
    `stop` to `end` (common must save there: --checkpoint.interval). build(*overrides) makes
    the config (make_config, or a wrapper of it). Returns both runs' results."""
    from nanotrain.runtime import RuntimeEngine

    straight = RuntimeEngine(build(*common, f"--train.max_steps={end}",
                                   f"--train.out_dir={build().train.out_dir}_straight")).run()
    RuntimeEngine(build(*common, f"--train.max_steps={stop}")).run()
    resumed = RuntimeEngine(build(*common, f"--train.max_steps={end}", "--checkpoint.resume=latest")).run()
    return straight, resumed


@contextlib.contextmanager
def runtime_parts(cfg_dict: dict):
    """The run's components built as the engine builds them, in this process (one rank of a
    world): (data, model, optimizer); torn down after."""
    from nanotrain.config import Config
    from nanotrain.runtime.components import default_components, resolve_model_config

    cfg = Config.from_dict(cfg_dict)
    c = default_components()
    ctx = c.bootstrap.setup(cfg)
    try:
        data = c.data.build(ctx)
        resolve_model_config(cfg, data.vocab_size)
        model = c.model.build(ctx)
        yield data, model, c.optimizer.build(ctx, model)
    finally:
        c.bootstrap.teardown(ctx)
