"""metrics.jsonl survives kills: a resumed run repairs what a killed one left (a partial last line,
rows past the checkpoint it resumes from), and the readers (report, plot) skip bad lines, counting them."""

import json
from pathlib import Path

from pictures import assert_picture

from nanotrain.cli import main
from nanotrain.monitoring import JSONLSink, plot_loss_curve, read_metrics, repair_metrics
from nanotrain.runtime import RuntimeEngine

LINES = [b'{"step": %d, "loss": %d.5}\n' % (s, 9 - s) for s in range(1, 7)]
ROWS = b"".join(LINES)


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_repairs_the_file_a_killed_run_left(make_config, capsys):
    """Train to step 5 (a checkpoint there), then play a kill after step 7 logged mid-write: the
    resumed run drops steps 6-7 and the partial line, with a warning, and logs each step once."""
    common = ["--checkpoint.interval=5", "--schedule.decay_steps=10"]
    cfg = make_config(*common, "--train.max_steps=5")
    RuntimeEngine(cfg).run()
    metrics = Path(cfg.train.out_dir) / "metrics.jsonl"
    before = metrics.read_bytes()
    with open(metrics, "ab") as f:
        f.write(b'{"step": 6, "loss": 99.0}\n{"step": 7, "loss": 99.0}\n{"step": 8, "lo')
    capsys.readouterr()
    RuntimeEngine(make_config(*common, "--train.max_steps=10")).run()
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if "metrics.jsonl" in line]
    assert warning.startswith(f"warning: {metrics}: dropped a partial last line ('{{\"step\": 8, \"lo')")
    assert "2 rows past step 5" in warning
    after = metrics.read_bytes()
    # rows up to the resume point kept as they were, the injected ones gone (matched as written: a bare
    # b"99.0" also matches a timing figure such as "tokens_per_s": 1399.07)
    assert after.startswith(before) and b'"loss": 99.0' not in after
    rows, bad = read_metrics(metrics)
    train = [r["step"] for r in rows if "loss" in r]
    assert bad == 0 and train == sorted(set(train)) and train[-1] == 10  # each step once, in order
    assert sorted(p.name for p in metrics.parent.glob("*metrics*")) == ["metrics.jsonl"]  # no temporary left


def test_repair_counts_bad_lines_and_drops_rows_past_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(LINES[:2]) + b"garbage\n" + b"".join(LINES[2:]) + b"[1]\n" + b'{"step": 7, "lo')
    warning = repair_metrics(path, 3)
    assert warning == (f"warning: {path}: dropped a partial last line ('{{\"step\": 7, \"lo'), 2 unreadable lines "
                       "before it, 3 rows past step 3, where this run resumes (logged after that checkpoint; "
                       "they are logged again).")
    assert _steps(path) == [1, 2, 3]
    assert repair_metrics(path, 3) is None  # repaired: nothing more to say, the file stays as it is


def test_a_fresh_run_starts_the_file_anew(tmp_path, capsys):
    """start=0: the rows are a run's that was killed before its first checkpoint (build_logger's start)."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(ROWS)
    sink = JSONLSink(path, start=0)
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert _steps(path) == [1]
    err = capsys.readouterr().err
    assert f"warning: {path}: dropped 6 rows of a run that stopped before its first checkpoint" in err


def test_a_good_file_is_left_alone_and_a_lost_newline_is_restored(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(ROWS)
    JSONLSink(path, start=6).close()
    assert path.read_bytes() == ROWS and capsys.readouterr().err == ""
    path.write_bytes(ROWS[:-1])  # killed between a row and its newline: the row is whole, keep it
    sink = JSONLSink(path, start=6)
    sink.log(7, {"loss": 1.0})
    sink.close()
    assert _steps(path) == [1, 2, 3, 4, 5, 6, 7] and capsys.readouterr().err == ""


def test_report_and_plot_skip_bad_lines_and_say_how_many(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    no_step, partial = b'{"loss": 1.0}\n', b'{"step": 7, "lo'
    (run / "metrics.jsonl").write_bytes(b"".join(LINES[:2]) + no_step + b"".join(LINES[2:]) + partial)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    # The six good rows were read: the summary's last step is 6, its loss 9 - 6 + 0.5.
    assert "wrote" in out and "run</td><td>6</td><td>3.5</td>" in (run / "report.html").read_text()
    assert err == f"warning: skipped 2 unreadable lines of {run / 'metrics.jsonl'} (a run killed mid-write " \
                  "leaves a partial last line)\n"
    pixels = assert_picture(plot_loss_curve(run / "metrics.jsonl", tmp_path / "loss.png"), size=(960, 600))
    r, b = pixels[..., 0], pixels[..., 2]
    assert (b - r > 0.15).mean() > 1e-4  # the train loss, drawn in tab:blue (translucent: 0.3)
