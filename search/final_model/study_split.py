"""The retrain's split: the study's own, as its split.json recorded it, with the labels the data gives now.

Indexing the data again with the study's seed gives the study's split only while the data is
unchanged: a manifest's group column edited, or one more file in a class folder, and the same
seed cuts other splits, so the retrain would test on images the search trained on. The split's
membership therefore comes from the study's record (search.tracking.study_run.read_split_record):
the test split is exactly the study's test images, train and val exactly its train and val.
`retrain_index` is the one place a record becomes the index the retrain uses.
"""

from __future__ import annotations

from dataclasses import replace

from search.errors import UsageError
from search.records.split import SplitSpec
from search.records.study_config import SMOKE
from search.tracking.schema import SPLIT_FILE
from search.tracking.study_run import SplitRecord
from trainables.data import SPLITS, DatasetIndex, Sample, subsample
from trainables.manifest import shown
from trainables.privacy import patient_hash, patient_salt

TRAINED_ON = ("train", "val")
"""The splits the search trained or scored on: never tested on."""


def retrain_index(data: DatasetIndex, split: SplitSpec, record: SplitRecord | None, unchecked: str) -> DatasetIndex:
    """The split the retrain uses, its notes printed. `data` is the data as it is now, indexed with the seed of
    `split` (the study's); `record` the study's split.json, or None, `unchecked` then saying why there is none to
    follow."""
    if record is None:
        print(
            f"note: {unchecked}: the split could not be checked against the study's record ({SPLIT_FILE}); the data "
            f"is split again with the study's seed {split.seed}, which gives the study's split only if the data is "
            f"unchanged",
            flush=True,
        )
        return subsample(data, SMOKE.per_class or {}, split.seed) if split.smoke else data  # the study's subsample
    index, notes = index_from_record(data, record, smoke=split.smoke)
    for note in notes:
        print(note, flush=True)
    return index


def index_from_record(data: DatasetIndex, record: SplitRecord, *, smoke: bool) -> tuple[DatasetIndex, list[str]]:
    """`data` split as the study recorded it (each split its recorded keys, in the study's order), with the labels
    and patients the data has now; and the notes to print. A UsageError where an image the study split is no longer
    in the data."""
    samples = {sample.key: sample for split in data.splits.values() for sample in split}
    split_of = record.split_of()
    missing = [key for key in split_of if key not in samples]
    if missing:
        raise UsageError(
            f"{len(missing)} of the {len(split_of)} images study {record.study!r} split are not in {data.source} now "
            f"(e.g. {shown(missing)}): the retrain tests on the study's own test images only; put them back, or "
            f"run a new study on the data as it is"
        )
    index = replace(data, splits={split: [samples[key] for key in record.images[split]] for split in SPLITS})
    notes = []
    change = record.manifest_change(data.source)
    if change:
        notes.append(
            f"note: {change}; every image it split is still there: the retrain keeps the study's split (its "
            f"{SPLIT_FILE}), with the labels the manifest gives now"
        )
    new = [key for key in samples if key not in split_of and key not in record.skipped]
    if new and not smoke:  # a --smoke study drew a subsample: the rest it never had by design
        notes.append(
            f"note: {len(new)} image(s) of {data.source} are not in the split of study {record.study!r} (e.g. "
            f"{shown(new)}): added since it ran; left out, as the study never had them"
        )
    spanning = patients_across_test(index.splits)
    if spanning:
        notes.append(
            f"warning: by the group column as it is now, {len(spanning)} patient(s) have images in the study's test "
            f"split and in its train or val (e.g. {shown(spanning)}): if those are one patient's, the study's and "
            f"this retrain's test scores are inflated; run a new study to split by the groups as they are"
        )
    return index, notes


def patients_across_test(splits: dict[str, list[Sample]]) -> list[str]:
    """The patients with images in test and in train or val, each as its salted hash and one of its test images
    ('p-1f0c… (a/x.png)'): never the raw id, which this warning would print."""
    tested = {sample.group: sample.key for sample in reversed(splits["test"]) if sample.group is not None}
    trained = {sample.group for split in TRAINED_ON for sample in splits[split] if sample.group is not None}
    spanning = tested.keys() & trained
    if not spanning:
        return []
    salt = patient_salt()
    return sorted(f"{patient_hash(group, salt)} ({tested[group]})" for group in spanning)
