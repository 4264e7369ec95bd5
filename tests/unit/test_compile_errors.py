"""train.compile stops before training, with one line naming the problem and the fix, when it
cannot work: no C++ compiler for inductor, or a block that fails to compile. Never a silent
fallback to eager. (The compiled runs themselves: tests/parity/test_compile_layouts.py, marked slow.)"""

from pathlib import Path

import pytest

from nanotrain.compiling import CompileError
from nanotrain.runtime import RuntimeEngine


def steps_run(cfg) -> list[int]:
    """Train; the steps whose gradients were computed (none if the run stopped at start-up)."""
    seen = []
    RuntimeEngine(cfg, on_grads=lambda step, model, ctx: seen.append(step)).run()
    return seen


def test_compile_is_off_by_default(make_config):
    assert make_config().train.compile is False
    assert make_config("--train.compile=true").train.compile is True


def no_compiler():
    """As on a machine without g++: inductor's compiler search finds nothing that runs."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")})


def test_missing_cxx_compiler_is_named_at_start_up(make_config):
    cfg = make_config("--train.compile=true", "--precision.recipe=fp32")
    with no_compiler(), pytest.raises(CompileError) as err:
        steps_run(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "C++ compiler" in message and "/nonexistent/g++" in message
    assert "install g++" in message and "train.compile=false" in message
    assert not Path(cfg.train.out_dir).exists()  # stopped before the run made its folder


def test_block_that_fails_to_compile_stops_before_step_one(make_config, monkeypatch):
    """Inductor's entry point raises, as a lowering or C++ build error would: the start-up
    compile names the block and the fix, and no step runs."""
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("simulated lowering failure")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    with pytest.raises(CompileError) as err:
        steps_run(make_config("--train.compile=true", "--precision.recipe=fp32"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train.compile: layers.0 failed to compile (RuntimeError: simulated lowering failure)")
    assert "set train.compile=false" in message


def test_compile_errors_print_one_line_from_the_cli(tmp_path, capsys):
    from conftest import CORPUS
    from nanotrain.cli import main

    with no_compiler():
        code = main(["train", f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                     f"--train.out_dir={tmp_path / 'run'}", "--train.compile=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: train.compile=true needs a C++ compiler")


def test_inductor_cache_has_a_folder_per_cpu_capability(tmp_path, monkeypatch):
    """Kernels cached under one ATen CPU capability and loaded under another broke runs (NaN,
    heap corruption) in torch 2.13: each capability gets its own folder, once."""
    import torch

    from nanotrain.compiling import separate_cache_by_isa

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    mine = tmp_path / f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    assert separate_cache_by_isa() == str(mine)
    assert separate_cache_by_isa() == str(mine)  # not nested again on the next run
