"""One study config, one home per hyperparameter: the records themselves, their one loader, and old names."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, study_config
from helpers.cli import call_main, one_line_refusal

from search.records.study_config import ConfigError, StudyConfig
from search.run import main
from search.study.spaces import load_space
from trainables.config import (
    AUGMENTS,
    DEFAULTS,
    KNOBS,
    SHAPES_MODEL,
    Hyperparameters,
    from_aug_strength,
    value_problem,
)
from trainables.spec import ModelSpec


def test_study_yaml_round_trips_through_the_one_loader():
    config = study_config(weights=(("vit_tiny_patch16_224", "/w/vit.safetensors"),), max_concurrent=None)
    text = config.to_yaml()
    assert yaml.safe_load(text)["format"] == 1
    assert StudyConfig.from_yaml(text, "study.yaml") == config


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.update(trails=3), "unknown setting 'trails'"),
        (lambda raw: raw.pop("model"), "missing setting 'model'"),
        (lambda raw: raw.update(trials="3"), "trials is '3', not int"),
        (lambda raw: raw.update(smoke="yes"), "smoke is 'yes', not bool"),
        (lambda raw: raw.update(format=0), "has format 0"),
        (lambda raw: raw.update(trials=0), "--trials 0: run at least 1 trial"),
    ],
)
def test_a_bad_study_yaml_is_refused_naming_the_file_and_the_problem(edit, message):
    raw = yaml.safe_load(study_config().to_yaml())
    edit(raw)
    with pytest.raises(ConfigError, match=message) as raised:
        StudyConfig.from_yaml(yaml.safe_dump(raw), "study.yaml of study 'x'")
    assert str(raised.value).startswith("study.yaml of study 'x'") or "format" in message


def test_a_config_lists_every_problem_at_once_by_its_flag():
    with pytest.raises(ConfigError) as raised:
        study_config(name="a b", trials=0, img_size=8, cpus_per_trial=0, gpus_per_trial=2.0)
    for flag in ("--name 'a b'", "--trials 0", "--img-size 8", "--cpus-per-trial 0", "--gpus-per-trial 2.0"):
        assert flag in str(raised.value)


def test_the_knobs_that_shape_the_model_are_exactly_the_model_spec_s_fields():
    spec_fields = {f.name for f in fields(ModelSpec)} - {
        "name",
        "num_classes",
        "img_size",
        "pretrained",
        "weights_files",
        "backbone",  # a reference model's timm name (compare.py), not a searched knob
    }
    assert set(SHAPES_MODEL) == spec_fields
    spec = ModelSpec("hybrid", 3)
    assert {name: getattr(spec, name) for name in SHAPES_MODEL} == DEFAULTS.model_knobs()  # defaults from one home
    tuned = Hyperparameters(dropout=0.3, vit_depth=6, fusion="two_tokens")
    assert spec.with_knobs(tuned).portable() == {
        **spec.portable(),
        "dropout": 0.3,
        "vit_depth": 6,
        "fusion": "two_tokens",
    }


def test_every_default_is_a_valid_value_and_bounds_are_enforced():
    for name in KNOBS:
        assert value_problem(name, getattr(DEFAULTS, name)) is None, name
    assert "outside [1, 12]" in value_problem("vit_depth", 13)
    assert "is not an integer" in value_problem("batch_size", 16.5)
    assert value_problem("fusion", "concat") == "fusion: 'concat' is not one of single_token, two_tokens"


def test_the_probe_measures_the_heaviest_configuration_a_space_allows(tmp_path):
    space = load_space(ROOT / "spaces" / "vit.yaml", "vit")
    heaviest = space.heaviest()
    assert heaviest.batch_size == 32 and heaviest.vit_depth == 12
    small = tmp_path / "small.yaml"
    small.write_text(
        "parameters: {batch_size: {type: categorical, choices: [8, 64]}, vit_depth: {type: int, low: 2, high: 5}}\n"
    )
    heaviest = load_space(small, "vit").heaviest()
    assert (heaviest.batch_size, heaviest.vit_depth) == (64, 5)
    # A knob that a `when` can leave out keeps its default in those trials: the probe must cover that too.
    conditional = tmp_path / "conditional.yaml"
    conditional.write_text(
        "parameters: {fusion: {type: categorical, choices: [single_token, two_tokens]},\n"
        "             vit_depth: {type: int, low: 2, high: 5, when: {fusion: two_tokens}}}\n"
    )
    assert load_space(conditional, "hybrid").heaviest().vit_depth == 12


def test_old_fusion_names_still_load_from_configs_and_checkpoints():
    assert Hyperparameters.from_dict({"fusion": "seed"}).fusion == "single_token"
    assert Hyperparameters.from_dict({"fusion": "tokens"}).fusion == "two_tokens"
    assert ModelSpec.from_portable({"name": "hybrid", "num_classes": 3, "fusion": "tokens"}).fusion == "two_tokens"


def test_the_retired_aug_strength_becomes_the_knobs_it_applied():
    assert from_aug_strength(0.0) == dict.fromkeys(AUGMENTS, 0.0)  # off was off
    assert from_aug_strength(0.5) == {
        "hflip": 0.5,
        "vflip": 0.5,  # any strength above 0 flipped upside-down too
        "rotation_deg": 15.0,
        "color_jitter": 0.2,
        "noise_std": 0.025,
    }
    assert from_aug_strength(1.0)["rotation_deg"] == 30.0
    with pytest.raises(ValueError, match=r"aug_strength=1.5 is outside \[0, 1\]"):
        from_aug_strength(1.5)


def test_an_old_config_with_aug_strength_still_loads():
    """best_config.yaml, trial checkpoints and model files of earlier studies hold aug_strength."""
    hp = Hyperparameters.from_dict({"lr": 1e-3, "aug_strength": 0.25, "fusion": "tokens"})
    assert hp.augmentation() == from_aug_strength(0.25) and hp.lr == 1e-3 and hp.fusion == "two_tokens"
    assert all(value_problem(name, value) is None for name, value in hp.augmentation().items())
    assert "aug_strength" not in hp.to_dict()  # what is written back uses the new names
    with pytest.raises(ValueError, match=r"aug_strength \(retired\) and hflip both given"):
        Hyperparameters.from_dict({"aug_strength": 0.5, "hflip": 0.0})


@pytest.mark.parametrize("value", [16.7, True, "sixteen", None, [16], float("inf")])
def test_an_integer_knob_refuses_what_is_not_an_integer_instead_of_rounding_it(value):
    """As the space loader does (value_problem): batch_size 16.7 trained with 16 until issue 23."""
    with pytest.raises(ValueError, match=rf"batch_size={re.escape(repr(value))} is not (an integer|a finite number)"):
        Hyperparameters.from_dict({"batch_size": value})


def test_what_trials_and_old_records_hold_still_loads_typed():
    """A Tune config (Optuna's ints and floats, numpy scalars), YAML's 16.0 and '1e-5', an int for a float."""
    import numpy as np

    hp = Hyperparameters.from_dict(
        {"batch_size": 16.0, "vit_depth": np.int64(6), "lr": "1e-5", "dropout": 0, "weight_decay": np.float64(0.1)}
    )
    assert (hp.batch_size, hp.vit_depth, hp.lr, hp.dropout, hp.weight_decay) == (16, 6, 1e-5, 0.0, 0.1)
    assert [type(v) for v in (hp.batch_size, hp.vit_depth, hp.lr, hp.dropout)] == [int, int, float, float]
    with pytest.raises(ValueError, match="lr=False is not a number"):
        Hyperparameters.from_dict({"lr": False})


def test_every_value_of_the_wrong_type_is_named_at_once():
    with pytest.raises(ValueError) as raised:
        Hyperparameters.from_dict({"batch_size": 16.7, "lr": "fast", "vit_depth": 4})
    assert str(raised.value) == "batch_size=16.7 is not an integer; lr='fast' is not a number"


def test_help_and_argument_errors_load_nothing_heavy():
    """torch, Ray, MLflow and numpy load only once the arguments are good (the study's checks come next)."""
    probe = (
        "import sys\n"
        "from search.run import main\n"
        "code = main(['--model', 'cnn', '--trials', '0'])\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(loaded & {'torch', 'ray', 'mlflow', 'numpy', 'optuna', 'timm'})\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr


def interrupted_study(tmp_path: Path, name: str, study_yaml: str | None = None) -> str:
    """A study's KILLED parent run (with `study_yaml` as its study.yaml) and Ray folder: what --resume looks for.
    Its store's URI."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cnn", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name=name, tags={"study": name, "model": "cnn"}).info.run_id
    client.log_param(parent, "model", "cnn")  # what older versions recorded, and decoded
    if study_yaml is not None:
        client.log_text(parent, study_yaml, "study.yaml")
    client.set_terminated(parent, "KILLED")
    (tmp_path / "ray" / name).mkdir(parents=True)
    (tmp_path / "ray" / name / "tuner.pkl").write_bytes(b"an interrupted study's trial state")
    return uri


@pytest.fixture
def refused_resume(tmp_path: Path, monkeypatch, capsys):
    """run.py --resume of a study, which must be refused (its main() in this process): its one line."""

    def refused(name: str, uri: str, *extra: str) -> str:
        where = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")]
        args = ("--model", "cnn", "--name", name, "--resume", *where, *extra)
        return one_line_refusal(call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys), "run.py")

    return refused


def test_resuming_a_study_that_predates_study_yaml_is_one_line(tmp_path, refused_resume):
    line = refused_resume("old", interrupted_study(tmp_path, "old"))
    assert "study 'old' predates study.yaml" in line and "final.py --study old" in line


def test_resuming_a_study_from_before_the_optuna_database_is_one_line(tmp_path, refused_resume):
    recorded = study_config(name="older", storage_path=str(tmp_path / "ray"))
    assert recorded.optuna_storage is None  # what study.yaml held before the database
    line = refused_resume("older", interrupted_study(tmp_path, "older", recorded.to_yaml()))
    assert "study 'older' was run by an older version" in line and "final.py --run-id" in line


@pytest.mark.parametrize("case", ["database gone", "another database"])
def test_resume_refuses_an_optuna_database_that_cannot_continue_the_study(tmp_path, case, refused_resume):
    """The pickled searcher reopens the recorded database: a moved file would start an empty study."""
    recorded_db = f"sqlite:///{tmp_path}/optuna.db"
    recorded = study_config(name="cut", storage_path=str(tmp_path / "ray"), optuna_storage=recorded_db)
    uri = interrupted_study(tmp_path, "cut", recorded.to_yaml())
    if case == "database gone":
        line = refused_resume("cut", uri)
        assert f"the Optuna storage {recorded_db} no longer holds study 'cut'" in line
        assert not (tmp_path / "optuna.db").exists()  # checking did not create it
    else:
        line = refused_resume("cut", uri, "--optuna-storage", f"sqlite:///{tmp_path}/elsewhere.db")
        assert f"--optuna-storage cannot change on --resume: study 'cut' continues in {recorded_db}" in line


def test_a_model_file_reloads_to_the_same_outputs_and_keeps_no_local_path(tmp_path):
    import torch

    from trainables.checkpoint import ModelFile
    from trainables.models import build_model

    spec = ModelSpec(
        "hybrid",
        3,
        32,
        vit_depth=2,
        fusion="two_tokens",
        pretrained=False,
        weights_files=(("vit_tiny_patch16_224", "/home/me/vit.safetensors"),),
    )
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = ModelFile(model.state_dict(), spec, Hyperparameters(), ["a", "b", "c"], {"val_acc": 0.5}).save(
        tmp_path / "m.pt"
    )
    saved = torch.load(path, weights_only=True)
    assert "weights_files" not in saved["model_spec"]
    saved["model_spec"]["fusion"] = "tokens"  # as a file written before the rename
    torch.save(saved, path)

    loaded = ModelFile.load(path)
    assert loaded.spec == ModelSpec("hybrid", 3, 32, vit_depth=2, fusion="two_tokens", pretrained=False)
    assert loaded.classes == ["a", "b", "c"] and loaded.metrics == {"val_acc": 0.5}
    rebuilt = build_model(loaded.spec).eval()
    rebuilt.load_state_dict(loaded.weights)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--name", "a'b\"c"], "--name 'a\\'b\"c': use 1 to 100"),
        (["--name", "old", "--weights", "bogus"], "--weights bogus: write BACKBONE=PATH"),
    ],
)
def test_resume_checks_its_arguments_first(tmp_path, flags, message, monkeypatch, capsys):
    args = ("--model", "cnn", "--resume", *flags, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    line = one_line_refusal(call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys), "run.py")
    assert message in line
    assert not (tmp_path / "m.db").exists()


# ---------------------------------------------------------------- final.py --config: one problem per bad field

WINNER = {
    "model": "vit",
    "hyperparameters": {"batch_size": 16, "dropout": 0.127, "vit_depth": 3},
    "classes": ["benign", "malignant"],
    "data": "synthetic:2",
    "seed": 0,
    "img_size": 32,
    "model_spec": {"name": "vit", "num_classes": 2, "img_size": 32, "dropout": 0.127, "vit_depth": 3},
}


def winner_problems(**changes) -> list[str]:
    """The problems Winner.from_dict lists for WINNER with some top-level values or hyperparameters (hp_NAME)
    changed."""
    from search.records.winner import Winner, WinnerRefused

    raw = {**WINNER, "hyperparameters": dict(WINNER["hyperparameters"])}
    for key, value in changes.items():
        if key.startswith("hp_"):
            raw["hyperparameters"][key.removeprefix("hp_")] = value
        else:
            raw[key] = value
    try:
        Winner.from_dict(raw, "config x.yaml")
    except WinnerRefused as error:
        text = str(error)
        assert text.startswith("config x.yaml: ")
        return text.removeprefix("config x.yaml: ").split("; ")
    return []


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"hp_batch_size": "sixteen"}, "hyperparameters: batch_size='sixteen' is not an integer"),
        ({"hp_batch_size": 16.7}, "hyperparameters: batch_size=16.7 is not an integer"),
        ({"hp_vit_depth": True}, "hyperparameters: vit_depth=True is not an integer"),
        ({"hp_dropout": "high"}, "hyperparameters: dropout='high' is not a number"),
        ({"classes": "benign"}, "classes must be a list of at least 2 class names"),
        ({"img_size": 32.5}, "img_size must be an integer, not 32.5"),
        ({"model": "vvit"}, "model 'vvit' is not one of cnn, vit, hybrid"),
    ],
)
def test_one_bad_field_of_a_winner_config_is_one_problem(changes, problem):
    """Not one more per comparison with model_spec against a default filled in after the field was refused."""
    assert winner_problems(**changes) == [problem]


def test_a_winner_config_lists_every_independent_problem_and_reads_16_0_as_16():
    assert winner_problems(hp_batch_size=16.7, hp_lr=-1.0, seed=True) == [
        "hyperparameters: batch_size=16.7 is not an integer",
        "lr: -1.0 is outside [1e-12, inf]",
        "seed must be an integer, not True",
    ]
    assert winner_problems(hp_vit_depth=4) == ["model_spec.vit_depth=3 disagrees with hyperparameters.vit_depth=4"]
    assert winner_problems(hp_batch_size=16.0) == []


def test_final_py_refuses_a_fractional_batch_size_in_one_line_before_training(tmp_path, capsys):
    from search.final import main

    config = tmp_path / "best_config.yaml"
    config.write_text(yaml.safe_dump({**WINNER, "hyperparameters": {**WINNER["hyperparameters"], "batch_size": 16.7}}))
    out = tmp_path / "out"
    code = main(["--config", str(config), "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"search/final.py: error: config {config}: hyperparameters: batch_size=16.7 is not an integer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_config.yaml"]  # no run, no store, no results
