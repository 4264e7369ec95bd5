"""Run one pipeline rank's part of a schedule: its time slots, in order.

    for each slot t of the timetable (actions.py):
        compute this rank's action of slot t, if any:
            F: wait for the input (received earlier), forward the chunk, keep (input, output)
            B: wait for the output's gradient, backpropagate, free (input, output); where the
               schedule has a W for it, only the input's gradient (split_backward.py)
            W: the weights' gradients that B left
        exchange: one batch_isend_irecv with the messages produced in slot t:
            this rank's output (hidden states, or the gradient of its input) to the rank
            of the next (previous) chunk, and the receives matching its neighbours' sends

Receives are posted early and waited for only when the action that needs them runs;
sends are waited for at the end of the step. What crosses ranks is the hidden state
[micro_batch, seq_len, d_model] in the residual stream's dtype (fp32, or bf16 parameters'), or its shard
[micro_batch, seq_len / tp, d_model] under sequence parallelism; the receiver knows
the shape from its own micro-batch (point-to-point carries no metadata). A message
to the same rank (DualPipeV's tip, where one rank holds two neighbouring chunks) is
handed over in memory.

Megatron's equivalent is schedules.py (forward_backward_pipelining_*), written as
explicit loops per schedule with send_forward_recv_backward-style pairs; torch's is
torch.distributed.pipelining's _PipelineScheduleRuntime, which, like this file,
executes per-rank action lists.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..collectives import Group, batch_isend_irecv
from .actions import Action
from .schedules import cached_timetable
from .split_backward import WeightGradients, backward_input
from .stage import Stage


class _NoMeter:
    """Stands in for the communication meter where the runner's group has none (tests' raw groups)."""

    @contextlib.contextmanager
    def computing(self):
        yield


_NO_METER = _NoMeter()


class _Here:
    """A message this rank sends itself: already delivered."""

    def wait(self) -> None:
        pass

    def is_completed(self) -> bool:
        return True


class PipelineRunner:
    def __init__(self, model: nn.Module, schedule: str, peers: list[int], group: Group | None,
                 device: torch.device | str = "cpu",
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """model: cut to this rank's stage (stage.pipeline_stage). peers[q]: global rank of
        pipeline rank q in this rank's pipeline (pp group)."""
        self.model, self.schedule, self.peers, self.group = model, schedule, peers, group
        self.stage: Stage = model.stage
        self.max_in_flight = 0  # after a training step: peak micro-batches of stored activations
        self.device, self.autocast = torch.device(device), autocast
        self.events: list[tuple[str, int, int, float, float]] | None = None  # timeline, when recording
        self.dtype = torch.float32  # the residual stream's: the parameters' storage dtype (precision.param_dtype)
        # Run DualPipeV's paired forward and backward side by side (set by runtime/step.py where
        # experts are spread over ranks: their all-to-alls are what the pair hides).
        self.overlap = False
        self._pool = None

    @classmethod
    def from_state(cls, model: nn.Module, schedule: str, state, device="cpu", autocast=contextlib.nullcontext):
        peers = [state.global_rank(pp_rank=q) for q in range(state.pp)]
        return cls(model, schedule, peers, state.pp_group, device, autocast)

    # -- entry points -------------------------------------------------------------------

    def train_step(self, micro_batches: list, loss_denominator, backward_context=None,
                   record: bool = False) -> torch.Tensor:
        """Forward and backward every micro-batch; gradients accumulate in the stage's
        parameters. Returns the summed loss on the rank with the last chunk (0 elsewhere).
        backward_context(last) wraps each backward that accumulates weight gradients (a
        whole B, or a W); last=True for the final one of each chunk, when the chunk's
        gradients are complete (data-parallel sync hooks). Where one rank holds both ends
        of the model (DualPipeV), their chunks can share a weight (tied embeddings), so
        only the rank's final one is last."""
        return self._run(micro_batches, loss_denominator, backward_context, record, forward_only=False)

    @torch.no_grad()
    def forward_only(self, micro_batches: list, loss_denominator=1.0) -> torch.Tensor:
        """Evaluation: the summed loss over the micro-batches on the last rank (0 elsewhere)."""
        return self._run(micro_batches, loss_denominator, None, False, forward_only=True)

    # -- the slot loop -------------------------------------------------------------------

    def _run(self, micro_batches, denom, backward_context, record, forward_only) -> torch.Tensor:
        stage, me = self.stage, self.stage.rank
        tt, split, lasts = self._step_plan(len(micro_batches), forward_only)
        sends, recvs = tt.sends(me), tt.recvs(me)
        shape = self._message_shape(micro_batches[0][0])
        self.events = [] if record else None
        self._t0 = time.perf_counter()
        self.t0_wall = time.time()  # events are seconds after this wall-clock time (ranks align on it)

        inbox: dict[Action, tuple[dist.Work, torch.Tensor]] = {}  # consumer -> (receive, buffer)
        outbox: dict[Action, torch.Tensor] = {}  # producer -> what it sends
        in_flight: list[tuple[dist.Work, torch.Tensor, Action]] = []  # sends not yet known complete, by sender
        acts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (chunk, mb) -> (input, output)
        weights_left: dict[tuple[int, int], WeightGradients] = {}  # (chunk, mb) -> its W, after the B
        loss_sum = torch.zeros((), device=self.device)
        peak = 0

        def forward(a: Action, held: int = 0) -> None:
            nonlocal loss_sum, peak
            x, y = self._forward(a, micro_batches, denom, inbox, forward_only)
            if stage.is_last_chunk(a.chunk):
                loss_sum += y.detach()  # a tensor, not .item(): no host sync per micro-batch
            else:
                outbox[a] = y.detach().to(self.dtype)
            if not forward_only:
                acts[(a.chunk, a.mb)] = (x, y)
                peak = max(peak, len(acts) + len(weights_left) + held)

        def backward(a: Action, x, y) -> torch.Tensor | None:
            if (a.chunk, a.mb) in split:
                dx, weights_left[(a.chunk, a.mb)] = self._backward_input(a, x, y, inbox)
                return dx
            return self._backward(a, x, y, inbox, backward_context, a in lasts)

        def backward_done(a: Action, dx) -> None:
            # Its gradient came back, so the next rank has received this micro-batch's output:
            # the send is done (gloo's send reports it only to wait()). Releasing it frees the
            # output now instead of at the end of the step.
            sent = [f for f in in_flight if (f[2].kind, f[2].chunk, f[2].mb) == ("F", a.chunk, a.mb)]
            for work, _, _ in sent:
                work.wait()
            in_flight[:] = [f for f in in_flight if all(f is not g for g in sent)]
            if dx is not None:
                outbox[a] = dx

        t = 0
        while t < tt.n_slots:
            a = tt.slots[me][t]
            b = tt.slots[me][t + 1] if t + 1 < tt.n_slots else None
            if self.overlap and not forward_only and self._pair(a, b, inbox, acts):
                # One micro-batch's forward beside another's backward (DualPipeV's F0 B1 / F1 B0):
                # the backward in the second thread, so that while one waits in its all-to-all
                # the other computes. The pair's messages go out after both, in slot order.
                x, y = acts.pop((b.chunk, b.mb))
                meter = self._meter()
                with meter.computing():
                    job = self._second_thread().submit(self._computing, meter, backward, b, x, y)
                    forward(a, held=1)
                backward_done(b, job.result())
                del x, y  # not until the next pair: locals of this loop would keep them
                for slot in (t, t + 1):
                    self._exchange(sends.get(slot, ()), recvs.get(slot, ()), outbox, inbox, in_flight, shape)
                t += 2
                continue
            if a is not None and a.kind == "F":
                forward(a)
            elif a is not None and a.kind == "W":
                if (a.chunk, a.mb) in split:
                    self._weights(a, weights_left.pop((a.chunk, a.mb)), backward_context, a in lasts)
            elif a is not None:
                backward_done(a, backward(a, *acts.pop((a.chunk, a.mb))))
            self._exchange(sends.get(t, ()), recvs.get(t, ()), outbox, inbox, in_flight, shape)
            t += 1

        self._finish_sends(in_flight)
        if not forward_only:
            self.max_in_flight = peak
        return loss_sum

    def _step_plan(self, m: int, forward_only: bool):
        """This rank's timetable for m micro-batches, the (chunk, mb) whose backward splits into B
        then W (the model's first chunk has no input gradient: its B runs whole), and the backwards
        after which a chunk's gradients are complete (the sync hooks' `last`: one for the whole
        rank where it holds the whole model, see train_step)."""
        stage = self.stage
        tt = cached_timetable(self.schedule, stage.n_ranks, stage.v, m, forward_only)
        whole = stage.has_first and stage.has_last
        lasts = set({0 if whole else a.chunk: a for a in tt.finishes(stage.rank)}.values())
        return tt, tt.split(stage.rank), lasts

    def _finish_sends(self, in_flight) -> None:
        """Wait for the sends still in flight at the end of the step (a timeline's "send" bar)."""
        start = time.perf_counter()
        for work, _, _ in in_flight:
            work.wait()
        if in_flight:
            self._event("send", None, start)

    # -- DualPipeV's overlapped pairs -----------------------------------------------------------

    def _pair(self, a: Action | None, b: Action | None, inbox, acts) -> bool:
        """Whether the forward `a` and the backward `b` of the next slot can run side by side: b's own
        forward is done (it is not a), and b's input gradient has been posted for (its message came
        before a's slot), or b needs none."""
        return a is not None and b is not None and a.kind == "F" and b.kind == "B" and (b.chunk, b.mb) in acts \
            and (self.stage.is_last_chunk(b.chunk) or b in inbox)

    def _second_thread(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="pipeline-backward")
        return self._pool

    def _meter(self):
        meter = getattr(self.group, "meter", None)
        return meter if meter is not None else _NO_METER

    @staticmethod
    def _computing(meter, fn, *args):
        with meter.computing():
            return fn(*args)

    def _forward(self, a: Action, micro_batches, denom, inbox, forward_only) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's forward of one micro-batch: (its input, its output or loss)."""
        stage = self.stage
        first, last = stage.is_first_chunk(a.chunk), stage.is_last_chunk(a.chunk)
        x = micro_batches[a.mb][0] if first else self._take(inbox, a)
        if not (forward_only or first):
            x.requires_grad_()  # a leaf: after backward, x.grad is what the previous rank needs
        start = time.perf_counter()
        with self.autocast():
            # Every chunk gets the micro-batch's token ids: packed documents' masks come from them.
            y = self.model(x, micro_batches[a.mb][1] if last else None, denom if last else None, chunk=a.chunk,
                           tokens=micro_batches[a.mb][0])
        self._event("F", a, start)
        return x, y

    def _backward(self, a: Action, x, y, inbox, backward_context, last: bool) -> torch.Tensor | None:
        """One chunk's backward of one micro-batch; returns the gradient of its input (None on chunk 0)."""
        stage = self.stage
        grad = None if stage.is_last_chunk(a.chunk) else self._take(inbox, a)
        ctx = backward_context(last) if backward_context else contextlib.nullcontext()
        start = time.perf_counter()
        with ctx:
            # The last chunk's output is the scalar loss, whose gradient is implicitly 1.
            torch.autograd.backward(y, grad_tensors=None if grad is None else grad.to(y.dtype))
        self._event("B", a, start)
        return None if stage.is_first_chunk(a.chunk) else x.grad

    def _backward_input(self, a: Action, x, y, inbox) -> tuple[torch.Tensor, WeightGradients]:
        """B of a split backward: the input's gradient, now; the weights' are left for W.
        Not inside backward_context: no weight gradient arrives here, so no bucket fills."""
        grad = None if self.stage.is_last_chunk(a.chunk) else self._take(inbox, a)
        start = time.perf_counter()
        dx, rest = backward_input(y, None if grad is None else grad.to(y.dtype), x)
        self._event("B", a, start)
        return dx, rest

    def _weights(self, a: Action, rest: WeightGradients, backward_context, last: bool) -> None:
        """W: the weights' gradients of a split backward, where the gradient hooks fire."""
        ctx = backward_context(last) if backward_context else contextlib.nullcontext()
        start = time.perf_counter()
        with ctx:
            rest.run()
        self._event("W", a, start)

    def _exchange(self, sends, recvs, outbox, inbox, in_flight, shape) -> None:
        if not (sends or recvs):
            return
        start = time.perf_counter()
        me = self.stage.rank
        for msg in [m for m in sends if m.dst == me]:  # to this rank's other chunk: no message
            inbox[msg.consumer] = (_Here(), outbox.pop(msg.action))
        sends, recvs = [m for m in sends if m.dst != me], [m for m in recvs if m.src != me]
        to_send = [(outbox.pop(msg.action).contiguous(), self.peers[msg.dst]) for msg in sends]
        to_recv = [(torch.empty(shape, dtype=self.dtype, device=self.device), self.peers[msg.src]) for msg in recvs]
        buffers = [t for t, _ in to_send + to_recv]  # kept alive until the transfers complete
        if not buffers:
            return
        works = batch_isend_irecv(to_send, to_recv, self.group)
        n_ops = len(buffers)
        if len(works) != n_ops:  # NCCL may return one work for the whole batch
            works = works * n_ops if len(works) == 1 else works
        for msg, work, buf in zip(sends, works[:len(sends)], buffers[:len(sends)]):
            in_flight.append((work, buf, msg.action))
        for msg, work, buf in zip(recvs, works[len(sends):], buffers[len(sends):]):
            inbox[msg.consumer] = (work, buf)
        in_flight[:] = [f for f in in_flight if not f[0].is_completed()]
        self._event("comm", None, start)

    def _take(self, inbox, a: Action) -> torch.Tensor:
        """The received input of action a, waiting for it if it has not arrived yet."""
        work, buf = inbox.pop(a)
        start = time.perf_counter()
        work.wait()
        self._event("wait", a, start)
        return buf

    def _event(self, kind: str, a: Action | None, start: float) -> None:
        if self.events is not None:
            self.events.append((kind, -1 if a is None else a.chunk, -1 if a is None else a.mb,
                                start - self._t0, time.perf_counter() - self._t0))

    def _message_shape(self, input_ids: torch.Tensor) -> tuple[int, int, int]:
        B, T = input_ids.shape
        if self.model.sequence_parallel:
            T //= self.model.tp.size
        return (B, T, self.model.cfg.d_model)
