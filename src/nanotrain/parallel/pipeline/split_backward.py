"""A backward in two halves: B, the gradient of the chunk's input, now; W, the weights', later.

Zero-bubble schedules (zero_bubble.py, dualpipev.py) send the input's gradient to the
previous rank as soon as it exists, and compute the weights' gradients when the rank
would otherwise idle. Every layer kind has to allow this, so the cut is made in the
autograd graph, not in the layers:

    y  <- ... <- mm <- ... <- mm <- x          the path to the input: B runs it
                  ^             ^
                  W1            W2             the weights hang off it: W runs those branches

B calls torch.autograd.grad(y, x): autograd runs only the nodes on the path to x, and
built-in nodes (mm, the norms, attention) compute only the gradients asked for. A
pre-hook on each node where a weight's branch leaves the path ("intermediates")
keeps the gradient that reached it. W later starts at those nodes with the kept
gradients and runs only towards the weights: one GEMM per linear in B (dx = dy W)
and one in W (dW = dyᵀ x), together the one backward.

W goes through torch.autograd.backward(inputs=weights), so the gradients accumulate
in AccumulateGrad as in any backward: the data-parallel bucket hooks
(register_post_accumulate_grad_hook, data_parallel.py) and ZeRO's reduce-scatter fire
in W, where the weights' gradients appear. A custom autograd.Function on a weight's
branch runs in both halves; QuantizedLinear (fp8/fp4) skips the GEMM its half does not
need (precision/recipes.py).

torch.distributed.pipelining._backward (stage_backward_input / stage_backward_weight)
is the library version of this cut; it sets .grad by hand, which skips those hooks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque

import torch
from torch.autograd.graph import GradientEdge, Node

# Which half runs now: None (a whole backward), "input" (B) or "weights" (W). A module
# global, not a contextvar: autograd may run a backward on its own device threads.
_half: str | None = None


def running_half() -> str | None:
    """For an autograd.Function on a weight's branch (autograd's built-in nodes know this by
    themselves): "input" in B, where only the input's gradient is used, "weights" in W."""
    return _half


@contextlib.contextmanager
def _running(half: str):
    global _half
    _half = half
    try:
        yield
    finally:
        _half = None


def _graph(root: Node) -> tuple[dict[Node, list[Node]], list[Node]]:
    """Every node under root: the nodes that pass it their gradient (towards the output),
    and the leaves' gradient accumulators."""
    towards_output: dict[Node, list[Node]] = defaultdict(list)
    leaves, seen, queue = [], {root}, deque([root])
    while queue:
        node = queue.popleft()
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf (a weight, or the chunk's input)
            leaves.append(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            towards_output[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return towards_output, leaves


def _upwards(starts: list[Node], towards_output, stop: set[Node] = frozenset()) -> tuple[set[Node], set[Node]]:
    """Nodes reached from `starts` walking towards the output without entering `stop`, and the
    nodes of `stop` met on the way."""
    reached, met, queue = set(starts), set(), deque(starts)
    while queue:
        for node in towards_output[queue.popleft()]:
            if node in stop:
                met.add(node)
            elif node not in reached:
                reached.add(node)
                queue.append(node)
    return reached, met


class WeightGradients:
    """The W half of one chunk's backward of one micro-batch. Groups of weights whose branches
    meet the input's path at the same nodes are computed together, in one autograd call each."""

    def __init__(self, groups: list[tuple[list[Node], list[torch.Tensor]]], captured: dict[Node, tuple]):
        self.groups, self.captured = groups, captured

    def run(self) -> None:
        for nodes, weights in self.groups:
            got = [(node, self.captured[node]) for node in nodes if node in self.captured]
            edges = [(GradientEdge(node, i), g) for node, grads in got for i, g in enumerate(grads) if g is not None]
            if not edges:
                continue  # no gradient reached these weights (an expert that got no token)
            # A branch may pass through another of the group's nodes: there, the gradient B kept is
            # the whole one, so it replaces what arrives (else that part would count twice).
            handles = [node.register_prehook(lambda _, g=grads: g) for node, grads in got] if len(got) > 1 else []
            try:
                with _running("weights"):
                    torch.autograd.backward([e for e, _ in edges], [g for _, g in edges], retain_graph=True,
                                            inputs=weights)
            finally:
                for h in handles:
                    h.remove()
        self.groups, self.captured = [], {}  # frees the graph and the kept gradients


def backward_input(y: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                                          WeightGradients]:
    """B: the gradient of the leaf x (the chunk's input) for output y with gradient `grad` (None: y
    is the scalar loss), and the W still to run. No weight gradient is accumulated yet."""
    towards_output, leaves = _graph(y.grad_fn)
    x_node = next(n for n in leaves if n.variable is x)
    input_path, _ = _upwards([x_node], towards_output)
    # Group the weights by the nodes where their branches meet the input's path (torch's
    # get_param_groups): weights that share such a node go in one autograd call.
    group_of: dict[Node, int] = {}
    groups: list[tuple[set[Node], list[torch.Tensor]]] = []
    for leaf in leaves:
        if leaf is x_node:
            continue
        _, met = _upwards([leaf], towards_output, input_path)
        joined = sorted({group_of[n] for n in met if n in group_of})
        nodes, weights = set(met), [leaf.variable]
        for g in joined:
            nodes |= groups[g][0]
            weights += groups[g][1]
            groups[g] = (set(), [])
        groups.append((nodes, weights))
        for n in nodes:
            group_of[n] = len(groups) - 1
    captured: dict[Node, tuple] = {}

    def keep(node):
        def hook(grad_outputs):
            captured[node] = grad_outputs
        return hook

    handles = [n.register_prehook(keep(n)) for n in group_of]
    try:
        with _running("input"):
            (dx,) = torch.autograd.grad(y, x, grad, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return dx, WeightGradients([(list(n), w) for n, w in groups if w], captured)
