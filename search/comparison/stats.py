"""What a comparison says about two models on the same test images, and the one-sentence recommendation.

The paired test itself (the paired bootstrap interval of a difference in accuracy and
McNemar's exact test) lives in search.evaluation.paired; here it becomes words.

Pure (numpy, scipy): testable without torch or MLflow.
"""

from __future__ import annotations

from search.comparison.results import ModelResult
from search.evaluation.formatting import ci, finite, ms, p_text, percent, points, ratio
from search.evaluation.intervals import CONFIDENCE, Interval, negated
from search.evaluation.paired import PairedTest

# --- words ----------------------------------------------------------------------------------------------------


def winner_first(pair: PairedTest) -> PairedTest:
    """The pair seen from the more accurate model's side (as stored on a tie), so a sentence and its counts agree."""
    if pair.difference.value >= 0 or not finite(pair.difference.value):
        return pair
    return PairedTest(pair.b, pair.a, negated(pair.difference), pair.p_value, pair.b_only, pair.a_only)


def describe_pair(pair: PairedTest) -> str:
    """One line, from the more accurate model's side: by how much, how sure, and whether it is more than chance."""
    verdict = "significant" if pair.significant else "not a significant difference"
    won = winner_first(pair)
    sure = f"{ci(won.difference, CONFIDENCE)}, {p_text(pair.p_value)}: {verdict}"
    if not finite(won.difference.value):
        return f"{won.a} and {won.b}: accuracy difference not measured, {sure}"
    if won.difference.value == 0:
        return f"{won.a} and {won.b} tie in accuracy, {sure}"
    return f"{won.a} beats {won.b} by {points(won.difference.value)} points, {sure}"


def recommend(models: list[ModelResult], pairs: list[PairedTest]) -> str:
    """Which lightweight model to pick, in one sentence that follows from the numbers.

    The most accurate model, unless one that is not significantly less accurate
    (McNemar) is faster at inference (batch 1): then the fastest of those, fewer
    parameters breaking a tie. The reference model is never a candidate.
    """
    lightweight = [model for model in models if not model.reference]
    if not lightweight:
        raise ValueError("no lightweight model to recommend (only the reference)")
    if len(lightweight) == 1:
        alone = "the only model compared" if len(models) == 1 else "the only model compared besides the reference"
        return f"Pick {lightweight[0].name}: {alone}."
    best = max(lightweight, key=lambda model: (_accuracy(model), -_latency(model), -model.costs.parameters))
    others = [model for model in lightweight if model is not best]
    against_best = {model.name: versus(pairs, model.name, best.name) for model in others}
    close = [model for model in others if not against_best[model.name][1].significant]
    chosen = min([best, *close], key=lambda model: (_latency(model), model.costs.parameters, -_accuracy(model)))
    if chosen is not best:
        return _faster_sentence(chosen, best, *against_best[chosen.name])
    worse = [model for model in others if all(model is not near for near in close)]
    return _best_sentence(best, close, worse, against_best)


def _best_sentence(
    best: ModelResult,
    close: list[ModelResult],
    worse: list[ModelResult],
    against_best: dict[str, tuple[Interval, PairedTest]],
) -> str:
    """The most accurate model is picked: because every other is significantly worse, or it is also the fastest."""
    accuracy = f"test accuracy {percent(_accuracy(best))}"
    if not close:
        return f"Pick {best.name}: the most accurate ({accuracy}), and {_worse_clause(worse, against_best)}."
    fastest = all(_latency(best) < _latency(model) for model in close)
    speed = "the fastest at inference" if fastest else "at least as fast at inference"
    sentence = (
        f"Pick {best.name}: the most accurate ({accuracy}) and, of the models not significantly worse "
        f"({_join([m.name for m in close])}), {speed} ({ms(_latency(best))} ms per image vs "
        f"{_join([ms(_latency(m)) for m in close])} ms)"
    )
    if worse:
        sentence += f"; {_worse_clause(worse, against_best)}"
    return sentence + "."


def _worse_clause(worse: list[ModelResult], against_best: dict[str, tuple[Interval, PairedTest]]) -> str:
    """'vit (-4.1 points, p = 0.003) and hybrid (-2.5 points, p = 0.02) are significantly worse'."""
    named = [
        f"{m.name} ({points(against_best[m.name][0].value)} points, {p_text(against_best[m.name][1].p_value)})"
        for m in worse
    ]
    return f"{_join(named)} {'is' if len(worse) == 1 else 'are'} significantly worse"


def _faster_sentence(chosen: ModelResult, best: ModelResult, difference: Interval, pair: PairedTest) -> str:
    """A less accurate model is picked: it is faster (or as fast and smaller), and not significantly less accurate."""
    if _latency(chosen) < _latency(best):
        edge = (
            f"{ratio(_latency(best) / _latency(chosen))} faster at inference than {best.name} "
            f"({ms(_latency(chosen))} vs {ms(_latency(best))} ms per image)"
        )
    else:
        edge = (
            f"as fast at inference as {best.name} ({ms(_latency(chosen))} ms per image) with fewer parameters "
            f"({chosen.costs.parameters:,} vs {best.costs.parameters:,})"
        )
    return (
        f"Pick {chosen.name}: {edge} and not significantly less accurate "
        f"({points(difference.value)} points, {ci(difference, CONFIDENCE)}, {p_text(pair.p_value)})."
    )


def versus(pairs: list[PairedTest], name: str, other: str) -> tuple[Interval, PairedTest]:
    """`name`'s accuracy minus `other`'s, whichever way round their pair was stored.

    Public because the report reads the reference's pairs (stored reference first) from the lightweight side.
    """
    for pair in pairs:
        if (pair.a, pair.b) == (name, other):
            return pair.difference, pair
        if (pair.a, pair.b) == (other, name):
            return negated(pair.difference), pair
    raise ValueError(f"no paired test between {name} and {other}: cannot tell whether they differ")


def _accuracy(model: ModelResult) -> float:
    return model.metrics["test_acc"].value


def _latency(model: ModelResult) -> float:
    """Milliseconds per image at batch 1: what a single request waits."""
    return model.costs.latency_ms[1]


def _join(items: list[str]) -> str:
    """a; a and b; a, b and c."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
