"""Search-space entries keyed by TrainConfig dotted paths, with `when:` conditions.

```yaml
space:
  optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  loss.name: {type: categorical, choices: [ce, focal, f1]}
  loss.gamma: {type: float, low: 0.5, high: 3.0, when: {loss.name: focal}}
```
Every key, bound and choice is checked against the TrainConfig types when the spec is loaded, so a
typo fails before the first trial, not in the middle of a search.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_origin

import optuna

from maskcls.config import check_value, field_type
from maskcls.errors import ConfigError, UserError, quoted

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    path: str  # TrainConfig dotted path, also the Optuna parameter name
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)  # path -> values for which it is active

    def active(self, chosen: Mapping[str, Any]) -> bool:
        return all(chosen.get(path) in values for path, values in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.low is None or self.high is None:  # parse() refuses such an entry
            raise ConfigError(f"{self.path}: a {self.type} parameter needs low and high")
        if self.type == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)


def parse(raw: Any, where: str = "space") -> list[Param]:
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where}: expected a mapping of config paths to parameter definitions")
    params: list[Param] = []
    for path, entry in raw.items():
        # a key that is not a plain dotted name is quoted: a message stays one line
        here = f"{where}.{path}" if re.fullmatch(r"[\w.-]+", str(path)) else f"{where}[{quoted(path)}]"
        params.append(_parse_one(str(path), entry, params, here))
    return params


def _parse_one(path: str, entry: Any, earlier: list[Param], where: str) -> Param:
    try:
        field_type(path)
    except ConfigError as err:
        raise UserError(f"{where}: {err}") from None
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: expected a mapping with `type` and its bounds or choices")
    known = {"type", "low", "high", "log", "step", "choices", "when"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown field {quoted(unknown[0])}; valid fields: {', '.join(sorted(known))}"
        )
    kind = entry.get("type")
    if kind not in TYPES:
        raise UserError(f"{where}: type must be one of {', '.join(TYPES)}, got {quoted(kind)}")
    when = _parse_when(entry.get("when", {}), earlier, where)
    try:
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{where}: categorical needs a non-empty `choices` list")
            # Optuna stores categorical values as given; lists (e.g. image sizes) become tuples.
            checked = tuple(_storable(check_value(path, c)) for c in choices)
            return Param(path, kind, choices=checked, when=when)
        low, high = entry.get("low"), entry.get("high")
        if low is None or high is None:
            raise UserError(f"{where}: {kind} needs `low` and `high`")
        low, high = check_value(path, low), check_value(path, high)
        if not isinstance(low, int | float) or isinstance(low, bool):
            raise UserError(f"{where}: {path} is not numeric; use type: categorical")
        if kind == "int" and not isinstance(low, int):
            raise UserError(f"{where}: {path} is a float field; use type: float")
        if not low < high:
            raise UserError(f"{where}: low must be below high, got {low} and {high}")
        log, step = bool(entry.get("log", False)), entry.get("step")
        if log and (low <= 0 or step is not None):
            raise UserError(f"{where}: log scale needs low > 0 and no step")
        return Param(
            path,
            kind,
            low=float(low) if kind == "float" else low,
            high=float(high) if kind == "float" else high,
            log=log,
            step=step,
            when=when,
        )
    except ConfigError as err:
        raise UserError(f"{where}: {err}") from None


def _storable(value: Any) -> Any:
    """Optuna categorical choices must be None, bool, int, float or str: tuples travel as `128x96`."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else value


def config_value(path: str, value: Any) -> Any:
    """The TrainConfig value of a stored Optuna value (undoes `_storable`)."""
    if isinstance(value, str) and get_origin(field_type(path)) is tuple:
        return [int(v) for v in value.split("x")]
    return value


def _parse_when(raw: Any, earlier: list[Param], where: str) -> dict[str, tuple]:
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}.when: expected a mapping such as {{loss.name: focal}}")
    by_path = {p.path: p for p in earlier}
    when = {}
    for path, values in raw.items():
        parent = by_path.get(path)
        if parent is None or parent.type != "categorical":
            names = [p.path for p in earlier if p.type == "categorical"]
            raise UserError(
                f"{where}.when: {quoted(path)} must be a categorical parameter listed before it "
                f"(available: {', '.join(names) or 'none'})"
            )
        values = tuple(values) if isinstance(values, list) else (values,)
        bad = [v for v in values if v not in parent.choices]
        if bad:
            raise UserError(
                f"{where}.when: {quoted(bad[0])} is not a choice of {path} "
                f"({', '.join(map(str, parent.choices))})"
            )
        when[path] = values
    return when


def suggest(trial: optuna.Trial, params: list[Param]) -> dict[str, Any]:
    """TrainConfig overrides for this trial; conditional parameters only where active."""
    chosen: dict[str, Any] = {}
    for param in params:
        if param.active(chosen):
            chosen[param.path] = param.suggest(trial)
    return {p.path: config_value(p.path, chosen[p.path]) for p in params if p.path in chosen}


def overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig overrides of a trial's stored parameters: what `suggest` returned for it."""
    return {path: config_value(path, value) for path, value in params.items()}


def check_recipe(recipe: Any, params: list[Param], where: str) -> dict[str, Any]:
    """An `enqueue:` recipe: values for space parameters, each valid for its parameter."""
    if not isinstance(recipe, Mapping):
        raise UserError(f"{where}: expected a mapping of space parameters to values")
    by_path = {p.path: p for p in params}
    out = {}
    for path, value in recipe.items():
        param = by_path.get(path)
        if param is None:
            raise UserError(f"{where}: {quoted(path)} is not in the space (space: {', '.join(by_path)})")
        try:
            value = _storable(check_value(path, config_value(path, value)))
        except (ConfigError, ValueError) as err:
            raise UserError(f"{where}: {path}: {err}") from None
        if param.type == "categorical" and value not in param.choices:
            raise UserError(
                f"{where}: {quoted(value)} is not a choice of {path} ({', '.join(map(str, param.choices))})"
            )
        if param.type != "categorical" and not param.low <= value <= param.high:
            raise UserError(f"{where}: {path}={value} is outside [{param.low}, {param.high}]")
        out[path] = value
    return out
