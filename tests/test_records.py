"""The records that cross stages: the winner read back as written, files of earlier versions still loading, every
refusal listed at once; the retrain's settings and registration in the shapes metrics.json and MLflow hold."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from search.records.registration import Registration
from search.records.retrain import RetrainSettings
from search.records.split import SplitSpec
from search.records.winner import Winner, WinnerRefused, load_file
from trainables.config import Hyperparameters
from trainables.spec import REFERENCE

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "best_config_v1.yaml"
"""A best_config.yaml as the study of main (before the records) wrote it: a cnn --smoke study of 3 classes."""
V0 = FIXTURES / "best_config_v0.yaml"
"""An older one, written before the trial's name (t07) was recorded."""


def written_now(text: str) -> str:
    """A fixture as today's writer writes it: the knobs added since (class_weighting) at their defaults."""
    smoothing = re.search(r"  label_smoothing: .*\n", text)
    assert smoothing is not None
    return text.replace(smoothing.group(), smoothing.group() + "  class_weighting: none\n")


def test_a_best_config_written_before_the_records_loads_and_is_written_back_byte_for_byte():
    text = V1.read_text()
    winner = load_file(str(V1))
    assert (winner.model, winner.classes, winner.split) == (
        "cnn",
        ["class_00", "class_01", "class_02"],
        SplitSpec("synthetic:3", 0, True),
    )
    assert (winner.study, winner.trial, winner.best_epoch, winner.epochs, winner.pretrained) == (
        "fixture24",
        "t00",
        1,
        1,
        False,
    )
    assert winner.model_spec is not None and winner.model_spec.num_classes == 3
    assert winner.source == f"config {V1}" and winner.run_id is None
    assert winner.to_yaml() == written_now(text)  # a retrain's config.yaml: the study's file, with the new knob


def test_a_best_config_from_before_class_weighting_loads_with_the_seeds_plain_loss():
    for fixture in (V0, V1):
        assert "class_weighting" not in fixture.read_text()
        assert load_file(str(fixture)).hyperparameters.class_weighting == "none"


def test_an_older_best_config_without_the_trials_name_loads():
    winner = load_file(str(V0))
    assert winner.trial is None and winner.trial_name == f"{winner.trial_id} (Ray's trial id)"
    assert Winner.from_dict(winner.to_dict(), "again") == replace(winner, source="again")


def test_from_trial_writes_what_the_study_wrote_before():
    """The study's writer, from its config and the trial's checkpoint: the fixture's bytes again."""
    raw = yaml.safe_load(V1.read_text())
    study = SimpleNamespace(
        name=raw["study"],
        model=raw["model"],
        metric=raw["metric"],
        epochs=raw["epochs"],
        img_size=raw["img_size"],
        seed=raw["seed"],
        data=raw["data"],
        smoke=raw["smoke"],
        pretrained=raw["pretrained"],
        subgroups=(),
        window=None,
    )
    winner = Winner.from_trial(
        study,
        trial_id=raw["trial_id"],
        metrics={"val_acc": raw["best_value"], "epoch": raw["best_epoch"], "val_loss": 1.0},
        hyperparameters=raw["hyperparameters"],
        classes=raw["classes"],
        model_spec=raw["model_spec"],
        trial=raw["trial"],
    )
    assert winner.to_yaml() == written_now(V1.read_text()) and winner.source == "study fixture24"
    without_spec = Winner.from_trial(
        study, trial_id="x", metrics={"val_acc": 0.5, "epoch": 1}, hyperparameters={}, classes=["a", "b"]
    )
    assert "model_spec" not in without_spec.to_dict() and without_spec.hyperparameters == Hyperparameters()


def test_every_problem_is_listed_at_once():
    raw = {**yaml.safe_load(V1.read_text()), "colour": "red", "seed": True, "best_epoch": 0}
    raw["model_spec"] = {**raw["model_spec"], "num_classes": 4}
    with pytest.raises(WinnerRefused) as refused:
        Winner.from_dict(raw, "config x.yaml", requested_model="vit")
    assert str(refused.value) == "; ".join(
        [
            "config x.yaml: it is a config for --model cnn, not --model vit",
            "unknown key(s) colour",
            "valid: model, hyperparameters, classes, data, seed, img_size, study, trial, trial_id, metric, best_value, "
            "best_epoch, model_spec, epochs, smoke, pretrained, backbone, subgroups, window",
            "seed must be an integer, not True",
            "best_epoch must be a positive integer, not 0",
            "model_spec.num_classes is 4 but classes lists 3",
        ]
    )


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"model": "reference"}, "a reference model's config needs its timm name (backbone), e.g. convnext_tiny"),
        ({"model": "vvit"}, "model 'vvit' is not one of cnn, vit, hybrid"),
        (
            {"backbone": "convnext_tiny"},
            "backbone 'convnext_tiny' names a reference model's timm model, not one of a cnn",
        ),
        ({"data": None}, "missing data"),
    ],
)
def test_a_model_and_its_backbone_are_checked_together(changes, problem):
    raw = {**yaml.safe_load(V1.read_text()), **changes}
    raw.pop("model_spec")
    with pytest.raises(WinnerRefused, match=f"^{re.escape(f'config x.yaml: {problem}')}$"):
        Winner.from_dict(raw, "config x.yaml")


def test_a_reference_runs_config_reads_back(tmp_path):
    """compare.py's reference model: its config.yaml says it repeats the run, and final.py --config reads it
    (before: "unknown key(s) backbone ...; model 'reference' is not one of cnn, vit, hybrid")."""
    from search.comparison.driver import reference_config
    from search.final import build_parser, load_winner

    winner = replace(load_file(str(V1)), run_id="abc", experiment_id="1")
    reference = reference_config(winner, "convnext_tiny")
    (tmp_path / "config.yaml").write_text(reference.to_yaml())
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (written["model"], written["backbone"], written["study"], written["trial"]) == (
        REFERENCE,
        "convnext_tiny",
        None,
        None,
    )
    assert written["hyperparameters"] == Hyperparameters().to_dict() and "model_spec" not in written

    args = build_parser().parse_args(["--config", str(tmp_path / "config.yaml")])
    again = load_winner(args)
    assert again == replace(reference, source=f"config {tmp_path / 'config.yaml'}")
    assert (again.split, again.epochs, again.metric, again.pretrained) == (winner.split, 1, "val_acc", False)


def test_the_retrains_settings_keep_the_params_order_and_the_registration_metrics_json_s_keys():
    settings = RetrainSettings(
        model="cnn",
        source="study s",
        study="s",
        trial="t00",
        trial_id="ab12",
        train_on="train+val",
        epochs=2,
        img_size=32,
        seed=0,
        split_seed=0,
        split_from="study_record",
        data="synthetic:3",
        window=None,
        smoke=True,
        pretrained=False,
        search_metric="val_acc",
        search_best_value=0.5,
        num_classes=3,
        train_images=24,
        val_images=0,
        test_images=12,
        calibration_split="none",
    )
    assert list(settings.to_dict()) == [
        "model", "source", "study", "trial", "trial_id", "train_on", "epochs", "img_size", "seed", "split_seed",
        "split_from", "data", "window", "smoke", "pretrained", "search_metric", "search_best_value", "num_classes",
        "train_images", "val_images", "test_images", "calibration_split",
    ]  # fmt: skip
    registration = Registration(name="cnn-classifier", version=3, model_uri="models:/m-1", model_id="m-1")
    assert registration.to_dict() == {
        "name": "cnn-classifier",
        "version": 3,
        "model_uri": "models:/m-1",
        "model_id": "m-1",
    }
    assert (registration.title, registration.version_uri, registration.tag) == (
        "cnn-classifier version 3",
        "models:/cnn-classifier/3",
        "cnn-classifier/3",
    )
