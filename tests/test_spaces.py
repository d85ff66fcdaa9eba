from pathlib import Path

import optuna
import pytest

from search.study.spaces import SpaceError, load_space
from trainables.config import AUGMENTS, CLASS_WEIGHTINGS, DEFAULTS, Hyperparameters

SPACES = Path(__file__).resolve().parents[1] / "spaces"


@pytest.mark.parametrize("model", ["cnn", "vit", "hybrid"])
def test_every_shipped_space_loads_and_samples_valid_hyperparameters(model):
    space = load_space(SPACES / f"{model}.yaml", model)
    names = {p.name for p in space.parameters}
    assert {"lr", "weight_decay", "dropout", "batch_size", "label_smoothing", *AUGMENTS} <= names
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        hp = Hyperparameters.from_dict(space.configuration(trial))
        assert hp.batch_size in (16, 32)
        study.tell(trial, 0.5)


@pytest.mark.parametrize("model", ["cnn", "vit", "hybrid"])
def test_every_shipped_space_searches_class_weighting_and_its_recipe_point_is_none(model):
    space = load_space(SPACES / f"{model}.yaml", model)
    (weighting,) = [p for p in space.parameters if p.name == "class_weighting"]
    assert (weighting.type, weighting.choices) == ("categorical", CLASS_WEIGHTINGS)
    assert DEFAULTS.class_weighting == "none" and space.recipe()["class_weighting"] == "none"  # t00: the seed's loss


def test_model_specific_knobs_are_searched():
    assert "vit_depth" in {p.name for p in load_space(SPACES / "vit.yaml", "vit").parameters}
    assert "fusion" in {p.name for p in load_space(SPACES / "hybrid.yaml", "hybrid").parameters}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_conditional_and_fixed_parameters(tmp_path):
    space = load_space(
        write(
            tmp_path,
            """
parameters:
  fusion: {type: categorical, choices: [single_token, two_tokens]}
  vit_depth: {type: int, low: 4, high: 12, when: {fusion: two_tokens}}
  lr: {type: float, low: 1e-5, high: 1e-3, log: true}
  early_stop_patience: {type: fixed, value: 3}
""",
        ),
        "hybrid",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = space.sample(trial)
        assert constants == {"early_stop_patience": 3}
        assert ("vit_depth" in trial.params) == (trial.params["fusion"] == "two_tokens")
        assert 1e-5 <= trial.params["lr"] <= 1e-3  # '1e-5' (a string to YAML 1.1) read as a number
        seen.add(trial.params["fusion"])
        study.tell(trial, 0.0)
    assert seen == {"single_token", "two_tokens"}


BAD_SPACES = {
    "unknown top-level key": (
        "parameters: {lr: {type: float, low: 0.1, high: 1}}\nsearch: x\n",
        "unknown top-level key",
    ),
    "not a mapping": ("- lr\n", "expected a mapping 'parameters:'"),
    "empty parameters": ("parameters: {}\n", "is empty"),
    "unknown parameter": (
        "parameters: {learning_rate: {type: float, low: 0.1, high: 1}}\n",
        "not a hyperparameter of the trainable; valid: lr",
    ),
    "unknown distribution": (
        "parameters: {lr: {type: gaussian, low: 0.1, high: 1}}\n",
        "needs 'type:' one of float, int, categorical, fixed",
    ),
    "unknown key": (
        "parameters: {lr: {type: float, low: 0.1, high: 1, q: 2}}\n",
        "unknown key(s) q for type float; valid:",
    ),
    "inverted range": ("parameters: {lr: {type: float, low: 0.1, high: 0.01}}\n", "empty or inverted range"),
    "empty range": ("parameters: {dropout: {type: float, low: 0.2, high: 0.2}}\n", "empty or inverted range"),
    "log of zero": (
        "parameters: {weight_decay: {type: float, low: 0.0, high: 0.1, log: true}}\n",
        "log scale needs low > 0",
    ),
    "missing bound": ("parameters: {lr: {type: float, low: 0.1}}\n", "needs numeric 'low:' and 'high:'"),
    "empty choices": ("parameters: {batch_size: {type: categorical, choices: []}}\n", "non-empty list 'choices:'"),
    "out of domain": ("parameters: {dropout: {type: float, low: 0.0, high: 1.5}}\n", "outside"),
    "wrong type": ("parameters: {batch_size: {type: categorical, choices: [16, big]}}\n", "not an integer"),
    "bad fusion": (
        "parameters: {fusion: {type: categorical, choices: [single_token, concat]}}\n",
        "'concat' is not one of single_token, two_tokens",
    ),
    "old fusion name": (
        "parameters: {fusion: {type: categorical, choices: [seed, two_tokens]}}\n",
        "'seed' is now called 'single_token'",
    ),
    "dangling when": (
        "parameters: {lr: {type: float, low: 0.1, high: 1, when: {fusion: two_tokens}}}\n",
        "not a categorical parameter defined above",
    ),
    "invalid yaml": ("parameters: {lr: [\n", "not valid YAML"),
    "NaN bound": ("parameters: {lr: {type: float, low: .nan, high: 0.1}}\n", "must be finite numbers"),
    "infinite bound": ("parameters: {lr: {type: float, low: 0.001, high: .inf}}\n", "must be finite numbers"),
    "infinite step": (
        "parameters: {dropout: {type: float, low: 0.0, high: 0.5, step: .inf}}\n",
        "'step' must be a positive number",
    ),
    "infinite fixed value": ("parameters: {lr: {type: fixed, value: .inf}}\n", "lr: inf is not a finite number"),
    "infinite integer": (
        "parameters: {batch_size: {type: fixed, value: .inf}}\n",
        "batch_size: inf is not a finite number",
    ),
    "nested when value": (
        "parameters: {batch_size: {type: categorical, choices: [16, 32]}, lr: {type: float, low: 0.001, high: 0.01, "
        "when: {batch_size: [[16]]}}}\n",
        "give a value or a flat list of values",
    ),
    "or inside the range": (
        "parameters: {rotation_deg: {type: float, low: 0.0, high: 30.0, or: 0.0}}\n",
        "'or: 0.0' lies inside [0.0, 30.0]",
    ),
    "or not a number": ("parameters: {rotation_deg: {type: float, low: 5, high: 30, or: none}}\n", "'or' must be a"),
    "off read as false": ("parameters: {rotation_deg: {type: float, low: 5, high: 30, off: 0}}\n", "write 'or: 0.0'"),
    "or on a categorical": (
        "parameters: {hflip: {type: categorical, choices: [0.0, 0.5], or: 0.0}}\n",
        "unknown key(s) or for type categorical",
    ),
    "nested choice": ("parameters: {batch_size: {type: categorical, choices: [[16], 32]}}\n", "must be plain values"),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_bad_space_files_are_refused_with_what_is_valid(tmp_path, case):
    text, message = BAD_SPACES[case]
    with pytest.raises(SpaceError) as raised:
        load_space(write(tmp_path, text), "hybrid")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_shipped_spaces_search_augmentation_but_never_turn_images_upside_down():
    for model in ("cnn", "vit", "hybrid"):
        space = load_space(SPACES / f"{model}.yaml", model)
        assert {"hflip", "rotation_deg", "color_jitter", "noise_std"} <= set(space.searched)
        assert [p.values() for p in space.parameters if p.name == "vflip"] == [[0.0]]


def test_a_space_that_still_lists_aug_strength_is_told_the_new_knobs(tmp_path):
    text = "parameters: {lr: {type: float, low: 1e-4, high: 1e-3}, aug_strength: {type: float, low: 0, high: 1}}\n"
    with pytest.raises(SpaceError) as raised:
        load_space(write(tmp_path, text), "cnn")
    message = str(raised.value)
    assert "aug_strength is retired" in message and "\n" not in message
    assert all(name in message for name in AUGMENTS)
    assert "vflip: {type: fixed, value: 0}" in message


def test_a_knob_of_another_model_is_refused(tmp_path):
    with pytest.raises(SpaceError, match="vit_depth: applies to --model vit or hybrid only, not cnn"):
        load_space(write(tmp_path, "parameters: {vit_depth: {type: int, low: 2, high: 6}}\n"), "cnn")


def test_a_space_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("parameters: {lr: {type: float, low: 0.001, high: 0.01}}  # r\u00e9glage\n".encode("latin-1"))
    with pytest.raises(SpaceError, match="is not UTF-8 text: save it as UTF-8"):
        load_space(path, "cnn")


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml", "cnn")


SWITCHED = """
parameters:
  lr:           {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
  rotation_deg: {type: float, low: 5.0, high: 30.0, or: 0.0}
  noise_std:    {type: float, low: 0.005, high: 0.05, or: 0.0}
  vit_depth:    {type: int, low: 3, high: 12, or: 1}
"""


def test_a_knob_with_or_is_off_or_on_with_a_searched_magnitude(tmp_path):
    space = load_space(write(tmp_path, SWITCHED), "vit")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configurations = []
    for _ in range(40):
        trial = study.ask()
        configuration = space.configuration(trial)
        for name in ("rotation_deg", "noise_std"):
            on = trial.params[f"{name}_on"]
            assert (name in trial.params) == on  # the magnitude is sampled only when on
            assert configuration[name] == 0.0 if not on else 0 < configuration[name] == trial.params[name]
        assert not any(name.endswith("_on") for name in configuration)  # a trial gets hyperparameters alone
        Hyperparameters.from_dict(configuration)
        configurations.append(configuration)
        study.tell(trial, 0.0)
    assert any(c["rotation_deg"] == 0.0 and c["noise_std"] == 0.0 for c in configurations)  # "none" is reachable
    assert {c["vit_depth"] for c in configurations} & {1} and max(c["vit_depth"] for c in configurations) > 3
    assert space.switches == {"rotation_deg_on", "noise_std_on", "vit_depth_on"}
    assert space.searched == ["lr", "rotation_deg", "noise_std", "vit_depth"]


def test_a_point_is_clipped_into_the_space_and_samples_back_as_given(tmp_path):
    space = load_space(write(tmp_path, SWITCHED), "vit")
    point = space.point({"lr": 0.05, "rotation_deg": 0.0, "noise_std": 0.001, "vit_depth": 12})
    assert point == {"lr": 1e-3, "rotation_deg_on": False, "noise_std_on": True, "noise_std": 0.005,
                     "vit_depth_on": True, "vit_depth": 12}  # fmt: skip
    study = optuna.create_study()
    study.enqueue_trial(point)
    configuration = space.configuration(study.ask())
    assert configuration == {"lr": 1e-3, "rotation_deg": 0.0, "noise_std": 0.005, "vit_depth": 12}


def test_the_recipe_is_the_knobs_defaults_in_every_shipped_space():
    defaults = Hyperparameters().to_dict()
    for model in ("cnn", "vit", "hybrid"):
        space = load_space(SPACES / f"{model}.yaml", model)
        study = optuna.create_study()
        study.enqueue_trial(space.recipe())
        configuration = space.configuration(study.ask())
        assert configuration == {name: defaults[name] for name in configuration}, model
        assert set(configuration) == {p.name for p in space.parameters}
