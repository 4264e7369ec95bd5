"""Expert tensor parallelism (parallel.etp = tp: each routed expert's d_ff split over the tp group,
models/moe.py ExpertMLP.split / tensor_parallel_forward) against one process: fp32, 10 steps,
1e-5 relative on losses, step-1 gradients and norms (nanotrain verify); a checkpoint written with
experts split over two axes (ep on dim 0, tp on dim 1 or 2) resumes on one process."""

import pytest

from conftest import CORPUS
from nanotrain.config import ConfigError, load_config

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_tp_dp import check_layout  # noqa: E402

TOL = 1e-5


def config(tmp_path, *extra):
    return load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                              f"--train.out_dir={tmp_path / 'run'}", "--train.seq_len=16", "--train.batch_size=8",
                              "--schedule.warmup_steps=2", "--optimizer.lr=3e-3", "--model.bias_update_rate=0.01",
                              "--logging.progress=none", *extra])


LAYOUTS = {
    "tp2_etp2": "tp=2,etp=2",
    "tp2_sp_etp2": "tp=2,etp=2,sp",  # every tp rank's tokens all-gathered for the experts
    "tp2_dp2_ep2_etp2": "tp=2,dp=2,ep=2,etp=2",  # the layout: experts split over ep and tp
    "tp2_dp2_ep2_etp2_sp_zero2": "tp=2,dp=2,ep=2,etp=2,sp,zero=2",
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_expert_tensor_parallel_matches_one_process(tmp_path, name):
    check_layout(config(tmp_path), LAYOUTS[name], TOL)


def test_expert_tensor_parallel_checkpoint_resumes_on_one_process(tmp_path):
    from test_resume_across_layouts import check_resume_chain  # noqa: E402

    def cfg(out, *extra):
        return config(tmp_path, f"--train.out_dir={tmp_path / out}", "--train.eval_interval=0",
                      "--precision.recipe=fp32", "--logging.tensorboard=false", "--logging.plot=false",
                      "--schedule.decay_steps=12", *extra)

    check_resume_chain(cfg, (8, 4, "--parallel.tp=2", "--parallel.dp=4", "--parallel.ep=2", "--parallel.etp=2"),
                       (1, 8))


def test_etp_must_be_one_or_tp():
    with pytest.raises(ConfigError, match="parallel.etp=2 must be 1"):
        load_config(None, [*TINY, "--parallel.etp=2"])
