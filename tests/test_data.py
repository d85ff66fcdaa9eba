import os

import numpy as np
import pytest
from helpers import mounted_tmpfs, write_image_folder
from PIL import Image

import trainables.data as data
from trainables.data import DataError, cache_split, index_source, prepare_splits, stratified_split


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = np.repeat(np.arange(3), [40, 20, 10])
    classes = ["a", "b", "c"]
    first = stratified_split(labels, seed=7, classes=classes)
    again = stratified_split(labels, seed=7, classes=classes)
    other = stratified_split(labels, seed=8, classes=classes)
    assert all(np.array_equal(first[s], again[s]) for s in first)
    assert not np.array_equal(first["train"], other["train"])
    together = np.concatenate(list(first.values()))
    assert sorted(together) == list(range(len(labels)))  # every image once
    for label, count in enumerate([40, 20, 10]):
        per_split = {s: int((labels[idx] == label).sum()) for s, idx in first.items()}
        assert per_split["val"] == per_split["test"] == round(count * 0.15)
        assert per_split["train"] == count - 2 * round(count * 0.15)


def test_folder_source_is_indexed_by_class_and_split(image_folder):
    index = index_source(image_folder, seed=0)
    assert index.classes == ["benign", "malignant", "normal"]
    assert sum(len(v) for v in index.splits.values()) == 30
    keys = [{s.key for s in index.splits[split]} for split in data.SPLITS]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert index_source(image_folder, seed=0).splits == index.splits


def test_presplit_folders_are_used_as_given(tmp_path):
    for split, n in [("train", 5), ("val", 2), ("test", 3)]:
        write_image_folder(tmp_path / "ds" / split, {"a": n, "b": n})
    index = index_source(tmp_path / "ds", seed=0)
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 10, "val": 4, "test": 6}
    assert all(s.key.startswith("test/") for s in index.splits["test"])


def test_synthetic_source_has_class_structure():
    index = index_source("synthetic", seed=0)
    assert len(index.classes) == 11
    assert len(index_source("synthetic:4", seed=0).classes) == 4
    first = data.synthetic_image("c03-0007", 11, 32)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, data.synthetic_image("c03-0007", 11, 32))
    # Images of one class resemble each other more than images of another class.
    means = {
        c: np.mean([data.synthetic_image(f"c{c:02d}-{i:04d}", 11, 32).mean((0, 1)) for i in range(5)], 0)
        for c in (0, 5)
    }
    spread = np.abs(data.synthetic_image("c00-0009", 11, 32).mean((0, 1)) - means[0]).sum()
    assert spread < np.abs(means[0] - means[5]).sum()


def test_decoding_converts_every_image_mode(tmp_path):
    arrays = {
        "grey.png": Image.fromarray(np.full((20, 30), 128, np.uint8), "L"),
        "rgba.png": Image.fromarray(np.full((20, 20, 4), 200, np.uint8), "RGBA"),
        "palette.gif": Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).convert("P"),
        "deep.png": Image.fromarray(np.full((25, 25), 60000, np.uint16)),
        "big.jpg": Image.fromarray(np.full((900, 700, 3), 30, np.uint8)),
    }
    for name, image in arrays.items():
        image.save(tmp_path / name)
        decoded = data.decode_image(tmp_path / name, 16)
        assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8, name
    assert data.decode_image(tmp_path / "deep.png", 16).max() == 255  # 16-bit scaled, not clipped to white


def test_the_cache_decodes_once_and_a_second_trial_decodes_nothing(image_folder, tmp_path, monkeypatch):
    index = index_source(image_folder, seed=0)
    calls = []
    real_decode = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, *args: calls.append(path) or real_decode(path, *args))
    first = cache_split(index, "train", 24, tmp_path / "cache")
    assert len(calls) == len(index.splits["train"])
    images = first.images()
    assert images.shape == (len(index.splits["train"]), 24, 24, 3) and images.dtype == np.uint8
    assert not images.flags.writeable  # trials share it read-only

    calls.clear()
    second = cache_split(index, "train", 24, tmp_path / "cache")
    assert calls == [] and second.images_path == first.images_path
    assert np.array_equal(second.images(), images)
    # Another image size is another cache; the test split was never decoded.
    cache_split(index, "train", 32, tmp_path / "cache")
    test_keys = {s.key for s in index.splits["test"]}
    assert not any(str(p.relative_to(image_folder)) in test_keys for p in calls)


def test_a_changed_file_invalidates_the_cache(image_folder, tmp_path):
    index = index_source(image_folder, seed=0)
    before = cache_split(index, "val", 16, tmp_path / "cache").images_path
    changed = image_folder / index.splits["val"][0].key
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    assert cache_split(index, "val", 16, tmp_path / "cache").images_path != before


def test_an_interrupted_decode_leaves_no_cache(image_folder, tmp_path, monkeypatch):
    index = index_source(image_folder, seed=0)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "decode_into", crash)
    with pytest.raises(KeyboardInterrupt):
        cache_split(index, "train", 16, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_images_are_skipped_and_named(image_folder, tmp_path):
    (image_folder / "benign" / "000.png").write_bytes(b"not a png at all")
    index = index_source(image_folder, seed=0)
    split_of_bad = next(s for s, v in index.splits.items() if any(x.key == "benign/000.png" for x in v))
    index, cached, skipped = prepare_splits(index, (split_of_bad,), 16, tmp_path / "cache")
    assert skipped == ["benign/000.png"]
    assert len(cached[split_of_bad]) == len(index.splits[split_of_bad])


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "does not exist"),
        ({"only": 5}, "holds one class"),
        ({"a": 5, "b": 2}, "has 2 image(s)"),
    ],
)
def test_unusable_sources_say_what_to_do(tmp_path, layout, message):
    root = tmp_path / "missing" if not layout else write_image_folder(tmp_path / "ds", layout)
    with pytest.raises(DataError) as raised:
        index_source(root, seed=0)
    assert message in str(raised.value)


def test_a_cache_that_cannot_fit_is_refused_before_decoding_naming_both_sizes(tmp_path):
    """--cache-dir on a 30 MB disk, 256 px: one clear error, and the disk left as it was."""
    index = index_source("synthetic", seed=0)
    with mounted_tmpfs(tmp_path / "small", megabytes=30) as small:
        with pytest.raises(DataError, match=r"needs 105 MB for 256 px images but .*small has 30 MB free"):
            prepare_splits(index, ("train", "val"), 256, small / "cache")
        assert not (small / "cache").exists()


def test_a_disk_that_fills_while_caching_is_an_error_not_sigbus_and_leaves_no_partial_file(tmp_path):
    """The space check passed (another writer filled the disk since): the allocation, not a mapped write, fails."""
    index = index_source("synthetic:2", seed=0)
    with mounted_tmpfs(tmp_path / "small", megabytes=8) as small:
        with pytest.raises(DataError, match=r"the disk of the image cache .* is full"):
            cache_split(index, "train", 512, small)  # 84 images of 768 KB: 63 MB
        assert list(small.iterdir()) == []
        cached = cache_split(index, "val", 64, small)  # what fits still caches
        assert cached.images().shape == (18, 64, 64, 3)


def test_a_folder_with_train_and_val_but_no_test_is_refused(tmp_path):
    write_image_folder(tmp_path / "ds" / "train", {"cat": 4, "dog": 4})
    write_image_folder(tmp_path / "ds" / "val", {"cat": 2, "dog": 2})
    with pytest.raises(DataError, match="holds train/ and val/ but no test/: add test/ with the same class folders"):
        index_source(tmp_path / "ds", seed=0)
    # A class that happens to be called 'train' is still a class.
    write_image_folder(tmp_path / "vehicles", {"bus": 4, "car": 4, "train": 4})
    assert index_source(tmp_path / "vehicles", seed=0).classes == ["bus", "car", "train"]
