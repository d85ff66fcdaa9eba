"""The final model's card: what it takes and gives, what it was trained and tested on, how well it did, what it
is for and where nobody knows how it behaves.

One record of plain facts (CardFacts), filled from the final run by `card_facts`, is
written out in Markdown by `card_markdown`: the results folder's model_card.md, the
run's artifact of that name, and the registered version's description. Every sentence
is generated from the record; nothing is claimed that the run did not measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.evaluation.calibration import ECE_BINS
from search.evaluation.formatting import finite, fixed
from search.evaluation.intervals import CONFIDENCE, RESAMPLES
from search.final_model.report import INTERVAL_METHOD, INTERVAL_SEED, SUMMARY_ROWS
from search.tracking.study_run import data_record
from trainables.config import MODEL_NAMES, knobs_of
from trainables.data import SPLIT_FRACTIONS, DatasetIndex
from trainables.spec import backbones_of

if TYPE_CHECKING:
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
    """Fitted on few images or on images all classified right (Calibration.unsteady)."""
    ece_before: float
    ece_after: float


# ---------------------------------------------------------------- from the final run


def card_facts(
    final: PreparedFinal, result: HeldOutResult, trained_epochs: int, registered: Registration | None, run_id: str
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
        ece_before=calibration.ece_before,
        ece_after=calibration.ece_after,
    )


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
        calibration_section(facts),
        per_class_section(facts, shown),
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
    limits = [
        "Intended for research: studying and comparing classifiers. Not a medical device: not cleared or "
        "validated for diagnosis, screening or any decision about a patient.",
        f"Trained on {facts.train_images} images from {source}. How it performs on images from other "
        "scanners, sites, acquisition settings or populations is unknown: it was tested only on a held-out "
        "split of that same source.",
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
    if facts.model_uri is not None:
        lines.append(
            f"- Serve: `mlflow models serve -m {facts.model_uri} --env-manager local`, then POST "
            '`{"inputs": [...]}` (N images as nested lists, N × 3 × H × W) to `/invocations`; '
            'the answer is `{"predictions": [[...], ...]}`, one row of probabilities per image.'
        )
    return "## Input and output\n\n" + "\n".join(lines)


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
    else:
        text = (
            f"Temperature T = {facts.temperature:.4f}, fitted on the {facts.calibration_split} split (which the "
            f"model did not train on) by minimising the NLL. On the test split, ECE ({ECE_BINS} bins) "
            f"{fixed(facts.ece_before, 4)} before, {fixed(facts.ece_after, 4)} after. Dividing the logits by T "
            "changes no prediction, only the confidences."
        )
        if facts.calibration_unsteady:
            text += (
                f" Caution: T was fitted on {facts.calibration_images} images (few, or all classified right), so it "
                "may be far from the one a larger validation split would give."
            )
    return "## Calibration\n\n" + text


def per_class_section(facts: CardFacts, shown: tuple[ClassRow, ...]) -> str:
    rows = [(row.name, str(row.test_images), fixed(row.sensitivity, 4), fixed(row.specificity, 4)) for row in shown]
    note = "Each class against the rest, on the test split: sensitivity TP / (TP + FN), specificity TN / (TN + FP)."
    if len(shown) < len(facts.classes):
        note += (
            f" The {len(shown)} classes of lowest sensitivity of {len(facts.classes)}; every class in "
            f"{MODEL_CARD_FILE} and classification_report.txt of run `{facts.run_id}`."
        )
    return "## Per class\n\n" + note + "\n\n" + table(("class", "test images", "sensitivity", "specificity"), rows)


def score_text(score: Score, prefix: str = "") -> str:
    """'0.9123 (0.8800–0.9400)', the bounds after `prefix`; the value alone for a metric without an interval;
    '(n/a)' for an undefined one."""
    if score.low is None or score.high is None:
        return fixed(score.value, 4)
    if not (finite(score.low) and finite(score.high)):
        return f"{fixed(score.value, 4)} ({prefix}n/a)"
    return f"{fixed(score.value, 4)} ({prefix}{fixed(score.low, 4)}–{fixed(score.high, 4)})"


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
    return tags


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
