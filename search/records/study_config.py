"""A study's configuration: one frozen, typed record, built and checked once at the command line.

It is the only settings object the driver passes around. It is written once as
study.yaml on the study's MLflow parent run and in its Ray experiment folder; `--resume`,
final.py and compare.py read that file back through `StudyConfig.from_yaml`, the one loader.
The parent run's params show the same values for people and the UI; no code reads them.

A record (search.records): standard library, PyYAML (deferred, when the file is written or
read) and trainables.config only, so that every stage may read it and bad arguments are
answered at once. Building it from run.py's arguments is search.study.config's.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from search.records.location import join
from trainables.config import (
    ACCURACY,
    COSTS,
    METRIC_MODES,
    MODEL_NAMES,
    OBJECTIVES,
    Cost,
    objective_cost,
    window_problem,
)

CONFIG_FILE = "study.yaml"
LEAK_POLICIES = ("warn", "fail")
"""--on-leak: what duplicate images across splits do (search.study.leaks)."""
RESOLUTION = "resolution"
FIDELITIES = ("epochs", RESOLUTION)
"""--fidelity: what makes ASHA's early rungs cheap: fewer epochs alone, or also smaller images (trainables.fidelity)."""
DEFAULT_FIDELITY = "epochs"
"""One place to flip the default once the benchmark has spoken."""
CONFIRM_DIR = "confirm"
FORMAT = 1
"""study.yaml's format version, written into the file; a file of another version is refused."""
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 1024
"""1024 px is already 3 MB of cache per image and 4,096 ViT tokens; these models were made for 224."""
MAX_NAME_LENGTH = 100
MANIFEST_COLUMNS = ("path", "label", "group", "split")
"""A manifest's own columns (trainables.manifest.COLUMNS): never a subgroup."""
IDENTIFYING_PARTS = ("patient", "birth")
IDENTIFYING_WORDS = ("id", "name", "dob", "mrn", "ssn", "accession")
"""A subgroup column whose name holds one of IDENTIFYING_PARTS, or one of IDENTIFYING_WORDS as a word of its own
(patient_id, PatientName, birth_date, study id), is refused: results per value would put patient identifiers in
MLflow, metrics.json and the model card. A rule on names, not on values: simple, and said in the refusal."""
STUDY_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
"""A study's name is a folder (or a URI's last part) under --storage-path and a value in MLflow filters: nothing
that escapes either."""


@dataclass(frozen=True)
class Profile:
    """Image size, epoch budget and per-class sample caps that --smoke or a full run start from."""

    img_size: int
    epochs: int
    per_class: dict[str, int] | None = None
    """At most this many images of each class per split (None: all)."""


FULL = Profile(img_size=224, epochs=15)
SMOKE = Profile(img_size=32, epochs=3, per_class={"train": 24, "val": 8, "test": 8})


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem and how to fix it."""


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Everything that decides a study, resolved (no 'default' left to interpret later)."""

    # ---- what to search
    name: str
    """The study's name: its Ray folder, its MLflow parent run and `study` tag."""
    model: str
    """cnn, vit or hybrid."""
    trials: int = 30
    data: str
    """'synthetic[:C]' or the absolute path of the data folder."""
    window: tuple[float, float] | None = None
    """(center, width) every DICOM image is windowed with (--window), instead of its file's own VOI LUT or window;
    None: the file's (trainables.dicom)."""
    space: str
    """The search-space YAML, an absolute path."""
    metric: str = "val_acc"
    """What the search optimises (val_loss is minimised)."""
    objective: str = ACCURACY
    """'accuracy': the metric alone; 'accuracy,<cost>' (a COSTS name): a multi-objective study whose Pareto front
    trades the metric against that cost."""
    seed: int = 0
    """Seeds the split, the TPE sampler and every trial."""
    on_leak: str = "warn"
    """What duplicate images across train, val and test do before training: 'warn' (a warning, the study goes on)
    or 'fail' (the study is refused, nothing written)."""
    trials_before: int = 0
    """Trials of the study's earlier searches (0 for a new study): an extended study (--resume --trials N on a
    finished one) searches trials_before..trials-1 in a Tune run of its own, continuing the same Optuna study."""
    warm_start: str | None = None
    """An earlier study whose best configurations this one evaluates first."""
    warm_start_top: int = 3
    """How many of the earlier study's best configurations go first."""
    confirm: int = 0
    """Once the search ends, retrain its `confirm` best configurations with more seeds (0: no confirmation)."""
    confirm_seeds: int = 2
    """The seeds each confirmed configuration is retrained with, besides its search trial's."""
    subgroups: tuple[str, ...] = ()
    """Extra columns of a CSV manifest (--subgroups site,sex), lower-case, in the declared order: read with the data,
    and final.py reports its test results per value of each (search.evaluation.subgroups). () : none."""
    recipe: bool = True
    """The study's first trial (t00) trains the knobs' defaults, the seed document's recipe, clipped into the space
    (search.study.spaces.Space.recipe), before any warm start: the baseline the winner's gain is measured against,
    never stopped early. False (--no-recipe): TPE's own trials only. An extension does not run it again."""
    # ---- training
    epochs: int
    """Epoch budget per trial (ASHA's max_t)."""
    img_size: int
    fidelity: str = DEFAULT_FIDELITY
    """'epochs': every epoch at img_size; 'resolution': the epochs up to ASHA's first two rungs at half and three
    quarters of img_size (trainables.fidelity.resolution_schedule)."""
    smoke: bool = False
    """The CPU-sized profile: a per-class subsample of every split (SMOKE.per_class)."""
    pretrained: bool = True
    weights: tuple[tuple[str, str], ...] = ()
    """(backbone, path) pairs of local pretrained weights files."""
    # ---- speed on CUDA
    amp: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    # ---- resources and early stopping
    gpus_per_trial: float | None = None
    """GPU share per trial, 0 for the CPU; None ('auto') until the driver has measured it. study.yaml
    always holds the measured share."""
    cpus_per_trial: int = 1
    max_concurrent: int | None = None
    """Trials at once; None until resolved from the resources."""
    max_failures: int = 0
    grace_period: int = 2
    reduction_factor: int = 3
    # ---- where results go
    storage_path: str
    """Ray Tune's trial folders and checkpoints: an absolute path, or a URI such as s3://bucket/prefix
    (search.study.storage)."""
    cache_dir: str
    """The decoded-image cache, an absolute path."""
    tracking_uri: str
    experiment: str
    """The MLflow experiment that holds the study's runs."""
    optuna_storage: str | None = None
    """The database of the Optuna study (same name as the study). run.py always gives one; None (in memory)
    is for tests, and for the studies made before, which --resume refuses."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every value that cannot run, each said with its command-line flag and the fix."""
        problems = []
        if not STUDY_NAME.fullmatch(self.name):
            problems.append(name_problem(self.name))
        if self.model not in MODEL_NAMES:
            problems.append(f"--model {self.model!r}: choose one of {', '.join(MODEL_NAMES)}")
        if self.trials < 1:
            problems.append(f"--trials {self.trials}: run at least 1 trial")
        if not 0 <= self.trials_before < self.trials:
            problems.append(f"--trials {self.trials}: more than the {self.trials_before} the study has run already")
        if self.warm_start_top < 1:
            problems.append(f"--warm-start-top {self.warm_start_top}: give at least 1")
        if not 0 <= self.confirm <= self.trials:
            problems.append(f"--confirm {self.confirm}: give 0 (no confirmation) to --trials {self.trials}")
        if self.confirm_seeds < 1:
            problems.append(f"--confirm-seeds {self.confirm_seeds}: give at least 1")
        if self.metric not in METRIC_MODES:
            problems.append(f"--metric {self.metric!r}: choose one of {', '.join(METRIC_MODES)}")
        if self.on_leak not in LEAK_POLICIES:
            problems.append(f"--on-leak {self.on_leak!r}: choose one of {', '.join(LEAK_POLICIES)}")
        if self.objective not in OBJECTIVES:
            problems.append(f"--objective {self.objective!r}: choose one of {', '.join(map(repr, OBJECTIVES))}")
        elif self.cost is not None and self.cost.cuda_only and self.gpus_per_trial == 0:
            problems.append(
                f"--objective {self.objective}: {self.cost.metric} is measured on CUDA only, and the trials train on "
                f"the CPU (--gpus-per-trial 0, or no GPU): trade accuracy against params or latency instead"
            )
        problems += subgroup_problems(self.subgroups)
        if self.window is not None and (problem := window_problem(self.window)):
            problems.append(f"--window {self.window[0]:g},{self.window[1]:g}: {problem}")
        if self.epochs < 1:
            problems.append(f"--epochs {self.epochs}: train at least 1 epoch")
        if not MIN_IMG_SIZE <= self.img_size <= MAX_IMG_SIZE:
            problems.append(f"--img-size {self.img_size}: use {MIN_IMG_SIZE} to {MAX_IMG_SIZE} (224 is standard)")
        if self.fidelity not in FIDELITIES:
            problems.append(f"--fidelity {self.fidelity!r}: choose one of {', '.join(FIDELITIES)}")
        if self.gpus_per_trial is not None and not 0 <= self.gpus_per_trial <= 1:
            problems.append(f"--gpus-per-trial {self.gpus_per_trial}: give a fraction in (0, 1], or 0 for CPU")
        if self.cpus_per_trial < 1:
            problems.append(f"--cpus-per-trial {self.cpus_per_trial}: give at least 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            problems.append(f"--max-concurrent {self.max_concurrent}: give at least 1")
        if self.max_failures < 0:
            problems.append(f"--max-failures {self.max_failures}: give 0 or more")
        if self.grace_period < 1 or self.reduction_factor < 2:
            problems.append("ASHA needs --grace-period >= 1 and --reduction-factor >= 2")
        return problems

    @property
    def mode(self) -> str:
        """'max' or 'min': which way the metric improves."""
        return METRIC_MODES[self.metric]

    @property
    def cost(self) -> Cost | None:
        """What a multi-objective study trades its metric against; None for the metric alone."""
        name = objective_cost(self.objective)
        return COSTS.get(name) if name else None

    @property
    def objectives(self) -> tuple[list[str], list[str]]:
        """(metrics, modes) the Optuna study optimises: the study's metric, then the cost a multi-objective study
        trades it for (minimised)."""
        if self.cost is None:
            return [self.metric], [self.mode]
        return [self.metric, self.cost.metric], [self.mode, "min"]

    @property
    def per_class(self) -> dict[str, int] | None:
        """The smoke profile's per-class caps, or None."""
        return SMOKE.per_class if self.smoke else None

    @property
    def asha_grace_period(self) -> int:
        """ASHA's grace period as the scheduler gets it: no longer than the epoch budget."""
        return min(self.grace_period, self.epochs)

    @property
    def study_location(self) -> str:
        """The study's folder under the storage (its URI for a bucket): its searches' trials, and its winner."""
        return join(self.storage_path, self.name)

    @property
    def experiment_location(self) -> str:
        """The Ray experiment folder of the study's latest search: its path, or its URI (s3://bucket/prefix/<name>).

        An extension's trials go to a folder of their own inside the first search's, `trials-31-50`: Ray Tune
        cannot add samples to a finished experiment, so each extension is a Tune run of its own."""
        return join(self.study_location, *self.search_part)

    @property
    def search_part(self) -> tuple[str, ...]:
        """The latest search's folder inside the study's: none for the first, `trials-31-50` for an extension."""
        return (f"trials-{self.trials_before + 1}-{self.trials}",) if self.trials_before else ()

    @property
    def runs_recipe(self) -> bool:
        """Whether the latest search starts with the recipe trial: a new study's with a recipe, never an
        extension's (its first search ran it)."""
        return self.recipe and not self.trials_before

    @property
    def search_trials(self) -> int:
        """The trials of the latest search: all of them, or an extension's new ones."""
        return self.trials - self.trials_before

    @property
    def confirm_location(self) -> str:
        """The Ray experiment folder of the confirmation runs of the latest search."""
        return join(self.experiment_location, CONFIRM_DIR)

    # ------------------------------------------------------------ the file

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["weights"] = dict(self.weights)
        values["subgroups"] = list(self.subgroups)  # YAML has no tuples
        values["window"] = None if self.window is None else list(self.window)
        return {"format": FORMAT, **values}

    def to_yaml(self) -> str:
        import yaml  # deferred, here and below: --help and argument errors answer without it

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str) -> StudyConfig:
        """The one loader of study.yaml; ConfigError names the file and every problem."""
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{source} is not valid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} is not a study configuration (a mapping of settings)")
        if raw.get("format") != FORMAT:
            raise ConfigError(f"{source} has format {raw.get('format')!r}, this version reads format {FORMAT}")
        values = {key: value for key, value in raw.items() if key != "format"}
        known = {f.name: f for f in fields(cls)}
        problems = [f"unknown setting {key!r}" for key in values if key not in known]
        problems += [
            f"missing setting {name!r}" for name, f in known.items() if name not in values and f.default is MISSING
        ]
        hints = get_type_hints(cls)
        problems += [
            f"{key} is {value!r}, not {known[key].type}"
            for key, value in values.items()
            if key in known and not of_type(value, hints[key])
        ]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        values["weights"] = tuple(sorted((values.get("weights") or {}).items()))
        values["subgroups"] = tuple(values.get("subgroups") or ())
        window = values.get("window")
        values["window"] = None if window is None else tuple(float(value) for value in window)
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None


def of_type(value: object, hint: Any) -> bool:
    """Whether a YAML value has a field's type (`hint`: the field's resolved type hint), for any type a field may
    have: a new field needs no check of its own.

    YAML has no tuples: a tuple is a list in the file, and a tuple of (key, value) pairs is a mapping, as
    to_dict writes `weights` (null for none). An int passes as a float: YAML writes 1.0 as 1.0, a person writes 1.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, UnionType):
        return any(of_type(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # bool is an int to Python, never a number to a person
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    if origin is Literal:
        return value in args
    if origin is tuple and is_pairs(args):
        key, item = get_args(args[0])
        return value is None or (
            isinstance(value, dict) and all(of_type(k, key) and of_type(v, item) for k, v in value.items())
        )
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and items_of_type(list(value), args, fixed=origin is tuple)
    if origin is dict:
        key, item = args or (Any, Any)
        return isinstance(value, dict) and all(of_type(k, key) and of_type(v, item) for k, v in value.items())
    return isinstance(value, origin or hint)


def is_pairs(args: tuple) -> bool:
    """tuple[tuple[K, V], ...]'s arguments: a mapping, kept hashable in a frozen record."""
    return len(args) == 2 and args[1] is Ellipsis and get_origin(args[0]) is tuple and len(get_args(args[0])) == 2


def items_of_type(items: list, args: tuple, *, fixed: bool) -> bool:
    """A YAML list's items against a sequence type's arguments: X, ... (any length), X, Y (exactly two, for a
    tuple), or none given."""
    if not args:
        return True
    if not fixed or (len(args) == 2 and args[1] is Ellipsis):
        return all(of_type(item, args[0]) for item in items)
    return len(items) == len(args) and all(of_type(item, arg) for item, arg in zip(items, args, strict=True))


STUDY_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(StudyConfig) if f.default is not MISSING}
"""run.py's defaults: the record's own, so the two cannot drift apart."""


def subgroup_problems(columns: tuple[str, ...]) -> list[str]:
    """What makes --subgroups columns no subgroups: empty, repeated, a manifest's own column, or one that names or
    identifies a patient (IDENTIFYING_PARTS, IDENTIFYING_WORDS)."""
    flag = f"--subgroups {','.join(columns)}"
    problems = []
    if any(not column for column in columns):
        problems.append(f"{flag}: an empty column name; write the columns comma-separated, e.g. site,sex")
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        problems.append(f"{flag}: {', '.join(repeated)} given twice")
    own = [column for column in columns if column in MANIFEST_COLUMNS]
    if own:
        problems.append(
            f"{flag}: {', '.join(own)} {'is' if len(own) == 1 else 'are'} the manifest's own column(s) "
            f"({', '.join(MANIFEST_COLUMNS)}), not subgroups; declare other columns, e.g. site,sex"
        )
    identifying = [column for column in columns if is_identifying(column)]
    if identifying:
        problems.append(
            f"{flag}: {', '.join(identifying)} may name or identify patients (a column name holding "
            f"{' or '.join(IDENTIFYING_PARTS)}, or the word {', '.join(IDENTIFYING_WORDS)}), and results per "
            f"value would show them in MLflow and the model card: declare columns of categories (site, sex, scanner), "
            f"or rename a column of categories whose name merely looks so"
        )
    return problems


def is_identifying(column: str) -> bool:
    """A column name that looks like a patient's identifier or name: IDENTIFYING_PARTS anywhere, or one of
    IDENTIFYING_WORDS as a word (separated by anything but a letter or digit)."""
    name = column.lower()
    words = re.split(r"[^a-z0-9]+", name)
    return any(part in name for part in IDENTIFYING_PARTS) or any(word in IDENTIFYING_WORDS for word in words)


def name_problem(name: str) -> str:
    return (
        f"--name {name!r}: use 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', "
        f"starting with a letter or digit (it names a folder and an MLflow run)"
    )
