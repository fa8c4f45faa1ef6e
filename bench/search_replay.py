"""Optuna samplers and pruners replayed against a surrogate of recorded learning curves:

    python bench/search_replay.py                      # bench/data/curves-demo.csv, 20 seeds, < 5 min
    python bench/search_replay.py --study mask --table bench/data/curves-mask.csv

No training: as in the surrogate benchmarks of HPOBench and YAHPO, a model fitted once to real
curves (bench/curves.py) answers every trial. Here it is a random forest from (parameters, epoch)
to validation macro-F1; a trial's curve is the forest's mean plus, at every epoch, a residual drawn
from the forest's out-of-bag residuals at that epoch (so epoch 1 is as noisy as it was measured).
A trial's quality is the best epoch of its mean curve: what retraining it would give on average,
whatever luck its noisy replay had.

Each method (sampler x pruner x what is reported per epoch: the value as is, or the best so far)
runs the spec's space through real Optuna objects (in-memory storage, one worker) until it has
spent 4x the budget of the spec's study, N trials x E epochs (N = n_trials, E = train.epochs). It
picks, as `hpo.export-best` does, the complete trial with the best observed value; the table shows
that trial's quality after 1x, 2x and 4x the budget, and the epochs a method needs until its pick is
within 0.01 of the best quality any configuration of the space reaches (median and interquartile
range over seeds; `>4x` when not within the run). The last line compares the spec's shipped sampler
and pruner with random search without pruning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from sklearn.ensemble import RandomForestRegressor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo import space  # noqa: E402
from hpo import spec as specs  # noqa: E402
from hpo.protocol import quiet_experimental  # noqa: E402

TOLERANCE = 0.01  # "within 0.01 of the best any configuration reaches"
BUDGETS = (1, 2, 4)  # multiples of one study's budget, N trials x E epochs


@dataclass(frozen=True)
class Method:
    sampler: str  # a name in hpo.spec.SAMPLERS
    pruner: str  # a name in hpo.spec.PRUNERS
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner_options: dict[str, Any] = field(default_factory=dict)
    report: str = "value"  # value: each epoch's value as is; best: the best so far
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"{self.sampler} + {self.pruner}"


def methods(spec: specs.StudySpec) -> list[Method]:
    """The spec's own settings first, then each sampler with each pruner."""
    shipped = Method(
        spec.sampler.name,
        spec.pruner.name,
        spec.sampler.options,
        spec.pruner.options,
        label=f"shipped: {strategy_label(spec.sampler.name, spec.sampler.options)} + "
        f"{strategy_label(spec.pruner.name, spec.pruner.options)}",
    )
    samplers = {
        "tpe": {"n_startup_trials": 4, "group": True},
        "tpe multivariate": {"n_startup_trials": 4, "group": False},
        "gp": {},  # Optuna's defaults (10 random trials first): its asks cost 100x TPE's
        "random": {},
    }
    pruners = {
        "hyperband min 1, rf 3": ("hyperband", {"min_resource": 1, "reduction_factor": 3}),
        "hyperband min 1, rf 2": ("hyperband", {"min_resource": 1, "reduction_factor": 2}),
        "hyperband min 2, rf 3": ("hyperband", {"min_resource": 2, "reduction_factor": 3}),
        "successive halving min 1": ("successive_halving", {"min_resource": 1}),
        "median": ("median", {}),
        "patient 1": ("patient", {"patience": 1}),
        "none": ("none", {}),
    }
    # Reporting the best value so far instead of each epoch's: for the two pruners that read the
    # values across trials (it changed nothing the seeds could tell apart with the others either).
    best_so_far = {"hyperband min 1, rf 3", "median"}
    found = [shipped]
    for sampler_label, sampler_options in samplers.items():
        sampler = sampler_label.split()[0]
        for pruner_label, (pruner, pruner_options) in pruners.items():
            reports = (
                ["value", "best"] if sampler_label == "tpe" and pruner_label in best_so_far else ["value"]
            )
            for report in reports:
                suffix = ", best so far" if report == "best" else ""
                method = Method(
                    sampler,
                    pruner,
                    sampler_options,
                    pruner_options,
                    report,
                    f"{sampler_label} + {pruner_label}{suffix}",
                )
                if same(method, shipped):  # replayed once, under the shipped row
                    found[0] = dataclasses.replace(shipped, label=f"{shipped.label} = {method.label}")
                else:
                    found.append(method)
    return found


def is_random_search(m: Method) -> bool:
    """Random search without pruning: the yardstick of R."""
    return m.sampler == "random" and m.pruner == "none" and not m.sampler_options and m.report == "value"


def same(a: Method, b: Method) -> bool:
    return (a.sampler, a.sampler_options, a.pruner, a.pruner_options, a.report) == (
        b.sampler,
        b.sampler_options,
        b.pruner,
        b.pruner_options,
        b.report,
    )


def strategy_label(name: str, options: dict[str, Any]) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in options.items())
    return f"{name} ({shown})" if shown else name


class Surrogate:
    """Validation macro-F1 of (parameters, epoch): a random forest's mean and its residuals."""

    def __init__(self, table: pd.DataFrame, params: list[space.Param], seed: int = 0):
        self.params = params
        self.epochs = int(table["epoch"].max())
        rows = [json.loads(p) for p in table["params"]]
        x = np.stack([self.features(r, e) for r, e in zip(rows, table["epoch"], strict=True)])
        y = table["val_macro_f1"].to_numpy(float)
        self.forest = RandomForestRegressor(
            n_estimators=60, min_samples_leaf=3, max_features=0.5, oob_score=True, random_state=seed
        ).fit(x, y)
        self.trees = [tree.tree_ for tree in self.forest.estimators_]
        assert np.allclose(self.predict(x), self.forest.predict(x))  # the fast path is the forest's
        residuals = y - self.forest.oob_prediction_
        self.residuals = [residuals[table["epoch"].to_numpy() == e] for e in range(1, self.epochs + 1)]

    def features(self, chosen: dict[str, Any], epoch: int) -> np.ndarray:
        """Floats scaled to [0, 1] (log ones in log space), categoricals one-hot, inactive -1."""
        out: list[float] = []
        for p in self.params:
            value = chosen.get(p.path)
            if p.type == "categorical":
                out += [float(value == c) if value is not None else -1.0 for c in p.choices]
            elif value is None:
                out.append(-1.0)
            else:
                assert p.low is not None and p.high is not None
                lo, hi, v = (
                    (np.log(p.low), np.log(p.high), np.log(value)) if p.log else (p.low, p.high, value)
                )
                out.append((v - lo) / (hi - lo))
        return np.array([*out, epoch / self.epochs])

    def mean_curves(self, chosen: list[dict[str, Any]]) -> np.ndarray:
        """[len(chosen), E] mean validation macro-F1 of each configuration at epochs 1..E."""
        x = [self.features(c, e) for c in chosen for e in range(1, self.epochs + 1)]
        return self.predict(np.stack(x)).reshape(len(chosen), self.epochs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The forest's mean, tree by tree: sklearn's predict costs 2-10 ms per call in its
        dispatch, 20x the trees themselves, and a replay asks 100,000 times."""
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        return np.mean([tree.predict(x32)[:, 0] for tree in self.trees], axis=0)

    def noisy(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = [rng.choice(r) for r in self.residuals]
        return np.clip(mean + np.array(noise), 0.0, 1.0)


def build(method: Method, seed: int, epochs: int) -> optuna.Study:
    with quiet_experimental():
        sampler = specs.SAMPLERS[method.sampler](seed, **method.sampler_options)
        pruner = specs.PRUNERS[method.pruner](epochs, **method.pruner_options)
    # A fixed name: Hyperband assigns brackets by a hash of the study name and the trial number.
    return optuna.create_study(
        study_name=f"replay-{seed}", direction="maximize", sampler=sampler, pruner=pruner
    )


def replay(
    method: Method, seed: int, surrogate: Surrogate, params: list[space.Param], budget: int
) -> np.ndarray:
    """One search until `budget` epochs are spent: rows (epochs spent when the trial ended,
    observed value or NaN if pruned, quality)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = build(method, seed, surrogate.epochs)
    rng = np.random.default_rng([seed, 7])
    spent, rows = 0, []
    while spent < budget:
        trial = study.ask()
        space.suggest(trial, params)
        chosen = dict(trial.params)
        mean = surrogate.mean_curves([chosen])[0]
        values = surrogate.noisy(mean, rng)
        reported = np.maximum.accumulate(values) if method.report == "best" else values
        pruned = False
        for epoch in range(1, surrogate.epochs + 1):
            spent += 1
            trial.report(float(reported[epoch - 1]), epoch)
            if epoch < surrogate.epochs and trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, float(values.max()))  # the objective returns the best epoch's value
        rows.append((spent, math.nan if pruned else float(values.max()), float(mean.max())))
    return np.array(rows)


def pick_quality(history: np.ndarray, epochs: float) -> float:
    """Quality of the complete trial with the best observed value among those ended by `epochs`."""
    done = history[(history[:, 0] <= epochs) & ~np.isnan(history[:, 1])]
    return float(done[np.argmax(done[:, 1]), 2]) if len(done) else 0.0


def epochs_to(history: np.ndarray, quality: float) -> float:
    """Epochs spent until the pick's quality is at least `quality` (inf if never)."""
    best_value, pick = -1.0, 0.0
    for spent, value, q in history:
        if not math.isnan(value) and value > best_value:
            best_value, pick = value, q
        if pick >= quality - 1e-12:
            return float(spent)
    return math.inf


@dataclass
class Setup:
    """What every replay process builds once: the spec's space, the surrogate, the methods."""

    spec: specs.StudySpec
    surrogate: Surrogate
    methods: list[Method]
    gp_horizon: int  # budgets GP runs to: its asks cost 100x TPE's

    def horizon(self, method: Method) -> int:
        return self.gp_horizon if method.sampler == "gp" else BUDGETS[-1]

    @property
    def budget(self) -> int:
        return self.spec.n_trials * self.surrogate.epochs

    @classmethod
    def load(cls, study: str, table: str | None, only: list[str] | None, gp_horizon: int) -> Setup:
        spec = specs.load(study)
        curves = pd.read_csv(table or ROOT / "bench" / "data" / f"curves-{spec.name}.csv")
        chosen = [
            m
            for m in methods(spec)
            if not only
            or any(text in m.name for text in only)
            or m.name.startswith("shipped")
            or is_random_search(m)
        ]
        return cls(spec, Surrogate(curves, spec.params), chosen, gp_horizon)


SETUP: Setup | None = None


def start_process(study: str, table: str | None, only: list[str] | None, gp_horizon: int) -> None:
    global SETUP
    torch.set_num_threads(1)  # GPSampler's torch: one thread per process, as many processes as cores
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    SETUP = Setup.load(study, table, only, gp_horizon)


def run_one(job: tuple[int, int]) -> tuple[int, np.ndarray, float]:
    m, seed = job
    assert SETUP is not None
    started = time.process_time()
    method = SETUP.methods[m]
    history = replay(method, seed, SETUP.surrogate, SETUP.spec.params, SETUP.budget * SETUP.horizon(method))
    return m, history, time.process_time() - started


def spread(values: list[float], horizon: int) -> str:
    """Median (first quartile-third quartile), by rank, so that `>Nx` (not within the run) can be one."""
    ranked = sorted(values)
    show = [ranked[round(q * (len(ranked) - 1))] for q in (0.5, 0.25, 0.75)]
    text = [f"{v:.0f}" if math.isfinite(v) else f">{horizon}x" for v in show]
    return f"{text[0]} ({text[1]}-{text[2]})"


def median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def best_reachable(setup: Setup, table: pd.DataFrame) -> float:
    """The best quality any configuration reaches: over the recorded ones and 2,000 fresh draws."""
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    fresh = []
    for _ in range(2000):
        trial = draws.ask()
        space.suggest(trial, setup.spec.params)
        fresh.append(dict(trial.params))
        draws.tell(trial, 0.0)
    recorded = [json.loads(p) for p in table.drop_duplicates("config")["params"]]
    return float(setup.surrogate.mean_curves(recorded + fresh).max(1).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="spec whose space and defaults are replayed")
    parser.add_argument("--table", help="learning curves (default bench/data/curves-<study>.csv)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per method (default 20)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: cores)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="replay only the methods whose name contains TEXT (repeatable); the shipped one and "
        "random + none always run",
    )
    parser.add_argument(
        "--gp-budget",
        type=int,
        choices=BUDGETS,
        default=1,
        help="budget multiple GP runs to (default 1: its asks cost 0.1-0.5 s here, and 4 takes ~30 min)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    setup = Setup.load(args.study, args.table, args.only, args.gp_budget)
    table = pd.read_csv(args.table or ROOT / "bench" / "data" / f"curves-{setup.spec.name}.csv")
    surrogate, budget = setup.surrogate, setup.budget
    top = best_reachable(setup, table)
    print(
        f"surrogate: {table['config'].nunique()} recorded configurations x {surrogate.epochs} epochs; "
        f"out-of-bag R^2 {surrogate.forest.oob_score_:.2f}; residual sd per epoch "
        + ", ".join(f"{np.std(r):.3f}" for r in surrogate.residuals)
    )
    print(
        f"budget 1x = {setup.spec.n_trials} trials x {surrogate.epochs} epochs = {budget} epochs; best "
        f"quality any configuration reaches {top:.4f}; {args.seeds} seeds x {len(setup.methods)} methods\n"
    )

    # GP's replays are the slowest: first, so that no process waits alone for one at the end.
    order = sorted(range(len(setup.methods)), key=lambda m: setup.methods[m].sampler != "gp")
    jobs = [(m, s) for m in order for s in range(args.seeds)]
    results: dict[int, list[np.ndarray]] = {m: [] for m in range(len(setup.methods))}
    cpu: dict[int, float] = dict.fromkeys(results, 0.0)
    initargs = (args.study, args.table, args.only, args.gp_budget)
    with ProcessPoolExecutor(args.jobs, initializer=start_process, initargs=initargs) as pool:
        for m, history, seconds in pool.map(run_one, jobs, chunksize=2):
            results[m].append(history)
            cpu[m] += seconds

    random_none = results[next(i for i, m in enumerate(setup.methods) if is_random_search(m))]
    targets = [pick_quality(h, budget) for h in random_none]  # what random search exports, seed by seed

    def ratio(m: int) -> float:
        """Median over seeds of the epochs a method needs to reach random search's pick, / its budget."""
        return median([epochs_to(h, q) / budget for h, q in zip(results[m], targets, strict=True)])

    header = [
        "method",
        *(f"F1 @{b}x" for b in BUDGETS),
        f"epochs to best-{TOLERANCE}",
        "R",
        "trials @1x",
        "cpu s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for m, method in enumerate(setup.methods):
        histories, horizon = results[m], setup.horizon(method)
        picks = [
            f"{np.median([pick_quality(h, b * budget) for h in histories]):.4f}" if b <= horizon else "-"
            for b in BUDGETS
        ]
        to_top = [epochs_to(h, top - TOLERANCE) for h in histories]
        trials = np.median([(h[:, 0] <= budget).sum() for h in histories])
        r = ratio(m)
        cells = [
            method.name,
            *picks,
            spread(to_top, horizon),
            f"{r:.2f}" if math.isfinite(r) else f">{horizon}",
        ]
        print("| " + " | ".join([*cells, f"{trials:.0f}", f"{cpu[m]:.0f}"]) + " |")

    print(
        f"\nR: epochs to reach the quality random search without pruning exports after {budget} epochs, / "
        f"{budget} (median over seeds, seed by seed); replay took {time.perf_counter() - started:.0f} s on "
        f"{args.jobs} processes"
    )
    print(
        f"shipped defaults reach random search's best with {ratio(0):.2f} of its epochs "
        f"(median over {args.seeds} seeds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
