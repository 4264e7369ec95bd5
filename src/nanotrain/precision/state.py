"""The GEMM recipes' own state in a checkpoint: what a resumed run needs to round as before.

Delayed fp8 scaling keeps an amax history per weight, and stochastic rounding a random
generator; both live on the modules the policy gave a recipe (policy.apply_policy). The policy
decides how each GEMM runs, and layers.Linear calls it, so it sits below the checkpoint code;
saving and restoring that state needs the checkpoint's pieces, so it is here, one step above both.
"""

from __future__ import annotations

from torch import nn

from ..checkpoint.pieces import whole
from ..module_spec import module_spec
from .policy import runs_gemms


def state_pieces(model: nn.Module, rank: int) -> list:
    """What a resumed run needs to round exactly as before: the delayed-scaling amax histories
    and the stochastic-rounding generators. Both belong to this rank's shards (a tp shard has
    its own amax), so they are saved per rank, like the RNG state, and restored only by a
    rank of the same number (any other starts afresh: the first step scales by its own amax)."""
    out, seen = [], set()
    for name, module in model.named_modules():
        if not runs_gemms(module):
            continue
        state = module_spec(module).gemm_state
        if state is not None:
            out += [whole(f"precision/rank{rank}/{name}/amax/{key}", hist) for key, hist in state.histories.items()]
        generator = getattr(module_spec(module).gemm_recipe, "generator", None)
        if generator is not None and id(generator) not in seen:  # one generator, shared by many modules
            seen.add(id(generator))
            out.append(whole(f"precision/rank{rank}/{name}/generator", generator.get_state()))
    return out


def load_state(model: nn.Module, reader, rank: int) -> None:
    """Restore what state_pieces saved, where this rank saved it."""
    seen = set()
    for name, module in model.named_modules():
        if not runs_gemms(module):
            continue
        state = module_spec(module).gemm_state
        prefix = f"precision/rank{rank}/{name}/amax/"
        if state is not None:
            state.histories = {n[len(prefix):]: reader.full(n) for n in reader.tensors if n.startswith(prefix)}
        generator = getattr(module_spec(module).gemm_recipe, "generator", None)
        key = f"precision/rank{rank}/{name}/generator"
        if generator is not None and id(generator) not in seen and reader.has(key):
            seen.add(id(generator))
            generator.set_state(reader.full(key))


def state_snapshot(model: nn.Module):
    """What state_pieces saves, copied now; returns a function that puts it back (the compile
    warm-up runs the blocks once and must leave the run's rounding state as it found it)."""
    histories, generators = [], {}
    for module in model.modules():
        if not runs_gemms(module):
            continue
        state = module_spec(module).gemm_state
        if state is not None:
            histories.append((state, dict(state.histories)))  # entries are replaced, never changed in place
        generator = getattr(module_spec(module).gemm_recipe, "generator", None)
        if generator is not None:
            generators[id(generator)] = (generator, generator.get_state())

    def restore() -> None:
        for state, saved in histories:
            state.histories = dict(saved)
        for generator, saved in generators.values():
            generator.set_state(saved)

    return restore
