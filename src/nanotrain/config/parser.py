"""The TOML file and the command line: the two texts a run's config is read from.

    cfg = load_config("configs/shakespeare_char.toml", ["--train.max_steps=200"])

The file's tables and the overrides become dotted keys (keys.py: set_value), the overrides after
the file so that the command line wins; then what one section fills in from another is resolved
(Config.resolve) and the whole config validated (rules.py), so errors name the final values.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .errors import ConfigError
from .keys import apply_dict, set_value
from .rules import validate
from .sections import Config


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ['--train.max_steps=200', '--model.n_layers', '2'] into (key, value) pairs."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value "
                              "(for example --train.max_steps=200).")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value: write {arg}=VALUE.")
        pairs.append((key, value))
        i += 1
    return pairs


def config_path(path: str | Path) -> Path:
    """The config file `path` names: a file, or the name of a config nano-train ships (`--config
    shakespeare_char`: configs/shakespeare_char.toml of the checkout or the installed package)."""
    from ..shipped import shipped, shipped_configs

    p = Path(path)
    if p.is_file():
        return p
    name = p.stem if p.suffix == ".toml" else p.name
    found = shipped(f"configs/{name}.toml") if p.parent in (Path("."), Path("configs")) else None
    if found is None:
        raise ConfigError(f"config file {p} does not exist. Pass a TOML file, or the name of a shipped config: "
                          f"{', '.join(shipped_configs())} (for example --config shakespeare_char).")
    return found


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Read a TOML config (or start from defaults), apply command-line overrides, resolve, validate.
    check=False leaves the validation to a command that applies more values first (verify's
    --layout): the config is checked once, after every source of values, not before the last."""
    cfg = Config()
    if path is not None:
        p = config_path(path)
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}. Fix the syntax at that line.") from None
        apply_dict(cfg, data, str(p))
    planned = cfg.train.max_steps if path is not None else None  # the run the file's schedule was set for
    pairs = parse_overrides(overrides or [])
    for key, value in pairs:
        set_value(cfg, key, value)
    note = shorten_schedule(cfg, planned, {key for key, _ in pairs})
    if note and os.environ.get("RANK", "0") == "0":
        print(note, flush=True)
    cfg.resolve()
    if check:
        validate(cfg)
    return cfg


def shorten_schedule(cfg: Config, planned: int | None, overridden: set[str]) -> str | None:
    """A config file's run shortened on the command line (--train.max_steps below the file's) gets the
    file's learning-rate schedule shortened alike: warm-up and decay scale by the same factor, so
    a 30-step try of a 1500-step config warms up and decays as the full run does, in 30 steps,
    rather than stopping inside the warm-up or failing the check that the warm-up ends before the
    decay. A schedule key set on the command line is the user's and is kept; so is a longer run's
    schedule (its warm-up is a number of steps, not a fraction). Returns the line that says so."""
    s, steps = cfg.schedule, cfg.train.max_steps
    if planned is None or "train.max_steps" not in overridden or not 0 < steps < planned or \
            overridden & {"schedule.warmup_steps", "schedule.decay_steps"}:
        return None
    was = {"warmup_steps": s.warmup_steps, "decay_steps": s.decay_steps}
    if s.decay_steps:  # 0 (= train.max_steps) follows the run already
        s.decay_steps = max(1, round(s.decay_steps * steps / planned))
    s.warmup_steps = min(round(s.warmup_steps * steps / planned), (s.decay_steps or steps) - 1)
    changed = [f"schedule.{k}={v} -> {getattr(s, k)}" for k, v in was.items() if getattr(s, k) != v]
    if not changed:
        return None
    return (f"note: train.max_steps={steps} shortens the config's run of {planned} steps, and its schedule alike: "
            f"{', '.join(changed)} (set them on the command line to choose)")
