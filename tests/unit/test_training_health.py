"""The monitor's figures (monitoring/health.py) against longhand definitions, and what a run
does with a non-finite step (monitoring.nonfinite)."""

import json
import math

import pytest
import torch

from conftest import tiny_config
from nanotrain.monitoring import health
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.divergence import TrainingError


def test_entropy_against_the_definition():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [1.0, 2.0, float("-inf"), 0.5]])
    p = [[0.25] * 4, torch.softmax(logits[1], 0).tolist(), torch.softmax(logits[2], 0).tolist()]
    longhand = [-sum(q * math.log(q) for q in row if q > 0) for row in p]
    assert health.entropy(logits).tolist() == pytest.approx(longhand, rel=1e-4, abs=1e-7)  # fp32
    norm = health.entropy(logits, normalised=True)
    assert norm[0].item() == pytest.approx(1.0)  # uniform over 4
    assert norm[2].item() == pytest.approx(longhand[2] / math.log(3))  # 3 allowed positions (one masked)
    assert norm[1].item() < 0.01  # nearly one-hot


def test_top_k_mass_outliers_and_quantiles():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1]))
    assert health.top_k_mass(logits, 2).item() == pytest.approx(0.8)
    a = torch.ones(1000)
    a[:3] = 100.0  # RMS = sqrt((3 * 1e4 + 997) / 1000) = 5.57; 10 x RMS = 55.7: the three 100s
    assert health.outlier_rate(a).item() == pytest.approx(3 / 1000)
    assert health.rms(a).item() == pytest.approx(math.sqrt((3e4 + 997) / 1000))
    v = torch.arange(1.0, 101.0)
    assert health.quantiles(v) == pytest.approx([50.5, 95.05])  # numpy's linear interpolation


def test_loss_ema_spike_and_update_ratio():
    e = None
    for x in (4.0, 3.0, 2.0):
        e = health.ema(e, x, 0.9)
    assert e == pytest.approx(0.9 * (0.9 * 4.0 + 0.1 * 3.0) + 0.1 * 2.0)
    assert health.spike_ratio(6.0, 3.0) == 2.0 and health.spike_ratio(1.0, None) == 1.0
    w, dw = torch.tensor([3.0, 4.0]), torch.tensor([0.003, 0.004])
    assert health.update_ratio(dw.norm(), w.norm()).item() == pytest.approx(1e-3)
    assert health.clip_coefficient(4.0, 1.0) == pytest.approx(1 / (4 + 1e-6))
    assert health.clip_coefficient(0.5, 1.0) == 1.0 and health.clip_coefficient(9.0, 0.0) == 1.0


ARGS = ["--train.max_steps=8", "--logging.log_interval=2", "--train.eval_interval=8", "--precision.recipe=fp32"]


def _poison_step(engine, bad_step):
    """Make the gradient of one step NaN (as an overflow would), through the on_grads hook."""
    def on_grads(step, model, ctx):
        if step == bad_step:
            next(model.parameters()).grad.fill_(float("nan"))
    engine.on_grads = on_grads
    return engine


def test_a_nonfinite_step_stops_the_run_naming_it(tmp_path):
    engine = _poison_step(RuntimeEngine(tiny_config(tmp_path, *ARGS)), 3)
    with pytest.raises(TrainingError, match="at step 3.*monitoring.nonfinite=rollback"):
        engine.run()


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path):
    engine = _poison_step(RuntimeEngine(tiny_config(tmp_path, *ARGS, "--monitoring.nonfinite=skip")), 3)
    result = engine.run()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = next(d for d in reversed(logged) if "skipped_nonfinite" in d)
    assert last["skipped_nonfinite"] == 1 and last["optimizer_state_finite"] == 1.0
    assert math.isfinite(result.losses[8]) and result.losses[8] < result.losses[1]


def test_standard_mode_logs_the_health_figures(tmp_path):
    RuntimeEngine(tiny_config(tmp_path, *ARGS)).run()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [d for d in logged if "loss" in d]
    for key in ("loss_ema", "loss_spike", "perplexity", "param_norm", "update_ratio", "update_ratio_p95",
                "clip_rate", "time/compute_ms", "mem/rss_mb", "ignored_targets", "blocks/layers.1/grad_norm",
                "grad_depth_ratio"):
        assert key in train[-1], key
    assert train[-1]["perplexity"] == pytest.approx(math.exp(train[-1]["loss"]))
    # the per-block gradient norms add up (in squares) to the global one
    blocks = [v for k, v in train[-1].items() if k.startswith("blocks/") and k.endswith("/grad_norm")]
    assert math.sqrt(sum(b * b for b in blocks)) == pytest.approx(train[-1]["grad_norm"], rel=1e-5)
    assert "train_val_gap" in logged[-1]
    RuntimeEngine(tiny_config(tmp_path / "min", *ARGS, "--monitoring.mode=minimal")).run()
    minimal = [json.loads(line) for line in (tmp_path / "min" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_ema" in minimal[-2] and "param_norm" not in minimal[-2]


def test_report_page_compares_runs(tmp_path):
    """`nanotrain report A B` writes one HTML page with the plots of both runs and what differs."""
    from nanotrain.cli import main

    RuntimeEngine(tiny_config(tmp_path / "a", *ARGS)).run()
    RuntimeEngine(tiny_config(tmp_path / "b", *ARGS, "--optimizer.lr=3e-3")).run()
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<img src='data:image/png;base64,") >= 7  # loss, lr, grad norm, ratios, ..., blocks x2
    for caption in ("Loss", "Gradient norm", "Update-to-weight ratio", "Time split", "Probe batch"):
        assert f"<figcaption>{caption}</figcaption>" in page
    assert "optimizer.lr" in page and "0.003" in page  # the config difference is named
    assert main(["report", str(tmp_path / "nothing")]) == 2  # a folder without metrics: a clear error


def test_attention_and_residual_figures_against_longhand():
    from nanotrain.monitoring.internals import attention_stats, norm_stats, residual_stats

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)  # GQA: 2 kv heads
    stats = attention_stats(q, k, 8 ** -0.5)
    best, ents = -math.inf, []
    for b in range(2):
        for h in range(4):
            kh = k[b, h // 2]  # query heads 0,1 share kv head 0; 2,3 share 1
            for t in range(5):
                logits = [float(q[b, h, t] @ kh[j]) / math.sqrt(8) for j in range(t + 1)]  # causal: j <= t
                best = max(best, *logits)
                if t > 0:
                    z = sum(math.exp(x) for x in logits)
                    ents.append(-sum(math.exp(x) / z * math.log(math.exp(x) / z) for x in logits) / math.log(t + 1))
    assert stats["attn_max"].item() == pytest.approx(best, rel=1e-5)
    assert (stats["ent_sum"] / stats["ent_n"]).item() == pytest.approx(sum(ents) / len(ents), rel=1e-5)
    x = torch.ones(3, 4, 400)
    x[0, 0, 0] = 50.0  # that token's RMS is sqrt((2500 + 399) / 400) = 2.69: 50 > 10 x 2.69
    x[1, 1, :2] = 8.0  # RMS sqrt((128 + 398) / 400) = 1.15: 8 < 11.5, not an outlier
    r = residual_stats(x)
    assert r["res_out"].item() == 1 and r["res_n"].item() == 4800
    assert r["res_sq"].item() == pytest.approx(float((x.double() ** 2).sum()))
    assert norm_stats(x)["norm_max"].item() == 50.0
