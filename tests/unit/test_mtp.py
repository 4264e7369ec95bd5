"""Multi-token prediction (DeepSeek-V3 §2.2, depth 1): loss, eval path, gradients, training."""

import pytest
import torch
import torch.nn.functional as F
from test_deepseek import TINY, tiny_model

from nanotrain.config import ConfigError, load_config
from nanotrain.models import IGNORE_INDEX
from nanotrain.models.deepseek import DeepSeekModel
from nanotrain.parallel.tensor_parallel import TensorParallel
from nanotrain.runtime import RuntimeEngine

MTP = "--model.mtp_depth=1"
V, T = 68, 16


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (2, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]  # inputs t_0..t_{T-1}, targets t_1..t_T


def trunk(model, x):
    """The main model's last hidden states, before its final norm, by hand."""
    h = model.tok_emb(x)
    pos, _ = model.positions(x)
    for layer in model.layers.values():
        h = layer(h, pos)
    return h, pos


def reference_losses(model, x, y, last_token=0):
    """(main CE sum, MTP CE sum) from the submodules, the MTP at full length T: position
    T-1 gets a dummy next token and an IGNORE_INDEX target."""
    h, rope = trunk(model, x)
    main = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), y.flatten(), reduction="sum")
    m = model.mtp
    next_tok = torch.cat([x[:, 1:], torch.full_like(x[:, :1], last_token)], dim=1)  # t_{i+1}
    z = m.proj(torch.cat([m.hidden_norm(h), m.emb_norm(model.tok_emb(next_tok))], dim=-1))
    logits = model.head(m.norm(m.block(z, rope)))
    target = torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE_INDEX)], dim=1)  # t_{i+2}
    mtp = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return main, mtp


def test_config_validation_and_sequence_parallel_refusal():
    with pytest.raises(ConfigError, match="mtp_depth=2"):
        load_config(None, [*TINY, "--model.mtp_depth=2"])
    with pytest.raises(ConfigError, match="needs model.arch='deepseek'"):
        load_config(None, [MTP])
    with pytest.raises(ConfigError, match="mtp_loss_weight"):
        load_config(None, [*TINY, MTP, "--model.mtp_loss_weight=-1"])
    cfg = load_config(None, [*TINY, MTP, "--train.seq_len=16"]).model
    cfg.max_seq_len = 16
    with pytest.raises(ValueError, match="sequence_parallel"):
        DeepSeekModel(cfg, TensorParallel(None, 0, 2, sequence_parallel=True))


def test_loss_is_main_plus_weighted_mtp_and_ignores_last_position():
    model = tiny_model(MTP, "--model.mtp_loss_weight=0.25").train()
    assert model.mtp.block.is_moe and any(n.startswith("mtp.block.mlp.experts") for n, _ in model.named_parameters())
    x, y = batch()
    loss = model(x, y)
    with torch.no_grad():
        main, mtp = reference_losses(model, x, y)
        _, mtp_other_last = reference_losses(model, x, y, last_token=V - 1)
    n = y.numel()
    torch.testing.assert_close(loss.detach(), (main + 0.25 * mtp) / n)
    # The last position has no t_{i+2}: whatever it is fed, it adds nothing.
    torch.testing.assert_close(mtp, mtp_other_last, rtol=0, atol=0)
    # loss_denominator divides the MTP term too (DESIGN, invariant 3).
    torch.testing.assert_close(model(x, y, loss_denominator=100.0).detach(), (main + 0.25 * mtp) / 100)


def test_eval_and_logits_unchanged_by_mtp():
    model = tiny_model(MTP)
    plain = tiny_model()
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and result.unexpected_keys
    assert all(k.startswith("mtp.") for k in result.unexpected_keys)
    x, y = batch(1)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x, y), plain(x, y), rtol=0, atol=0)
        model.train(), plain.train()
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # no targets: no MTP
        assert not torch.equal(model(x, y), plain(x, y))  # training with targets: MTP on


def test_mtp_gradients_reach_shared_embedding_and_head():
    model, plain = tiny_model(MTP).train(), tiny_model().train()
    plain.load_state_dict(model.state_dict(), strict=False)
    x, y = batch(2)
    model(x, y).backward()
    plain(x, y).backward()
    for name in ("tok_emb.weight", "head.weight"):
        mine, base = model.get_parameter(name).grad, plain.get_parameter(name).grad
        assert (mine - base).abs().max() > 1e-6, f"MTP adds no gradient to {name}"
    for name in ("mtp.proj.weight", "mtp.hidden_norm.weight", "mtp.emb_norm.weight", "mtp.norm.weight",
                 "mtp.block.attn_norm.weight"):
        assert model.get_parameter(name).grad.abs().max() > 0, name
    # No parameter is duplicated: the embedding and head are the main model's.
    assert not any(n.startswith(("mtp.tok_emb", "mtp.head")) for n, _ in model.named_parameters())


def test_causality_of_main_and_mtp_logits():
    model = tiny_model(MTP).eval()
    x, _ = batch(3)
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % V
    with torch.no_grad():
        # Within rounding, not bit for bit: an expert's matmul over a different set of tokens
        # may round differently.
        torch.testing.assert_close(model(x2)[:, :9], model(x)[:, :9], rtol=1e-5, atol=1e-6)
        # MTP at position i sees tokens up to t_{i+1}: positions < 8 ignore t_9.
        h, h2 = trunk(model, x), trunk(model, x2)
        a = model.mtp(h[0], x, model.tok_emb, model.head, h[1])
        b = model.mtp(h2[0], x2, model.tok_emb, model.head, h2[1])
    assert a.shape == (2, T - 1, V)
    torch.testing.assert_close(b[:, :8], a[:, :8], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b[:, 8], a[:, 8])


def test_engine_trains_with_mtp(make_config):
    cfg = make_config(*TINY, MTP, "--train.max_steps=16", "--schedule.decay_steps=16", "--optimizer.lr=3e-3",
                      "--train.eval_interval=16")
    result = RuntimeEngine(cfg).run()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < losses[0] - 0.3, losses
    assert result.val_losses


def test_mtp_moe_is_balanced_like_the_others(make_config):
    from nanotrain.runtime import RuntimeEngine

    from test_deepseek import TINY

    result = RuntimeEngine(make_config(*TINY, "--model.mtp_depth=1", "--model.bias_update_rate=0.01",
                                       "--train.max_steps=4", "--schedule.warmup_steps=1",
                                       "--logging.log_interval=2")).run()
    import json
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "loss" in r][-1]["moe/layermtp/bias_abs_max"] > 0
