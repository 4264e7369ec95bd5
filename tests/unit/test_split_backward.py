"""The backward split in two (parallel/pipeline/split_backward.py): B then W gives the gradients
of one whole backward, for every layer kind a pipeline chunk can hold.

Each case builds the model as the engine does (recipes, low-bit weights), cuts it to the last of
two pipeline stages, and runs one micro-batch from a hidden-state input: once with a whole
backward, once as B then W. The input's gradient comes from B alone; after B no weight has a
gradient; after W every weight's gradient equals the whole backward's. Same arithmetic in the
same order, so the tolerance is a few fp32 roundings (1e-6 relative), not a training tolerance.
Tensor-parallel linears with sequence parallelism, and experts over ep ranks, are split in the
parity suite (tests/parity/test_zero_bubble_layouts.py)."""

import pytest
import torch

from conftest import runtime_parts, tiny_config
from nanotrain.params import spec
from nanotrain.parallel.pipeline import pipeline_stage
from nanotrain.parallel.pipeline.split_backward import backward_input
from test_deepseek import TINY

CASES = {
    "llama_fp32": ["--precision.recipe=fp32", "--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.pos_emb=rope"],
    "gpt2_bf16_tied": ["--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned", "--model.bias=true",
                       "--model.tie_embeddings=true"],
    "fp8_tensorwise": ["--precision.recipe=fp8_tensorwise", "--precision.low_bit_exclude="],
    "fp8_deepseek": ["--precision.recipe=fp8_deepseek"],
    # (nvfp4 is left out: its stochastic rounding draws from one generator per recipe, and W
    # draws after every B instead of layer by layer, so the roundings differ, not the arithmetic.)
    "mxfp4": ["--precision.recipe=mxfp4"],
    "lowbit_nf4": ["--precision.recipe=fp32", "--precision.lowbit.weights=*.mlp.*", "--precision.lowbit.format=nf4"],
    "deepseek_mla_moe": [*TINY, "--precision.recipe=fp32", "--model.n_layers=2"],
}


def last_stage_grads(cfg, split: bool):
    """(gradient of the input, {weight name: gradient}, whether any weight had one after B)."""
    with runtime_parts(cfg.to_dict()) as (_, model, opt):
        torch.manual_seed(0)
        got: dict[str, torch.Tensor] = {}
        # Low-bit weights' gradients go to the optimizer's buffers (their .grad is taken): caught on the way.
        lowbit = {p: name for name, p in model.named_parameters() if spec(p).lowbit is not None}
        on_grad = opt.reducer.on_grad
        opt.reducer.on_grad = lambda p, g: got.__setitem__(lowbit[p], g.clone()) if p in lowbit else on_grad(p, g)
        n = cfg.model.n_layers
        stage = pipeline_stage(model, 1, 2, [list(range(n // 2, n))])
        B, T = 2, cfg.train.seq_len
        tokens = torch.randint(0, model.cfg.vocab_size, (B, T))
        x = torch.randn(B, T, cfg.model.d_model, requires_grad=True)
        y = stage(x, tokens, torch.tensor(float(B * T)), chunk=0, tokens=tokens)
        early = False
        if split:
            dx, rest = backward_input(y, None, x)
            early = bool(got) or any(p.grad is not None for p in stage.parameters())
            rest.run()
        else:
            y.backward()
            dx = x.grad
        grads = {k: p.grad.clone() for k, p in stage.named_parameters() if p.grad is not None}
        return dx, grads | got, early


@pytest.mark.parametrize("name", CASES)
def test_input_then_weights_equals_one_backward(tmp_path, name):
    cfg = tiny_config(tmp_path, *CASES[name])
    dx, whole, _ = last_stage_grads(cfg, split=False)
    dx2, split, early = last_stage_grads(cfg, split=True)
    assert not early, "B accumulated a weight gradient"
    torch.testing.assert_close(dx2, dx, rtol=1e-6, atol=0)
    assert split.keys() == whole.keys() and whole
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-6, atol=1e-9, msg=k)


def test_a_weight_used_twice_on_the_input_path_counts_once():
    """y = tanh(tanh(x W) W): W's two uses meet the input's path at two nodes, one downstream of
    the other. W starts from both with the gradients B kept; the later one's gradient also flows
    into the earlier one, where the kept (whole) gradient must replace it, not add to it."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 6) / 3)
    x = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    torch.tanh(torch.tanh(x @ w) @ w).backward(g)
    whole_w, whole_x = w.grad.clone(), x.grad.clone()
    w.grad = None
    x2 = x.detach().clone().requires_grad_()
    dx, rest = backward_input(torch.tanh(torch.tanh(x2 @ w) @ w), g, x2)
    assert w.grad is None
    rest.run()
    torch.testing.assert_close(dx, whole_x, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, whole_w, rtol=1e-6, atol=0)
