from pathlib import Path

import optuna
import pytest

from search.study.spaces import SpaceError, load_space
from trainables.config import AUGMENTS, Hyperparameters

SPACES = Path(__file__).resolve().parents[1] / "spaces"


@pytest.mark.parametrize("model", ["cnn", "vit", "hybrid"])
def test_every_shipped_space_loads_and_samples_valid_hyperparameters(model):
    space = load_space(SPACES / f"{model}.yaml", model)
    names = {p.name for p in space.parameters}
    assert {"lr", "weight_decay", "dropout", "batch_size", "label_smoothing", *AUGMENTS} <= names
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        constants = space.sample(trial)
        hp = Hyperparameters.from_dict({**trial.params, **constants})
        assert hp.batch_size in (16, 32)
        study.tell(trial, 0.5)


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
