"""The checks a study's inputs pass before anything heavy loads or anything is written (no torch, no Ray, no MLflow).

The store's address, the storage of the trials (a URI answers, its bucket exists, this machine
may write there), a name not taken, the search space, the data source and the model it implies;
on --resume, that the data still splits as the study recorded (its split.json: the one MLflow read
here, once --resume has loaded MLflow to read the study). Every problem is a one-line UsageError.
"""

from __future__ import annotations

from dataclasses import dataclass

from search.errors import UsageError
from search.records.study_config import StudyConfig
from search.study.spaces import Space, SpaceError, load_space
from search.study.storage import check_storage, exists
from search.tracking.claim import name_taken
from search.tracking.schema import check_store_uri
from trainables.data import DataError, DatasetIndex, index_source, subsample
from trainables.privacy import paths_naming_their_patient
from trainables.spec import ModelSpec, validate_spec


@dataclass(frozen=True)
class CheckedStudy:
    """What the checks found: the parsed space, the split data index, the model it implies."""

    space: Space
    index: DatasetIndex
    """Split (and, for --smoke, subsampled) as the study will use it."""
    spec: ModelSpec
    """The study's model; each trial adds its own knobs."""
    resume_run_id: str | None = None
    """The parent run of the interrupted study this one continues."""
    warm_start: tuple[dict, ...] = ()
    """Configurations to try first: an earlier study's best (--warm-start)."""


def check_study(config: StudyConfig, resume_run_id: str | None = None) -> CheckedStudy:
    """The inputs that need neither torch nor Ray: store address, trial storage, name, space, data layout, model."""
    check_store_uri(config.tracking_uri)
    check_storage(config.storage_path)
    if resume_run_id is None and exists(config.storage_path, config.name):
        raise UsageError(name_taken(config.name, f"under --storage-path {config.storage_path}"))
    try:
        space = load_space(config.space, config.model)
        index = index_source(config.data, config.seed, subgroups=config.subgroups, window=config.window)
    except (SpaceError, DataError) as error:
        raise UsageError(str(error)) from None
    if config.window is not None and not index.has_dicom:
        center, width = config.window
        raise UsageError(
            f"--window {center:g},{width:g} windows DICOM images (.dcm, .dicom) and {index.source} holds none: "
            f"leave --window out"
        )
    if index.unidentified:
        print(unidentified_warning(index), flush=True)
    named = paths_naming_their_patient(sample for samples in index.splits.values() for sample in samples)
    if named:
        print(patient_in_paths_warning(named), flush=True)
    if config.per_class:
        index = subsample(index, config.per_class, config.seed)
    if resume_run_id is not None:
        from search.study.resume import check_resumed_split  # MLflow: --resume has loaded it to read the study

        check_resumed_split(config, resume_run_id, index)
    spec = ModelSpec(
        config.model, len(index.classes), config.img_size, pretrained=config.pretrained, weights_files=config.weights
    )
    try:
        validate_spec(spec)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return CheckedStudy(space, index, spec, resume_run_id)


def patient_in_paths_warning(named: list[str]) -> str:
    """The line for image paths that contain their patient's id: split.json and the results record paths as given.
    Names no path: the example would show the id it warns of."""
    return (
        f"warning: {len(named)} image path(s) contain their patient's id (group or PatientID): the study records "
        f"paths as given (split.json, predictions), so those ids reach its stores in the paths, while the patients "
        f"themselves appear only as salted hashes; rename the files (or their folders) to keep ids out"
    )


def unidentified_warning(index: DatasetIndex) -> str:
    """The line for the images of a DICOM folder that name no patient: the split by patient cannot keep them
    together."""
    return (
        f"warning: {index.unidentified} image(s) of {index.source} have no PatientID: each is split as a patient of "
        f"its own, so scans of one patient among them may end up in train and test; give them their PatientID, or "
        f"a manifest with a group column"
    )
