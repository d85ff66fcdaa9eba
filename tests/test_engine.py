import math

import numpy as np
import pytest
import torch
from torch import nn

from trainables.checkpoint import load_trial_checkpoint, save_trial_checkpoint
from trainables.config import Hyperparameters
from trainables.data import CachedSplit, index_source, prepare_splits, subsample
from trainables.engine import (
    EFFECTIVE_NUMBER_BETA,
    Learner,
    NonFiniteLoss,
    batch_count,
    class_weights,
    epoch_batches,
    fit,
)
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


# ---------------------------------------------------------------- class weighting


def test_class_weights_from_known_counts():
    assert class_weights([30, 10], "none") is None
    assert class_weights([30, 10], "inverse") == pytest.approx([40 / 60, 40 / 20])  # N / (C n_c)
    assert class_weights([25, 25], "inverse") == [1.0, 1.0]  # a balanced split trains as unweighted

    beta = EFFECTIVE_NUMBER_BETA
    inverse_effective = [(1 - beta) / (1 - beta**n) for n in (30, 10)]
    expected = [2 * w / sum(inverse_effective) for w in inverse_effective]  # averaging 1 over the classes
    assert class_weights([30, 10], "effective") == pytest.approx(expected)

    # Between none and inverse: classes of 100 and 2000 images weigh 9:1, where inverse weighs them 20:1.
    small, large = class_weights([100, 2000], "effective") or []
    assert small / large == pytest.approx(9.08, abs=0.01) and (small + large) / 2 == pytest.approx(1.0)


def test_a_class_without_training_images_gets_a_finite_weight():
    for weighting in ("inverse", "effective"):
        weights = class_weights([12, 4, 0], weighting) or []
        assert len(weights) == 3 and all(math.isfinite(w) and w > 0 for w in weights)
    with pytest.raises(ValueError, match="not one of none, inverse, effective"):
        class_weights([1, 2], "sqrt")


def test_the_training_loss_is_torchs_cross_entropy_with_the_splits_class_weights():
    """One batch, learning rate 0 and no augmentation: the epoch's loss is the loss of the untouched model."""
    labels = np.array([0] * 12 + [1] * 3 + [2] * 1)  # 12:3:1
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    split = CachedSplit("in memory", labels, loaded_images=images)
    still = dict(lr=0.0, weight_decay=0.0, batch_size=16, hflip=0.0, rotation_deg=0.0, color_jitter=0.0, noise_std=0.0)

    def epoch_loss(weighting: str) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 3))
        learner = Learner(model, Hyperparameters(**still, class_weighting=weighting), torch.device("cpu"))
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).detach()
        return learner.train_epoch(split), logits

    plain, logits = epoch_loss("none")
    target = torch.from_numpy(labels)
    assert plain == pytest.approx(nn.functional.cross_entropy(logits, target).item(), rel=1e-5)
    for weighting in ("inverse", "effective"):
        weighted, _ = epoch_loss(weighting)
        weight = torch.tensor(class_weights([12, 3, 1], weighting), dtype=torch.float32)
        assert weighted == pytest.approx(nn.functional.cross_entropy(logits, target, weight=weight).item(), rel=1e-5)
        assert abs(weighted - plain) > 1e-3
