"""parallel/layout.py: one layout text, one parser, one value, the same in every command."""

import json
import re

import pytest

from nanotrain.cli import main
from nanotrain.config import ConfigError, load_config
from nanotrain.parallel.layout import Layout
from nanotrain.verify import layout_config

TEXT = "tp=2,pp=2,dp=2,ep=2,sp,zero=1"
CONFIG = "configs/deepseek_tiny.toml"


def test_parse_and_its_canonical_text():
    layout = Layout.parse(TEXT)
    assert layout == Layout(tp=2, pp=2, dp=2, ep=2, sp=True, zero=1)
    assert layout.world_size == 8
    assert str(layout) == TEXT and Layout.parse(str(layout)) == layout
    assert Layout.parse(" dp = 4 , micro=2, sp=false ") == Layout(dp=4, micro=2)
    assert str(Layout()) == "dp=1" and Layout.parse(str(Layout())) == Layout()
    # What the text leaves out is the base's (a command's: the config's).
    assert Layout.parse("tp=2", Layout(dp=4, zero=2)) == Layout(tp=2, dp=4, zero=2)


def test_vp_parses_and_writes_back_after_pp():
    """vp (parallel.pp_virtual_stages) is a size like the others: canonical text in the field order,
    left out at its default, and no part of the world size."""
    layout = Layout.parse("vp=2,dp=2,pp=2,tp=2")
    assert layout == Layout(tp=2, pp=2, vp=2, dp=2) and layout.world_size == 8
    assert str(layout) == "tp=2,pp=2,vp=2,dp=2" and Layout.parse(str(layout)) == layout
    assert str(Layout(pp=2, vp=1)) == "pp=2"
    assert Layout.parse("pp=4", Layout(pp=2, vp=3)) == Layout(pp=4, vp=3)  # the base's vp stays


@pytest.mark.parametrize("text,message", [
    ("xp=2", "unknown key 'xp'. Valid keys: tp, cp, pp, vp, dp, ep, etp, sp, zero, micro"),
    ("tp=0", "tp=0 must be a whole number >= 1"),
    ("dp=two", "dp=two must be a whole number >= 1"),
    ("zero=4", "zero=4 must be 0, 1, 2 or 3"),
    ("micro=-1", "micro=-1 must be a whole number >= 0"),
    ("vp=0", "vp=0 must be a whole number >= 1"),
    ("pp=2,vp=1.5", r"vp=1\.5 must be a whole number >= 1"),
    ("sp=maybe", "sp=maybe must be true or false"),
    ("tp=2,tp=4", "tp is given twice"),
])
def test_bad_text_is_one_config_error_naming_the_key(text, message):
    with pytest.raises(ConfigError, match=message) as e:
        Layout.parse(text)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--layout {text!r}: ")


def test_apply_writes_the_config_keys_and_checks_them():
    cfg = load_config(CONFIG)
    out = Layout.parse("dp=2,zero=1,micro=3").apply(cfg)
    assert (out.parallel.dp, out.optimizer.zero_stage, out.train.micro_batch_size) == (2, 1, 3)
    assert cfg.parallel.dp == 1  # a copy: the config it came from is untouched
    assert Layout.from_config(out) == Layout(dp=2, zero=1, micro=3)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true needs parallel.tp > 1"):
        Layout(sp=True).apply(cfg)


def test_a_size_is_declared_once_in_the_config():
    """Layout's defaults are the config's, and from_config reads every key CONFIG_KEYS names."""
    from nanotrain.config import Config
    from nanotrain.parallel.layout import CONFIG_KEYS

    assert Layout() == Layout.from_config(Config())
    cfg = Layout(tp=2, cp=2, pp=2, vp=2, dp=4, ep=2, etp=2, sp=True, zero=2, micro=3).apply(
        load_config(CONFIG, ["--parallel.pp_schedule=interleaved", "--train.batch_size=24"]))
    layout = Layout.from_config(cfg)
    assert [getattr(layout, key) for key in CONFIG_KEYS] == [2, 2, 2, 2, 4, 2, 2, True, 2, 3]


def test_vp_is_parallel_pp_virtual_stages_both_ways():
    cfg = load_config(CONFIG, ["--parallel.pp_schedule=interleaved"])
    out = Layout.parse("pp=2,vp=2,micro=2").apply(cfg)
    assert (out.parallel.pp, out.parallel.pp_virtual_stages, out.parallel.chunks_per_rank) == (2, 2, 2)
    assert Layout.from_config(out) == Layout(pp=2, vp=2, micro=2)
    configured = load_config(CONFIG, ["--parallel.pp=2", "--parallel.pp_schedule=interleaved",
                                      "--parallel.pp_virtual_stages=2", "--train.micro_batch_size=2"])
    assert Layout.from_config(configured) == Layout(pp=2, vp=2, micro=2)


VP_FIX = "parallel.pp_virtual_stages=2 needs parallel.pp_schedule='interleaved' (1f1b runs one chunk per rank): " \
         "set pp_virtual_stages=1 or pp_schedule='interleaved'."


def test_vp_without_the_interleaved_schedule_is_refused_with_the_fix(capsys):
    """The schedule is the config's: verify's config check and inspect's plan both refuse vp=2 under
    1F1B with the config check's line (config.check_chunks), before any process or schedule runs."""
    with pytest.raises(ConfigError, match=re.escape(VP_FIX)):
        Layout.parse("pp=2,vp=2,micro=2").apply(load_config(CONFIG))
    assert main(["verify", "--config", CONFIG, "--layout", "pp=2,vp=2,micro=2"]) == 2
    assert VP_FIX in capsys.readouterr().err
    assert main(["inspect", "--config", CONFIG, "--model.vocab_size=64", "--layout", "pp=2,vp=2,micro=2"]) == 2
    assert capsys.readouterr().err == f"error: --layout: {VP_FIX}\n"
    # DualPipeV holds its V of 2 chunks whatever vp says, and takes vp=1 (or 2), not 3.
    dualpipev = ["inspect", "--config", CONFIG, "--model.vocab_size=64", "--parallel.pp_schedule=dualpipev", "--json"]
    assert main([*dualpipev, "--layout", "pp=2,micro=2"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["layout"]["pp_virtual_stages"] == 2
    assert main([*dualpipev, "--layout", "pp=2,vp=3,micro=2"]) == 2
    assert "leave pp_virtual_stages at 1" in capsys.readouterr().err


def test_inspect_plans_the_chunks_of_the_layouts_vp(capsys):
    """inspect's plan takes its chunks per rank from --layout's vp, not from the config's."""
    args = ["inspect", "--config", CONFIG, "--model.vocab_size=64", "--parallel.pp_schedule=interleaved", "--json"]
    assert main([*args, "--layout", "pp=2,vp=2,micro=2"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["layout"]["pp_virtual_stages"] == 2


def test_verify_and_inspect_read_the_same_layout(capsys):
    """The same text gives the same layout to both commands: verify's config, inspect's plan."""
    verify_layout = Layout.from_config(layout_config(load_config(CONFIG), TEXT))
    assert verify_layout == Layout.parse(TEXT)
    assert main(["inspect", "--config", CONFIG, "--model.vocab_size=64", "--layout", TEXT, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["plan"]["layout"]
    assert {k: planned[k] for k in ("tp", "pp", "dp", "ep", "sp", "zero_stage")} == \
        {"tp": 2, "pp": 2, "dp": 2, "ep": 2, "sp": True, "zero_stage": verify_layout.zero}
    # micro left out: batch_size / dp, as a run computes it
    assert planned["micro_batch_size"] == load_config(CONFIG).train.batch_size // 2


def test_both_commands_reject_an_unknown_key_with_the_same_line(capsys):
    assert main(["verify", "--config", CONFIG, "--layout", "tp=2,xp=2"]) == 2
    verify_err = capsys.readouterr().err
    assert main(["inspect", "--config", CONFIG, "--model.vocab_size=64", "--layout", "tp=2,xp=2"]) == 2
    inspect_err = capsys.readouterr().err
    assert verify_err == inspect_err == ("error: --layout 'tp=2,xp=2': unknown key 'xp'. Valid keys: tp, cp, pp, "
                                         "vp, dp, ep, etp, sp, zero, micro (for example tp=2,dp=2,sp or "
                                         "tp=2,pp=2,dp=2,ep=2,zero=1,micro=2).\n")


def test_ep_must_divide_dp_one_rule_everywhere():
    """The rule lives in config.expert_groups_errors; the parser, the config check and the process
    groups all give its message."""
    from nanotrain.config import ParallelConfig
    from nanotrain.parallel.state import check_layout

    message = "parallel.ep=2 must divide parallel.dp=3"
    with pytest.raises(ConfigError, match=message):
        Layout.parse("dp=3,ep=2")
    assert any(message in e for e in ParallelConfig(dp=3, ep=2).check())
    with pytest.raises(ValueError, match=message):
        check_layout(Layout(dp=3, ep=2), 3)
