"""Typed configuration: dataclasses loaded from TOML, overridable from the command line.

A config is validated before any heavy work (data preparation, model build,
process groups), so a typo costs a second, not a run. Every error names the
key and says how to fix it. Read in this order:

    sections.py  one dataclass per [section], each with check(): the rules on its own fields;
                 Config holds them, and resolve() fills what one section takes from another
    precision.py [precision] and its tables ([precision.fp8], ...)
    rules.py     validate(): every problem at once; cross_checks(): the rules between sections
                 (the layout's splits, what a pipeline schedule asks of the sizes)
    keys.py      set_value: a dotted key (precision.fp8.margin) to a typed field; saved configs
    parser.py    load_config: the TOML file, then the command line's --section.key=value
    errors.py    ConfigError, and failed(): how every rule reports

    cfg = load_config("configs/shakespeare_char.toml", ["--train.max_steps=200"])

This file only gathers the public names, so `from nanotrain.config import X` reads the same
whichever module X lives in.
"""

from .errors import ConfigError
from .keys import RENAMED, set_value, upgrade_saved
from .parser import load_config, parse_overrides
from .precision import (LOW_BIT_RECIPES, RECIPES, FP8Config, LossScaleConfig, LowBitConfig, MoEPrecisionConfig,
                        NVFP4Config, PrecisionConfig)
from .rules import check_chunks, check_schedule, cross_checks, nonfinite_errors, validate, whole_sequence_errors
from .sections import (PP_SCHEDULES, CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig,
                       MonitoringConfig, OptimizerConfig, ParallelConfig, ScheduleConfig, TrainConfig,
                       chunks_per_rank, expert_groups_errors, fill_micro_batch)

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "FP8Config", "LOW_BIT_RECIPES",
           "LoggingConfig", "LossScaleConfig", "LowBitConfig", "ModelConfig", "MoEPrecisionConfig",
           "MonitoringConfig", "NVFP4Config", "OptimizerConfig", "PP_SCHEDULES", "ParallelConfig",
           "PrecisionConfig", "RECIPES", "RENAMED", "ScheduleConfig", "TrainConfig", "check_chunks",
           "check_schedule", "chunks_per_rank", "cross_checks", "expert_groups_errors", "fill_micro_batch",
           "load_config", "nonfinite_errors", "parse_overrides", "set_value", "upgrade_saved", "validate",
           "whole_sequence_errors"]
