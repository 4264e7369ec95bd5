"""A schedule is, for every pipeline rank, the order of its compute actions.

    Action("F", k, i): forward of micro-batch i through this rank's local chunk k
    Action("B", k, i): its backward: the gradient of the chunk's input, which the previous
                       chunk waits for, and (unless a W follows) the weights' gradients
    Action("W", k, i): the weights' gradients of that backward, split off and run later
                       (zero-bubble schedules): it needs its own B and sends nothing

gpipe.py, one_f_one_b.py, interleaved.py, zero_bubble.py and dualpipev.py each only
produce these orders. Which global chunk a rank's local chunk k is comes from the
placement (chunk_ids in schedules.py): chunk k * pp + rank for all but DualPipeV's V. Turning
an order into communication is shared, here: `timetable` plays all ranks' orders
in unit time slots (each rank runs its next action as soon as the inputs it needs
were produced in an earlier slot), which tells every rank in which slot each message
is produced. The runner (runner.py) then exchanges, after each slot, exactly the
messages produced in it, with one batch_isend_irecv per rank holding both its sends
and the receives its neighbours' sends match. Both ends agree on the batches by
construction, so no schedule can deadlock on communication, and a schedule whose
order is impossible (an action waiting on one that comes later) is caught by the
play-through, before any process starts.

The play-through is also the textbook picture: with a forward and a backward each
taking one slot, its idle slots give the schedule's ideal bubble.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Action:
    kind: str  # "F", "B" or "W"
    chunk: int  # local chunk index on its rank (0..v-1)
    mb: int  # micro-batch


@dataclass(frozen=True)
class Message:
    """Output of `action` (on rank `src`) that `consumer` (on rank `dst`) needs: hidden
    states for the next chunk's forward, or their gradient for the previous chunk's backward."""
    src: int
    dst: int
    slot: int  # produced (and exchanged) in this slot
    action: Action  # producer, in src's local chunk numbering
    consumer: Action  # in dst's local chunk numbering


@dataclass
class Timetable:
    pp: int
    v: int
    slots: list[list[Action | None]]  # slots[rank][t]
    messages: list[Message] = field(default_factory=list)
    placement: list[list[int]] = field(default_factory=list)  # [rank][k]: global chunk (loop_placement)

    @property
    def n_slots(self) -> int:
        return len(self.slots[0])

    def sends(self, rank: int) -> dict[int, list[Message]]:
        """Messages this rank sends, by slot."""
        return self._by_slot(lambda m: m.src == rank)

    def recvs(self, rank: int) -> dict[int, list[Message]]:
        """Messages this rank receives, by the slot in which they are sent."""
        return self._by_slot(lambda m: m.dst == rank)

    def _by_slot(self, keep) -> dict[int, list[Message]]:
        out: dict[int, list[Message]] = {}
        for m in filter(keep, self.messages):
            out.setdefault(m.slot, []).append(m)
        return out

    def bubble(self) -> float:
        """Idle fraction of the play-through (every action one slot): the ideal bubble."""
        busy = sum(a is not None for row in self.slots for a in row)
        return 1 - busy / (self.pp * self.n_slots)

    def split(self, rank: int) -> set[tuple[int, int]]:
        """(chunk, micro-batch) pairs whose backward this rank runs as B then W: those with a W,
        except on the model's first chunk, whose input (token ids) has no gradient to send, so
        its B runs whole and the W has nothing left (runner.py)."""
        first = [k for k, c in enumerate(self.placement[rank]) if c == 0]
        return {(a.chunk, a.mb) for a in self.slots[rank] if a is not None and a.kind == "W" and a.chunk not in first}

    def finishes(self, rank: int) -> list[Action]:
        """This rank's actions that end a backward, in order: the W of a split one, else the whole
        B. Each accumulates the weights' gradients and frees its (chunk, micro-batch)'s activations."""
        split = self.split(rank)
        return [a for a in self.slots[rank]
                if a is not None and a.kind != "F" and (a.kind == "W") == ((a.chunk, a.mb) in split)]

    def peak_in_flight(self, rank: int, size=lambda chunk: 1) -> int:
        """Most (chunk, micro-batch) pairs whose activations this rank holds at once, from a forward
        to the backward that finishes with them (the W of a split one); each pair counts size(chunk)
        (1, or the chunk's layers). It depends on the rank's order alone: the runner measures it too."""
        ends = set(self.finishes(rank))
        live = peak = 0
        for a in (a for a in self.slots[rank] if a is not None):
            if a.kind == "F":
                live += size(a.chunk)
                peak = max(peak, live)
            elif a in ends:
                live -= size(a.chunk)
        return peak


def loop_placement(pp: int, v: int) -> list[list[int]]:
    """Global chunk of each rank's local chunk k: k * pp + rank (every schedule but DualPipeV)."""
    return [[k * pp + r for k in range(v)] for r in range(pp)]


def needs(kind: str, c: int, mb: int, n_chunks: int, rank: int) -> list[tuple[str, int, int]]:
    """The (kind, global chunk, micro-batch) actions that must finish before this one can start."""
    if kind == "F":
        return [("F", c - 1, mb)] if c > 0 else []
    if kind == "B":  # a backward needs its own forward, and the gradient from the next chunk
        return [("F", c, mb)] + ([("B", c + 1, mb)] if c < n_chunks - 1 else [])
    if kind == "W":  # the weights' half needs the input's half (its captured gradients)
        return [("B", c, mb)]
    raise ValueError(f"pipeline rank {rank}: unknown action kind {kind!r} (F, B or W)")


def timetable(orders: list[list[Action]], v: int = 1, placement: list[list[int]] | None = None) -> Timetable:
    """Play the per-rank orders in unit slots; raise ValueError if they cannot all finish.
    placement[rank][k]: the global chunk of rank's local chunk k (default: loop_placement)."""
    pp = len(orders)
    n_chunks = pp * v
    placement = placement or loop_placement(pp, v)
    where = {c: (r, k) for r, ids in enumerate(placement) for k, c in enumerate(ids)}
    if sorted(where) != list(range(n_chunks)):
        raise ValueError(f"the placement {placement} does not hold every chunk 0..{n_chunks - 1} once")

    def rank_of(c: int) -> int:
        return where[c][0]

    def local(c: int) -> int:
        return where[c][1]

    def glob(rank: int, k: int) -> int:
        return placement[rank][k]

    done: dict[tuple[str, int, int], int] = {}  # (kind, global chunk, mb) -> slot
    pos = [0] * pp
    slots: list[list[Action | None]] = [[] for _ in range(pp)]
    messages: list[Message] = []
    t = 0
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        ran = []
        for r in range(pp):
            if pos[r] == len(orders[r]):
                slots[r].append(None)
                continue
            a = orders[r][pos[r]]
            c = glob(r, a.chunk)
            need = needs(a.kind, c, a.mb, n_chunks, r)
            if all(done.get(d, t) < t for d in need):
                slots[r].append(a)
                ran.append((r, a, c))
            else:
                slots[r].append(None)
        if not ran:
            stuck = {r: orders[r][pos[r]] for r in range(pp) if pos[r] < len(orders[r])}
            raise ValueError(f"pipeline schedule cannot proceed at slot {t}: every rank waits ({stuck})")
        for r, a, c in ran:
            done[(a.kind, c, a.mb)] = t
            pos[r] += 1
            if a.kind == "W":
                continue  # weight gradients stay on the rank
            nxt = c + 1 if a.kind == "F" else c - 1
            if 0 <= nxt < n_chunks:  # the last chunk's forward ends in the loss, chunk 0's backward at the tokens
                messages.append(Message(r, rank_of(nxt), t, a, Action(a.kind, local(nxt), a.mb)))
        t += 1
    for r in range(pp):  # every action exactly once
        want = {(a.kind, glob(r, a.chunk), a.mb) for a in orders[r]}
        if len(want) != len(orders[r]):
            raise ValueError(f"pipeline rank {r}: an action appears twice in the schedule")
        late = {(a.chunk, a.mb) for a in orders[r] if a.kind == "W"} - \
            {(a.chunk, a.mb) for a in orders[r] if a.kind == "B"}
        if late:
            raise ValueError(f"pipeline rank {r}: W without its B for (chunk, micro-batch) {sorted(late)}")
    return Timetable(pp, v, slots, messages, placement)


def forward_only_order(ids: list[int], m: int) -> list[Action]:
    """Evaluation: a rank's chunks in the order of their global index, each through every
    micro-batch. Any placement plays without waiting in a cycle: every forward needs only
    the previous global chunk's, which comes earlier on its own rank too."""
    by_global = sorted(range(len(ids)), key=lambda k: ids[k])
    return [Action("F", k, i) for k in by_global for i in range(m)]
