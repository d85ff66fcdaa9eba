"""A CSV manifest as a data source: one row per image, with its label and, optionally, its patient and split.

    path,label,group,split
    scans/p001_a.png,benign,p001,train
    scans/p001_b.png,benign,p001,train
    scans/p002_a.png,malignant,p002,test

`path` is relative to the manifest's folder (or absolute); `group` is the patient (or
study) id; `split` is train, val or test. Without a split column the rows are split
stratified by label and grouped by patient, so that no patient's images end up in two
splits: two scans of one patient in train and test would inflate every test number.
Without a group column each image is its own group. Other columns are refused unless declared as subgroups
(run.py --subgroups site,sex): their values, never empty, are read into each sample's attributes, for results
per subgroup. Every problem is a one-line DataError.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.data import SPLITS, DataError, DatasetIndex, Sample, stratified_split
from trainables.privacy import patient_hash, patient_hashes, patient_salt

COLUMNS = ("path", "label", "group", "split")
REQUIRED = ("path", "label")
FOLDS = 7
"""Patients are cut into 7 folds: one for test, one for val, five for train (about 71/14/14 % of the images)."""
SHOWN = 3
"""Examples an error names."""
FILL_IN = {
    "path": "fill it in or remove the row",
    "label": "fill it in or remove the row",
    # Not "drop the column": on patient data, splitting by image puts one patient's scans in train and test.
    "group": "fill in each image's patient (or study) id: one id for all the images of a patient, and an id of its "
    "own for an image whose patient has no other",
}
"""What a row without a value in that column needs."""
OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "bars"}
"""Separators a header may use instead of commas: named in the refusal, never read."""


@dataclass(frozen=True)
class Row:
    line: int
    """The row's line in the file, for error messages."""
    key: str
    """The image's path relative to the manifest's folder (absolute only for a file outside it)."""
    label: str
    group: str | None
    split: str | None
    attributes: tuple[tuple[str, str], ...] = ()
    """(column, value) of each declared subgroup column."""


def manifest_index(path: Path, seed: int, subgroups: tuple[str, ...] = ()) -> DatasetIndex:
    """Index a manifest: its rows checked, then split by its split column or by patient (seeded). `subgroups`: the
    extra columns declared (run.py --subgroups), read into each sample's attributes."""
    rows, columns = read_rows(path, subgroups)
    check_rows(path, rows)
    check_attributes(path, rows, subgroups)
    classes = sorted({row.label for row in rows})
    if len(classes) < 2:
        raise DataError(f"manifest {path} names one class ({classes[0]}): a classifier needs at least 2")
    label_of = {name: label for label, name in enumerate(classes)}
    samples = [Sample(row.key, label_of[row.label], row.group, attributes=row.attributes) for row in rows]
    if "group" in columns:
        patient_salt()  # read (or made) now, before anything is written: every record of a patient is hashed with it
    if "split" in columns:
        return DatasetIndex(str(path), classes, given_splits(path, rows, samples, classes), split_by="manifest_column")
    labels = np.array([s.label for s in samples])
    if "group" in columns:
        parts = grouped_split(labels, [row.group or "" for row in rows], seed, classes)
    else:  # every image its own group: the folder sources' stratified split
        parts = stratified_split(labels, seed, classes)
    splits = {split: [samples[i] for i in parts[split]] for split in SPLITS}
    return DatasetIndex(str(path), classes, splits, split_by="patients" if "group" in columns else "stratified")


# ---------------------------------------------------------------- reading


def read_rows(path: Path, subgroups: tuple[str, ...] = ()) -> tuple[list[Row], list[str]]:
    """The manifest's rows and its header's columns; blank lines are skipped. `subgroups`: the declared extra
    columns."""
    if not path.is_file():
        raise DataError(
            f"manifest {path} does not exist: check the path, or pass --data a folder of class folders "
            f"(or --data synthetic)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not a column name
    except UnicodeDecodeError:
        raise DataError(f"manifest {path} is not UTF-8 text: save it as CSV UTF-8") from None
    reader = csv.reader(io.StringIO(text))
    lines = [(reader.line_num, cells) for cells in reader if any(cell.strip() for cell in cells)]
    if not lines:
        raise DataError(
            f"manifest {path} is empty: write a header line path,label (optionally group and split), "
            f"then one row per image"
        )
    columns = [cell.strip().lower() for cell in lines[0][1]]
    check_separator(path, lines[0][1])
    check_columns(path, columns, subgroups)
    if len(lines) == 1:
        raise DataError(f"manifest {path} has a header but no rows: add one row per image")
    ragged = [number for number, cells in lines[1:] if len(cells) != len(columns)]
    if ragged:
        raise DataError(
            f"{len(ragged)} row(s) of manifest {path} do not have the header's {len(columns)} columns "
            f"(line {shown(ragged)}): give every row a value per column (quote values that hold a comma)"
        )
    root = path.parent
    rows = []
    for number, cells in lines[1:]:
        values = dict(zip(columns, (cell.strip() for cell in cells), strict=True))
        rows.append(
            Row(
                line=number,
                key=sample_key(root, values["path"]) if values["path"] else "",
                label=values["label"],
                group=values.get("group"),
                split=values["split"].lower() if "split" in values else None,
                attributes=tuple((column, values[column]) for column in subgroups),
            )
        )
    return rows, columns


def check_separator(path: Path, header: list[str]) -> None:
    """A header that is one cell naming our columns with another separator between them (a spreadsheet's CSV export
    in locales where the comma is the decimal mark writes ';'): the file is refused, naming the separator. It is not
    read with that separator instead: a row's paths may hold it, and the same file must mean the same on every
    machine."""
    if len(header) != 1:
        return
    for separator, called in OTHER_SEPARATORS.items():
        names = [cell.strip().lower() for cell in header[0].split(separator)]
        if len(names) > 1 and any(name in COLUMNS for name in names):
            raise DataError(
                f"manifest {path} separates its columns with {called} ({header[0].strip()!r}), not with commas: "
                f"save it as comma-separated CSV (a spreadsheet's 'CSV UTF-8 (comma delimited)', or LibreOffice's "
                f"field delimiter ','), then run again"
            )


def check_columns(path: Path, columns: list[str], subgroups: tuple[str, ...] = ()) -> None:
    """The header has path and label, each column once, and no column that is neither ours nor a declared
    subgroup: an unknown column is more often a typo ('lable') or patient data than something to ignore."""
    unknown = [c for c in columns if c not in COLUMNS and c not in subgroups]
    missing = [c for c in REQUIRED if c not in columns]
    undeclared = [c for c in subgroups if c not in columns]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    problems = []
    if unknown:
        problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
    if missing:
        problems.append(f"no {' or '.join(missing)} column")
    if undeclared:
        problems.append(f"no column {', '.join(map(repr, undeclared))}, which --subgroups declares")
    if repeated:
        problems.append(f"column(s) {', '.join(repeated)} given twice")
    if problems:
        declared = f", and the subgroup column(s) declared: {', '.join(subgroups)}" if subgroups else ""
        keep = "; to keep another column for results per subgroup, declare it: run.py --subgroups NAME[,NAME]"
        raise DataError(
            f"manifest {path}: {'; '.join(problems)}: its header takes {', '.join(COLUMNS)} "
            f"(path and label required; group: the patient or study id; split: train, val or test){declared}"
            f"{keep if unknown else ''}"
        )


def sample_key(root: Path, value: str) -> str:
    """A row's path as a sample key: relative to the manifest's folder, so that digests and split lists are the
    same on every machine the data is copied to. Only a file outside that folder keeps its absolute path."""
    path = os.path.normpath(value)
    if not os.path.isabs(path):
        return Path(path).as_posix()
    relative = os.path.relpath(path, root)
    outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
    return path if outside else Path(relative).as_posix()


def check_rows(path: Path, rows: list[Row]) -> None:
    """Every row has a path, a label, a group and a known split where the columns exist, a path of its own, and
    an existing file; no two labels differ only in case: the first problem found, with up to three examples."""
    where = f"of manifest {path}"
    for name, field in (("path", "key"), ("label", "label"), ("group", "group")):
        lines = [row.line for row in rows if getattr(row, field) == ""]  # a group of None: no group column
        if lines:
            raise DataError(f"{len(lines)} row(s) {where} have no {name} (line {shown(lines)}): {FILL_IN[name]}")
    check_label_case(path, rows)
    bad_splits = [row for row in rows if row.split is not None and row.split not in SPLITS]
    if bad_splits:
        examples = ", ".join(f"line {row.line}: {row.split!r}" for row in bad_splits[:SHOWN])
        raise DataError(
            f"{len(bad_splits)} row(s) {where} have a split other than {', '.join(SPLITS)} ({examples}): "
            f"write one of those, or drop the split column to have the rows split by patient"
        )
    lines_of: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        lines_of[row.key].append(row.line)
    repeated = [(key, lines) for key, lines in lines_of.items() if len(lines) > 1]
    if repeated:
        examples = ", ".join(f"{key} (lines {shown(lines)})" for key, lines in repeated[:SHOWN])
        raise DataError(
            f"{len(repeated)} path(s) appear more than once in manifest {path} ({examples}): "
            f"list each image once, with one label"
        )
    missing = [row.key for row in rows if not (path.parent / row.key).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} file(s) listed in manifest {path} do not exist (e.g. {shown(missing)}): paths are "
            f"relative to {path.parent} (or absolute); fix them or remove those rows"
        )


def check_attributes(path: Path, rows: list[Row], subgroups: tuple[str, ...]) -> None:
    """Every row has a value in every declared subgroup column: an empty one would be a subgroup of its own,
    reported as if it meant something. Refused per column, naming up to three rows."""
    for column in subgroups:
        lines = [row.line for row in rows if dict(row.attributes)[column] == ""]
        if lines:
            raise DataError(
                f"{len(lines)} row(s) of manifest {path} have no {column} (line {shown(lines)}): fill it in, or write "
                f"'unknown' where it is not known (a subgroup of its own)"
            )


def check_label_case(path: Path, rows: list[Row]) -> None:
    """Two labels that differ only in case ('Benign', 'benign') are one class written two ways, almost always: as two
    classes the model would learn to tell them apart. Refused, naming both spellings and a row of each."""
    first_row: dict[str, Row] = {}
    for row in rows:
        first_row.setdefault(row.label, row)
    spellings: dict[str, list[Row]] = defaultdict(list)
    for label, row in first_row.items():
        spellings[label.casefold()].append(row)
    clashes = [found for found in spellings.values() if len(found) > 1]
    if clashes:
        examples = "; ".join(" and ".join(f"{row.label!r} (line {row.line})" for row in found) for found in clashes)
        raise DataError(
            f"manifest {path} has labels that differ only in case: {examples}: write each class one way in the label "
            f"column (labels are case-sensitive class names)"
        )


def shown(items: list) -> str:
    """The first few items, comma-separated, with '...' when there are more."""
    return ", ".join(map(str, items[:SHOWN])) + (", ..." if len(items) > SHOWN else "")


# ---------------------------------------------------------------- a split column, used as given


def given_splits(path: Path, rows: list[Row], samples: list[Sample], classes: list[str]) -> dict[str, list[Sample]]:
    """The manifest's own split, refused where it leaks a patient or leaves a split or a class empty."""
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for row, sample in zip(rows, samples, strict=True):
        splits[str(row.split)].append(sample)
    spanning = patients_in_several_splits(rows)
    if spanning:
        salt = patient_salt()  # the patient by its hash (never its id, which this line would print) and its rows
        examples = ", ".join(
            f"{patient_hash(group, salt)} in {' and '.join(where)} (line {shown(lines)})"
            for group, where, lines in spanning[:SHOWN]
        )
        raise DataError(
            f"{len(spanning)} patient group(s) of manifest {path} have images in more than one split ({examples}): "
            f"a patient's images must share one split, or the test scores are inflated; fix the split column, "
            f"or drop it to have the rows split by patient"
        )
    for split, members in splits.items():
        if not members:
            raise DataError(f"manifest {path} puts no image in {split}: give the split column some {split} rows")
        present = {sample.label for sample in members}
        absent = [name for label, name in enumerate(classes) if label not in present]
        if absent:
            raise DataError(
                f"manifest {path} puts no image of class(es) {shown(absent)} in {split}: every class needs images in "
                f"train, val and test; move some rows, or drop the split column to have them split by patient"
            )
    return splits


def patients_in_several_splits(rows: list[Row]) -> list[tuple[str, list[str], list[int]]]:
    """(group, its splits in train/val/test order, its rows' lines) for each patient whose images span splits, in
    the order of their first rows."""
    splits_of: dict[str, set[str]] = defaultdict(set)
    lines_of: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        if row.group is not None:
            splits_of[row.group].add(str(row.split))
            lines_of[row.group].append(row.line)
    return [
        (group, [split for split in SPLITS if split in where], lines_of[group])
        for group, where in splits_of.items()
        if len(where) > 1
    ]


# ---------------------------------------------------------------- a split by patient


def grouped_split(labels: np.ndarray, groups: list[str], seed: int, classes: list[str]) -> dict[str, np.ndarray]:
    """Train/val/test indices, stratified by label and grouped by patient, seeded: no patient in two splits,
    every class in every split.

    scikit-learn's StratifiedGroupKFold cuts the patients into FOLDS folds of alike class mix; the fold holding
    the most classes is test, the next val, the rest train. With few patients in a class a fold can still miss
    it: such a split then gets a patient of that class moved in, from a split that keeps every class it had.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # deferred: a second of imports, for this split alone

    group_ids = np.unique(np.asarray(groups), return_inverse=True)[1]
    require_groups_per_class(labels, group_ids, groups, classes)
    folds = min(FOLDS, int(group_ids.max()) + 1, int(np.bincount(labels).max()))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": handled below
        warnings.simplefilter("ignore", UserWarning)
        held_out = [fold for _, fold in splitter.split(labels, labels, group_ids)]
    richest = sorted(held_out, key=lambda fold: -len(np.unique(labels[fold])))  # stable: seeded order among equals
    where = np.full(int(group_ids.max()) + 1, SPLITS.index("train"))  # each patient's split
    where[group_ids[richest[0]]] = SPLITS.index("test")
    where[group_ids[richest[1]]] = SPLITS.index("val")
    fill_every_split(where, labels, group_ids, seed, classes)
    in_split = where[group_ids]
    return {split: np.flatnonzero(in_split == number) for number, split in enumerate(SPLITS)}


def require_groups_per_class(labels: np.ndarray, group_ids: np.ndarray, groups: list[str], classes: list[str]) -> None:
    for label, name in enumerate(classes):
        patients = np.unique(group_ids[labels == label])
        if len(patients) < len(SPLITS):
            # named by their hashes: this line is printed, and a patient id is never written (trainables.privacy)
            names = patient_hashes({groups[i] for i in np.flatnonzero(labels == label)}, patient_salt())
            raise DataError(
                f"class {name!r} has its images in {len(patients)} patient(s) ({shown(names)}): a split by patient "
                f"into train, val and test needs at least {len(SPLITS)}; add patients of {name!r} or drop the class"
            )


def fill_every_split(
    where: np.ndarray, labels: np.ndarray, group_ids: np.ndarray, seed: int, classes: list[str]
) -> None:
    """Move whole patients (their smallest, seeded among equals) into any split that lacks a class, each from a
    split that keeps an image of every class it had; `where` (each group's split) is changed in place."""
    holds = np.zeros((len(where), len(classes)), dtype=bool)  # holds[g, c]: patient g has an image of class c
    holds[group_ids, labels] = True
    size = np.bincount(group_ids, minlength=len(where))
    tie_break = np.random.default_rng(seed).permutation(len(where))
    train = SPLITS.index("train")
    for target in (SPLITS.index("test"), SPLITS.index("val"), train):
        for label in range(len(classes)):
            patients = patients_per_class(holds, where)  # [split, class]
            if patients[target, label]:
                continue
            movable = [
                group
                for group in np.flatnonzero(holds[:, label] & (where != target))
                if (patients[where[group], holds[group]] >= 2).all()  # its split keeps every class it had
            ]
            if not movable:
                raise DataError(
                    f"class {classes[label]!r} cannot have images in {SPLITS[target]} without splitting a patient: "
                    f"its patients also hold the only images of other classes there; add patients of "
                    f"{classes[label]!r} or drop the class"
                )
            # from train first (the largest split), the smallest patient: the proportions barely move
            chosen = min(movable, key=lambda g: (where[g] != train, size[g], tie_break[g]))
            where[chosen] = target


def patients_per_class(holds: np.ndarray, where: np.ndarray) -> np.ndarray:
    """How many patients of each split hold an image of each class: [split, class]."""
    return np.stack([holds[where == split].sum(axis=0) for split in range(len(SPLITS))])
