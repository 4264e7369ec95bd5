"""Context parallelism (parallel.cp: the zigzag split and ring attention, parallel/
context_parallel.py) against one process: fp32, 10 steps, 1e-5 relative on losses, step-1
gradients and norms (nanotrain verify), alone and with tp (+ sp), pp, dp, ep and ZeRO, for the Llama
block, GPT-2's (learned positions) and DeepSeek's (MLA, routed experts); a checkpoint written at
cp=2 resumes on one process; what cp does not run yet is refused by name.
(tests/distributed/test_context_parallel.py checks the ring itself against full attention.)"""

import pytest

from conftest import CORPUS
from nanotrain.config import ConfigError, load_config

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_tp_dp import check_layout, config as tp_dp_config  # noqa: E402

TOL = 1e-5


def config(tmp_path, *extra):
    return tp_dp_config(tmp_path, "--precision.recipe=fp32", *extra)  # seq_len 16: 4 chunks of 4 at cp=2


LAYOUTS = {
    "cp2": ("cp=2", []),
    "cp4": ("cp=4", ["--train.seq_len=32"]),
    "tp2_cp2_sp": ("tp=2,cp=2,sp", []),
    "cp2_dp2_zero1": ("cp=2,dp=2,zero=1", []),
    "cp2_zero3": ("cp=2,zero=3", []),
    "cp2_gqa": ("cp=2", ["--model.n_kv_heads=2"]),
    # the pipeline's messages are each rank's tokens; every stage takes its positions from them
    "cp2_pp2_1f1b": ("cp=2,pp=2", ["--model.n_layers=4", "--train.micro_batch_size=2"]),
    "cp2_pp2_interleaved": ("cp=2,pp=2", ["--model.n_layers=4", "--train.micro_batch_size=2",
                                          "--parallel.pp_schedule=interleaved", "--parallel.pp_virtual_stages=2"]),
    "cp2_gpt2_learned_positions": ("cp=2", ["--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned",
                                            "--model.bias=true"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_context_parallel_layout_matches_one_process(tmp_path, name):
    layout, extra = LAYOUTS[name]
    check_layout(config(tmp_path, *extra), layout, TOL)


@pytest.mark.parametrize("layout", ["cp=2", "tp=2,cp=2", "cp=2,dp=2,ep=2", "tp=2,cp=2,dp=2,ep=2,sp"])
def test_deepseek_context_parallel_matches_one_process(tmp_path, layout):
    """MLA's unequal q/k and v head sizes go round the ring; the experts route each rank's tokens,
    over ep groups of the same cp rank, and their gradients are summed over ep groups and cp ranks."""
    cfg = load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                             f"--train.out_dir={tmp_path / 'run'}", "--train.seq_len=16", "--train.batch_size=8",
                             "--schedule.warmup_steps=2", "--optimizer.lr=3e-3", "--logging.progress=none"])
    check_layout(cfg, layout, TOL)


def test_cp_checkpoint_resumes_on_one_process_and_back(tmp_path):
    """cp ranks hold the same weights: the checkpoint is the one-process model's."""
    from test_resume_across_layouts import SMALL, check_resume_chain, run_config  # noqa: E402

    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *SMALL, *extra),
                       (4, 4, "--parallel.cp=2", "--parallel.tp=2"), (1, 8), (2, 12, "--parallel.cp=2"))


@pytest.mark.slow
def test_compiled_context_parallel_matches_compiled_one_process(tmp_path):
    check_layout(config(tmp_path, "--train.compile=true", "--monitoring.mode=minimal"), "cp=2", TOL)


@pytest.mark.parametrize("extra,named", [
    (["--data.document_mask=true", "--data.tokenizer=x.json"], "data.document_mask=true with parallel.cp=2"),
    (["--train.seq_len=18"], "not divisible by 2 x parallel.cp = 4"),
    (["--model.dropout=0.1"], "ring attention has no attention dropout"),
])
def test_what_cp_does_not_run_is_named(tmp_path, extra, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [f"--data.path={CORPUS}", "--parallel.cp=2", "--train.seq_len=16", *extra])
