"""The final model's card: what it takes and gives, what it was trained and tested on, how well it did, what it
is for and where nobody knows how it behaves.

One record of plain facts (CardFacts), filled from the final run by `card_facts`, is
written out in Markdown by `card_markdown`: the results folder's model_card.md, the
run's artifact of that name, and the registered version's description. Every sentence
is generated from the record; nothing is claimed that the run did not measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

from search.evaluation.calibration import ECE_BINS
from search.evaluation.formatting import finite, fixed, span
from search.evaluation.intervals import CONFIDENCE, RESAMPLES
from search.evaluation.operating_point import RATES
from search.evaluation.subgroups import METRICS as SUBGROUP_METRICS
from search.evaluation.subgroups import Subgroup, SubgroupTable, interval_text
from search.final_model.report import INTERVAL_METHOD, INTERVAL_SEED, SUMMARY_ROWS
from search.tracking.study_run import data_record
from trainables.config import MODEL_NAMES, knobs_of
from trainables.data import SPLIT_FRACTIONS, DatasetIndex, manifest_digest
from trainables.spec import backbones_of

if TYPE_CHECKING:
    from search.evaluation.operating_point import OperatingPoint
    from search.final_model.ensemble import Outcome
    from search.final_model.external import ExternalResult
    from search.final_model.report import HeldOutResult
    from search.final_model.retrain import PreparedFinal
    from search.records.registration import Registration

MODEL_CARD_FILE = "model_card.md"
DESCRIPTION_LIMIT = 5000
"""Characters a registered version's description may hold: the registry's column is VARCHAR(5000)
(mlflow/store/model_registry/dbmodels/models.py), which PostgreSQL and MySQL enforce."""
ACCURACY = "test_acc"
CLASSES_TAG_LIMIT = 250
"""Characters of class names the 'classes' tag lists before it says how many more there are."""
EXTERNAL_TAG_PREFIX = "external."
"""A registered version's tag per external set: external.<digest> = the run and its accuracy with interval."""
EXTERNAL_TAG_DIGEST = 12
"""Characters of the external set's digest in that tag's key."""


@dataclass(frozen=True)
class Score:
    """A test metric as the card shows it."""

    key: str
    """The run's metric: test_acc, test_macro_f1, ..."""
    label: str
    """'accuracy', 'macro F1', ..."""
    value: float
    low: float | None = None
    """The interval's bounds; None for a metric without one (the loss). NaN: undefined."""
    high: float | None = None


@dataclass(frozen=True)
class ClassRow:
    """One class's line of the per-class table: one vs rest on the test split."""

    name: str
    test_images: int
    sensitivity: float
    """TP / (TP + FN): the recall."""
    specificity: float
    """TN / (TN + FP)."""


@dataclass(frozen=True)
class ExternalRow:
    """One score on the external set beside the internal test's."""

    score: Score
    """On the external set, with its interval."""
    test: float | None
    """The same metric on the internal test split; None where it is not known (a version's run without it)."""
    worse: bool
    """The external interval lies wholly on the worse side of the internal value."""


@dataclass(frozen=True, kw_only=True)
class ExternalFacts:
    """final.py --external: another source's images, tested whole (search/final_model/external.py)."""

    name: str
    """The source as its MLflow dataset names it."""
    digest: str
    images: int
    missing: tuple[str, ...]
    """The model's classes the source has no image of."""
    temperature: float
    calibrated: bool
    """The temperature was fitted on val (else T = 1: the model trained on val)."""
    rows: tuple[ExternalRow, ...]


@dataclass(frozen=True, kw_only=True)
class CardFacts:
    title: str
    """'cnn-classifier version 3', or the run's label for a model that is not registered."""
    model_uri: str | None
    """models:/NAME/VERSION to load or serve; None when not registered."""
    model: str
    """cnn, vit, hybrid or reference."""
    backbones: tuple[str, ...]
    """timm names of the model's backbones."""
    img_size: int
    dicom: bool = False
    """Whether the data held DICOM images (their decoding is then part of the input)."""
    window: tuple[float, float] | None = None
    """The (center, width) its DICOM images were windowed with (run.py --window); None: each file's own."""
    classes: tuple[ClassRow, ...]
    """In output order (the probabilities' columns), with their test counts and one-vs-rest rates."""
    temperature: float
    # the data
    data_name: str
    """The source as the run's MLflow dataset names it: a folder's or manifest's name, or 'synthetic'."""
    data_digest: str
    split_sizes: dict[str, int]
    """train, val and test images of the study's split."""
    split_method: str
    """How the split was made, as a sentence."""
    synthetic: bool
    smoke: bool
    """A --smoke study: a small per-class subsample."""
    # where it came from
    study: str | None
    trial: str | None
    """The trial as its study named it (t07); Ray's id, said to be one, for an older best_config.yaml."""
    config_source: str
    """'study NAME', 'trial run ID', 'config FILE'."""
    search_metric: str
    search_best: float | None
    """The trial's best search_metric during the search (on val)."""
    run_id: str
    """The final run's MLflow run."""
    # the training
    train_on: str
    """'train+val', or 'train' (--keep-val)."""
    train_images: int
    epochs: int
    trained_epochs: int
    """The epoch whose weights were kept: the last, or with --keep-val the best on val."""
    seed: int
    pretrained: bool
    hyperparameters: dict[str, object]
    """The knobs that mean something for this model."""
    # the test
    test_images: int
    scores: tuple[Score, ...]
    interval_note: str
    """How the intervals were computed."""
    # the calibration
    calibration_split: str | None
    """Where the temperature was fitted; None: not calibrated (T = 1)."""
    calibration_images: int
    """Images it was fitted on."""
    calibration_unsteady: bool
    calibration_averaged: int = 0
    """Probabilities averaged (an ensemble's members x test-time views); 0: one network's."""
    """Fitted on few images or on images all classified right (Calibration.unsteady)."""
    ece_before: float
    ece_after: float
    subgroups: SubgroupTable | None = None
    """The test results per value of each subgroup column the study declared (run.py --subgroups); None: none."""
    operating_point: OperatingPoint | None = None
    """final.py --operating-point's threshold, chosen on val, with its rates on val and test; None: none."""
    # the reporting checklist's (search/final_model/checklist.py): counts only, never a patient's id
    split_by: str | None = None
    """How the split was made (DatasetIndex.split_by): patients, stratified, folders, manifest_column."""
    class_counts: dict[str, dict[str, int]] | None = None
    """train, val and test -> class name -> images."""
    patients: dict[str, int] | None = None
    """train, val and test -> patients (a manifest's groups, a DICOM's PatientID); None without patients."""
    manifest_digest: str | None = None
    """The manifest's digest (trainables.data.manifest_digest) where the data is a manifest."""
    external: ExternalFacts | None = None
    """final.py --external's scores beside the internal test's; None: no external test."""
    ensemble: Outcome | None = None
    """final.py --ensemble's members beside the ensemble, and --tta's flips, with their judgements; None: neither."""


# ---------------------------------------------------------------- from the final run


def card_facts(
    final: PreparedFinal,
    result: HeldOutResult,
    trained_epochs: int,
    registered: Registration | None,
    run_id: str,
    operating: OperatingPoint | None = None,
    external: ExternalResult | None = None,
    ensemble: Outcome | None = None,
) -> CardFacts:
    """The card's record, from the prepared run, its one test and its registration (None when not registered)."""
    config, index = final.config, final.index
    dataset = data_record(index)  # the run's dataset input: the same name and digest as in the runs table
    calibration = result.calibration
    return CardFacts(
        title=registered.title if registered is not None else final.label,
        model_uri=registered.version_uri if registered is not None else None,
        model=config.model,
        backbones=backbones_of(final.spec),
        img_size=config.img_size,
        dicom=index.has_dicom,
        window=index.window,
        classes=tuple(
            ClassRow(name, int(scores["support"]), scores["sensitivity"], scores["specificity"])
            for name, scores in result.per_class.items()
        ),
        temperature=calibration.temperature,
        data_name=dataset["name"],
        data_digest=dataset["digest"],
        split_sizes={split: len(index.splits[split]) for split in ("train", "val", "test")},
        split_method=split_method(index, config.split.seed, config.split.smoke),
        synthetic=index.is_synthetic,
        smoke=config.split.smoke,
        study=config.study,
        trial=config.trial_name,
        config_source=config.source,
        search_metric=config.metric,
        search_best=config.best_value,
        run_id=run_id,
        train_on=final.settings.train_on,
        train_images=len(final.train),
        epochs=final.epochs,
        trained_epochs=trained_epochs,
        seed=final.seed,
        pretrained=final.spec.pretrained,
        hyperparameters=knobs_shown(config.model, config.hyperparameters.to_dict()),
        test_images=len(final.test),
        scores=tuple(Score(key, label, result.metrics[key], *bounds(result, key)) for label, key in SUMMARY_ROWS),
        interval_note=f"{round(100 * CONFIDENCE)} % intervals: {INTERVAL_METHOD}, {RESAMPLES:,} resamples, "
        f"seed {INTERVAL_SEED}",
        calibration_split=calibration.split,
        calibration_images=calibration.fitted_on,
        calibration_unsteady=calibration.unsteady,
        calibration_averaged=calibration.averaged,
        ece_before=calibration.ece_before,
        ece_after=calibration.ece_after,
        subgroups=result.subgroups,
        operating_point=operating,
        split_by=index.split_by,
        class_counts={split: class_counts(index, split) for split in ("train", "val", "test")},
        patients={split: len(index.groups(split)) for split in ("train", "val", "test")} if index.has_groups else None,
        manifest_digest=manifest_digest(index.source) if index.is_manifest else None,
        external=external_facts(external) if external is not None else None,
        ensemble=ensemble,
    )


def external_facts(external: ExternalResult) -> ExternalFacts:
    """The external test as the card shows it: each score with its interval, beside the internal test's."""
    data, result = external.data, external.result
    return ExternalFacts(
        name=data.name,
        digest=data.digest,
        images=len(result.labels),
        missing=data.missing,
        temperature=result.calibration.temperature,
        calibrated=result.calibration.calibrated,
        rows=tuple(
            ExternalRow(Score(row.key, row.label, row.external, row.low, row.high), row.test, row.worse)
            for row in external.comparison()
        ),
    )


def class_counts(index: DatasetIndex, split: str) -> dict[str, int]:
    """Images of each class in the split, every class named (0 where it has none): the checklist's table."""
    counts = dict.fromkeys(index.classes, 0)
    for sample in index.splits[split]:
        counts[index.classes[sample.label]] += 1
    return counts


def bounds(result: HeldOutResult, key: str) -> tuple[float | None, float | None]:
    interval = result.intervals.get(key)
    return (None, None) if interval is None else (interval.low, interval.high)


def knobs_shown(model: str, values: dict[str, object]) -> dict[str, object]:
    """The hyperparameters that mean something for the model. A reference is none of MODEL_NAMES, which is
    what knobs_of asks: it gets the knobs that every model has (not vit_depth, not fusion)."""
    if model in MODEL_NAMES:
        return knobs_of(model, values)
    return {key: value for key, value in values.items() if all(key in knobs_of(name, values) for name in MODEL_NAMES)}


def split_method(index: DatasetIndex, seed: int, smoke: bool) -> str:
    """How the study's split was made: the rule the indexer recorded (DatasetIndex.split_by), in words."""
    stratified = "stratified by class, {:.0f}/{:.0f}/{:.0f} % of each class's images".format(
        *(100 * fraction for fraction in SPLIT_FRACTIONS)
    )
    how = {
        "folders": "as given: the source's train/, val/ and test/ folders",
        "manifest_column": "as the manifest's split column says",
        "patients": f"stratified by class and grouped by patient (scikit-learn's StratifiedGroupKFold), seed {seed}",
    }.get(index.split_by, f"{stratified}, seed {seed}")
    if index.has_groups:
        patients = ", ".join(f"{split} {len(index.groups(split))}" for split in ("train", "val", "test"))
        how += f"; no patient has images in two splits (patients: {patients})"
    if smoke:
        how += f"; then a small per-class subsample of each split (--smoke, seed {seed})"
    return how


# ---------------------------------------------------------------- the card


def card_markdown(facts: CardFacts, max_chars: int | None = None) -> str:
    """The card in Markdown. With max_chars (a registry description's limit), a long per-class table keeps
    only its weakest classes (lowest sensitivity), as many as fit, and says where the whole table is."""
    text = render(facts, facts.classes)
    if max_chars is None or len(text) <= max_chars:
        return text
    weakest = sorted(facts.classes, key=lambda row: row.sensitivity)
    fits, too_many = 0, len(weakest)  # render(fits) fits; render(too_many) does not
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        if len(render(facts, tuple(weakest[:middle]))) <= max_chars:
            fits = middle
        else:
            too_many = middle
    text = render(facts, tuple(weakest[:fits]))
    if len(text) > max_chars:  # not even the table's head fits: cut, and say so
        cut = f"\n\n… (cut at {max_chars:,} characters: the whole card is {MODEL_CARD_FILE} of run {facts.run_id})\n"
        text = text[: max_chars - len(cut)] + cut
    return text


def render(facts: CardFacts, shown: tuple[ClassRow, ...]) -> str:
    sections = [
        header(facts),
        intended_use(facts),
        input_and_output(facts),
        data_section(facts),
        origin_section(facts),
        training_section(facts),
        test_section(facts),
        *([facts.ensemble.card_section()] if facts.ensemble is not None else []),
        calibration_section(facts),
        *([external_section(facts.external)] if facts.external is not None else []),
        *([operating_point_section(facts.operating_point)] if facts.operating_point is not None else []),
        per_class_section(facts, shown),
        *([subgroups_section(facts.subgroups)] if facts.subgroups is not None else []),
    ]
    return "\n\n".join(sections) + "\n"


def header(facts: CardFacts) -> str:
    accuracy = next((score for score in facts.scores if score.key == ACCURACY), None)
    tested = f"tested once on {facts.test_images} held-out images"
    if accuracy is not None:
        tested += f": accuracy {score_text(accuracy, f'{round(100 * CONFIDENCE)} % CI ')}"
    names = ", ".join(row.name for row in facts.classes[:10]) + (", …" if len(facts.classes) > 10 else "")
    return (
        f"# {facts.title}\n\n"
        f"An image classifier ({facts.model}: {' + '.join(facts.backbones)}) that gives the probabilities of "
        f"{len(facts.classes)} classes ({names}) for an RGB image of {facts.img_size}×{facts.img_size} pixels; "
        f"{tested}. For research use only: not a medical device."
    )


def intended_use(facts: CardFacts) -> str:
    source = "the synthetic set" if facts.synthetic else f"one source ({facts.data_name})"
    tested = (
        "it was tested only on a held-out split of that same source."
        if facts.external is None
        else f"it was tested on a held-out split of that source and on one other ({facts.external.name}, "
        "see External validation), which says nothing of the rest."
    )
    limits = [
        "Intended for research: studying and comparing classifiers. Not a medical device: not cleared or "
        "validated for diagnosis, screening or any decision about a patient.",
        f"Trained on {facts.train_images} images from {source}. How it performs on images from other "
        f"scanners, sites, acquisition settings or populations is unknown: {tested}",
        f"It sees every image at {facts.img_size}×{facts.img_size} pixels: a larger image is resized, and "
        "detail finer than that is lost.",
        f"It always answers with one of its {len(facts.classes)} classes: an image of none of them (another "
        "body part, another kind of image) still gets a class and a probability.",
    ]
    if facts.calibration_split is None:
        limits.append(
            "Its probabilities are not calibrated (temperature 1): no split was left to fit a temperature on "
            "(the model trained on train+val)."
        )
    if facts.synthetic:
        limits.append("Trained on generated images (--data synthetic): a test of the pipeline, not a real classifier.")
    if facts.smoke:
        limits.append("From a --smoke study: a few images per class, to check the pipeline; its scores mean little.")
    return "## Intended use and limits\n\n" + "\n".join(f"- {line}" for line in limits)


def input_and_output(facts: CardFacts) -> str:
    size = f"{facts.img_size}, {facts.img_size}"
    columns = ", ".join(row.name for row in facts.classes[:20]) + (
        f", … ({len(facts.classes)} in all, in the order of the table below)" if len(facts.classes) > 20 else ""
    )
    lines = [
        f"- Input: float32 (N, 3, {size}), RGB, values in [0, 1] (pixel / 255), each image resized to "
        f"{facts.img_size}×{facts.img_size} (bilinear, as trainables.data.decode_image does for training). "
        "The model normalises the images itself. Any batch size N ≥ 1.",
        f"- Output: (N, {len(facts.classes)}) class probabilities, softmax(logits / T) with T = "
        f"{facts.temperature:.4f}; each row sums to 1; columns: {columns}.",
    ]
    if facts.dicom:
        lines.insert(1, f"- DICOM images: {dicom_decoding(facts.window)}")
    if facts.model_uri is not None:
        lines.append(
            f"- Serve: `mlflow models serve -m {facts.model_uri} --env-manager local`, then POST "
            '`{"inputs": [...]}` (N images as nested lists, N × 3 × H × W) to `/invocations`; '
            'the answer is `{"predictions": [[...], ...]}`, one row of probabilities per image.'
        )
    return "## Input and output\n\n" + "\n".join(lines)


def dicom_decoding(window: tuple[float, float] | None) -> str:
    """How DICOM images become the input, as trainables.dicom decodes them (and predict.py, from the model file)."""
    shown = (
        f"the window center {window[0]:g}, width {window[1]:g} (run.py --window)"
        if window is not None
        else "the file's own VOI LUT or window, else the image's min..max"
    )
    return (
        f"the Modality LUT (rescale slope and intercept), then {shown}, MONOCHROME1 inverted, then 8 bits, grey "
        "repeated in the 3 channels."
    )


def data_section(facts: CardFacts) -> str:
    sizes = facts.split_sizes
    rows = [
        ("source", facts.data_name),
        ("digest", f"`{facts.data_digest}` (the run's MLflow dataset)"),
        ("classes", f"{len(facts.classes)} (test images per class: table below)"),
        ("split", f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']} images"),
        ("how it was split", facts.split_method),
    ]
    return "## Data\n\n" + table(("", ""), rows)


def origin_section(facts: CardFacts) -> str:
    lines = [f"- Configuration: {facts.config_source}."]
    if facts.study:
        lines.append(f"- Study `{facts.study}`" + (f", trial {facts.trial}." if facts.trial else "."))
    if facts.search_best is not None:
        lines.append(f"- The trial's best {facts.search_metric} in the search: {fixed(facts.search_best, 4)}.")
    lines.append(f"- Final run: MLflow run `{facts.run_id}`.")
    return "## Where it came from\n\n" + "\n".join(lines)


def training_section(facts: CardFacts) -> str:
    kept = (
        f"the weights of epoch {facts.trained_epochs} (best on val) kept"
        if facts.trained_epochs != facts.epochs
        else "the last epoch's weights kept"
    )
    start = "timm's pretrained weights" if facts.pretrained else "random initialisation (no pretrained weights)"
    splits = "the train and val splits" if facts.train_on == "train+val" else f"the {facts.train_on} split"
    summary = (
        f"Trained on {splits} ({facts.train_images} images) for {facts.epochs} epoch(s), {kept}; "
        f"from {start}; seed {facts.seed}. Hyperparameters (to 4 significant digits; exact in config.yaml):"
    )
    rows = [
        (key, f"{value:.4g}" if isinstance(value, float) else str(value))
        for key, value in facts.hyperparameters.items()
    ]
    knobs = table(("hyperparameter", "value"), rows)
    return f"## Training\n\n{summary}\n\n{knobs}"


def test_section(facts: CardFacts) -> str:
    rows = [(score.label, score_text(score)) for score in facts.scores]
    return (
        f"## Test results\n\n{facts.test_images} images the search never saw, tested once ({facts.interval_note}; "
        "n/a: undefined).\n\n" + table(("metric", f"value ({round(100 * CONFIDENCE)} % CI)"), rows)
    )


def calibration_section(facts: CardFacts) -> str:
    if facts.calibration_split is None:
        text = (
            f"Not calibrated: temperature 1. The model trained on every image but the test's, so none was left "
            f"to fit a temperature on without touching the test; test ECE ({ECE_BINS} bins) "
            f"{fixed(facts.ece_before, 4)}."
        )
    elif facts.calibration_averaged:
        text = (
            f"{facts.calibration_averaged} probabilities averaged (members × views), each network's logits divided "
            f"by its own temperature, then the average's log-probabilities by T = {facts.temperature:.4f}: all "
            f"fitted on the {facts.calibration_split} split (which no member trained on) by minimising the NLL. On "
            f"the test split, ECE ({ECE_BINS} bins) {fixed(facts.ece_before, 4)} with the networks' temperatures "
            f"alone, {fixed(facts.ece_after, 4)} with T. No temperature changes a prediction, only the confidences."
        )
    else:
        text = (
            f"Temperature T = {facts.temperature:.4f}, fitted on the {facts.calibration_split} split (which the "
            f"model did not train on) by minimising the NLL. On the test split, ECE ({ECE_BINS} bins) "
            f"{fixed(facts.ece_before, 4)} before, {fixed(facts.ece_after, 4)} after. Dividing the logits by T "
            "changes no prediction, only the confidences."
        )
    if facts.calibration_split is not None and facts.calibration_unsteady:
        text += (
            f" Caution: T was fitted on {facts.calibration_images} images (few, or all classified right), so it "
            "may be far from the one a larger validation split would give."
        )
    return "## Calibration\n\n" + text


def operating_point_section(point: OperatingPoint) -> str:
    """The threshold, how it was chosen (on val), and what it achieves on the test split, with intervals."""
    text = (
        f"An image is flagged as {point.positive} when {point.rule()} (its calibrated probability): the threshold "
        f"was {point.chosen()}, never on the test split. On the test split ({round(100 * CONFIDENCE)} % CI as "
        "above; n/a: undefined):"
    )
    rows = [
        (f"{name} of {point.positive}", score_text(Score(name, name, *astuple(point.test[name])))) for name in RATES
    ]
    note = (
        "predict.py applies it: its CSV's `flagged` column is 1 where the rule holds. The registered model itself "
        "still gives the probabilities."
    )
    return "## Operating point\n\n" + text + "\n\n" + table(("rate", "value (CI)"), rows) + "\n\n" + note


def external_section(external: ExternalFacts) -> str:
    """The external set's scores with intervals beside the internal test's, and what fell beyond the interval."""
    temperature = (
        f"at the temperature fitted on val (T = {external.temperature:.4f}; nothing was fitted on these images)"
        if external.calibrated
        else "uncalibrated (T = 1), as on the internal test"
    )
    text = (
        f"{external.images} images of another source ({external.name}, digest `{external.digest}`), tested whole "
        f"as the test split is, {temperature}."
    )
    if external.missing:
        text += (
            f" It has no image of {len(external.missing)} of the model's classes ({', '.join(external.missing[:10])}"
            f"{', …' if len(external.missing) > 10 else ''}): ROC-AUC is undefined there and macro F1 counts each "
            "such class as 0."
        )
    rows = [
        (
            row.score.label,
            score_text(row.score),
            "n/a" if row.test is None else fixed(row.test, 4),
            "n/a" if row.test is None else signed(row.score.value - row.test),
        )
        for row in external.rows
    ]
    worse = [row.score.label for row in external.rows if row.worse]
    verdict = (
        f"Worse than on the internal test beyond the external interval: {', '.join(worse)}. The model does not "
        "carry over to this source as well as the internal test says."
        if worse
        else "No score is worse than the internal test's beyond the external interval."
    )
    head = ("metric", f"external ({round(100 * CONFIDENCE)} % CI)", "internal test", "difference")
    return "## External validation\n\n" + text + "\n\n" + table(head, rows) + "\n\n" + verdict


def signed(value: float) -> str:
    """'+0.0123', '-0.0456'; 'n/a' where undefined."""
    return f"{value:+.4f}" if finite(value) else "n/a"


def per_class_section(facts: CardFacts, shown: tuple[ClassRow, ...]) -> str:
    rows = [(row.name, str(row.test_images), fixed(row.sensitivity, 4), fixed(row.specificity, 4)) for row in shown]
    note = "Each class against the rest, on the test split: sensitivity TP / (TP + FN), specificity TN / (TN + FP)."
    if len(shown) < len(facts.classes):
        note += (
            f" The {len(shown)} classes of lowest sensitivity of {len(facts.classes)}; every class in "
            f"{MODEL_CARD_FILE} and classification_report.txt of run `{facts.run_id}`."
        )
    return "## Per class\n\n" + note + "\n\n" + table(("class", "test images", "sensitivity", "specificity"), rows)


SUBGROUP_ROWS = 30
"""Values of a subgroup column the card lists (the smallest left out first); every one is in metrics.json."""


def subgroups_section(subgroups: SubgroupTable) -> str:
    """Per subgroup value: its test images and its four rates with intervals, the ones below the whole test split
    named first; a subgroup too small for an interval says so."""
    rate = f"of {subgroups.positive}" if subgroups.positive else "macro-averaged over the classes, each vs the rest"
    text = (
        f"The test split per value of each subgroup column the study declared ({', '.join(subgroups.columns)}). "
        f"Sensitivity and specificity {rate}. {round(100 * CONFIDENCE)} % intervals resampled within the subgroup "
        f"(within each class), {RESAMPLES:,} resamples, seed {subgroups.seed}; a subgroup of few images, or without "
        "some class, gets its values and no interval."
    )
    marked = subgroups.marked()
    if marked:
        named = "; ".join(
            f"{column} = {value} ({', '.join(SUBGROUP_METRICS[key] for key in group.below_overall)})"
            for column, value, group in marked
        )
        text += f"\n\n**Below the whole test split** (the interval wholly under its value): {named}."
    else:
        text += (
            "\n\nNo subgroup's interval lies wholly below the whole test split's value (one without an interval is "
            "not judged)."
        )
    tables = [subgroup_table_text(column, values) for column, values in subgroups.columns.items()]
    return "## Subgroups\n\n" + text + "\n\n" + "\n\n".join(tables)


def subgroup_table_text(column: str, values: dict[str, Subgroup]) -> str:
    """One column's table: its SUBGROUP_ROWS largest values, in value order."""
    largest = sorted(values.items(), key=lambda item: -item[1].images)[:SUBGROUP_ROWS]
    rows = [
        (
            value + (" **(below)**" if group.below_overall else ""),
            str(group.images),
            *(interval_text(group.metrics[key]) for key in SUBGROUP_METRICS),
            group.note or "",
        )
        for value, group in sorted(largest, key=lambda item: item[0])
    ]
    head = ("value", "test images", *SUBGROUP_METRICS.values(), "note")
    more = f"\n\n({len(values) - SUBGROUP_ROWS} smaller values in metrics.json.)" if len(values) > SUBGROUP_ROWS else ""
    return f"### {column}\n\n" + table(head, rows) + more


def score_text(score: Score, prefix: str = "") -> str:
    """'0.9123 (0.8800–0.9400)', the bounds after `prefix`; the value alone for a metric without an interval;
    '(n/a)' for an undefined one."""
    if score.low is None or score.high is None:
        return fixed(score.value, 4)
    return f"{fixed(score.value, 4)} ({prefix}{span(score.low, score.high)})"


def table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """A Markdown table; '|' in a cell is escaped, so that a class name cannot break it."""
    lines = [head, tuple("---" for _ in head), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


# ---------------------------------------------------------------- the tags


def card_tags(facts: CardFacts) -> dict[str, str]:
    """The registered version's (and its logged model's) tags: what one wants to see in a list of versions."""
    accuracy = next(score.value for score in facts.scores if score.key == ACCURACY)
    tags = {
        ACCURACY: fixed(accuracy, 4),
        "classes": listed([row.name for row in facts.classes], CLASSES_TAG_LIMIT),
        "num_classes": str(len(facts.classes)),
        "img_size": str(facts.img_size),
        "model": facts.model,
        "temperature": f"{facts.temperature:.4f}",
    }
    if facts.study:
        tags["study"] = facts.study
    if facts.operating_point is not None:
        point = facts.operating_point
        tags["operating_point.positive"] = point.positive
        tags["operating_point.threshold"] = str(point.threshold)  # exact: the model file's threshold
        tags["operating_point.target"] = f"{point.target}={point.target_value:g}"
    if facts.external is not None:
        tags.update([external_tag(facts.external, facts.run_id)])
    return tags


def external_tag(external: ExternalFacts, run_id: str) -> tuple[str, str]:
    """external.<digest> = 'run ID: accuracy 0.9123 (95 % CI 0.8800–0.9400) on N images of NAME': as a registered
    version tested later gets (search/final_model/external.py), so the version's page lists each external test."""
    accuracy = next(row.score for row in external.rows if row.score.key == ACCURACY.removeprefix("test_"))
    text = (
        f"run {run_id}: accuracy {score_text(accuracy, f'{round(100 * CONFIDENCE)} % CI ')} on {external.images} "
        f"images of {external.name}"
    )
    return EXTERNAL_TAG_PREFIX + external.digest[:EXTERNAL_TAG_DIGEST], text


def listed(names: list[str], limit: int) -> str:
    """'a,b,c' whole when it fits in `limit` characters, else the first names that fit and '… (+N more)'."""
    whole = ",".join(names)
    if len(whole) <= limit:
        return whole
    shown: list[str] = []
    for name in names:
        more = f",… (+{len(names) - len(shown) - 1} more)"
        if len(",".join([*shown, name])) + len(more) > limit:
            break
        shown.append(name)
    return ",".join(shown) + f",… (+{len(names) - len(shown)} more)"
