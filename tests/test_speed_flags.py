"""The CUDA speed flags come from SpeedOptions' fields: a new option is a field there (and the StudyConfig setting
that records it, which the first test asks for by name)."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
from helpers import study_config

from search.compare import build_compare_parser
from search.records.study_config import StudyConfig
from search.run import build_parser
from search.study.config import new_config
from trainables.config import FLAG_HELP, SpeedOptions

OPTIONS = [option.name for option in fields(SpeedOptions)]


@pytest.mark.parametrize("name", OPTIONS)
def test_every_speed_option_is_a_study_setting_of_the_same_type_and_default(name):
    option = next(option for option in fields(SpeedOptions) if option.name == name)
    settings = {setting.name: setting for setting in fields(StudyConfig)}
    assert name in settings, f"SpeedOptions.{name} has no StudyConfig setting {name!r} to record it in study.yaml"
    assert (settings[name].type, settings[name].default) == (option.type, option.default), f"StudyConfig.{name}"
    assert option.default is not MISSING and option.metadata[FLAG_HELP], f"SpeedOptions.{name}: a default and a help"


@pytest.mark.parametrize("parser", [build_parser(), build_compare_parser()[0]], ids=["run.py", "compare.py"])
def test_each_option_is_a_flag_pair_with_its_help_and_default(parser):
    text = " ".join(parser.format_help().split())
    for option in fields(SpeedOptions):
        flag = option.name.replace("_", "-")
        assert f"--{flag}, --no-{flag} {option.metadata[FLAG_HELP]}" in text
        assert getattr(parser.parse_args(["--model", "cnn"] * (parser.prog == "search/run.py")), option.name) is (
            option.default
        )


def test_the_flags_reach_the_study_and_its_trials_whole():
    args = build_parser().parse_args(["--model", "cnn", "--data", "synthetic", "--no-amp", "--compile"])
    config = new_config(args)
    assert SpeedOptions.of(config) == SpeedOptions(amp=False, compile=True)
    # compare.py's cost measurement read three of the four before: a study's --compile was left out
    assert SpeedOptions.of(study_config(compile=True, cudnn_benchmark=False)) == SpeedOptions(
        cudnn_benchmark=False, compile=True
    )
