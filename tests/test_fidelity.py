"""Resolution as a fidelity: the schedule of image sizes, the models that take them, the engine that trains at each
and counts its compute, and the study's flag and cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import study_config

from search.records.study_config import DEFAULT_FIDELITY, FIDELITIES, ConfigError
from search.study.console import EpochPrinter
from search.study.tuning import epoch_sizes, smaller_sizes, trial_setup
from search.tracking.schema import TrialNames
from trainables.checkpoint import load_trial_checkpoint, save_trial_checkpoint
from trainables.config import Hyperparameters
from trainables.data import DataError, cache_resized, check_free_space, index_source, prepare_splits, subsample
from trainables.engine import Learner, Resolutions, fit
from trainables.fidelity import asha_rungs, epoch_compute, resolution_schedule
from trainables.models import ModelSpec, build_model

# ---------------------------------------------------------------- the schedule


def test_the_schedule_at_224_px_halves_then_three_quarters_up_to_ashas_first_two_rungs():
    assert resolution_schedule(224, 15, 2, 3) == (112,) * 2 + (160,) * 4 + (224,) * 9


def test_reduced_sizes_round_down_to_the_patch_and_never_below_it():
    assert resolution_schedule(32, 15, 2, 3) == (16,) * 2 + (16,) * 4 + (32,) * 9  # 24 px rounds down to 16
    assert resolution_schedule(100, 7, 1, 2) == (48, 64, 100, 100, 100, 100, 100)  # 50 -> 48, 75 -> 64
    assert set(resolution_schedule(16, 15, 2, 3)) == {16}  # a 16 px study has nothing smaller


def test_reduction_factor_2_moves_the_second_rung_closer():
    assert asha_rungs(8, 1, 2) == [1, 2, 4]
    assert resolution_schedule(224, 8, 1, 2) == (112, 160, 224, 224, 224, 224, 224, 224)


def test_only_epochs_before_a_rung_below_the_budget_are_reduced_and_the_last_is_full():
    assert resolution_schedule(224, 2, 3, 3) == (224, 224)  # grace beyond the budget: no rung, nothing cheap
    assert resolution_schedule(224, 1, 2, 3) == (224,)
    assert resolution_schedule(224, 6, 2, 3) == (112, 112, 224, 224, 224, 224)  # the second rung is the budget
    assert resolution_schedule(224, 3, 2, 3)[-1] == 224


def test_compute_weighs_an_epoch_by_its_images_and_its_pixels():
    assert epoch_compute(10, 10, 16, 32) == 0.25
    assert epoch_compute(9, 10, 32, 32) == pytest.approx(0.9)


# ---------------------------------------------------------------- the study's setting


def test_the_fidelity_is_a_checked_setting_with_epochs_as_default():
    assert FIDELITIES == ("epochs", "resolution") and DEFAULT_FIDELITY == "epochs"
    assert study_config().fidelity == "epochs"
    with pytest.raises(ConfigError, match="--fidelity 'pixels': choose one of epochs, resolution"):
        study_config(fidelity="pixels")


def test_study_yaml_round_trips_the_fidelity_and_an_older_file_reads_as_epochs():
    from search.records.study_config import StudyConfig

    config = study_config(fidelity="resolution")
    assert StudyConfig.from_yaml(config.to_yaml(), "study.yaml") == config
    older = config.to_yaml().replace("fidelity: resolution\n", "")
    assert StudyConfig.from_yaml(older, "study.yaml").fidelity == "epochs"


def test_run_py_records_fidelity_from_its_flag():
    from search.run import build_parser
    from search.study.config import new_config

    argv = ["--model", "vit", "--data", "synthetic", "--smoke", "--storage-path", "/tmp/r", "--name", "f"]
    assert new_config(build_parser().parse_args(argv)).fidelity == "epochs"
    assert new_config(build_parser().parse_args([*argv, "--fidelity", "resolution"])).fidelity == "resolution"


def test_compare_py_hands_the_fidelity_to_its_studies_and_refuses_a_changed_one():
    from search.compare import build_compare_parser, forwarded_argv
    from search.comparison.plan import BUDGET_SETTINGS

    parser, forwarded = build_compare_parser()
    assert forwarded_argv(parser.parse_args(["--fidelity", "resolution"]), forwarded) == ["--fidelity", "resolution"]
    assert "fidelity" in BUDGET_SETTINGS


def test_epoch_sizes_follow_the_fidelity_and_the_cache_holds_each_smaller_size():
    assert epoch_sizes(study_config(epochs=15, img_size=224)) == (224,) * 15
    resolution = study_config(epochs=15, img_size=224, fidelity="resolution")
    assert epoch_sizes(resolution) == resolution_schedule(224, 15, 2, 3)
    assert smaller_sizes(resolution) == (112, 160) and smaller_sizes(study_config()) == ()
    # The scheduler's grace period (clipped to the budget) is the schedule's
    assert epoch_sizes(study_config(epochs=2, grace_period=5, fidelity="resolution")) == (32, 32)


def test_the_free_space_check_counts_every_size(tmp_path, monkeypatch):
    import shutil

    index = index_source("synthetic:3", seed=0)
    usage = shutil.disk_usage(tmp_path)
    full_only = sum(len(index.splits[split]) * 32 * 32 * 3 for split in ("train", "val"))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=full_only + 1))
    check_free_space(index, ("train", "val"), 32, tmp_path)  # the full size alone fits
    with pytest.raises(DataError, match="for 16 and 32 px images"):
        check_free_space(index, ("train", "val"), 32, tmp_path, also=(16,))


# ---------------------------------------------------------------- models and the engine


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_a_model_built_for_the_resolution_fidelity_takes_the_smaller_sizes(name):
    model = build_model(ModelSpec(name, 3, 32, vit_depth=1, pretrained=False), dynamic_size=True).eval()
    with torch.no_grad():
        for size in (16, 32):
            assert model(torch.rand(2, 3, size, size)).shape == (2, 3)


def test_the_dynamic_vit_is_the_fixed_one_at_the_full_size():
    """Same parameters, same logits: a checkpoint of a resolution trial rebuilds as the fixed-size model."""
    spec = ModelSpec("vit", 3, 32, vit_depth=1, pretrained=False)
    fixed, dynamic = build_model(spec).eval(), build_model(spec, dynamic_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fixed(images), dynamic(images))


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """Train (16 images) and val of a 3-class synthetic set at 32 px, and Resolutions for one epoch at 16 px."""
    cache = tmp_path_factory.mktemp("cache")
    index = subsample(index_source("synthetic:3", seed=0), {"train": 6, "val": 2}, seed=0)
    index, cached, _ = prepare_splits(index, ("train", "val"), 32, cache, also=(16,))
    return cached["train"], cached["val"], Resolutions((16, 32, 32), cache_resized(index, (16,), cache))


def vit_learner(seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    model = build_model(ModelSpec("vit", 3, 32, vit_depth=1, pretrained=False), dynamic_size=True)
    return Learner(model, Hyperparameters(lr=1e-3, batch_size=18), torch.device("cpu"), "val_acc", seed)


def test_fit_trains_each_epoch_at_its_size_and_counts_full_resolution_epochs(sized):
    train, val, resolutions = sized
    assert resolutions.splits[16][0].images().shape[1:3] == (16, 16)
    results = list(fit(vit_learner(), train, val, 2, resolutions=resolutions))
    assert [r.img_size for r in results] == [16, 32]
    assert [r.compute_epochs for r in results] == [0.25, 1.25]
    assert [r.img_size for r in fit(vit_learner(), train, val, 1)] == [32]  # no schedule: the full size


def test_a_restored_learner_goes_on_with_the_schedule_by_epoch(sized, tmp_path):
    train, val, resolutions = sized
    first = vit_learner()
    (one,) = fit(first, train, val, 1, resolutions=resolutions)
    save_trial_checkpoint(tmp_path, first, ModelSpec("vit", 3, 32), first.hp, one.metrics)
    resumed = vit_learner()
    resumed.load_state_dict(load_trial_checkpoint(tmp_path))
    (two,) = fit(resumed, train, val, 2, resolutions=resolutions)
    assert (two.epoch, two.img_size, two.compute_epochs) == (2, 32, 1.25)


def test_early_stopping_waits_for_a_full_size_epoch(sized):
    train, val, _ = sized
    hp = Hyperparameters(lr=1e-9, batch_size=18, early_stop_patience=1)  # nothing improves
    learner = Learner(vit_learner().model, hp, torch.device("cpu"), "val_acc")
    resolutions = Resolutions((16, 16, 16, 32), sized[2].splits)
    results = list(fit(learner, train, val, 6, resolutions=resolutions))
    assert results[-1].img_size == 32 and len(results) >= 4


def test_trial_setup_carries_the_schedule_and_the_smaller_splits(sized):
    train, val, resolutions = sized
    spec = ModelSpec("vit", 3, 32, pretrained=False)
    assert trial_setup(study_config(), spec, train, val).resolutions is None
    setup = trial_setup(study_config(fidelity="resolution"), spec, train, val, resolutions.splits)
    assert setup.resolutions == Resolutions((16, 16, 32), resolutions.splits)


# ---------------------------------------------------------------- what the study prints


def test_the_console_names_the_size_of_a_smaller_epoch_only(capsys):
    class Trial:
        experiment_tag, trial_id = "0_lr=0.1", "a"

    printer = EpochPrinter(3, "val_acc", TrialNames(3), img_size=32)
    result = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5, "epoch_img_size": 16}
    printer.on_trial_result(0, [], Trial(), result)
    printer.on_trial_result(0, [], Trial(), {**result, "epoch": 2, "epoch_img_size": 32})
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("val_acc 0.5000  at 16 px") and second.endswith("val_acc 0.5000")


# ---------------------------------------------------------------- a whole study


@pytest.mark.slow
def test_a_resolution_study_trains_its_first_epochs_smaller_and_logs_size_and_compute(tmp_path):
    """run.py --fidelity resolution, as a user runs it: each trial's run has epoch_img_size and compute_epochs as
    per-epoch metrics, the console names the smaller epochs, study.yaml records the fidelity."""
    from helpers import run_script
    from helpers.smoke_study import laid_out_like_the_project
    from mlflow.tracking import MlflowClient

    root = laid_out_like_the_project(tmp_path / "project")
    uri = f"sqlite:///{root}/mlflow.db"
    flags = ["--model", "vit", "--smoke", "--data", "synthetic:3", "--no-pretrained", "--gpus-per-trial", "0"]
    where = ["--tracking-uri", uri, "--storage-path", str(root / "ray"), "--cache-dir", str(root / "cache")]
    result = run_script(
        "run.py", *flags, *where, "--trials", "1", "--name", "res", "--fidelity", "resolution", cwd=root
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "epoch  1/3" in result.stdout and "at 16 px" in result.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vit").experiment_id], "tags.study = 'res'")
    (child,) = [run for run in runs if "mlflow.parentRunId" in run.data.tags]  # the trial's run

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(child.info.run_id, key), key=lambda m: m.step)]

    assert history("epoch_img_size") == [16, 16, 32]
    assert history("compute_epochs") == pytest.approx([0.25, 0.5, 1.5])
    assert "epoch_img_size" not in child.data.params and "compute_epochs" not in child.data.params
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    recorded = Path(client.download_artifacts(parent.info.run_id, "study.yaml", str(tmp_path)))
    assert "fidelity: resolution" in recorded.read_text().splitlines()
