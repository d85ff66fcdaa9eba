"""The reporting checklist: the CLAIM 2024 and TRIPOD+AI items a final run's record answers, and those it cannot.

Reviewers of a medical-imaging model ask for the same things in the same words (CLAIM 2024:
the Checklist for Artificial Intelligence in Medical Imaging; TRIPOD+AI: the reporting guideline
for prediction models that use machine learning). `checklist_markdown` renders, from the record
alone, the items the run can answer (the model card's facts, metrics.json as final.py wrote it,
and the leakage check as the study's run recorded it) and lists the rest as open: those a flag
would answer name the flag, those only the user can answer carry a one-line prompt.

Pure rendering: nothing is measured or computed again here. Counts only: no image key and no
patient id is written. CLAIM items are named by their topic (CLAIM 2024 renumbered 2020's list);
TRIPOD+AI items by number and topic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from search.evaluation.formatting import fixed, span
from search.final_model.card import CardFacts, table
from search.tracking.study_run import StudyLeaks

CHECKLIST_FILE = "checklist.md"
CHECKLIST_TAG = "checklist"
"""The registered version's tag that says how many items are answered and where the whole checklist is."""
SPLITS = ("train", "val", "test")
LEAK_KINDS = ("exact", "near", "mirror")
LEAK_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
SPLIT_RULES_IN_WORDS = {
    "patients": "by patient: each patient's images in one split (grouped and stratified by class)",
    "stratified": "by image, stratified by class (no patient grouping)",
    "folders": "as the source's train/, val/ and test/ folders give it",
    "manifest_column": "as the manifest's split column gives it",
}


@dataclass(frozen=True)
class Item:
    """One line of the checklist: its topic, the guidelines' items it answers, and the answer or what would give it."""

    topic: str
    claim: str
    """The CLAIM 2024 item(s), by topic."""
    tripod: str
    """The TRIPOD+AI item(s): number and topic."""
    answer: str | None
    """Markdown from the record; None: open."""
    prompt: str = ""
    """For an open item: the flag that answers it, or what the user should write."""

    @property
    def answered(self) -> bool:
        return self.answer is not None


# ---------------------------------------------------------------- the document


def checklist_markdown(facts: CardFacts, record: Mapping[str, Any], leaks: StudyLeaks | None) -> str:
    """The checklist in Markdown: a summary table of every item, then each answered item filled from the record,
    then the open ones with their prompts. `record` is metrics.json as final.py wrote it; `leaks` the study's
    leakage check, or None where final.py could not reach the study's run."""
    items = checklist_items(facts, record, leaks)
    answered = [item for item in items if item.answered]
    still_open = [item for item in items if not item.answered]
    parts = [
        header(facts, len(answered), len(still_open)),
        "## Summary\n\n"
        + table(
            ("item", "CLAIM 2024", "TRIPOD+AI", "status"),
            [(item.topic, item.claim, item.tripod, "answered" if item.answered else "open") for item in items],
        ),
        "## Answered from the record\n\n" + "\n\n".join(answered_text(item) for item in answered),
        "## Open\n\n" + "\n".join(f"- [ ] **{item.topic}** ({guidelines(item)}): {item.prompt}" for item in still_open),
    ]
    return "\n\n".join(parts) + "\n"


def checklist_tag(facts: CardFacts, record: Mapping[str, Any], leaks: StudyLeaks | None) -> str:
    """The registered version's tag: '12 answered, 17 open: checklist.md in the model's files and on run ID'."""
    items = checklist_items(facts, record, leaks)
    answered = sum(item.answered for item in items)
    return (
        f"{answered} answered, {len(items) - answered} open: {CHECKLIST_FILE} in the model's files and on run "
        f"{facts.run_id}"
    )


def header(facts: CardFacts, answered: int, still_open: int) -> str:
    where = f"`{facts.model_uri}`, " if facts.model_uri else ""
    return (
        f"# Reporting checklist: {facts.title}\n\n"
        f"The items of CLAIM 2024 (Checklist for Artificial Intelligence in Medical Imaging) and TRIPOD+AI that a "
        f"reviewer asks of this model ({where}final run `{facts.run_id}`). {answered} are answered from the run's "
        f"record: the model card, metrics.json and the study's run. {still_open} are open: a flag of final.py "
        "answers some; only you can answer the rest. CLAIM items are named by topic, TRIPOD+AI items by number. "
        "Counts only: no image names and no patient identifiers."
    )


def guidelines(item: Item) -> str:
    return f"CLAIM: {item.claim}; TRIPOD+AI: {item.tripod}"


def answered_text(item: Item) -> str:
    return f"### {item.topic}\n\n*{guidelines(item)}*\n\n{item.answer}"


# ---------------------------------------------------------------- the items


def checklist_items(facts: CardFacts, record: Mapping[str, Any], leaks: StudyLeaks | None) -> list[Item]:
    """Every item: first those the record (or a flag) can answer, then those only the user can."""
    return [
        data_source(facts),
        class_counts(facts),
        split_made(facts, record),
        leakage(leaks),
        model_and_hyperparameters(facts),
        class_imbalance(facts),
        calibration(record),
        intervals(record),
        subgroups(record),
        external(record),
        operating_point(record),
        test_used_once(facts, record),
        *USER_ITEMS,
    ]


def data_source(facts: CardFacts) -> Item:
    lines = [
        f"- Source: {facts.data_name}" + (" (generated images: --data synthetic)" if facts.synthetic else ""),
        f"- Data digest: `{facts.data_digest}` (the run's MLflow dataset: every split's files, labels, sizes and "
        "times)",
    ]
    if facts.manifest_digest:
        lines.append(f"- Manifest digest: `{facts.manifest_digest}` (sha256 of the manifest's bytes, first 12)")
    if facts.smoke:
        lines.append("- A --smoke study: a small per-class subsample of each split")
    return Item("Data source and digest", "Data sources", "5a Data sources", "\n".join(lines))


def class_counts(facts: CardFacts) -> Item:
    topic, claim, tripod = (
        "Images per class and split",
        "Data partitions (proportions); flow of cases",
        "21 Participants and outcome events in each analysis",
    )
    if facts.class_counts is None:
        return Item(topic, claim, tripod, None, "the run did not record its class counts per split")
    rows = [
        (name, *(str(facts.class_counts[split].get(name, 0)) for split in SPLITS))
        for name in (row.name for row in facts.classes)
    ]
    rows.append(("all", *(str(facts.split_sizes[split]) for split in SPLITS)))
    text = table(("class", *SPLITS), rows)
    if facts.patients:
        text += "\n\nPatients: " + ", ".join(f"{split} {facts.patients.get(split, 0)}" for split in SPLITS) + "."
    return Item(topic, claim, tripod, text)


def split_made(facts: CardFacts, record: Mapping[str, Any]) -> Item:
    rule = SPLIT_RULES_IN_WORDS.get(facts.split_by or "", facts.split_by or "not recorded")
    from_record = record.get("settings", {}).get("split_from")
    followed = {
        "study_record": "the study's own split, image by image, as its split.json recorded it",
        "seed": "cut again with the study's seed (the study's run has no split.json to follow): the study's split "
        "only if the data is unchanged",
    }.get(from_record, "not recorded")
    lines = [
        f"- Split: {rule} (split_by: {facts.split_by or 'not recorded'})",
        f"- In full: {facts.split_method}",
        f"- This run's split: {followed}",
    ]
    return Item(
        "How the split was made",
        "Data partitions: how assigned; level at which they are disjoint",
        "12a How the data were used (partitioning)",
        "\n".join(lines),
    )


def leakage(leaks: StudyLeaks | None) -> Item:
    topic, claim, tripod = (
        "Leakage check across splits",
        "Data partitions: level at which they are disjoint",
        "7 Data preparation (quality checking)",
    )
    if leaks is None:
        unreachable = "final.py could not reach the study's run: see the study run (its leak_* metrics)"
        return Item(topic, claim, tripod, None, unreachable)
    if not leaks.counts:
        return Item(
            topic,
            claim,
            tripod,
            None,
            f"the study's run `{leaks.study_run_id}` predates the leakage check: see the study run, or run a new study",
        )
    found = [
        f"{a}-{b}: " + ", ".join(f"{leaks.counts.get(f'leak_{kind}_{a}_{b}', 0)} {kind}" for kind in LEAK_KINDS)
        for a, b in LEAK_PAIRS
        if any(leaks.counts.get(f"leak_{kind}_{a}_{b}", 0) for kind in LEAK_KINDS)
    ]
    if not found:
        answer = (
            "No exact, near-duplicate or mirrored copies of an image across train, val and test (the study's leakage "
            f"check, on run `{leaks.study_run_id}`)."
        )
    else:
        answer = (
            f"Duplicate pairs across splits: {'; '.join(found)} (the study's leakage check, on run "
            f"`{leaks.study_run_id}`; every pair in its leakage.csv). The test scores may be inflated by them."
        )
    return Item(topic, claim, tripod, answer)


def model_and_hyperparameters(facts: CardFacts) -> Item:
    origin = [f"the configuration of {facts.config_source}" + (f", trial {facts.trial}" if facts.trial else "")]
    if facts.search_best is not None:
        origin.append(f"the trial's best {facts.search_metric} in the search {fixed(facts.search_best, 4)} (val)")
    start = "timm's pretrained weights" if facts.pretrained else "random initialisation"
    lines = [
        f"- Model: {facts.model} ({' + '.join(facts.backbones)}), {facts.img_size}×{facts.img_size} px RGB in, "
        f"{len(facts.classes)} class probabilities out; from {start}",
        f"- Selected by the hyperparameter search: {'; '.join(origin)}",
        f"- Trained on {facts.train_on} ({facts.train_images} images), {facts.epochs} epoch(s), seed {facts.seed}",
    ]
    values = facts.hyperparameters.items()
    knobs = table(
        ("hyperparameter", "value"),
        [(key, f"{value:.4g}" if isinstance(value, float) else str(value)) for key, value in values],
    )
    return Item(
        "Model, its selection and hyperparameters",
        "Model description; initialisation; training details; selection of the final model",
        "12c Type of model, model building, hyperparameter tuning",
        "\n".join(lines) + "\n\n" + knobs,
    )


def class_imbalance(facts: CardFacts) -> Item:
    topic, claim, tripod = "Class imbalance", "Training details", "13 Class imbalance"
    weighting = facts.hyperparameters.get("class_weighting")
    if facts.class_counts is None:
        return Item(topic, claim, tripod, None, "the run did not record its class counts per split")
    train = [count for count in facts.class_counts["train"].values() if count > 0]
    ratio = f"{max(train) / min(train):.1f}:1" if train else "n/a"
    text = f"Largest to smallest class in the train split: {ratio}. Class weighting in the loss: " + (
        f"{weighting} (the class_weighting hyperparameter)." if weighting is not None else "none recorded."
    )
    return Item(topic, claim, tripod, text)


def calibration(record: Mapping[str, Any]) -> Item:
    topic, claim, tripod = "Calibration", "Metrics of model performance", "12e Performance measures (calibration)"
    fitted = record["calibration"]
    if fitted.get("split") is None:
        text = (
            f"Not calibrated (temperature 1): the model trained on train+val, so no split was left to fit one on "
            f"(final.py --keep-val fits one on val). Test ECE ({fitted['ece_bins']} bins) "
            f"{fixed(fitted['ece_before'], 4)}."
        )
    else:
        text = (
            f"Temperature {fitted['temperature']:.4f}, fitted on the {fitted['split']} split "
            f"({fitted['fitted_on_images']} images, which the model did not train on). Test ECE "
            f"({fitted['ece_bins']} bins): {fixed(fitted['ece_before'], 4)} before, {fixed(fitted['ece_after'], 4)} "
            "after."
        )
    return Item(topic, claim, tripod, text)


def intervals(record: Mapping[str, Any]) -> Item:
    bounds = record["intervals"]
    rows = [
        (key, fixed(value, 4), interval_text(bounds.get(key)))
        for key, value in record["test"].items()
        if key in bounds or key == "test_loss"
    ]
    text = (
        f"{round(100 * bounds['confidence'])} % intervals: {bounds['method']}, {bounds['resamples']:,} resamples, "
        f"seed {bounds['seed']}.\n\n" + table(("metric", "test", "interval"), rows)
    )
    return Item(
        "Performance with confidence intervals",
        "Statistical measures of uncertainty; performance metrics",
        "12e Performance measures; 23a Performance estimates with confidence intervals",
        text,
    )


def interval_text(bounds: Sequence[float] | None) -> str:
    if bounds is None:
        return "—"
    return span(*bounds)


def bounded(score: Mapping[str, float]) -> str:
    """'0.9123 (0.8800–0.9400)' from {"value", "low", "high"}."""
    return f"{fixed(score['value'], 4)} ({interval_text((score['low'], score['high']))})"


SUBGROUP_METRICS = ("acc", "balanced_acc", "sensitivity", "specificity")


def subgroups(record: Mapping[str, Any]) -> Item:
    topic, claim, tripod = (
        "Results per subgroup",
        "Robustness or sensitivity analysis; potential bias",
        "14 Fairness; 23a Performance estimates (key subgroups)",
    )
    found = record.get("subgroups")
    if not found:
        return Item(
            topic,
            claim,
            tripod,
            None,
            "a study run with --subgroups (run.py --subgroups site,sex: a manifest's columns) reports them here",
        )
    return Item(topic, claim, tripod, subgroup_tables(found))


def subgroup_tables(found: Mapping[str, Any]) -> str:
    positive = found.get("positive")
    lines = [
        "Per subgroup value, on the test split, with 95 % bootstrap intervals; *below*: its interval lies wholly "
        "below the overall value. Sensitivity and specificity: "
        + (f"of class {positive}." if positive else "macro mean of one-vs-rest.")
    ]
    for column, values in found["columns"].items():
        rows = [
            (
                str(value),
                str(group["images"]),
                *(bounded(group["metrics"][key]) if key in group["metrics"] else "—" for key in SUBGROUP_METRICS),
                ", ".join(group.get("below_overall", [])) or "—",
                group.get("note") or "",
            )
            for value, group in values.items()
        ]
        lines.append(f"**{column}**\n\n" + table(("value", "images", *SUBGROUP_METRICS, "below", "note"), rows))
    return "\n\n".join(lines)


def external(record: Mapping[str, Any]) -> Item:
    topic, claim, tripod = (
        "External test",
        "Validation or testing on external data",
        "16 Development versus evaluation data; 23a Performance estimates",
    )
    found = record.get("external")
    if not found:
        return Item(topic, claim, tripod, None, "test on another site's images with final.py --external DATA")
    bounds = found.get("intervals", {})
    rows = [(key, fixed(value, 4), interval_text(bounds.get(key))) for key, value in found["metrics"].items()]
    skipped = f" ({found['skipped_images']} unreadable, skipped)" if found.get("skipped_images") else ""
    text = f"- Source: {found['source']}, digest `{found['digest']}`, {found['images']} images{skipped}\n\n" + table(
        ("metric", "external", "interval"), rows
    )
    if found.get("operating_point"):
        text += "\n\nAt the operating point: " + operating_point_test(found["operating_point"]) + "."
    if found.get("subgroups"):
        text += "\n\nPer subgroup on the external set:\n\n" + subgroup_tables(found["subgroups"])
    return Item(topic, claim, tripod, text)


def operating_point(record: Mapping[str, Any]) -> Item:
    topic, claim, tripod = (
        "Operating point (decision threshold)",
        "Metrics of model performance (threshold)",
        "15 Model output (classification thresholds and how they were chosen)",
    )
    found = record.get("operating_point")
    if not found:
        return Item(
            topic,
            claim,
            tripod,
            None,
            "choose a threshold on val with final.py --operating-point sensitivity=0.95 --positive CLASS",
        )
    val = found.get("val", {})
    text = (
        f"Threshold {fixed(found['threshold'], 4)} on the calibrated probability of class {found['positive']}, "
        f"chosen on the {found.get('chosen_on', 'val')} split for {found['target']} {fixed(found['target_value'], 2)} "
        f"(there: sensitivity {fixed(val.get('sensitivity', float('nan')), 4)}, specificity "
        f"{fixed(val.get('specificity', float('nan')), 4)}). On the test split: " + operating_point_test(found) + "."
    )
    return Item(topic, claim, tripod, text)


def operating_point_test(found: Mapping[str, Any]) -> str:
    test = found["test"]
    return f"sensitivity {bounded(test['sensitivity'])}, specificity {bounded(test['specificity'])}"


def test_used_once(facts: CardFacts, record: Mapping[str, Any]) -> Item:
    settings = record.get("settings", {})
    chosen = ["the hyperparameters on val by the search"]
    if settings.get("calibration_split") not in (None, "none"):
        chosen.append(f"the temperature on {settings['calibration_split']}")
    if record.get("operating_point"):
        chosen.append("the threshold on val")
    text = (
        f"The search never read the test split ({facts.test_images} images); this run evaluated it once, after "
        f"training, and chose nothing on it ({', '.join(chosen)}). Every final run of this study tests the same "
        "images: report the one you planned, not the best of several."
    )
    if settings.get("split_from") == "seed":
        text += " Caution: the split was cut again, not read from the study's record (see the split item)."
    return Item(
        "The test split used once",
        "Method of selecting the final model; data partitions",
        "12a How the data were used (development and evaluation)",
        text,
    )


USER_ITEMS = (
    Item(
        "Intended use and users",
        "Background: intended use and clinical role",
        "3b Target population, intended use and users",
        None,
        "who uses it, on which patients, at which point of care, to decide what?",
    ),
    Item(
        "Study design",
        "Study design (prospective or retrospective); study goal",
        "4 Objectives (development and/or evaluation)",
        None,
        "retrospective or prospective; consecutive, random or convenience series?",
    ),
    Item(
        "Data collection: dates, sites, setting",
        "Eligibility criteria (setting, location, dates)",
        "5b Dates; 6a Setting and centres",
        None,
        "when and where were the images acquired, by which scanners and sites?",
    ),
    Item(
        "Eligibility of patients",
        "Eligibility criteria (inclusion and exclusion)",
        "6b Eligibility criteria",
        None,
        "which patients and images were included and which excluded, and why?",
    ),
    Item(
        "Reference standard and labelling",
        "Reference standard: definition, rationale, annotators, tools, rater variability",
        "8a–c Outcome: definition, assessment, blinding",
        None,
        "how was each label established, by whom (qualifications), with which tool, and how consistently?",
    ),
    Item(
        "Image acquisition and preprocessing",
        "Data preprocessing steps; image acquisition",
        "7 Data preparation",
        None,
        "acquisition protocol and any preprocessing before this tool (it only resizes, and windows DICOM)",
    ),
    Item(
        "De-identification",
        "De-identification methods",
        "— (not a TRIPOD+AI item)",
        None,
        "how were the images de-identified (burned-in text, headers)? this tool stores patient ids only as salted "
        "hashes",
    ),
    Item(
        "Sample size",
        "Intended sample size and how it was determined",
        "10 Sample size",
        None,
        "why this many images and patients; what precision does it allow?",
    ),
    Item(
        "Missing data",
        "How missing data were handled",
        "11 Missing data",
        None,
        "images that were missing or unreadable (final.py's log names those skipped) and how they were handled",
    ),
    Item(
        "Characteristics per partition",
        "Demographic and clinical characteristics of cases in each partition",
        "20b Characteristics of participants (overall and per data source)",
        None,
        "age, sex, disease stage and site of the patients in each split",
    ),
    Item(
        "Fairness and health inequalities",
        "Study limitations (potential bias)",
        "3c Health inequalities; 14 Fairness",
        None,
        "which groups could the model serve worse, and how was that checked (see the subgroup item)?",
    ),
    Item(
        "Failure analysis",
        "Failure analysis of incorrectly classified cases",
        "— (not a TRIPOD+AI item)",
        None,
        "what do the misclassified images have in common? (predictions.csv and the confusion matrix are on the run)",
    ),
    Item(
        "Explainability",
        "Methods for explainability or interpretability",
        "— (not a TRIPOD+AI item)",
        None,
        "how will users understand or check an answer? this tool makes no saliency maps",
    ),
    Item(
        "Limitations and generalisability",
        "Study limitations; implications for practice",
        "26 Limitations; 27c Future research and generalisability",
        None,
        "the limits a reader must know (the model card lists those the record shows)",
    ),
    Item(
        "Ethics approval",
        "— (not a CLAIM item)",
        "17 Ethical approval",
        None,
        "the ethics committee's approval and consent (or waiver), with reference numbers",
    ),
    Item(
        "Registration, protocol, funding, data and code",
        "Registration; protocol; funding",
        "18a–f Open science: funding, conflicts of interest, protocol, registration, data and code sharing",
        None,
        "where the protocol is, who funded it, conflicts of interest, and whether data and code are shared",
    ),
    Item(
        "Patient and public involvement",
        "— (not a CLAIM item)",
        "19 Patient and public involvement",
        None,
        "were patients or the public involved in the design, conduct or reporting?",
    ),
)
