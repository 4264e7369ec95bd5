"""The TOML file and the command line: the two texts a run's config is read from.

    cfg = load_config("configs/shakespeare_char.toml", ["--train.max_steps=200"])

The file's tables and the overrides become dotted keys (keys.py: set_value), the overrides after
the file so that the command line wins; then what one section fills in from another is resolved
(Config.resolve) and the whole config validated (rules.py), so errors name the final values.
"""

from __future__ import annotations

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
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value)
    cfg.resolve()
    if check:
        validate(cfg)
    return cfg
