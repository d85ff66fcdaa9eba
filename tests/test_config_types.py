"""study.yaml's type checks come from the record's type hints: any field type is checked, none needs a table entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pytest
import yaml
from helpers import study_config

from search.records.study_config import ConfigError, StudyConfig, of_type


@dataclass(frozen=True, kw_only=True)
class WiderConfig(StudyConfig):
    """A StudyConfig with settings of types no field had before: what a new setting would add."""

    ratio: float = 0.5
    tags: tuple[str, ...] = ()
    limits: dict[str, int] | None = None
    shape: tuple[int, int] = (1, 2)
    mode: Literal["fast", "slow"] = "fast"


def wider_yaml(**changes: Any) -> str:
    raw = yaml.safe_load(study_config().to_yaml())
    return yaml.safe_dump({**raw, **changes})


def test_a_float_setting_loads_and_a_wrong_one_is_refused_by_name():
    loaded = WiderConfig.from_yaml(wider_yaml(ratio=0.25, tags=["a"], limits={"a": 1}, shape=[3, 4]), "study.yaml")
    assert (loaded.ratio, loaded.tags, loaded.limits, loaded.shape) == (0.25, ["a"], {"a": 1}, [3, 4])
    with pytest.raises(ConfigError, match="ratio is 'x', not float"):
        WiderConfig.from_yaml(wider_yaml(ratio="x"), "study.yaml")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tags": ["a", 1]}, "tags is ['a', 1], not tuple[str, ...]"),
        ({"limits": {"a": "1"}}, "limits is {'a': '1'}, not dict[str, int] | None"),
        ({"shape": [1, 2, 3]}, "shape is [1, 2, 3], not tuple[int, int]"),
        ({"mode": "slower"}, "mode is 'slower', not Literal['fast', 'slow']"),
        ({"ratio": True}, "ratio is True, not float"),
    ],
)
def test_every_kind_of_hint_is_checked(changes, message):
    with pytest.raises(ConfigError) as raised:
        WiderConfig.from_yaml(wider_yaml(**changes), "study.yaml")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "value, hint, ok",
    [
        (3, int, True),
        (True, int, False),
        (3, float, True),
        (None, int | None, True),
        ("3", int | None, False),
        ({"vit": "/w.safetensors"}, tuple[tuple[str, str], ...], True),  # how to_dict writes weights
        (None, tuple[tuple[str, str], ...], True),
        ({"vit": 3}, tuple[tuple[str, str], ...], False),
        ([1, 2], list[int], True),
        ("anything", Any, True),
    ],
)
def test_of_type_reads_the_hint(value, hint, ok):
    assert of_type(value, hint) is ok


def test_every_study_config_field_has_a_checkable_type():
    """Each of today's fields loads as written: the derived checks accept what to_dict writes."""
    config = study_config(weights=(("vit_tiny_patch16_224", "/w/vit.safetensors"),), warm_start="earlier")
    assert StudyConfig.from_yaml(config.to_yaml(), "study.yaml") == config
