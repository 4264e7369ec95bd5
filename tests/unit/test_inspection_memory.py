"""inspection/memory.py's activation formulas against the tensors autograd really saves, one
process, for each kind of block and both compute dtypes; the layout flags of `nanotrain inspect`.
(The layouts themselves, against a gloo world of 8: tests/distributed/test_inspection_world.py.)"""

import json
from dataclasses import replace

import pytest
import torch

from nanotrain.cli import main
from nanotrain.config import ModelConfig, PrecisionConfig
from nanotrain.inspection.measure import LiveActivationMeter, SavedTensorMeter
from nanotrain.inspection.memory import Plan, activation_bytes, in_flight, recomputed_activations
from nanotrain.models import build_model
from nanotrain.module_spec import ATTENTION, LATENT_ATTENTION, mark, module_spec
from nanotrain.parallel.layout import Layout
from nanotrain.recompute import Recompute

B, T, LAYERS = 4, 32, 3
CASES = {
    "llama": {},
    "gpt2": {"mlp": "gelu", "norm": "layernorm", "pos_emb": "learned", "bias": True},
    "gqa": {"n_kv_heads": 2},
    "deepseek": {"arch": "deepseek"},
    "deepseek_q_lora": {"arch": "deepseek", "q_lora_rank": 32},
    "deepseek_mtp": {"arch": "deepseek", "mtp_depth": 1},
}


def fp32_attention_cores(model) -> None:
    """Every attention core (MHA and MLA) in fp32: how these tests have always measured bf16."""
    for module in model.modules():
        if module_spec(module).kind in (ATTENTION, LATENT_ATTENTION):
            mark(module, core_dtype=torch.float32)


def saved_bytes(m: ModelConfig, recipe: str, document_eos: int | None = None) -> int:
    torch.manual_seed(0)
    model = build_model(m)
    model.init_weights(0)
    mark(model, document_eos=document_eos)
    if recipe == "bf16":  # as the runtime sets it on CPU (precision.attention=auto)
        fp32_attention_cores(model)
    x, y = torch.randint(0, m.vocab_size, (B, T)), torch.randint(0, m.vocab_size, (B, T))
    meter = SavedTensorMeter(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "bf16")
    with meter.counting(), autocast:
        loss = model(x, y, loss_denominator=B * T)
    loss.backward()
    assert meter.live <= 2 * B * T * 8  # freed by backward: only the batch's ids, still referenced here
    return meter.peak


@pytest.mark.parametrize("recipe", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_activation_formula_equals_the_saved_tensors(case, recipe):
    m = ModelConfig(vocab_size=96, d_model=64, n_layers=LAYERS, n_heads=4, max_seq_len=T, **CASES[case])
    measured = saved_bytes(m, recipe)
    estimate = activation_bytes(m, Plan(Layout(micro=B), seq_len=T), PrecisionConfig(recipe=recipe),
                                list(range(LAYERS)), True, True, device="cpu")
    # Exact for these (every expert receives tokens: its weight copy is counted under autocast).
    assert sum(estimate.values()) == pytest.approx(measured, rel=0.01), estimate


@pytest.mark.parametrize("recipe", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["llama", "gpt2", "deepseek", "deepseek_mtp"])
def test_document_mask_formula_equals_the_saved_tensors(case, recipe):
    """data.document_mask: one additive mask per forward, shared by the layers, and RoPE rows (or
    learned-embedding rows) gathered per token (models/documents.py). Token 5 ends documents:
    about one token in 96 (random ids), so most windows hold several. What the mask adds is ~1%
    of the whole, so it is the difference that is compared."""
    m = ModelConfig(vocab_size=96, d_model=64, n_layers=LAYERS, n_heads=4, max_seq_len=T, **CASES[case])

    def estimate(documents: bool) -> int:
        return sum(activation_bytes(m, Plan(Layout(micro=B), seq_len=T, document_mask=documents),
                                    PrecisionConfig(recipe=recipe), list(range(LAYERS)), True, True,
                                    device="cpu").values())

    added = saved_bytes(m, recipe, document_eos=5) - saved_bytes(m, recipe)
    assert added > 0
    assert estimate(True) - estimate(False) == pytest.approx(added, rel=0.01)


def live_bytes(m: ModelConfig, recipe: str, mode: str) -> int:
    """The peak of what forward and backward's recomputations create and keep (LiveActivationMeter),
    run as the runtime runs it: forward under autocast, backward outside it."""
    torch.manual_seed(0)
    model = build_model(m)
    model.init_weights(0)
    mark(model, recompute=Recompute(mode))
    if recipe == "bf16":
        fp32_attention_cores(model)
    x, y = torch.randint(0, m.vocab_size, (B, T)), torch.randint(0, m.vocab_size, (B, T))
    meter = LiveActivationMeter(model)
    with meter.counting():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "bf16"):
            loss = model(x, y, loss_denominator=B * T)
        loss.backward()
    return meter.peak


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("recipe", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_formula_equals_the_live_tensors(case, recipe, mode):
    """Each recompute mode's peak: what the blocks keep through forward (their inputs; selective:
    their matmul and attention outputs), autocast's weight copies until forward ends, and one
    block rebuilt in backward. Measured: 0.3% or closer (the batch's token ids are created outside
    the forward: the estimate counts them, the meter does not)."""
    m = ModelConfig(vocab_size=96, d_model=64, n_layers=LAYERS, n_heads=4, max_seq_len=T, **CASES[case])
    plan, precision = Plan(Layout(micro=B), seq_len=T), PrecisionConfig(recipe=recipe)
    layers = list(range(LAYERS))
    if mode == "none":
        estimate = sum(activation_bytes(m, plan, precision, layers, True, True, device="cpu").values())
    else:
        estimate = recomputed_activations(m, plan, precision, layers, True, True, "cpu", 1, mode)
    assert live_bytes(m, recipe, mode) == pytest.approx(estimate, rel=0.005)


def test_full_recompute_of_the_first_blocks_only():
    """train.recompute_layers=N: the first N blocks of the chunk recomputed, the rest keep everything."""
    m = ModelConfig(vocab_size=96, d_model=64, n_layers=4, n_heads=4, max_seq_len=T)
    plan = Plan(Layout(micro=B), seq_len=T, recompute="full", recompute_layers=2)
    estimate = recomputed_activations(m, plan, PrecisionConfig(recipe="fp32"), list(range(4)), True, True, "cpu", 1,
                                      "full")
    torch.manual_seed(0)
    model = build_model(m)
    model.init_weights(0)
    mark(model, recompute=Recompute("full", 2))
    x, y = torch.randint(0, 96, (B, T)), torch.randint(0, 96, (B, T))
    meter = LiveActivationMeter(model)
    with meter.counting():
        model(x, y, loss_denominator=B * T).backward()
    assert meter.peak == pytest.approx(estimate, rel=0.005)
    none = sum(activation_bytes(m, Plan(Layout(micro=B), seq_len=T), PrecisionConfig(recipe="fp32"),
                                list(range(4)), True, True, device="cpu").values())
    assert estimate < none


def test_in_flight_micro_batches_per_schedule():
    plan = Plan(Layout(pp=4, micro=1), micro_batches=8)
    assert [in_flight(plan, s) for s in range(4)] == [4, 3, 2, 1]  # 1F1B: pp - stage
    assert in_flight(replace(plan, pp_schedule="gpipe"), 3) == 8  # every forward before any backward
    assert in_flight(Plan(Layout(pp=4, micro=1), micro_batches=2), 0) == 2  # never more than there are


def test_inspect_prints_memory_per_rank(tmp_path, capsys):
    args = ["inspect", "--config", "configs/deepseek_tiny.toml", "--model.vocab_size=64", "--seq-len", "64",
            "--layout", "tp=2,pp=2,dp=4,ep=2,zero=2", "--micro-batch-size", "2", "--micro-batches", "4", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    plan = r["plan"]
    assert plan["world_size"] == 16 and len(plan["stages"]) == 2
    assert r["memory_per_rank_bytes"] == max(s["total"] for s in plan["stages"]) > 0
    first, last = plan["stages"]
    assert first["in_flight"] == 2 and last["in_flight"] == 1
    assert set(first["comm_bytes"]) >= {"tp", "dp", "pp", "ep"}
    # ZeRO-2 with fp32 copies: gradients and moments sharded over dp (experts over expert-dp)
    assert first["gradients"] < first["weights"] and first["optimizer"] < 2 * first["weights"]
    assert main(args[:-1] + ["--out", str(tmp_path)]) == 0
    assert "## Memory per rank" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("layout,words", [
    ("tp=3", "model.n_heads=4 is not divisible by parallel.tp=3"),
    ("dp=5", "train.batch_size=24 is not divisible by train.micro_batch_size=4 x parallel.dp=5"),
    ("dp=99999999999999999999", "is not divisible by train.micro_batch_size=1 x parallel.dp=99999999999999999999"),
])
def test_inspect_refuses_what_train_refuses_in_its_words(capsys, layout, words):
    """One set of checks for every command (issue 40): inspect puts the layout through the config
    checks train runs (report.run_config), and says what they say."""
    assert main(["inspect", "--config", "configs/deepseek_tiny.toml", "--model.vocab_size=64",
                 "--layout", layout]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def _inspect_json(capsys, *extra) -> dict:
    args = ["inspect", "--config", "configs/deepseek_tiny.toml", "--model.vocab_size=64", "--seq-len", "256",
            "--layout", "dp=4,ep=2,zero=1", "--micro-batch-size", "4", "--micro-batches", "2", "--json", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)["plan"]


def test_gpu_memory_names_the_cheapest_change_that_fits(capsys):
    """--gpu-memory: fits or not, and the first change in FIT_ORDER (keeping the earlier ones) that fits."""
    plan = _inspect_json(capsys, "--gpu-memory", "1000")
    assert plan["fits"] and "fix" not in plan
    st = plan["stages"][0]
    by = st["activations_by_recompute"]
    assert by["full"] < by["selective"] < by["none"] == st["activations"]
    static = st["total"] - by["none"]
    # Room for selective recomputation, not for none: selective is the change named.
    gb = (static + (by["selective"] + by["none"]) / 2) / 1e9
    plan = _inspect_json(capsys, "--gpu-memory", f"{gb}")
    assert not plan["fits"] and plan["fix"]["changes"] == ["selective recomputation"]
    assert plan["fix"]["memory_per_rank_bytes"] <= gb * 1e9 and plan["fix"]["layout"]["recompute"] == "selective"
    # Less room: smaller micro-batches come before full recomputation, which comes before ZeRO.
    gb = (static + by["full"]) * 0.999 / 1e9
    fix = _inspect_json(capsys, "--gpu-memory", f"{gb}")["fix"]
    assert fix["changes"][0].startswith("micro-batch") or fix["changes"][0] == "selective recomputation"
    assert fix["memory_per_rank_bytes"] <= gb * 1e9
    order = ["selective", "micro-batch", "full", "ZeRO", "tp=", "pp="]
    kinds = [next(i for i, k in enumerate(order) if c.startswith(k)) for c in fix["changes"]]
    assert kinds == sorted(kinds)
    # No room at all: nothing fits, and the markdown says what is left.
    assert main(["inspect", "--config", "configs/deepseek_tiny.toml", "--model.vocab_size=64", "--seq-len", "256",
                 "--layout", "dp=4,ep=2", "--gpu-memory", "0.0001"]) == 0
    assert "makes it fit at this world size" in capsys.readouterr().out
