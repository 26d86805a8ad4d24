"""The configuration convention: config files, --key=value, types, unknown keys; and the scripts' exit codes."""

import signal
import sys
from dataclasses import dataclass

import pytest

import configurator
from configurator import UserError


@dataclass
class DemoConfig:
    learning_rate: float = 1e-3
    max_iters: int = 100
    compile: bool = False
    out_dir: str = "out"


def test_overrides_are_typed_and_later_sources_win(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import math\nmax_iters = 50\nlearning_rate = 3e-4\n_private = 1\n")
    overrides = configurator.parse([str(recipe), "--max_iters=7", "--compile", "--out_dir=runs/a"], DemoConfig)
    assert overrides == {"max_iters": 7, "learning_rate": 3e-4, "compile": True, "out_dir": "runs/a"}
    config = configurator.build(DemoConfig, overrides)
    assert config.max_iters == 7 and config.compile is True


def test_numbers_are_promoted_where_it_is_safe():
    overrides = configurator.parse(["--learning_rate=1", "--max_iters=1e3", "--compile=false"], DemoConfig)
    assert overrides == {"learning_rate": 1.0, "max_iters": 1000, "compile": False}
    assert isinstance(overrides["learning_rate"], float) and isinstance(overrides["max_iters"], int)


@pytest.mark.parametrize("arg, message", [
    ("--max_iters=2.5", "max_iters must be int, got 2.5"),
    ("--compile=maybe", "compile must be bool"),
    ("--learning_rate=fast", "learning_rate must be float"),
])
def test_wrong_types_fail_with_one_line(arg, message):
    with pytest.raises(UserError, match=message) as error:
        configurator.parse([arg], DemoConfig)
    assert "\n" not in str(error.value)


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(UserError) as error:
        configurator.parse(["--learning_rte=1e-3"], DemoConfig)
    assert "learning_rte" in str(error.value) and "learning_rate" in str(error.value)


def test_keys_of_other_stages_pass_through_untouched():
    # a recipe file drives every stage: n_layer belongs to the model, tokenizer to prepare.py
    assert {"n_layer", "tokenizer", "max_iters"} <= configurator.keys_of_all_stages()
    assert configurator.parse(["--n_layer=4", "--tokenizer=char"], DemoConfig) == {}


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.py not found"):
        configurator.parse([str(tmp_path / "nope.py")], DemoConfig)
    broken = tmp_path / "broken.py"
    broken.write_text("max_iters = 1 +\n")
    with pytest.raises(UserError, match="failed to run"):
        configurator.parse([str(broken)], DemoConfig)
    with pytest.raises(UserError, match="unexpected argument"):
        configurator.parse(["max_iters=3"], DemoConfig)


@pytest.mark.parametrize("outcome, code", [
    (lambda: None, 0),
    (lambda: {"meta": 1}, 0),           # prepare.py and bench.py return their results
    (lambda: signal.SIGINT, 130),       # train.py and sft.py return the signal that stopped the run
    (lambda: signal.SIGTERM, 143),      # 128 + 15, as the shell reports it
])
def test_a_script_exits_with_the_code_of_the_signal_that_stopped_it(monkeypatch, capsys, outcome, code):
    monkeypatch.setattr(sys, "argv", ["x.py", "--a=1"])
    with pytest.raises(SystemExit) as exit:
        configurator.run_script(lambda argv: outcome())
    assert (exit.value.code or 0) == code and capsys.readouterr().err == ""


def test_a_script_s_bad_input_and_ctrl_c_are_one_line(monkeypatch, capsys):
    def fails(argv):
        raise UserError(f"bad {argv[0]}")

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["x.py", "--a=1"])
    with pytest.raises(SystemExit) as exit:
        configurator.run_script(fails)
    assert exit.value.code == "error: bad --a=1"  # sys.exit prints it to stderr and exits 1
    with pytest.raises(SystemExit) as exit:
        configurator.run_script(interrupted)
    assert exit.value.code == 130 and capsys.readouterr().err == "interrupted\n"
