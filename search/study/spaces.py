"""Search spaces: a small YAML format, one loader that validates it, one sampler.

    parameters:
      lr:         {type: float, low: 1.0e-5, high: 3.0e-3, log: true}
      batch_size: {type: categorical, choices: [16, 32]}
      fusion:     {type: categorical, choices: [single_token, two_tokens]}
      vit_depth:  {type: int, low: 4, high: 12, when: {fusion: two_tokens}}
      rotation_deg: {type: float, low: 5.0, high: 30.0, or: 0.0}
      early_stop_patience: {type: fixed, value: 4}

Parameters are sampled in file order (Optuna define-by-run); `when` makes one
conditional on the values of parameters above it. `or` makes a number a choice first:
off (the `or` value) or on, with a magnitude searched in [low, high]. A knob whose best value
is often exactly its floor (no augmentation, no label smoothing) is then a point TPE can
reach, where a range from 0 makes it sample 0 for every such knob at once almost never. Names are the trainable's
hyperparameters (trainables.config, which also holds each one's bounds and the models
it applies to); anything not in the space keeps its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainables.config import (
    DEFAULTS,
    KNOBS,
    MEMORY_GROWS,
    Hyperparameters,
    finite,
    retired_knob_problem,
    value_problem,
)

TYPES = {
    "float": {"low", "high", "log", "step", "or"},
    "int": {"low", "high", "log", "step", "or"},
    "categorical": {"choices"},
    "fixed": {"value"},
}
COMMON_KEYS = {"type", "when"}
SCALARS = (str, int, float, bool, type(None))
"""What a categorical choice or a `when` value may be (YAML lists and mappings are not)."""
TOP_LEVEL_KEYS = {"parameters"}
SWITCH_SUFFIX = "_on"
"""An `off` parameter's switch, in Optuna's params: `rotation_deg_on` True or False. It is not a hyperparameter:
the searcher hands trials the hyperparameters alone (Space.hyperparameters)."""


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message lists what is valid."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    value: Any = None
    when: dict[str, tuple] = field(default_factory=dict)
    off: float | int | None = None
    """The file's `or:` value, which a number takes when its switch is off (None: no switch, always searched in
    [low, high]). The key is not `off`, which YAML 1.1 reads as False."""

    def values(self) -> list:
        """The values this parameter can take, as far as a finite list says."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "fixed":
            return [self.value]
        return [self.low, self.high] if self.off is None else [self.off, self.low, self.high]

    @property
    def switch(self) -> str | None:
        """The name of its on/off choice in Optuna's params (None: it has none)."""
        return None if self.off is None else self.name + SWITCH_SUFFIX

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for a value: an `off` parameter's switch first, its magnitude only when on."""
        if self.switch is not None and not trial.suggest_categorical(self.switch, [False, True]):
            return self.off
        return self.magnitude(trial)

    def magnitude(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class Space:
    path: str
    parameters: tuple[Parameter, ...]

    def sample(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest every active parameter; return the values not in the trial's params
        (the fixed ones, and the `off` value of a switched-off parameter)."""
        chosen: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for parameter in self.active(chosen):
            if parameter.type == "fixed":
                chosen[parameter.name] = constants[parameter.name] = parameter.value
                continue
            chosen[parameter.name] = parameter.suggest(trial)
            if parameter.switch is not None and chosen[parameter.name] == parameter.off:
                constants[parameter.name] = parameter.off
        return constants

    def configuration(self, trial) -> dict[str, Any]:
        """Sample a trial's whole configuration, as the searcher hands it over: its hyperparameters (sampled,
        fixed and switched off), without the switches. Benchmarks and tests draw configurations so."""
        constants = self.sample(trial)
        return self.hyperparameters({**trial.params, **constants})

    def active(self, chosen: dict[str, Any]):
        """The parameters in file order, each only where its `when` holds for the values chosen above it
        (`chosen` is filled in by the caller as it goes)."""
        for parameter in self.parameters:
            if all(chosen.get(name) in allowed for name, allowed in parameter.when.items()):
                yield parameter

    def point(self, values: dict[str, Any]) -> dict[str, Any]:
        """The Optuna params that make the space sample `values` (hyperparameters; one left out is TPE's to
        sample), each clipped into the space: a number into [low, high], a categorical to its nearest choice, a
        switch on unless the value is its `off`. The recipe trial and a warm start's configurations are queued so."""
        chosen: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for parameter in self.active(chosen):
            if parameter.type == "fixed":
                chosen[parameter.name] = parameter.value
                continue
            if parameter.name not in values:
                continue
            wanted = values[parameter.name]
            if parameter.switch is not None:
                params[parameter.switch] = wanted != parameter.off
                if wanted == parameter.off:
                    chosen[parameter.name] = parameter.off
                    continue
            chosen[parameter.name] = params[parameter.name] = clipped(parameter, wanted)
        return params

    def recipe(self) -> dict[str, Any]:
        """The Optuna params of the knobs' defaults (the seed document's recipe) clipped into the space."""
        return self.point(DEFAULTS.to_dict())

    def hyperparameters(self, params: dict[str, Any]) -> dict[str, Any]:
        """A sampled configuration without the switches: what a trial is given."""
        return {name: value for name, value in params.items() if name not in self.switches}

    @property
    def switches(self) -> frozenset[str]:
        return frozenset(parameter.switch for parameter in self.parameters if parameter.switch is not None)

    @property
    def searched(self) -> list[str]:
        """The hyperparameters the search samples (not the fixed ones), in file order."""
        return [parameter.name for parameter in self.parameters if parameter.type != "fixed"]

    @property
    def optuna_names(self) -> set[str]:
        """The names in an Optuna trial's params: the searched hyperparameters and their switches."""
        return set(self.searched) | self.switches

    def largest(self, name: str) -> Any:
        """The largest value a numeric parameter can take: its default where the space leaves it out,
        or where a `when` condition can leave it out."""
        for parameter in self.parameters:
            if parameter.name == name:
                default = [getattr(DEFAULTS, name)] if parameter.when else []
                return max([*parameter.values(), *default])
        return getattr(DEFAULTS, name)

    def heaviest(self) -> Hyperparameters:
        """The configuration that needs the most GPU memory: the largest value of every knob whose
        memory grows with it (batch size, ViT depth), defaults elsewhere. The GPU probe measures it."""
        return Hyperparameters(**{name: self.largest(name) for name in MEMORY_GROWS})


def clipped(parameter: Parameter, value: Any) -> Any:
    """The value of the parameter's domain nearest to `value`."""
    if parameter.type == "categorical":
        if value in parameter.choices:
            return value
        numeric = [choice for choice in parameter.choices if isinstance(choice, int | float)]
        if isinstance(value, int | float) and numeric:
            return min(numeric, key=lambda choice: abs(choice - value))
        return parameter.choices[0]
    assert parameter.low is not None and parameter.high is not None, "a number's range is checked on loading"
    value = min(max(value, parameter.low), parameter.high)
    return round(value) if parameter.type == "int" else value


def load_space(path: str | Path, model: str) -> Space:
    """Read and validate a space file; raise SpaceError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file {path} does not exist: pass --space PATH or use spaces/{model}.yaml")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpaceError(f"space file {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as error:
        raise SpaceError(f"space file {path} cannot be read ({error.strerror}): pass a readable --space") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise SpaceError(f"space file {path} is not valid YAML{line}: fix its syntax") from None
    problems: list[str] = []
    parameters = parse_document(document, model, problems)
    if problems:
        raise SpaceError(f"space file {path}: " + "; ".join(problems))
    return Space(str(path), tuple(parameters))


def parse_document(document: Any, model: str, problems: list[str]) -> list[Parameter]:
    if not isinstance(document, dict) or not isinstance(document.get("parameters"), dict):
        problems.append("expected a mapping 'parameters:' of name -> {type: ..., ...}")
        return []
    unknown = sorted(set(document) - TOP_LEVEL_KEYS)
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    if not document["parameters"]:
        problems.append("'parameters' is empty: name at least one hyperparameter")
    parameters: list[Parameter] = []
    for name, spec in document["parameters"].items():
        parameter = parse_parameter(str(name), spec, model, parameters, problems)
        if parameter is not None:
            parameters.append(parameter)
    return parameters


def parse_parameter(
    name: str, spec: Any, model: str, earlier: list[Parameter], problems: list[str]
) -> Parameter | None:
    known = Hyperparameters.names()
    retired = retired_knob_problem(name)
    if retired:
        problems.append(retired)
        return None
    if name not in known:
        problems.append(f"{name}: not a hyperparameter of the trainable; valid: {', '.join(known)}")
        return None
    if model not in KNOBS[name].models:
        problems.append(f"{name}: applies to --model {' or '.join(KNOBS[name].models)} only, not {model}")
        return None
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        problems.append(f"{name}: needs 'type:' one of {', '.join(TYPES)}")
        return None
    kind = spec["type"]
    unknown = sorted(map(str, set(spec) - TYPES[kind] - COMMON_KEYS))
    if {"True", "False"} & set(unknown):
        problems.append(f"{name}: YAML reads the keys 'off', 'on', 'yes' and 'no' as true/false; write 'or: 0.0'")
        return None
    if unknown:
        valid = ", ".join(sorted(TYPES[kind] | COMMON_KEYS))
        problems.append(f"{name}: unknown key(s) {', '.join(unknown)} for type {kind}; valid: {valid}")
        return None
    before = len(problems)
    fields_: dict[str, Any] = {"when": parse_when(name, spec.get("when"), earlier, problems)}
    if kind in ("float", "int"):
        fields_.update(parse_range(name, kind, spec, problems))
    elif kind == "categorical":
        fields_["choices"] = parse_choices(name, spec.get("choices"), problems)
    else:
        if "value" not in spec:
            problems.append(f"{name}: type fixed needs 'value:'")
        fields_["value"] = spec.get("value")
    if len(problems) > before:
        return None
    parameter = Parameter(name, kind, **fields_)
    check_domain(parameter, problems)
    return parameter if len(problems) == before else None


def as_number(value: Any) -> Any:
    """YAML 1.1 reads '1e-5' as a string; accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_range(name: str, kind: str, spec: dict, problems: list[str]) -> dict:
    low, high, step = (as_number(spec.get(key)) for key in ("low", "high", "step"))
    number = int if kind == "int" else (int, float)
    if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
        problems.append(
            f"{name}: type {kind} needs numeric 'low:' and 'high:'" + (" (integers)" if kind == "int" else "")
        )
        return {}
    if not all(finite(v) for v in (low, high)):
        problems.append(f"{name}: 'low:' and 'high:' must be finite numbers, got low={low}, high={high}")
        return {}
    if low >= high:
        problems.append(
            f"{name}: empty or inverted range low={low} >= high={high}; give low < high (or use type fixed)"
        )
    log = bool(spec.get("log", False))
    if log and low <= 0:
        problems.append(f"{name}: log scale needs low > 0, got {low}")
    if step is not None and (not isinstance(step, number) or not finite(step) or step <= 0 or log):
        problems.append(f"{name}: 'step' must be a positive number and cannot combine with log")
    off = as_number(spec.get("or"))
    if "or" in spec and (not isinstance(off, number) or isinstance(off, bool) or not finite(off)):
        problems.append(f"{name}: 'or' must be a number, the value when the knob is off (e.g. or: 0.0)")
    elif off is not None and low <= off <= high:
        problems.append(f"{name}: 'or: {off}' lies inside [{low}, {high}]; put the searched range above (or below) it")
    return {"low": low, "high": high, "log": log, "step": step, "off": off}


def parse_choices(name: str, choices: Any, problems: list[str]) -> tuple:
    if not isinstance(choices, list) or not choices:
        problems.append(f"{name}: type categorical needs a non-empty list 'choices:'")
        return ()
    if not all(isinstance(choice, SCALARS) for choice in choices):
        problems.append(f"{name}: 'choices' must be plain values (numbers or text), not lists or mappings")
        return ()
    if len(set(map(repr, choices))) < len(choices):
        problems.append(f"{name}: 'choices' repeats a value")
    return tuple(choices)


def parse_when(name: str, when: Any, earlier: list[Parameter], problems: list[str]) -> dict[str, tuple]:
    if when is None:
        return {}
    by_name = {p.name: p for p in earlier}
    if not isinstance(when, dict) or not when:
        problems.append(f"{name}: 'when' must map earlier parameter names to a value or list of values")
        return {}
    conditions = {}
    for other, allowed in when.items():
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not all(isinstance(value, SCALARS) for value in allowed):
            problems.append(f"{name}: 'when' asks {other} for {list(allowed)}: give a value or a flat list of values")
            continue
        if other not in by_name or by_name[other].type not in ("categorical", "fixed"):
            problems.append(f"{name}: 'when' names {other!r}, which is not a categorical parameter defined above it")
        elif not set(allowed) <= set(by_name[other].values()):
            problems.append(f"{name}: 'when' asks {other} for {list(allowed)}, but it takes {by_name[other].values()}")
        conditions[other] = allowed
    return conditions


def check_domain(parameter: Parameter, problems: list[str]) -> None:
    """Every value the space can produce must be one the trainable accepts."""
    for value in parameter.values():
        problem = value_problem(parameter.name, value)
        if problem:
            problems.append(problem)
