"""The leakage check: exact and near-duplicate images across splits, its cache, its report, and --on-leak fail."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_script, structured_image, write_manifest, write_patient_images
from PIL import Image

import trainables.leakage as leakage
from search.errors import UsageError
from search.records.study_config import StudyConfig
from search.study.leaks import check_leaks
from trainables.data import cache_split, index_source, synthetic_image
from trainables.leakage import cross_split_duplicates, fingerprints, split_fingerprints


def jpeg_again(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def brighter(image: np.ndarray, by: int = 2) -> np.ndarray:
    return np.clip(image.astype(np.int16) + by, 0, 255).astype(np.uint8)


def distinct(start: int, count: int, size: int = 48) -> np.ndarray:
    return np.stack([structured_image(start + i, size) for i in range(count)])


def test_copies_across_splits_are_found_and_distinct_images_are_not():
    train, val, test = distinct(0, 60), distinct(100, 20), distinct(200, 20)
    val[3] = train[5]  # an exact copy
    test[7] = jpeg_again(train[9])  # re-saved as JPEG
    test[8] = brighter(val[11])  # a brightness shift
    test[9] = test[10]  # a copy within one split: not leakage
    found = cross_split_duplicates({"train": fingerprints(train), "val": fingerprints(val), "test": fingerprints(test)})
    pairs = {(d.first_split, d.first, d.second_split, d.second, d.kind) for d in found}
    assert pairs == {("train", 5, "val", 3, "exact"), ("train", 9, "test", 7, "near"), ("val", 11, "test", 8, "near")}
    assert all(d.distance <= leakage.NEAR_BITS for d in found)


def test_the_perceptual_hash_tolerates_recompression_and_brightness_but_not_another_image():
    images = distinct(0, 40)
    original = fingerprints(images)
    for altered in (np.stack([jpeg_again(i, 60) for i in images]), np.stack([brighter(i, 8) for i in images])):
        altered_prints = fingerprints(altered)
        assert (leakage.popcount(original.perceptual ^ altered_prints.perceptual) <= leakage.NEAR_BITS).all()
        for a, b in zip(original.thumbnails, altered_prints.thumbnails, strict=True):
            assert leakage.correlation(a, b) >= leakage.MIN_CORRELATION
    hashes = original.perceptual
    apart = leakage.popcount(hashes[:, None] ^ hashes[None, :])[np.triu_indices(len(images), 1)]
    assert apart.min() > leakage.NEAR_BITS and 24 < apart.mean() < 40  # about half the bits of unrelated images


def test_a_low_contrast_image_re_saved_as_jpeg_is_found_though_its_hash_moves_several_bits():
    # The synthetic images' stripes are faint: JPEG at quality 60 flips about 10 of their 64 hash bits at 32 px.
    original = synthetic_image("c00-0000", 3, 64)
    copy = jpeg_again(original, 60)
    train = np.stack([synthetic_image(f"c00-{i:04d}", 3, 32) for i in range(1, 20)] + [decode_small(original)])
    test = np.stack([decode_small(copy), synthetic_image("c01-0000", 3, 32)])
    (found,) = cross_split_duplicates({"train": fingerprints(train), "test": fingerprints(test)})
    assert (found.first, found.second, found.kind) == (19, 0, "near") and 4 < found.distance <= leakage.NEAR_BITS


def decode_small(image: np.ndarray, size: int = 32) -> np.ndarray:
    """As the cache decodes a file: resized to size x size."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


def test_a_shared_hash_without_alike_thumbnails_is_no_duplicate():
    # Two synthetic images of one class, stripes out of phase: their pHash is the same (the stripes lie beyond its
    # 8 x 8 lowest frequencies), their thumbnails are anti-correlated.
    first, second = (fingerprints(synthetic_image(key, 11, 224)[None]) for key in ("c01-0001", "c01-0052"))
    assert first.perceptual[0] == second.perceptual[0]
    assert leakage.correlation(first.thumbnails[0], second.thumbnails[0]) < 0
    assert not cross_split_duplicates({"train": first, "test": second})


def test_a_mirrored_copy_is_found_under_the_flips_training_makes_and_only_those():
    train, test = distinct(0, 30), distinct(100, 10)
    test[1] = train[4][:, ::-1]  # left-right, as hflip makes it
    test[2] = jpeg_again(train[7][::-1])  # upside down, then re-saved
    test[3] = train[9][::-1, ::-1]  # both flips: turned by 180 degrees
    test[4] = train[11]  # an exact copy: reported once, as exact, whatever the flips
    prints = {"train": fingerprints(train), "test": fingerprints(test)}

    def found(flips: tuple[str, ...]) -> set:
        return {(d.first, d.second, d.kind, d.flip) for d in cross_split_duplicates(prints, flips=flips)}

    assert found(()) == {(11, 4, "exact", "")}
    assert found(("hflip",)) == {(11, 4, "exact", ""), (4, 1, "mirror", "hflip")}
    assert found(tuple(leakage.FLIPS)) == {
        (11, 4, "exact", ""),
        (4, 1, "mirror", "hflip"),
        (7, 2, "mirror", "vflip"),
        (9, 3, "mirror", "hflip+vflip"),
    }


def test_a_symmetric_image_copied_is_one_exact_pair_and_distinct_mirrors_stay_apart():
    image = distinct(0, 1)[0]
    symmetric = np.concatenate([image[:, :24], image[:, :24][:, ::-1]], axis=1)  # its own mirror image
    train, test = np.stack([symmetric, *distinct(1, 20)]), np.stack([symmetric, *distinct(40, 20)])
    (pair,) = cross_split_duplicates({"train": fingerprints(train), "test": fingerprints(test)}, flips=("hflip",))
    assert (pair.first, pair.second, pair.kind) == (0, 0, "exact")
    images = distinct(0, 40)
    mirrored = leakage.mirrored_hashes(fingerprints(images), "hflip")
    apart = leakage.popcount(mirrored[:, None] ^ fingerprints(images).perceptual[None, :])
    assert apart.min() > leakage.NEAR_BITS  # no structured image is close to another's mirror, nor to its own


def test_the_flips_checked_are_those_the_space_can_draw(tmp_path):
    from search.study.leaks import training_flips
    from search.study.spaces import load_space

    root = Path(__file__).resolve().parents[1]
    assert training_flips(load_space(root / "spaces" / "cnn.yaml", "cnn")) == ("hflip",)
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  hflip: {type: fixed, value: 0.0}\n  lr: {type: float, low: 0.001, high: 0.01}\n")
    assert training_flips(load_space(space, "cnn")) == ()
    space.write_text("parameters:\n  vflip: {type: float, low: 0.0, high: 0.5}\n")  # hflip left at its 0.5
    assert training_flips(load_space(space, "cnn")) == ("hflip", "vflip", "hflip+vflip")


def test_exact_copies_match_many_to_many_without_comparing_every_pair():
    a = np.array([5, 7, 7, 9], dtype=np.uint64)
    b = np.array([7, 1, 7, 5], dtype=np.uint64)
    assert sorted(leakage.exact_pairs(a, b)) == [(0, 3), (1, 0), (1, 2), (2, 0), (2, 2)]


def test_every_image_size_has_a_fingerprint():
    for size in (16, 40, 64, 100):
        prints = fingerprints(distinct(0, 3, size))
        assert prints.perceptual.dtype == prints.exact.dtype == np.uint64 and len(set(prints.perceptual)) == 3
        assert prints.thumbnails.shape == (3, 32, 32) and prints.thumbnails.dtype == np.uint8
    assert len(fingerprints(np.zeros((0, 32, 32, 3), np.uint8))) == 0


def test_hashes_are_kept_beside_the_cache_and_read_back(tmp_path, monkeypatch):
    rows = write_patient_images(tmp_path / "scans", {f"p{i}": ("ab"[i % 2], 2) for i in range(8)}, size=32)
    index = index_source(write_manifest(tmp_path / "m.csv", "path,label", [r.rsplit(",", 1)[0] for r in rows]), seed=0)
    cache = tmp_path / "cache"
    train = cache_split(index, "train", 32, cache)
    from_cache, decoded = split_fingerprints(index, "train", 32, cache, train)
    assert decoded.all() and np.array_equal(from_cache.perceptual, fingerprints(train.images()).perceptual)
    test, _ = split_fingerprints(index, "test", 32, cache)  # decoded in memory: the image cache gets no test file
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.npy")) == ["train"]
    assert sorted(p.name.split("-")[0] for p in (cache / "hashes").iterdir()) == ["test", "train"]

    monkeypatch.setattr(leakage, "fingerprints", lambda images: pytest.fail("fingerprinted twice"))
    again = split_fingerprints(index, "train", 32, cache, train)[0]
    assert np.array_equal(again.exact, from_cache.exact) and np.array_equal(again.thumbnails, from_cache.thumbnails)
    assert np.array_equal(split_fingerprints(index, "test", 32, cache)[0].perceptual, test.perceptual)


def checked(manifest: Path, cache: str, on_leak: str):
    """The manifest indexed, train and val cached, and the leakage check run: (index, report)."""
    index = index_source(manifest, seed=0)
    cached = {split: cache_split(index, split, 32, cache) for split in ("train", "val")}
    return index, check_leaks(index, cached, 32, cache, on_leak)


def test_the_check_warns_or_refuses_in_one_line(tmp_path, capsys):
    rows = write_patient_images(tmp_path / "scans", {f"p{i}": ("ab"[i % 2], 2) for i in range(12)}, size=32)
    manifest = write_manifest(tmp_path / "m.csv", "path,label", [r.rsplit(",", 1)[0] for r in rows])
    cache = str(tmp_path / "cache")
    index, report = checked(manifest, cache, "fail")
    assert not report.duplicates and "no exact or near-duplicate images" in capsys.readouterr().out

    original, copy = index.splits["train"][0].key, index.splits["test"][0].key
    shutil.copy(tmp_path / original, tmp_path / copy)  # the test image is now a train image
    _, report = checked(manifest, cache, "warn")
    line = capsys.readouterr().out.strip()
    assert line.startswith("warning: 1 pair(s) of duplicate images across splits (train-test: 1 exact)")
    assert f"train:{original} = test:{copy}" in line and "\n" not in line
    assert report.counts()["leak_exact_train_test"] == 1 and sum(report.counts().values()) == 1
    assert report.table().splitlines()[1] == f"exact,0,train,{original},test,{copy},"
    with pytest.raises(UsageError, match=r"^1 pair\(s\) of duplicate images .* --on-leak warn to go on$"):
        checked(manifest, cache, "fail")


def test_a_mirrored_copy_is_warned_about_counted_and_listed_as_a_mirror(tmp_path, capsys):
    rows = write_patient_images(tmp_path / "scans", {f"p{i}": ("ab"[i % 2], 2) for i in range(12)}, size=32)
    manifest = write_manifest(tmp_path / "m.csv", "path,label", [r.rsplit(",", 1)[0] for r in rows])
    index = index_source(manifest, seed=0)
    original, copy = index.splits["train"][0].key, index.splits["test"][0].key
    Image.open(tmp_path / original).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / copy)
    cache = str(tmp_path / "cache")
    cached = {split: cache_split(index, split, 32, cache) for split in ("train", "val")}
    report = check_leaks(index, cached, 32, cache, "warn", ("hflip",))
    line = capsys.readouterr().out.strip()
    assert line.startswith("warning: 1 pair(s) of duplicate images across splits (train-test: 1 mirror)"), line
    assert f"train:{original} ~ test:{copy} (hflip)" in line
    assert report.counts()["leak_mirror_train_test"] == 1 and sum(report.counts().values()) == 1
    assert len(report.counts()) == 9 and report.counts()["leak_exact_train_test"] == 0  # the six, and three more
    kind, bits, *pair = report.table().splitlines()[1].split(",")
    assert kind == "mirror" and int(bits) <= leakage.NEAR_BITS and pair == ["train", original, "test", copy, "hflip"]
    assert not check_leaks(index, cached, 32, cache, "warn").duplicates  # a space that never flips: no leak
    assert "no exact or near-duplicate images across train, val and test\n" in capsys.readouterr().out


def test_a_test_image_that_will_not_decode_is_left_out_of_the_check(tmp_path, capsys):
    rows = write_patient_images(tmp_path / "scans", {f"p{i}": ("ab"[i % 2], 2) for i in range(12)}, size=32)
    manifest = write_manifest(tmp_path / "m.csv", "path,label", [r.rsplit(",", 1)[0] for r in rows])
    broken = index_source(manifest, seed=0).splits["test"][0].key
    (tmp_path / broken).write_bytes(b"not an image")
    index, report = checked(manifest, str(tmp_path / "cache"), "fail")
    assert broken not in report.keys["test"] and len(report.keys["test"]) == len(index.splits["test"]) - 1
    assert "note: 1 test image(s) would not decode" in capsys.readouterr().out
    assert not list((tmp_path / "cache" / "hashes").glob("test-*"))  # hashed again once the file is mended


def test_on_leak_is_a_setting_of_the_study_that_round_trips(tmp_path):
    from helpers import study_config

    from search.records.study_config import ConfigError

    config = study_config(on_leak="fail")
    assert StudyConfig.from_yaml(config.to_yaml(), "study.yaml").on_leak == "fail"
    older = "\n".join(line for line in config.to_yaml().splitlines() if not line.startswith("on_leak"))
    assert StudyConfig.from_yaml(older, "study.yaml").on_leak == "warn"  # a study from before the check
    with pytest.raises(ConfigError, match="--on-leak 'sometimes': choose one of warn, fail"):
        study_config(on_leak="sometimes")


@pytest.mark.slow  # about 15 to 40 s on two cores: the check runs once torch and Ray are imported
def test_a_planted_duplicate_with_on_leak_fail_stops_the_study_before_any_run(tmp_path):
    rows = write_patient_images(tmp_path / "scans", {f"p{i}": ("abc"[i % 3], 2) for i in range(9)}, size=32)
    # p0-p2 (classes a, b, c) in train, p3-p5 in val, p6-p8 in test
    rows = [f"{row},{('train', 'val', 'test')[int(row.rsplit(',p', 1)[1]) // 3]}" for row in rows]
    shutil.copy(tmp_path / "scans" / "p0_0.png", tmp_path / "scans" / "p6_1.png")  # a train image again in test
    manifest = write_manifest(tmp_path / "m.csv", "path,label,group,split", rows)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_script(
        "run.py",
        *["--model", "vit", "--smoke", "--no-pretrained", "--trials", "1", "--on-leak", "fail"],
        *["--data", str(manifest), "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")],
        *["--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("search/run.py: error: 1 pair(s) of duplicate images across splits (train-test:")
    assert "train:scans/p0_0.png = test:scans/p6_1.png" in result.stderr
    from mlflow.tracking import MlflowClient

    assert not MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert not (tmp_path / "ray").exists()
