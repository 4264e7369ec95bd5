"""DeepSeekModel: MLA + dense/MoE layers assembled; causality, balancing, resume, outputs."""

import pytest
import torch

from nanotrain.config import load_config
from nanotrain.models import build_model
from nanotrain.runtime import RuntimeEngine

TINY = ["--model.arch=deepseek", "--model.d_model=32", "--model.n_layers=3", "--model.n_heads=4",
        "--model.vocab_size=68", "--model.kv_lora_rank=16", "--model.qk_nope_head_dim=8",
        "--model.qk_rope_head_dim=4", "--model.v_head_dim=8", "--model.q_lora_rank=16",
        "--model.n_routed_experts=4", "--model.moe_top_k=2", "--model.moe_d_ff=16", "--model.d_ff=64",
        "--model.first_k_dense_replace=1", "--model.tie_embeddings=false", "--model.norm=rmsnorm"]


def tiny_model(*extra):
    cfg = load_config(None, TINY + ["--train.seq_len=16", *extra]).model
    cfg.max_seq_len = 16
    model = build_model(cfg)
    model.init_weights(seed=3)
    return model


def test_structure_and_causality():
    model = tiny_model().eval()
    assert [b.is_moe for b in model.layers.values()] == [False, True, True]
    x = torch.randint(0, 68, (2, 16))
    base = model(x)
    assert base.shape == (2, 16, 68)
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % 68
    out = model(x2)
    # Not bit-exact: an expert's matmul over a different set of tokens may round differently.
    torch.testing.assert_close(out[:, :9], base[:, :9], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, 9], base[:, 9])
    # Active matmul parameters count top_k of the routed experts.
    moe = model.layers["1"].mlp
    full = sum(p.numel() for p in moe.experts.parameters())
    dense_only = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.num_matmul_params() == dense_only + 2 * (moe.router.weight.numel() + full // 2)


def test_training_updates_biases_logs_load_and_resumes_exactly(make_config):
    common = [*TINY, "--schedule.decay_steps=12", "--checkpoint.interval=6", "--model.bias_update_rate=0.01",
              "--model.aux_loss_coef=0.01", "--logging.log_interval=3", "--train.max_steps=12"]
    straight = RuntimeEngine(make_config(*common, f"--train.out_dir={make_config().train.out_dir}_s")).run()
    RuntimeEngine(make_config(*common, "--train.max_steps=6")).run()
    resumed = RuntimeEngine(make_config(*common, "--checkpoint.resume=latest")).run()
    assert {s: resumed.losses[s] for s in range(7, 13)} == {s: straight.losses[s] for s in range(7, 13)}
    import json
    rows = [json.loads(line) for line in (straight.out_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["moe/layer1/imbalance"] >= 1.0 and last["moe/layer2/bias_abs_max"] > 0


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bias_update_follows_every_applied_step_and_no_skipped_one(make_config, monkeypatch, zero_stage):
    """The expert-bias update is the optimizer's post-step hook (components.register_moe_load_balancing_hook),
    at ZeRO stage 0 (plain AdamW) and 1: once after each step that updated,
    none after a step skipped for a non-finite gradient (monitoring.nonfinite=skip)."""
    from nanotrain.models.deepseek import DeepSeekModel
    from nanotrain.parallel.zero import ZeroOptimizer

    events, update = [], DeepSeekModel.update_expert_bias

    def counted(self, parallel):
        events.append("bias")
        update(self, parallel)

    def on_grads(step, model, ctx):  # the synced gradients, before the optimizer step
        events.append(step)
        if step == 3:
            model.tok_emb.weight.grad.fill_(float("nan"))

    monkeypatch.setattr(DeepSeekModel, "update_expert_bias", counted)
    engine = RuntimeEngine(make_config(*TINY, "--model.bias_update_rate=0.01", "--monitoring.nonfinite=skip",
                                       f"--optimizer.zero_stage={zero_stage}", "--train.max_steps=5",
                                       "--schedule.warmup_steps=2"),
                           on_grads=on_grads)
    engine.run()
    assert isinstance(engine.optimizer, ZeroOptimizer) and engine.optimizer.stage == zero_stage
    assert events == [1, "bias", 2, "bias", 3, 4, "bias", 5, "bias"]
    assert engine.monitor.skipped == 1
