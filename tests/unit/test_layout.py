"""parallel/layout.py: one layout text, one parser, one value, the same in every command."""

import json

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


@pytest.mark.parametrize("text,message", [
    ("xp=2", "unknown key 'xp'. Valid keys: tp, cp, pp, dp, ep, etp, sp, zero, micro"),
    ("tp=0", "tp=0 must be a whole number >= 1"),
    ("dp=two", "dp=two must be a whole number >= 1"),
    ("zero=4", "zero=4 must be 0, 1, 2 or 3"),
    ("micro=-1", "micro=-1 must be a whole number >= 0"),
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
                                         "dp, ep, etp, sp, zero, micro (for example tp=2,dp=2,sp or "
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
