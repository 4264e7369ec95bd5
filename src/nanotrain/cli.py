"""The `nanotrain` command: train, prepare, sample, verify, convert, inspect, plan, report, weights, machine.
Each subcommand only assembles library pieces."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError


def _config(args, overrides):
    return load_config(args.config, overrides)


def cmd_train(args, overrides) -> int:
    from .runtime import RuntimeEngine

    cfg = _config(args, overrides)
    result = RuntimeEngine(cfg).run()
    if result.signal:  # preempted: the engine said where it saved; 143 (SIGTERM) or 130 (Ctrl-C)
        return result.exit_code
    if result.val_losses and result.rank == 0:
        step, val = max(result.val_losses.items())
        print(f"done: step {result.final_step}, val loss {val:.4f}, {result.tokens_per_s:,.0f} tokens/s, "
              f"outputs in {result.out_dir}")
    return 0


def cmd_prepare(args, overrides) -> int:
    from .data import prepare_data

    cfg = _config(args, overrides)
    prepare_data(cfg.data, cfg.train.seq_len)
    return 0


def cmd_sample(args, overrides) -> int:
    from .sample import sample_text

    if args.checkpoint:
        if overrides:
            raise ConfigError(f"config overrides ({' '.join(overrides)}) only apply with --config")
        path = args.checkpoint
    elif args.config:
        path = _config(args, overrides).train.out_dir  # the newest checkpoint of that run
    else:
        raise ConfigError("sample needs --checkpoint PATH or --config FILE (to use that run's latest checkpoint)")
    texts = sample_text(path, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                        args.seed, args.num_samples, _sample_device(args.device))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def _sample_device(name: str) -> str:
    """--device as torch takes it: cpu, cuda where one is visible, or auto (cuda if visible)."""
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not a device: use cpu, cuda or auto.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is visible: use --device cpu (or auto).")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_verify(args, overrides) -> int:
    import signal

    from .verify import Stopped, verify

    _verify_overrides(args, overrides)
    cfg = load_config(args.config, overrides, check=False)  # checked once, under the layout (verify)
    try:
        report = verify(cfg, args.layout, args.steps, args.tolerance, args.precision)
    except Stopped as e:
        print(f"verify was stopped by {signal.Signals(e.signal).name} before its runs finished: nothing was "
              "judged (its runs live in a temporary folder, now removed); run it again.", file=sys.stderr)
        return 128 + e.signal
    if report is None:  # a rank other than 0 of a torchrun world: rank 0 judges and prints
        return 0
    print(report.table(args.layout))
    return 0 if report.ok else 1


def _verify_overrides(args, overrides) -> None:
    """verify sets some keys on both sides (verify.SETS): a user's value for one of them does not
    stand. A precision that disagrees with --precision is refused (the user meant to verify in it: say
    it with the flag); for the others a note says verify's value wins."""
    from .config import parse_overrides
    from .verify import SETS

    for key, value in parse_overrides(overrides):
        if key == "precision.recipe" and value != args.precision:
            raise ConfigError(f"--{key}={value} disagrees with verify's --precision {args.precision}, which sets it "
                              f"for both sides ({SETS[key]}): pass --precision instead.")
        if key == "model.dropout" and _nonzero(value):
            print(f"note: verify sets {key}=0.0 for both sides ({SETS[key]}): --{key}={value} is not used",
                  file=sys.stderr)


def _nonzero(value: str) -> bool:
    """A number other than 0 (not a number: False, the config check names it)."""
    try:
        return float(value) != 0.0
    except ValueError:
        return False


def cmd_convert(args, overrides) -> int:
    from .models.hf import convert_from_hf, convert_to_hf

    if overrides:
        raise ConfigError(f"convert takes no config overrides, got: {' '.join(overrides)}")
    if args.to_hf and not args.checkpoint:
        raise ConfigError("convert --to-hf needs --checkpoint PATH (a training checkpoint or a "
                          "convert --from-hf folder)")
    if args.from_hf and args.checkpoint:
        raise ConfigError("convert --from-hf FOLDER reads FOLDER; --checkpoint goes with --to-hf")
    check_convert_out(Path(args.out), args.overwrite)
    try:
        if args.from_hf:
            model = convert_from_hf(args.from_hf, args.out)
            print(f"wrote {Path(args.out) / 'model.safetensors'} and nanotrain_config.json "
                  f"({model.cfg.arch}, {model.num_params():,} parameters)")
        else:
            model = convert_to_hf(args.checkpoint, args.out)
            print(f"wrote Hugging Face config.json and model.safetensors to {args.out} "
                  f"({model.cfg.arch}, {model.num_params():,} parameters)")
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        raise ConfigError(str(e)) from None
    return 0


# What marks a folder as a training run's (train.out_dir): convert never writes there.
RUN_MARKERS = ("metrics.jsonl", "checkpoints", ".lock")


def check_convert_out(out: Path, overwrite: bool) -> None:
    """convert writes config.json and model.safetensors (or nanotrain_config.json) into --out: never
    into a run's folder (its config.json is the run's), and into a folder holding anything only
    with --overwrite, so that no file of the user's is replaced unasked."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder (new or empty).")
    if not out.is_dir():
        return
    if any((out / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"--out {out} is a training run's folder (it holds "
                          f"{', '.join(m for m in RUN_MARKERS if (out / m).exists())}): writing there would "
                          "replace the run's config.json. Give convert a folder of its own.")
    held = sorted(p.name for p in out.iterdir())
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(f"--out {out} is not empty (it holds {shown}): give a new or empty folder, or pass "
                          "--overwrite to replace the files convert writes there.")


def cmd_report(args, overrides) -> int:
    from pathlib import Path

    from .monitoring.report import write_report

    if overrides:
        raise ConfigError(f"report takes run folders, not config overrides: {' '.join(overrides)}")
    out = Path(args.out) if args.out else Path(args.runs[0]) / "report.html"
    predict = None
    if not args.no_predict:  # the planner on this CPU, beside each run's measured step
        from .inspection.predicted_run import predict_run as predict
    try:
        path, notes = write_report([Path(r) for r in args.runs], out, predict)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"wrote {path} ({len(args.runs)} run(s))")
    return 0


def cmd_weights(args, overrides) -> int:
    from .inspection.weights import checkpoint_stats, compare_checkpoints, markdown, to_json, write_weights

    if overrides:
        raise ConfigError(f"weights takes checkpoint folders, not config overrides: {' '.join(overrides)}")
    if args.ckpt2:
        result = compare_checkpoints(args.ckpt, args.ckpt2, args.optimizer)
    else:
        result = checkpoint_stats(args.ckpt, args.optimizer)
    print(to_json(result) if args.json else markdown(result).rstrip("\n"))
    if args.out:  # to stderr: stdout stays one JSON document with --json
        print("wrote " + ", ".join(map(str, write_weights(result, args.out))), file=sys.stderr)
    return 0


def cmd_inspect(args, overrides) -> int:
    import json

    from .inspection.hardware import get_accelerator
    from dataclasses import replace

    from .config import validate
    from .inspection.report import (fewest_micro_batches, inspect_model, markdown, model_config, plan_layout,
                                    run_config, without_balance_loss, write_report)
    from .parallel.layout import Layout

    if args.config and args.hf_config:
        raise ConfigError("inspect takes --config (ours) or --hf-config (Hugging Face config.json), not both")
    m, seq = model_config(args.config, args.hf_config, overrides, args.seq_len)
    # The run's config (--config), or the defaults (--hf-config: the model is HF's, the other keys
    # still apply); --layout changes its layout (parallel/layout.py) for the memory and communication plan.
    cfg = load_config(args.config, [o for o in overrides if not o.startswith("--model.")] if args.hf_config
                      else overrides)
    layout = Layout.parse(args.layout or "", Layout.from_config(cfg))  # as `nanotrain verify` reads it
    note = without_balance_loss(m, layout)  # (DeepSeek-V3's published layouts split it)
    if note:
        print(f"note: {note}", file=sys.stderr)
    t = cfg.train
    mbs = args.micro_batch_size or layout.micro or (1 if args.hf_config else max(1, t.batch_size // layout.dp))
    micro_batches = args.micro_batches or (None if args.hf_config else max(1, t.batch_size // (layout.dp * mbs)))
    # The layout as `nanotrain train` would run it goes through the config checks first: what train
    # refuses (a batch dp does not divide, a tp that does not divide the heads) inspect refuses too.
    # The global batch is the config's, or with --micro-batches (and for --hf-config) the one they make.
    fill = fewest_micro_batches(cfg.parallel.pp_schedule, layout.pp)
    batch = t.batch_size if args.config and not args.micro_batches else mbs * (micro_batches or fill) * layout.dp
    validate(run_config(cfg, m, replace(layout, micro=mbs), cfg.parallel.pp_schedule, layout.vp, t.recompute,
                        batch, seq))
    hardware = get_accelerator(args.hardware)
    if cfg.precision.recipe == "auto":  # what a run on that hardware would pick (runtime/machine.py)
        fast_bf16 = hardware.fp32_flops is None or hardware.bf16_flops >= hardware.fp32_flops
        cfg.precision.recipe = "bf16" if fast_bf16 else "fp32"
    result = inspect_model(m, seq, hardware=hardware, micro_batch_size=mbs, dtype=args.dtype)
    capacity = args.gpu_memory * 1e9 if args.gpu_memory is not None else None
    result["plan"] = plan_layout(m, seq, cfg, layout, mbs, micro_batches, hardware, capacity)
    result["memory_per_rank_bytes"] = result["plan"]["memory_per_rank_bytes"]
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    if args.out:  # to stderr: stdout stays one JSON document with --json
        print("wrote " + ", ".join(map(str, write_report(result, args.out))), file=sys.stderr)
    return 0


def cmd_plan(args, overrides) -> int:
    import json

    from .inspection.plan import FIELDS, Planner, plan_request, search, table

    if args.html and Path(args.html).is_dir():  # before the search, which can take a minute
        raise ConfigError(f"--html {args.html} is a folder: give the page's file, e.g. {Path(args.html) / 'plan.html'}")
    req, notes = plan_request(args, overrides)
    planner = Planner(req)
    result = search(req, planner=planner)
    for note in notes + result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        out = {k: result[k] for k in FIELDS}
        out["candidates"] = [{k: c[k] for k in FIELDS} for c in result["candidates"]]
        print(json.dumps(out, indent=1))
    else:
        print(table(req, result))
    if args.html:  # to stderr: stdout stays one JSON document with --json
        from .inspection.plan_page import write_plan_page

        path, n = write_plan_page(Path(args.html), req, planner, result)
        print(f"wrote {path} ({n} layouts, {path.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


def cmd_machine(args, overrides) -> int:
    """This CPU's matmul rates, as runs read them (runtime/machine_cache.py); --measure times them again."""
    import torch

    from .runtime.machine import Machine, choose_recipe, cpu_name_and_kind, cpu_rates, job_cores
    from .runtime.machine_cache import cache_file

    name, kind = cpu_name_and_kind()
    cores = job_cores()
    rates, warnings, where = cpu_rates(name, kind, cores, ("fp32", "bf16"), fresh=args.measure)
    for line in warnings:
        print(line, file=sys.stderr)
    machine = Machine("cpu", name, kind, cores, cores, 1, 1, rates, where)
    print(machine.describe() + f"; torch {torch.__version__}")
    for dtype, rate in rates.items():
        print(f"{dtype} matmul: {rate / 1e12:.4g} TFLOP/s (torch.mm, {cores} threads)")
    print(f"rates {where} (cache {cache_file()})")
    print(choose_recipe("auto", machine, torch.device("cpu"))[1])
    return RUN_FAILED if warnings else 0


# The valid range of every subcommand's numeric arguments: (least, most; None: no bound). argparse
# only checks the type; check_numbers checks these after parsing, so that a bad value is a ConfigError
# naming the argument like any other bad input (a negative temperature would sample the least likely
# tokens, a negative --max-new-tokens would print the prompt alone). 0 is allowed where it means
# something: greedy (--temperature), no filtering (--top-k), the config's (--micro-batch-size/-batches).
NUMBER_RANGES = {
    "--steps": (1, None), "--tolerance": (0.0, None),  # verify
    "--max-new-tokens": (1, None), "--temperature": (0.0, None), "--top-k": (0, None),  # sample
    "--num-samples": (1, None), "--seed": (0, 2**64 - 1),  # a torch.Generator seed is 64-bit unsigned
    "--seq-len": (1, None), "--micro-batch-size": (0, None), "--micro-batches": (0, None),  # inspect
    "--gpu-memory": (0.0, None),  # and not 0 itself (ABOVE_LEAST): a device has some memory
    "--gpus": (1, None), "--global-batch": (1, None), "--top": (1, None),  # plan
}


ABOVE_LEAST = {"--gpu-memory"}  # the bound itself is out of range


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a numeric argument outside NUMBER_RANGES, NaN or infinite (float("nan") parses)."""
    for flag, (least, most) in NUMBER_RANGES.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:  # not this subcommand's, or left to its default of "the config's"
            continue
        finite = not isinstance(value, float) or math.isfinite(value)  # an int is; a huge one has no float
        above = flag in ABOVE_LEAST
        if not (finite and (value > least if above else value >= least) and (most is None or value <= most)):
            kind = "an integer" if isinstance(least, int) else "a finite number"
            bound = f"{'>' if above else '>='} {least:g}" if most is None else f"in [{least}, {most}]"
            raise ConfigError(f"{flag} {value} is out of range: it must be {kind} {bound}.")


# One text for every command's --layout (parallel/layout.py parses it).
LAYOUT_HELP = ("comma-separated tp=N, pp=N, vp=N (pipeline chunks per rank, with "
               "--parallel.pp_schedule=interleaved), dp=N, ep=N, sp (sequence parallel), zero=0|1|2|3, micro=N "
               "(sequences per micro-batch); what it leaves out is the config's")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanotrain", description="Learning-first distributed LLM training.",
                                epilog="Any --section.key=value after the subcommand overrides the config, "
                                       "e.g. --train.max_steps=200 --model.n_layers=2.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", cmd_train, "train a model"),
                            ("prepare", cmd_prepare, "tokenize the corpus into train/val token files")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="TOML config file (see configs/); defaults apply where omitted")
        s.set_defaults(fn=fn)
    s = sub.add_parser("verify", help="prove a parallel layout trains the same model as one process")
    s.add_argument("--config", help="TOML config file")
    s.add_argument("--layout", required=True, help=LAYOUT_HELP + "; e.g. tp=2,dp=2 or tp=2,sp or dp=2,micro=1")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--tolerance", type=float, default=1e-5, help="largest relative loss/gradient difference")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", help="checkpoint folder, its metadata.json, or a run's out_dir")
    s.add_argument("--config", help="instead of --checkpoint: sample from the latest checkpoint of this config's run")
    s.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=200, help="0 = no top-k filtering")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda where one is visible)")
    s.set_defaults(fn=cmd_sample)
    s = sub.add_parser("convert", help="convert weights to or from a Hugging Face checkpoint folder",
                       description="--from-hf FOLDER --out DIR: an HF Llama/Mistral/DeepSeek-V3 folder -> "
                                   "DIR/model.safetensors + DIR/nanotrain_config.json (weights and model config, "
                                   "not a training checkpoint). --to-hf --checkpoint PATH --out DIR: a training "
                                   "checkpoint (or a --from-hf folder) -> an HF folder transformers can load.")
    way = s.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="FOLDER", help="Hugging Face folder (config.json + *.safetensors)")
    way.add_argument("--to-hf", action="store_true", help="write a Hugging Face folder from --checkpoint")
    s.add_argument("--checkpoint", help="with --to-hf: checkpoint folder, its metadata.json, a run's out_dir, "
                                        "or a convert --from-hf folder")
    s.add_argument("--out", required=True, help="output folder (new or empty; never a run's folder)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing the files "
                                                             "convert writes")
    s.set_defaults(fn=cmd_convert)
    _add_inspect(sub)
    _add_plan(sub)
    s = sub.add_parser("machine", help="this CPU's matmul rates (precision auto, the MFU's peak) and where they "
                                       "come from; --measure times them again")
    s.add_argument("--measure", action="store_true", help="time torch.mm again (on an idle machine) and keep it")
    s.set_defaults(fn=cmd_machine)
    s = sub.add_parser("report", help="an HTML page with the health plots of one or more runs, side by side")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train.out_dir) holding metrics.jsonl")
    s.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html of the first run)")
    s.add_argument("--no-predict", action="store_true",
                   help="leave out the planner's predicted step (it times this CPU first: ~10 s)")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("weights", help="per-tensor weight statistics of a checkpoint, or how two checkpoints differ")
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (step_N), or a run folder (its latest checkpoint)")
    s.add_argument("ckpt2", metavar="CKPT2", nargs="?", help="a second checkpoint: compare it against CKPT")
    s.add_argument("--out", metavar="DIR", help="also write DIR/weights.md, weights.json and weights.png (histograms)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of the markdown tables")
    s.add_argument("--optimizer", action="store_true", help="also Adam's moments (optim/exp_avg, optim/exp_avg_sq)")
    s.set_defaults(fn=cmd_weights)
    return p


def _add_inspect(sub) -> None:
    s = sub.add_parser("inspect", help="a model's parameters (per kind, total and active) and FLOPs per token")
    s.add_argument("--config", help="one of our TOML configs (plus --section.key=value overrides)")
    s.add_argument("--hf-config", help="a Hugging Face config.json (Llama family, DeepSeek-V3)")
    s.add_argument("--seq-len", type=int, help="context length for the FLOPs (default: the config's)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of the markdown tables")
    s.add_argument("--hardware", default="h100",
                   help="roofline device: a100, h100, h200, b200, mi300x, or cpu (this machine, measured)")
    s.add_argument("--layout", help=LAYOUT_HELP + "; e.g. tp=8,pp=16,dp=64,ep=64,zero=1 (default: the config's)")
    s.add_argument("--micro-batch-size", type=int, default=0,
                   help="sequences per micro-batch on one rank (memory, communication, roofline); "
                        "default: --layout's micro=, else the config's, 1 for --hf-config")
    s.add_argument("--micro-batches", type=int, default=0,
                   help="micro-batches per optimizer step on one rank (default: the config's; pp for --hf-config)")
    s.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="memory per device in GB (default: --hardware's): whether each rank fits and, if not, the "
                        "cheapest change that makes it (recomputation, micro-batch, ZeRO stage, tp, pp)")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"], help="matmul operand format for the roofline")
    s.add_argument("--out", metavar="DIR", help="also write DIR/report.md, roofline.png and intensity.png")
    s.set_defaults(fn=cmd_inspect)


def _add_plan(sub) -> None:
    s = sub.add_parser("plan", help="predict the step time and MFU of layouts on a cluster, and rank them",
                       description="Search every layout of a model on --gpus devices (whatever --layout, --schedule "
                                   "and --recompute leave open), predict each one's step time, memory and MFU, "
                                   "drop what does not fit, and print the fastest (docs/planning.md).")
    s.add_argument("--config", help="one of our TOML configs (plus --section.key=value overrides)")
    s.add_argument("--hf-config", help="a Hugging Face config.json (Llama family, DeepSeek-V3)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--hardware", help="a100, h100, h200, b200, mi300x (8-GPU nodes, cluster.py), or cpu "
                                          "(this machine, measured; --gpus counts processes)")
    where.add_argument("--cluster", metavar="FILE.toml", help="your own cluster: a preset with the keys it changes")
    s.add_argument("--gpus", type=int, required=True, help="devices (processes with --hardware cpu)")
    s.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    s.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    s.add_argument("--layout", help=LAYOUT_HELP + "; what it fixes stays, the rest is searched")
    s.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved", "zb_h1", "dualpipev"])
    s.add_argument("--recompute", choices=["none", "selective", "full"])
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp8"],
                   help="GEMM operands (default: the config's precision.recipe as it resolves on that hardware)")
    s.add_argument("--top", type=int, default=10, help="candidates to print")
    s.add_argument("--json", action="store_true", help="one JSON object: the best plan and the ranked candidates")
    s.add_argument("--html", metavar="FILE", help="also write a page to explore the candidates and their one-knob "
                                                  "neighbours offline (docs/planning.md)")
    s.set_defaults(fn=cmd_plan)


BAD_INPUT = 2  # exit code of a config, data, checkpoint or path error (nanotrain.torchrun reads it too)
RUN_FAILED = 1  # exit code of a run that diverged or lost a peer


def named_error(e: BaseException) -> int | None:
    """An error the user gets as one line, no traceback: print it, return the exit code. None for
    anything else, which is a bug and keeps its traceback (the caller re-raises it).

      2  bad input: a config, data, checkpoint or path (OSError: a folder that cannot be made or read)
      1  the run failed: it diverged (TrainingError), or another rank is gone (CollectiveError)

    Under torchrun every process fails alike: rank 0 says it, except a lost peer, which each
    survivor names from where it stands."""
    from .parallel.collectives import CollectiveError
    from .runtime.divergence import TrainingError

    if not isinstance(e, (ConfigError, DataError, CheckpointError, OSError, TrainingError, CollectiveError)):
        return None
    if os.environ.get("RANK", "0") == "0" or isinstance(e, CollectiveError):
        print(f"error: {e}", file=sys.stderr)
    return RUN_FAILED if isinstance(e, (TrainingError, CollectiveError)) else BAD_INPUT


@contextlib.contextmanager
def one_line_errors():
    """For a training script of one's own (examples/): bad input ends it as it ends the CLI, with one
    line (rank 0's) and exit code 2, so that nanotrain.torchrun ends with that line too."""
    try:
        yield
    except Exception as e:
        code = named_error(e)
        if code is None:
            raise
        sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        check_numbers(args)
        return args.fn(args, overrides)
    except Exception as e:
        code = named_error(e)
        if code is None:
            raise
        return code
    except KeyboardInterrupt:  # Ctrl-C before or after the training loop (inside it: a checkpoint, then 130)
        if os.environ.get("RANK", "0") == "0":
            print("interrupted before training started or after it ended: nothing to save", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
