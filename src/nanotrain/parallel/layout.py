"""Layout: how one training step is split over processes, as one value.

    tp=2,pp=2,dp=2,ep=2,sp,zero=1,micro=2

is the text every command's --layout takes (`nanotrain verify`, `nanotrain inspect`):
Layout.parse reads it and str(layout) writes it back. The same value comes out of a config
(Layout.from_config) and goes back into one (Layout.apply), and ParallelState holds the run's
(parallel/state.py). Each key is a field, and each field is one config key:

    key    config key                  meaning
    tp     parallel.tp                 tensor parallel: each layer's matrices split over tp ranks
    cp     parallel.cp                 context parallel: each sequence split over cp ranks (ring attention)
    pp     parallel.pp                 pipeline parallel: the layers split into pp stages
    vp     parallel.pp_virtual_stages  pipeline chunks per rank (virtual stages): pp_schedule='interleaved' only
    dp     parallel.dp                 data parallel: replicas that split the global batch
    ep     parallel.ep                 expert parallel: routed experts over ep of the dp ranks
    etp    parallel.etp                expert tensor parallel: each expert's width over the tp ranks (1 or tp)
    sp     parallel.sequence_parallel  sequence parallelism (with tp > 1); `sp` alone is sp=true
    zero   optimizer.zero_stage        ZeRO stage: 0 (off), 1 (optimizer state), 2 (and gradients), 3 (and parameters)
    micro  train.micro_batch_size      sequences per micro-batch on one rank (0: batch_size / dp)

The config declares each size once (config/sections.py): its type, its default, its rules on its
own. A Layout is those ten config values gathered under short names; its defaults are the config's
defaults, read through CONFIG_KEYS, and from_config and apply go through the same map, so a size
added to the layout is one line of CONFIG_KEYS and one field here.

A text names only what it changes; parse takes the rest from a base layout (a command passes
the config's). The world is tp x cp x pp x dp processes; ep is carved out of dp. The zero stage and
the micro-batch live in other config sections than the sizes, but they are part of how a step
is laid out over ranks, and a layout that changes them must be checked by the same rules. vp is
checked against the schedule, which stays the config's (parallel.pp_schedule): a vp it cannot run
(vp > 1 without 'interleaved'; DualPipeV holds its V of 2 chunks whatever vp says, and takes vp=1)
is refused where the schedule is known, by config.check_chunks (through Layout.apply's validate,
and in `nanotrain inspect`'s plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import Config, ConfigError, expert_groups_errors, set_value, validate

# key -> the config key it is (the defaults, Layout.from_config, Layout.apply)
CONFIG_KEYS = {"tp": "parallel.tp", "cp": "parallel.cp", "pp": "parallel.pp", "vp": "parallel.pp_virtual_stages",
               "dp": "parallel.dp", "ep": "parallel.ep", "etp": "parallel.etp", "sp": "parallel.sequence_parallel",
               "zero": "optimizer.zero_stage", "micro": "train.micro_batch_size"}
EXAMPLE = "for example tp=2,dp=2,sp or tp=2,pp=2,dp=2,ep=2,zero=1,micro=2"


def config_value(cfg: Config, key: str) -> int | bool:
    """The config's value of layout key `key` (tp -> cfg.parallel.tp)."""
    section, name = CONFIG_KEYS[key].split(".")
    return getattr(getattr(cfg, section), name)


DEFAULTS = {key: config_value(Config(), key) for key in CONFIG_KEYS}  # the config's own defaults


@dataclass(frozen=True)
class Layout:
    tp: int = DEFAULTS["tp"]
    cp: int = DEFAULTS["cp"]
    pp: int = DEFAULTS["pp"]
    vp: int = DEFAULTS["vp"]
    dp: int = DEFAULTS["dp"]
    ep: int = DEFAULTS["ep"]
    etp: int = DEFAULTS["etp"]
    sp: bool = DEFAULTS["sp"]
    zero: int = DEFAULTS["zero"]
    micro: int = DEFAULTS["micro"]

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def __str__(self) -> str:
        """The canonical text: what differs from the defaults, in the order of the fields."""
        default = Layout()
        parts = []
        for key in CONFIG_KEYS:
            value = getattr(self, key)
            if value != getattr(default, key):
                parts.append(key if value is True else f"{key}={int(value)}")
        return ",".join(parts) or "dp=1"

    @classmethod
    def parse(cls, text: str, base: Layout | None = None) -> Layout:
        """'tp=2,dp=2,sp' -> base with tp=2, dp=2 and sp=True. A ConfigError (one line: the key, what
        it takes, the valid keys) for an unknown key, a bad value or a key given twice."""
        layout = dataclasses.replace(base or cls(), **cls.keys(text))
        if layout.check():
            raise ConfigError(f"--layout {text!r}: " + " ".join(layout.check()))
        return layout

    @staticmethod
    def keys(text: str) -> dict[str, int | bool]:
        """The keys a layout text gives and their values, each checked alone (`nanotrain plan` searches
        the ones it leaves out)."""
        values: dict[str, int | bool] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if key not in CONFIG_KEYS:
                raise ConfigError(f"--layout {text!r}: unknown key {key!r}. Valid keys: "
                                  f"{', '.join(CONFIG_KEYS)} ({EXAMPLE}).")
            if key in values:
                raise ConfigError(f"--layout {text!r}: {key} is given twice; give each key once ({EXAMPLE}).")
            values[key] = _value(text, key, value if eq else None)
        return values

    @classmethod
    def from_config(cls, cfg: Config) -> Layout:
        return cls(**{key: config_value(cfg, key) for key in CONFIG_KEYS})

    def check(self) -> list[str]:
        """What no model can run: ep not dividing dp (config.expert_groups_errors). What a given model
        or world cannot run is checked where they are known (Layout.apply's validate, check_layout)."""
        return expert_groups_errors(self.dp, self.ep)

    def apply(self, cfg: Config) -> Config:
        """A copy of cfg that runs this layout, resolved and validated: a layout the config cannot run
        (heads that tp does not divide, sp without tp) is a ConfigError naming the config key."""
        cfg = Config.from_dict(dataclasses.asdict(cfg))
        for key, dotted in CONFIG_KEYS.items():
            set_value(cfg, dotted, getattr(self, key), source="--layout")
        cfg.resolve()  # micro=0 under DualPipeV: the size the schedule needs, as load_config would
        validate(cfg)
        return cfg


def _value(text: str, key: str, value: str | None) -> int | bool:
    """One key's value, checked: sizes are whole numbers >= 1, zero is 0 to 3, micro >= 0, sp a boolean."""
    if key == "sp":
        if value is None or value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise ConfigError(f"--layout {text!r}: sp={value} must be true or false (sp alone: true).")
    low, what = {"zero": (0, "0, 1, 2 or 3 (the ZeRO stage)"),
                 "micro": (0, "a whole number >= 0 (0: batch_size / dp)")}.get(key, (1, "a whole number >= 1"))
    number = int(value) if value is not None and value.isascii() and value.isdigit() else -1
    if number < low or (key == "zero" and number > 3):
        raise ConfigError(f"--layout {text!r}: {key}={value or ''} must be {what}.")
    return number
