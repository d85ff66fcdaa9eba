import pytest
import torch

from trainables.checkpoint import load_trial_checkpoint, save_trial_checkpoint
from trainables.config import Hyperparameters
from trainables.data import index_source, prepare_splits, subsample
from trainables.engine import Learner, NonFiniteLoss, batch_count, epoch_batches, fit
from trainables.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    index = subsample(index_source("synthetic:4", seed=0), {"train": 16, "val": 6}, seed=0)
    _, cached, _ = prepare_splits(index, ("train", "val"), 32, tmp_path_factory.mktemp("cache"))
    return cached


def learner(hp: Hyperparameters, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    model = build_model(ModelSpec("vit", 4, 32, vit_depth=2, pretrained=False))
    return Learner(model, hp, torch.device("cpu"), "val_acc", seed)


def test_fit_learns_and_reports_every_metric(splits):
    results = list(fit(learner(Hyperparameters(lr=1e-3, batch_size=16)), splits["train"], splits["val"], 4))
    assert [r.epoch for r in results] == [1, 2, 3, 4] and results[-1].finished
    assert set(results[0].metrics) == {"train_loss", "val_loss", "val_acc", "val_balanced_acc", "val_macro_f1", "lr"}
    assert max(r.metrics["val_acc"] for r in results) > 0.5  # chance is 0.25
    assert results[-1].metrics["train_loss"] < results[0].metrics["train_loss"]


def test_early_stopping_ends_within_the_budget(splits):
    hp = Hyperparameters(lr=1e-9, batch_size=16, early_stop_patience=1)  # nothing improves
    results = list(fit(learner(hp), splits["train"], splits["val"], 10))
    assert len(results) < 10 and results[-1].finished


def test_a_restored_checkpoint_continues_exactly(splits, tmp_path):
    hp = Hyperparameters(lr=1e-3, batch_size=16)
    straight = [r.metrics for r in fit(learner(hp), splits["train"], splits["val"], 3)]

    first = learner(hp)
    *_, result = fit(first, splits["train"], splits["val"], 2)
    save_trial_checkpoint(tmp_path, first, ModelSpec("vit", 4, 32), hp, result.metrics)
    resumed = learner(hp, seed=0)
    torch.manual_seed(123)  # a different process state must not matter
    resumed.load_state_dict(load_trial_checkpoint(tmp_path))
    (last,) = list(fit(resumed, splits["train"], splits["val"], 3))
    assert last.epoch == 3
    assert last.metrics == pytest.approx(straight[2], rel=1e-5)


def test_diverging_loss_stops_the_trial(splits):
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        list(fit(learner(Hyperparameters(lr=1e6, batch_size=16, weight_decay=0.0)), splits["train"], splits["val"], 3))


@pytest.mark.parametrize("batch_size", [5, 16, 64])
def test_on_batch_ticks_once_per_batch_as_epoch_batches_counts(splits, batch_size):
    """The final retrain's progress bar is sized by epoch_batches and advanced by fit's own hook."""
    ticks: list[int] = []
    hp = Hyperparameters(batch_size=batch_size)
    for result in fit(learner(hp), splits["train"], splits["val"], 2, on_batch=lambda: ticks.append(1)):
        assert len(ticks) == result.epoch * epoch_batches(len(splits["train"]), len(splits["val"]), batch_size)


def test_batch_count_leaves_out_a_trailing_batch_of_one_in_training_only():
    assert batch_count(33, 16, drop_single=True) == 2 and batch_count(33, 16) == 3
    assert batch_count(1, 16, drop_single=True) == 1  # a split of one image still trains
    assert batch_count(32, 16, drop_single=True) == 2
