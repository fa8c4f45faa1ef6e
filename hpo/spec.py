"""Study specs: `studies/<name>.yaml` says everything a search needs.

```yaml
study: demo                       # the Optuna study name
storage: null                     # default: sqlite:///runs/<study>/study.db
data: {root: runs/demo/data, synth: {people: 200, eval_people: 50, size: [96, 128]}}
n_trials: 16                      # default for --n-trials
objectives: [val_macro_f1]        # optionally + cpu_latency_ms and/or params_m (minimised, pruner: none)
fixed: {model.name: mobilenetv3_small_050, train.epochs: 6}   # TrainConfig values for every trial
sampler: {name: tpe}              # tpe (multivariate, constant liar) | random | cmaes | gp
pruner: {name: hyperband}         # hyperband | median | successive_halving | patient | threshold | none
space: {...}                      # see hpo.space
enqueue: [{optim.lr: 0.003}]      # recipes run first, so a search never ends below them
heartbeat: {interval: 10, grace: 60, max_retry: 2, outage: 300}
export: {top_k: 3}                # export-best's default: the 3 best distinct recipes as one ensemble
```
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna

from hpo import space
from hpo.protocol import quiet_experimental
from maskcls import specfiles
from maskcls.config import ModelConfig, TrainConfig, read_yaml
from maskcls.errors import ConfigError, UserError, quoted
from maskcls.weights import spec_models

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # it names a folder: runs/<study>/
METRIC = "val_macro_f1"  # maximised
# What a study may optimise besides validation macro-F1, measured once after training, the same
# way in every trial (hpo.objective): name -> direction.
OBJECTIVES: dict[str, Literal["minimize", "maximize"]] = {
    METRIC: "maximize",
    "cpu_latency_ms": "minimize",  # CPU inference per image, batch 1, one thread, fastest of 20 runs
    "params_m": "minimize",  # the model's parameters, millions
}

SAMPLERS = {
    "tpe": lambda seed, **kw: optuna.samplers.TPESampler(
        seed=seed, **{"multivariate": True, "group": True, "constant_liar": True, **kw}
    ),
    "random": lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed, **kw),
    "cmaes": lambda seed, **kw: optuna.samplers.CmaEsSampler(
        seed=seed, **{"warn_independent_sampling": False, **kw}
    ),
    "gp": lambda seed, **kw: optuna.samplers.GPSampler(
        seed=seed, **{"warn_independent_sampling": False, **kw}
    ),
}
PRUNERS = {
    "hyperband": lambda epochs, **kw: optuna.pruners.HyperbandPruner(
        **{"min_resource": 1, "max_resource": epochs, "reduction_factor": 3, **kw}
    ),
    "median": lambda epochs, **kw: optuna.pruners.MedianPruner(
        **{"n_startup_trials": 4, "n_warmup_steps": 1, **kw}
    ),
    "successive_halving": lambda epochs, **kw: optuna.pruners.SuccessiveHalvingPruner(
        **{"min_resource": 1, "reduction_factor": 3, **kw}
    ),
    "patient": lambda epochs, **kw: optuna.pruners.PatientPruner(None, **{"patience": 2, **kw}),
    "threshold": lambda epochs, **kw: optuna.pruners.ThresholdPruner(**kw),
    "none": lambda epochs, **kw: optuna.pruners.NopPruner(),
}
SPEC_KEYS = (
    "study",
    "storage",
    "data",
    "metric",
    "objectives",
    "n_trials",
    "fixed",
    "sampler",
    "pruner",
    "space",
    "enqueue",
    "heartbeat",
    "export",
)


@dataclass(frozen=True)
class Heartbeat:
    interval: int = 10  # seconds between a running trial's heartbeats
    grace: int = 60  # a RUNNING trial silent this long is failed and re-queued
    max_retry: int = 2  # re-queues of one trial before it stays failed
    outage: int = 300  # seconds the storage may stay unreachable before the run gives up


@dataclass(frozen=True)
class SynthSpec:
    """The stand-in to generate at data.root when it is missing (maskcls.data.synth)."""

    people: int = 200
    eval_people: int = 50
    seed: int = 0
    size: tuple[int, int] = (384, 512)  # photo width x height


@dataclass(frozen=True)
class Strategy:
    """A sampler or pruner: its name in SAMPLERS / PRUNERS and the keyword options it is built with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # samplers only


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    storage: str | None
    base: TrainConfig  # fixed values applied; every trial starts from it
    synth: SynthSpec | None
    n_trials: int
    sampler: Strategy
    pruner: Strategy
    params: list[space.Param]
    enqueue: list[dict]
    heartbeat: Heartbeat
    models: tuple[ModelConfig, ...]  # every (model.name, model.pretrained) a trial can get
    objectives: tuple[str, ...] = (METRIC,)  # val_macro_f1 first; more make a multi-objective study
    top_k: int = 1  # export-best's default: an ensemble of this many best distinct recipes

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        return [OBJECTIVES[name] for name in self.objectives]

    @property
    def multi(self) -> bool:
        """Several objectives: a Pareto front and no pruning (Optuna prunes single-objective studies)."""
        return len(self.objectives) > 1

    @property
    def runs_dir(self) -> Path:
        return Path("runs") / self.name

    def make_sampler(self) -> TrialSeeded:
        def make(seed: int | None) -> optuna.samplers.BaseSampler:
            with quiet_experimental():
                return SAMPLERS[self.sampler.name](seed, **self.sampler.options)

        return TrialSeeded(make, self.sampler.seed)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        with quiet_experimental():  # PatientPruner is experimental
            return PRUNERS[self.pruner.name](self.base.train.epochs, **self.pruner.options)

    def with_data(self, root: str | None) -> StudySpec:
        if not root:
            return self
        base = self.base.override({"data.root": str(Path(root).expanduser())})
        return StudySpec(**{**self.__dict__, "base": base, "synth": None})


class TrialSeeded(optuna.samplers.BaseSampler):
    """The spec's sampler, rebuilt for each trial with a seed drawn from the spec's seed and the
    trial's number. So a trial's draws depend on its number and the study's history only, not on
    which worker or machine asked: one worker repeats a seeded study exactly, and parallel workers
    (whose trials have distinct numbers) never share a random stream, which a seed per process
    cannot promise once workers restart or machines join."""

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None):
        self.make, self.seed = make, seed
        self.inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seed = self.seed
        if seed is not None:
            seed = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0] >> 1)
        self.inner = self.make(seed)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)


def available() -> list[str]:
    return specfiles.available()


def resolve(name_or_path: str) -> Path:
    """`mask` -> the shipped mask.yaml (or $HPO_STUDIES/mask.yaml); a path to a YAML file works too
    (maskcls.specfiles says in which order)."""
    found = specfiles.find(name_or_path)
    if found is not None:
        return found
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        raise UserError(f"study spec {name_or_path} not found")
    where = " and ".join(str(f) for f in specfiles.folders()) or "no spec folder"
    raise UserError(
        f"unknown study {quoted(name_or_path)}; available: {', '.join(available()) or 'none'} "
        f"(in {where}; ${specfiles.SPECS_ENV} adds a folder), or give a path to a spec file"
    )


def cache_root(study: str) -> Path:
    """Where a study's decoded-image cache goes unless its spec fixes data.cache_dir:
    $HPO_CACHE/<study> (node-local disk on a cluster), else runs/<study>/cache."""
    given = os.environ.get("HPO_CACHE")
    return Path(given).expanduser() / study if given else Path("runs") / study / "cache"


def load(name_or_path: str) -> StudySpec:
    path = resolve(name_or_path)
    raw = read_yaml(path, f"a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {quoted(unknown[0])}; valid keys: {', '.join(SPEC_KEYS)}")
    name = raw.get("study") or path.stem
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise UserError(
            f"{path}: study must be a name of letters, digits, '.', '_' and '-' (at most 100; it names "
            f"runs/<study>/), got {quoted(name)}"
        )
    if raw.get("metric", METRIC) != METRIC:
        raise UserError(f"{path}: metric must be {METRIC} (maximised), got {quoted(raw['metric'])}")

    data = raw.get("data") or {}
    if not isinstance(data, Mapping) or set(data) - {"root", "synth"}:
        raise UserError(f"{path}: data must be a mapping with `root` and optionally `synth`")
    fixed = _flatten(raw.get("fixed") or {}, f"{path}: fixed")
    fixed.setdefault("data.cache_dir", str(cache_root(name)))
    if data.get("root"):
        fixed["data.root"] = str(data["root"])
    try:
        base = TrainConfig().override(fixed)
    except ConfigError as err:
        raise UserError(f"{path}: fixed: {err}") from None

    params = space.parse(raw.get("space"), f"{path}: space")
    recipes = raw.get("enqueue") or []
    if not isinstance(recipes, list):
        raise UserError(f"{path}: enqueue must be a list of recipes (mappings of space parameters to values)")
    enqueue = [space.check_recipe(r, params, f"{path}: enqueue[{i}]") for i, r in enumerate(recipes)]
    sampler = _strategy(raw.get("sampler") or "tpe", SAMPLERS, f"{path}: sampler", seeded=True)
    objectives = _objectives(raw, f"{path}: objectives")
    default_pruner = "none" if len(objectives) > 1 else "hyperband"
    pruner = _strategy(raw.get("pruner") or default_pruner, PRUNERS, f"{path}: pruner", seeded=False)
    if len(objectives) > 1 and pruner.name != "none":
        raise UserError(
            f"{path}: pruner: a study with several objectives cannot be pruned (Optuna prunes "
            "single-objective studies only); set `pruner: none`"
        )
    try:
        heartbeat = Heartbeat(**(raw.get("heartbeat") or {}))
    except TypeError:
        raise UserError(f"{path}: heartbeat takes interval, grace, max_retry and outage") from None
    for key, value in dataclasses.asdict(heartbeat).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "max_retry" else 1):
            raise UserError(
                f"{path}: heartbeat.{key} must be a whole number of seconds (or retries), got {quoted(value)}"
            )
    top_k = _export_top_k(raw.get("export"), path, objectives)
    n_trials = raw.get("n_trials", 20)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"{path}: n_trials must be a positive integer")
    spec = StudySpec(
        name=str(name),
        path=path,
        storage=raw.get("storage"),
        base=base,
        synth=_synth(data.get("synth"), f"{path}: data.synth"),
        n_trials=n_trials,
        sampler=sampler,
        pruner=pruner,
        params=params,
        enqueue=enqueue,
        heartbeat=heartbeat,
        models=tuple(spec_models(raw)),
        objectives=objectives,
        top_k=top_k,
    )
    _check_builds(spec, path)
    return spec


def _export_top_k(raw: Any, path: Path, objectives: tuple[str, ...]) -> int:
    """`export: {top_k: K}`: export-best's default ensemble size (1 when absent)."""
    export = {} if raw is None else raw
    if not isinstance(export, Mapping) or set(export) - {"top_k"}:
        raise UserError(
            f"{path}: export must be a mapping with `top_k` (export-best's default ensemble size)"
        )
    top_k = export.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise UserError(
            f"{path}: export.top_k must be a whole number of trials, at least 1, got {quoted(top_k)}"
        )
    if top_k > 1 and len(objectives) > 1:
        raise UserError(
            f"{path}: export.top_k: a study with several objectives exports the trial its trade-off "
            "picks (export-best --pick), not an ensemble; drop export.top_k"
        )
    return top_k


def _objectives(raw: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """`objectives: [val_macro_f1, cpu_latency_ms]`: validation macro-F1 first, each name once."""
    names = raw.get("objectives") or [METRIC]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}: expected a list of names, e.g. [{METRIC}, cpu_latency_ms]")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise UserError(f"{where}: unknown objective {quoted(unknown[0])}; valid: {', '.join(OBJECTIVES)}")
    if names[0] != METRIC or len(set(names)) != len(names):
        raise UserError(f"{where}: {METRIC} must come first and each objective once, got {names}")
    return tuple(names)


def _flatten(values: Any, where: str) -> dict[str, Any]:
    """`{optim: {lr: 1}}` and `{optim.lr: 1}` both become `{"optim.lr": 1}`."""
    if not isinstance(values, Mapping):
        raise UserError(f"{where}: expected a mapping of config paths to values")
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _strategy(raw: Any, registry: dict, where: str, seeded: bool) -> Strategy:
    """`tpe` or `{name: tpe, seed: 0, n_startup_trials: 4}`; a sampler's seed is kept apart, because
    every worker derives its own from it."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or raw.get("name") not in registry:
        name = raw.get("name") if isinstance(raw, Mapping) else raw
        raise UserError(f"{where}: unknown name {quoted(name)}; valid: {', '.join(registry)}")
    options = {k: v for k, v in raw.items() if k != "name" and not (seeded and k == "seed")}
    return Strategy(raw["name"], options, raw.get("seed") if seeded else None)


def _synth(raw: Any, where: str) -> SynthSpec | None:
    if raw is None:
        return None
    try:
        synth = SynthSpec(**raw)
        return dataclasses.replace(synth, size=(int(synth.size[0]), int(synth.size[1])))
    except (TypeError, ValueError, IndexError):
        keys = ", ".join(f.name for f in dataclasses.fields(SynthSpec))
        raise UserError(f"{where}: expected a mapping with keys {keys} (size as [width, height])") from None


def _check_builds(spec: StudySpec, path: Path) -> None:
    """Build sampler and pruner once so that a bad option fails at load time, naming it."""
    for what, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
        try:
            make()
        except (TypeError, ValueError) as err:
            raise UserError(f"{path}: {what}: {err}") from None
