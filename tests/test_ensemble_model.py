"""A model file that holds an ensemble and test-time flips, and every shipped form of it.

Two tiny ViTs (32 px, one block, random weights, a sharpened head so that the probabilities
are far from uniform) with their own temperatures stand in for final.py --ensemble's members;
the file's scoring network (trainables.scoring) is what the registered graph, model.onnx and
predict.py compute, and its numpy twin is what final.py's test computes.
"""

from __future__ import annotations

import csv
import io
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image_folder

from search.predict import main
from trainables.checkpoint import FLIPS, Member, ModelFile
from trainables.config import Hyperparameters
from trainables.data import decode_image
from trainables.models import build_model
from trainables.scoring import (
    FLIP_AXES,
    ScoringNetwork,
    averaged_probabilities,
    flipped_images,
    forward_passes,
    scoring_network,
    scoring_summary,
)
from trainables.spec import ModelSpec

CLASSES = ["benign", "malignant", "normal"]
SIZE = 32
SPEC = ModelSpec("vit", len(CLASSES), SIZE, pretrained=False, vit_depth=1)
OLD_KEYS = {"model", "model_spec", "hyperparameters", "classes", "metrics", "temperature"}
"""What a single model's file has held since temperatures were saved: it must hold no more."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the machine is shared, and two threads on a busy core wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def member(seed: int, temperature: float, label: str) -> Member:
    """A tiny ViT whose last layer is scaled up: logits of a few units, so each member and flip counts."""
    torch.manual_seed(seed)
    network = build_model(SPEC)
    with torch.no_grad():
        network.head[-1].weight.mul_(30)
    return Member(network.state_dict(), SPEC, Hyperparameters(), temperature, {"test_acc": seed / 10}, label)


@pytest.fixture(scope="module")
def members() -> list[Member]:
    return [member(7, 1.5, "t07"), member(3, 0.7, "t03")]


@pytest.fixture(scope="module")
def ensemble(members) -> ModelFile:
    """Two members, averaged over the image and its left-right flip."""
    return ModelFile.from_members(members, CLASSES, {"test_acc": 0.9}, tta=("hflip",))


def asymmetric_images(count: int = 3, seed: int = 0) -> torch.Tensor:
    """Random images with a bright left half and a top of less contrast than their bottom: no flip leaves them
    as they are."""
    images = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 0.5
    images[..., : SIZE // 2] += 0.5
    images[..., : SIZE // 2, :] = images[..., : SIZE // 2, :] * 0.5 + 0.25
    return images.clamp(0, 1)


def networks_of(model_file: ModelFile) -> list[torch.nn.Module]:
    """Each member rebuilt by hand, as a user of the file would."""
    networks = []
    for one in model_file.members:
        network = build_model(one.spec)
        network.load_state_dict(one.weights)
        networks.append(network.eval())
    return networks


# ---------------------------------------------------------------- the file


def test_an_ensemble_file_round_trips_its_members_and_flips(ensemble, members, tmp_path):
    loaded = ModelFile.load(ensemble.save(tmp_path / "model.pt"))
    assert loaded.tta == ("hflip",) and loaded.metrics == {"test_acc": 0.9}
    assert [m.label for m in loaded.members] == ["t07", "t03"]
    assert [m.temperature for m in loaded.members] == [1.5, 0.7]
    assert [m.metrics for m in loaded.members] == [{"test_acc": 0.7}, {"test_acc": 0.3}]  # each its own scores
    for got, saved in zip(loaded.members, members, strict=True):
        assert got.spec == saved.spec and got.hyperparameters == saved.hyperparameters
        assert all(torch.equal(got.weights[key], value) for key, value in saved.weights.items())
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == OLD_KEYS | {
        "more_members",
        "tta",
        "label",
        "member_metrics",
    }


def test_a_single_model_saves_the_same_keys_and_bytes_as_before(members, tmp_path):
    first = members[0]
    single = ModelFile(first.weights, SPEC, Hyperparameters(), CLASSES, {"val_acc": 0.5}, temperature=1.5)
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    single.save(tmp_path / "new" / "model.pt")
    old = {  # what ModelFile.save wrote before ensembles, written here by hand
        "model": first.weights,
        "model_spec": SPEC.portable(),
        "hyperparameters": Hyperparameters().to_dict(),
        "classes": CLASSES,
        "metrics": {"val_acc": 0.5},
        "temperature": 1.5,
    }
    torch.save(old, tmp_path / "old" / "model.pt")
    assert (tmp_path / "new" / "model.pt").read_bytes() == (tmp_path / "old" / "model.pt").read_bytes()
    # One member, no flips: from_members writes a single model's file too.
    lone = ModelFile.from_members([replace(first, label="")], CLASSES, {"val_acc": 0.5})
    assert torch.load(lone.save(tmp_path / "lone.pt"), weights_only=True).keys() == OLD_KEYS


def test_an_older_single_model_file_loads_as_one_member_without_flips(members, tmp_path):
    first = members[0]
    old = {  # a file from before temperatures: no temperature key either
        "model": first.weights,
        "model_spec": SPEC.portable(),
        "hyperparameters": Hyperparameters().to_dict(),
        "classes": CLASSES,
        "metrics": {"val_acc": 0.5},
    }
    torch.save(old, tmp_path / "old.pt")
    loaded = ModelFile.load(tmp_path / "old.pt")
    assert loaded.more_members == () and loaded.tta == () and loaded.label == ""
    (only,) = loaded.members
    assert only.temperature == 1.0 and only.metrics == {"val_acc": 0.5} and only.label == ""
    assert forward_passes(loaded) == 1 and scoring_summary(loaded) == ""


def test_the_ensemble_temperature_round_trips_and_is_saved_only_when_not_1(ensemble, members, tmp_path):
    rescaled = replace(ensemble, ensemble_temperature=0.8)
    loaded = ModelFile.load(rescaled.save(tmp_path / "rescaled.pt"))
    assert loaded.ensemble_temperature == 0.8 and [m.temperature for m in loaded.members] == [1.5, 0.7]
    assert "ensemble_temperature" in torch.load(tmp_path / "rescaled.pt", weights_only=True)
    assert "ensemble_temperature" not in torch.load(ensemble.save(tmp_path / "plain.pt"), weights_only=True)
    assert ModelFile.load(tmp_path / "plain.pt").ensemble_temperature == 1.0  # older ensemble files: none
    flipped = ModelFile.from_members(members[:1], CLASSES, {}, tta=("hflip",), ensemble_temperature=0.9)
    assert ModelFile.load(flipped.save(tmp_path / "flipped.pt")).ensemble_temperature == 0.9
    with pytest.raises(ValueError, match=r"ensemble_temperature 0\.9 on a single model without flips"):
        ModelFile.from_members(members[:1], CLASSES, {}, ensemble_temperature=0.9)
    with pytest.raises(ValueError, match="ensemble_temperature 0: it must be positive"):
        replace(ensemble, ensemble_temperature=0.0)


def test_unknown_flips_and_members_that_score_differently_are_refused(members):
    with pytest.raises(ValueError, match=r"unknown test-time flip 'rotate90' \(known: hflip, vflip\)"):
        ModelFile.from_members(members, CLASSES, {}, tta=("rotate90",))
    other = replace(members[1], spec=replace(SPEC, num_classes=4))
    with pytest.raises(ValueError, match="member t03 has 4 classes at 32 px, the first 3 at 32 px"):
        ModelFile.from_members([members[0], other], CLASSES, {})
    assert set(FLIP_AXES) == set(FLIPS)  # the scoring network knows every flip a file may name


# ---------------------------------------------------------------- the scoring network


def test_the_scoring_network_agrees_with_averaged_probabilities_and_a_hand_computation(ensemble):
    scoring = scoring_network(ensemble)
    assert isinstance(scoring, ScoringNetwork) and not scoring.training
    images = asymmetric_images(4)
    with torch.no_grad():
        probabilities = scoring(images).numpy()
        logits = [[view.numpy() for view in views] for views in scoring.view_logits(images)]
        by_hand = [
            (torch.softmax(net(images) / m.temperature, 1) + torch.softmax(net(images.flip(3)) / m.temperature, 1)) / 2
            for net, m in zip(networks_of(ensemble), ensemble.members, strict=True)
        ]
    twin = averaged_probabilities(logits, [1.5, 0.7])
    assert probabilities.shape == (4, len(CLASSES)) and twin.dtype == np.float64
    np.testing.assert_allclose(probabilities, twin, atol=1e-6)
    np.testing.assert_allclose(probabilities, ((by_hand[0] + by_hand[1]) / 2).numpy(), atol=1e-6)
    np.testing.assert_allclose(twin.sum(axis=1), 1, atol=1e-12)
    # Each member and flip counts: neither member alone, nor the images unflipped, give these numbers.
    alone = averaged_probabilities(np.asarray(logits)[:1], [1.5])
    unflipped = averaged_probabilities(np.asarray(logits)[:, :1], [1.5, 0.7])
    assert np.abs(twin - alone).max() > 1e-3 and np.abs(twin - unflipped).max() > 1e-3
    assert forward_passes(ensemble) == 4
    assert scoring_summary(ensemble) == "ensemble of 2 (t07, t03), flips hflip: 4 forward passes per image"


def test_the_ensemble_temperature_rescales_the_average_alike_in_torch_and_numpy(ensemble):
    rescaled = replace(ensemble, ensemble_temperature=0.6)
    scoring = scoring_network(rescaled)
    assert scoring.ensemble_temperature == 0.6
    images = asymmetric_images(4)
    with torch.no_grad():
        probabilities = scoring(images).numpy()
        logits = [[view.numpy() for view in views] for views in scoring.view_logits(images)]
    twin = averaged_probabilities(logits, [1.5, 0.7], 0.6)
    np.testing.assert_allclose(probabilities, twin, atol=1e-6)
    average = averaged_probabilities(logits, [1.5, 0.7])
    by_hand = average ** (1 / 0.6) / (average ** (1 / 0.6)).sum(axis=1, keepdims=True)  # softmax(log p / T_ens)
    np.testing.assert_allclose(twin, by_hand, atol=1e-12)
    assert np.abs(twin - average).max() > 1e-3  # T_ens counts
    assert (twin.argmax(axis=1) == average.argmax(axis=1)).all()  # and changes no prediction
    assert forward_passes(rescaled) == forward_passes(ensemble) == 4


def test_one_network_without_flips_is_the_single_model_s_graph(members):
    torch.manual_seed(0)
    network = build_model(SPEC).eval()
    scoring = ScoringNetwork([network], [2.0]).eval()
    images = asymmetric_images(2)
    with torch.no_grad():
        assert torch.equal(scoring(images), torch.softmax(network(images) / 2.0, dim=1))


def test_flips_flip_the_width_and_the_height(members):
    both = ModelFile.from_members(members[:1], CLASSES, {}, tta=("hflip", "vflip"))
    scoring = scoring_network(both)
    images = asymmetric_images(2)
    identity, hflipped, vflipped = scoring.views(images)
    assert torch.equal(identity, images)
    assert torch.equal(hflipped, images.flip(3)) and not torch.equal(hflipped, images)
    assert torch.equal(vflipped, images.flip(2)) and not torch.equal(vflipped, images)
    assert torch.equal(hflipped[0, :, :, 0], images[0, :, :, -1])  # the first column is the last one
    with torch.no_grad():
        (logits,) = scoring.view_logits(images)
        network = networks_of(both)[0]
        assert torch.allclose(logits[1], network(images.flip(3)), atol=1e-6)
        assert not torch.allclose(logits[1], logits[0], atol=1e-3)
    # The cached (N, H, W, 3) twin flips the same axes.
    cached = (images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for flip, flipped in (("hflip", hflipped), ("vflip", vflipped)):
        expected = (flipped.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(flipped_images(cached, flip), expected)
    assert forward_passes(both) == 3
    assert scoring_summary(both) == "flips hflip, vflip: 3 forward passes per image"


# ---------------------------------------------------------------- predict.py


def predict(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--device", "cpu", *args])
    return code, out.getvalue(), err.getvalue()


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("new") / "images", {"a": 2, "b": 2, "c": 2})


def test_predict_py_averages_the_members_and_flips_of_an_ensemble_file(ensemble, images, tmp_path):
    model = ensemble.save(tmp_path / "model.pt")
    code, stdout, stderr = predict("--model", str(model), "--images", str(images), "--out", str(tmp_path / "p.csv"))
    assert code == 0, stderr
    assert "; ensemble of 2 (t07, t03), flips hflip: 4 forward passes per image)" in stdout
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["image", "prediction", "probability", *(f"p:{name}" for name in CLASSES)]  # unchanged
    probabilities = np.array([[float(row[f"p:{name}"]) for name in CLASSES] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    pixels = np.stack([decode_image(images / row["image"], SIZE) for row in rows])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = [[net(batch).numpy(), net(batch.flip(3)).numpy()] for net in networks_of(ensemble)]
    np.testing.assert_allclose(probabilities, averaged_probabilities(logits, [1.5, 0.7]), rtol=1e-5, atol=2e-6)

    # --explain: the same CSV, the first member's heat maps, and a line that says so.
    code, stdout, stderr = predict(
        "--model", str(model), "--images", str(images), "--out", str(tmp_path / "e.csv"), "--explain"
    )
    assert code == 0, stderr
    assert "Explain:  Grad-CAM of the first member (t07) alone, for the class the ensemble predicts\n" in stdout
    assert read_rows(tmp_path / "e.csv") == rows
    assert len(list((tmp_path / "e_saliency").rglob("*.png"))) == len(rows)


def test_an_ensemble_file_that_does_not_read_back_is_one_line(ensemble, members, images, tmp_path):
    wrong = replace(members[1], weights={key: value for key, value in members[1].weights.items() if "head" not in key})
    ModelFile.from_members([members[0], wrong], CLASSES, {}).save(tmp_path / "cut.pt")
    state = torch.load(ensemble.save(tmp_path / "model.pt"), weights_only=True)
    torch.save({**state, "tta": ["rotate90"]}, tmp_path / "rotated.pt")
    del state["more_members"][0]["temperature"]
    torch.save(state, tmp_path / "lacking.pt")
    for name, cause in (
        ("cut.pt", "(the weights of member 2 (t03) do not fit its model_spec)"),
        ("rotated.pt", "(unknown test-time flip 'rotate90' (known: hflip, vflip))"),
        ("lacking.pt", "(an ensemble whose member 2 has no temperature)"),
    ):
        code, _, stderr = predict(
            "--model", str(tmp_path / name), "--images", str(images), "--out", str(tmp_path / "x.csv")
        )
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"search/predict.py: error: --model {tmp_path / name} is not a model file"), stderr
        assert cause in stderr, stderr


# ---------------------------------------------------------------- the export and the registered model


def test_an_ensemble_with_flips_exports_to_one_onnx_graph_that_agrees_with_torch(ensemble, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from search.final_model.export import INPUT_NAME, ONNX_FILE, export_onnx, model_input

    scoring = scoring_network(replace(ensemble, ensemble_temperature=0.6))  # T_ens in the graph too
    cached = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    start = time.perf_counter()
    check = export_onnx(scoring, cached, tmp_path / ONNX_FILE)
    print(f"\nensemble of 2 with hflip: export and check {time.perf_counter() - start:.1f} s, {check.line()}")
    assert check.share <= 1 and [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]  # one file
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    images = model_input(cached[:5])
    (got,) = session.run(None, {INPUT_NAME: images})
    with torch.no_grad():
        logits = [[view.numpy() for view in views] for views in scoring.view_logits(torch.from_numpy(images))]
    np.testing.assert_allclose(got, averaged_probabilities(logits, [1.5, 0.7], 0.6), rtol=1e-2, atol=1e-6)


@pytest.mark.slow
def test_a_registered_ensemble_loads_back_through_mlflow_with_the_same_probabilities(ensemble, tmp_path):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    import mlflow
    from search.final_model.registry import log_model

    uri, before = f"sqlite:///{tmp_path}/mlflow.db", mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    experiment = client.create_experiment("ensemble", artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        run_id = client.create_run(experiment).info.run_id
        registered = log_model(ensemble.save(tmp_path / "model.pt"), uri, run_id, "ensemble-classifier")
        loaded = mlflow.pytorch.load_model(f"models:/ensemble-classifier/{registered.version}")
        served = mlflow.pyfunc.load_model(f"models:/ensemble-classifier/{registered.version}")  # what serve runs
    finally:
        mlflow.set_tracking_uri(before)
    images = asymmetric_images(5)  # not the example's batch of 2: the batch dimension stays dynamic
    scoring = scoring_network(ensemble)
    with torch.no_grad():
        got = loaded(images).numpy()
        logits = [[view.numpy() for view in views] for views in scoring.view_logits(images)]
    np.testing.assert_allclose(got, averaged_probabilities(logits, [1.5, 0.7]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(served.predict(images.numpy())), got, atol=1e-6)
