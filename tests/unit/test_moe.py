"""DeepSeek-V3 MoE: routing against brute force, aux-loss-free bias, aux loss, and the
sorted-token MoE against a per-expert masked loop (forward and backward)."""

import pytest
import torch
import torch.nn.functional as F

from nanotrain.layers import init_parameters
from nanotrain.models.moe import LocalRoutedMoE, TopKRouter, masked_loop_moe

D, E, K = 16, 8, 3


def router(**kw) -> TopKRouter:
    r = TopKRouter(D, kw.pop("n_experts", E), kw.pop("top_k", K), **kw)
    init_parameters(r, seed=0)
    r.weight.data *= 20  # sharper scores, so near-ties (where topk may break either way) are unlikely
    return r


def brute_force(r: TopKRouter, x: torch.Tensor):
    """Route one token at a time with Python lists: group scores, group choice, then experts."""
    scores = (x.double() @ r.weight.double().T)
    scores = scores.softmax(-1) if r.score_func == "softmax" else scores.sigmoid()
    per_group = r.n_experts // r.n_group
    all_w, all_i = [], []
    for s in scores.tolist():
        b = [si + bi for si, bi in zip(s, r.expert_bias.tolist())]
        groups = [b[g * per_group:(g + 1) * per_group] for g in range(r.n_group)]
        gscore = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        kept = sorted(range(r.n_group), key=lambda g: -gscore[g])[:r.topk_group]
        allowed = [e for e in range(r.n_experts) if e // per_group in kept]
        chosen = sorted(sorted(allowed, key=lambda e: -b[e])[:r.top_k])
        w = [s[e] for e in chosen]
        if r.norm_topk_prob:
            w = [wi / sum(w) for wi in w]
        all_w.append([wi * r.routed_scaling_factor for wi in w])
        all_i.append(chosen)
    return torch.tensor(all_w), torch.tensor(all_i)


def sort_by_index(w, i):
    i, order = i.sort(-1)
    return w.gather(1, order), i


@pytest.mark.parametrize("score_func,n_group,topk_group", [
    ("softmax", 1, 1), ("sigmoid", 1, 1), ("softmax", 4, 2), ("sigmoid", 4, 2)])
def test_router_matches_brute_force(score_func, n_group, topk_group):
    r = router(score_func=score_func, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    r.expert_bias.copy_(torch.randn(E) * 0.05)  # the bias takes part in group and expert choice
    x = torch.randn(64, D)
    w, i, _ = r(x, seq_len=16)
    assert w.dtype == torch.float32 and i.dtype == torch.int64 and w.shape == i.shape == (64, K)
    ref_w, ref_i = brute_force(r, x)
    w, i = sort_by_index(w, i)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    if n_group > 1:  # every token's experts come from at most topk_group groups
        assert all(len(set((row // (E // n_group)).tolist())) <= topk_group for row in i)


def test_router_matches_hf_deepseek_v3():
    hf = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config
    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=4,
                           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    ref = hf.DeepseekV3TopkRouter(cfg)
    r = router(score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    r.expert_bias.copy_(torch.randn(E) * 0.05)
    ref.weight.data.copy_(r.weight)
    ref.e_score_correction_bias.copy_(r.expert_bias)
    x = torch.randn(32, D)
    _, ref_w, ref_i = ref(x)
    w, i = sort_by_index(*r(x, seq_len=32)[:2])
    ref_w, ref_i = sort_by_index(ref_w, ref_i)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_weights(score_func):
    r = router(score_func=score_func, norm_topk_prob=False)
    x = torch.randn(32, D)
    w0, i0, _ = r(x, 32)
    r.expert_bias[5] = 10.0  # expert 5 now wins every token
    w1, i1, _ = r(x, 32)
    assert (i1 == 5).any(-1).all() and not torch.equal(i0, i1)
    scores = r.scores(x)
    torch.testing.assert_close(w1, scores.gather(1, i1), rtol=0, atol=0)  # unbiased scores
    assert (w1[i1 == 5] < 1.0).all()  # the bias of 10 is nowhere in the weights


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_normalised_weights_sum_to_scaling_factor(score_func):
    r = router(score_func=score_func, routed_scaling_factor=2.5)
    w, _, _ = r(torch.randn(20, D), 10)
    torch.testing.assert_close(w.sum(-1), torch.full((20,), 2.5))


def test_update_bias_sign_and_no_op():
    r = router(bias_update_rate=0.01)
    r.update_bias(torch.tensor([10, 2, 2, 2, 2, 2, 2, 2]))
    assert r.expert_bias[0].item() == pytest.approx(-0.01)
    assert torch.allclose(r.expert_bias[1:], torch.full((E - 1,), 0.01))
    still = router(bias_update_rate=0.0)
    still.update_bias(torch.tensor([10, 2, 2, 2, 2, 2, 2, 2]))
    assert torch.equal(still.expert_bias, torch.zeros(E))


def test_update_bias_balances_load():
    r = router(score_func="sigmoid", bias_update_rate=0.02)
    r.weight.data[0] += 2.0 * torch.ones(D) / D ** 0.5  # expert 0 favoured by tokens with positive mean
    x = torch.randn(256, D) + 0.3
    loads = []
    for _ in range(40):
        _, i, _ = r(x, 256)
        load = torch.bincount(i.view(-1), minlength=E)
        loads.append(load.max().item() / load.float().mean().item())
        r.update_bias(load)
    assert loads[-1] < loads[0] and loads[-1] < 1.5
    assert r.expert_bias.argmin().item() == 0  # the most overloaded expert was pushed down most


def aux_loss_by_formula(r: TopKRouter, x, seq_len):
    """DeepSeek-V3 eq. 17-20 written per sequence, per expert, per token."""
    scores = r.scores(x)
    _, idx, _ = r(x, seq_len)
    total = 0.0
    n_seq = x.shape[0] // seq_len
    for s in range(n_seq):
        rows = range(s * seq_len, (s + 1) * seq_len)
        loss = 0.0
        for i in range(r.n_experts):
            f_i = r.n_experts / (r.top_k * seq_len) * sum(int(i in idx[t].tolist()) for t in rows)
            p_i = sum(scores[t, i] / scores[t].sum() for t in rows) / seq_len
            loss = loss + f_i * p_i
        total = total + r.aux_loss_coef * loss
    return total / n_seq


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_matches_formula_and_is_zero_when_off(score_func):
    r = router(score_func=score_func, aux_loss_coef=0.1)
    r.weight.data /= 20  # soft scores, so the loss is not dominated by a few experts
    x = torch.randn(3 * 8, D)
    _, _, aux = r(x, seq_len=8)
    ref = aux_loss_by_formula(r, x, 8)
    torch.testing.assert_close(aux, ref, rtol=1e-5, atol=1e-7)
    aux.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    off = router(score_func=score_func, aux_loss_coef=0.0)
    assert off(x, 8)[2].item() == 0.0


# --- LocalRoutedMoE against a per-expert masked loop ---------------------------------------

def moe(**kw) -> LocalRoutedMoE:
    args = dict(d_model=D, n_routed_experts=E, top_k=2, moe_d_ff=12, n_shared_experts=1,
                score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                init_std=0.2, out_std=0.1)
    m = LocalRoutedMoE(**(args | kw))
    init_parameters(m, seed=3)
    return m


def check_against_reference(m: LocalRoutedMoE, x: torch.Tensor):
    x1 = x.clone().requires_grad_()
    y = m(x1)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    x2 = x.clone().requires_grad_()
    y_ref = masked_loop_moe(m, x2)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_moe_matches_masked_loop_forward_and_backward(score_func):
    m = moe(score_func=score_func, aux_loss_coef=0.0)
    check_against_reference(m, torch.randn(3, 10, D))
    stats = m.last_stats
    assert stats["tokens_per_expert"].dtype == torch.int64
    assert stats["tokens_per_expert"].sum().item() == 3 * 10 * 2
    assert m.aux_loss.item() == 0.0


def test_expert_with_zero_tokens():
    m = moe()
    m.router.expert_bias[3] = -100.0  # never selected (sigmoid scores are in (0, 1))
    check_against_reference(m, torch.randn(2, 8, D))
    assert m.last_stats["tokens_per_expert"][3].item() == 0
    m.zero_grad()
    m(torch.randn(2, 8, D)).sum().backward()
    assert m.experts.w1.grad[3].abs().sum() == 0 and m.experts.w1.grad.abs().sum() > 0


def test_aux_loss_exposed_with_graph():
    m = moe(aux_loss_coef=0.01)
    m(torch.randn(2, 8, D))
    assert m.aux_loss.requires_grad and m.aux_loss.item() > 0
    assert not m.last_stats["aux_loss"].requires_grad


def test_moe_under_bf16_autocast():
    m = moe()
    x = torch.randn(2, 8, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        w, _, _ = m.router(x.view(-1, D), 8)
    assert w.dtype == torch.float32  # the router stays in fp32
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.float(), m(x).detach(), rtol=0.05, atol=0.05)


def test_init_is_deterministic():
    a, b, c = moe(), moe(), moe()
    init_parameters(c, seed=4)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, pc), n
    assert not torch.equal(a.experts.w1[0], a.experts.w1[1])  # experts differ from each other
    assert torch.equal(a.router.expert_bias, torch.zeros(E))
    assert "router.expert_bias" in a.state_dict()
    names = {n for n, _ in a.named_parameters()}
    assert names == {"router.weight", "experts.w1", "experts.w2", "experts.w3",
                     "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight"}


def test_invalid_arguments():
    for kw in (dict(score_func="relu"), dict(n_group=3), dict(n_group=4, topk_group=5),
               dict(n_group=4, topk_group=1, top_k=3)):
        with pytest.raises(ValueError):
            TopKRouter(D, E, kw.pop("top_k", 2), **kw)



def test_capacity_factor_drops_overflow_and_counts_it():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    dropless = LocalRoutedMoE(32, 4, 2, 16, 1, score_func="sigmoid", init_std=0.2, out_std=0.1)
    init_parameters(dropless, seed=1)
    big = LocalRoutedMoE(32, 4, 2, 16, 1, score_func="sigmoid", init_std=0.2, out_std=0.1, capacity_factor=100.0)
    big.load_state_dict(dropless.state_dict())
    torch.testing.assert_close(big(x), dropless(x), rtol=0, atol=0)  # capacity never reached
    assert big.last_stats["dropped"] == 0

    tight = LocalRoutedMoE(32, 4, 2, 16, 1, score_func="sigmoid", init_std=0.2, out_std=0.1, capacity_factor=0.25)
    tight.load_state_dict(dropless.state_dict())
    y = tight(x)
    capacity = 4  # ceil(0.25 * 64 assignments / 4 experts)
    routed = tight.last_stats["tokens_per_expert"]
    assert tight.last_stats["dropped"] == int((routed - routed.clamp(max=capacity)).sum()) > 0
    # Reference: the masked loop over only the first `capacity` tokens (in token order) of each expert.
    tokens = x.reshape(-1, 32)
    w, idx, _ = tight.router(tokens, 16)
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for e in range(4):
        rows, slots = (idx == e).nonzero(as_tuple=True)
        keep[rows[:capacity], slots[:capacity]] = True
    ex = tight.experts
    ref = tight.shared_experts(tokens)
    for e in range(4):
        hit = (idx == e) & keep
        mask = hit.any(-1)
        xe = tokens[mask]
        out = F.linear(F.silu(F.linear(xe, ex.w1[e])) * F.linear(xe, ex.w3[e]), ex.w2[e])
        ref = ref.index_add(0, mask.nonzero().squeeze(1), out * (w * hit).sum(-1)[mask].unsqueeze(-1))
    torch.testing.assert_close(y.reshape(-1, 32), ref, rtol=1e-5, atol=1e-6)
