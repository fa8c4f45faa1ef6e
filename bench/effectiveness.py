"""What the search and the export are worth on people no trial saw, over many seeds.

For each seed: a stand-in of its own (training people, and `--heldout` other people in its eval
split, whose labels only eval/gt.csv knows and which no search, export or baseline ever trains or
validates on), then these arms, each scored by macro-F1 on those held-out people:

  baseline           the competition baseline's recipe (Adam 1e-3, step schedule, cross-entropy,
                     no sampler, flip, centre crop) on the demo's model, size and epochs, trained on
                     every training person
  shipped            `demo.yaml` as shipped (its sampler and pruner, sampler seed = the seed), the
                     study's single best trial retrained as `export-best` does (all training people,
                     the epoch count at which it peaked)
  shipped top-K      up to K best distinct recipes, each retrained so, soft-voting equally: what the
                     spec's `export: {top_k: K}` exports by default (as many as the study has, when
                     fewer; `--top-k K` itself would refuse)
  shipped folds-3    the best recipe as 3 person-level folds (`--folds 3 --calibrate none`)
  shipped holdout    the best recipe retrained on its own split with decision biases fitted on its
                     validation people (`--holdout`, biases applied only where they pass their check)
  random             the same space and enqueued recipe, RandomSampler, no pruning, 12 trials (about
                     the epochs of the shipped search's 24 pruned ones): single and top-K
  shipped-12, ...    more searches on request (--searches; SEARCHES below)

The studies run through `python -m hpo.run` (2 CPU workers by default), exactly as a user runs them;
the exports call `hpo.export_best`'s own retrain functions in this process and keep each member's
held-out probabilities, so a member shared by several exports (the best trial is in every top-K)
trains once, and an ensemble's probabilities are the mean of its members' (what maskcls.models.
Ensemble computes). Everything lands in `--out` (a seed's data, studies, logs, member probabilities,
results.json); a killed run continues where it stopped.

Printed: per-seed values, means, and paired differences with 95% t-intervals over seeds (the unit of
replication is the seed: a new draw of people, a new study; not the photos). The last line,
`effectiveness over S seeds: shipped - random +X [lo, hi]; top-k - single +Y [lo, hi];
shipped - baseline +Z [lo, hi]` (one line), where shipped is the shipped search with the shipped
export default and top-k is `--k`.

    .venv/bin/python bench/effectiveness.py --quick --out runs/effectiveness-quick
    .venv/bin/python bench/effectiveness.py --seeds 6 --out runs/effectiveness
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

# The competition baseline's recipe in our vocabulary (docs/mask-dataset.md: Adam 1e-3, StepLR,
# cross-entropy, no sampler, horizontal flip, centre crop); the demo fixes model, size and epochs.
BASELINE = {
    "optim.name": "adam",
    "optim.lr": 1.0e-3,
    "optim.weight_decay": 1.0e-6,
    "schedule.name": "step",
    "schedule.warmup_epochs": 0.0,
    "loss.name": "ce",
    "sampler.name": "none",
    "augment.policy": "flip",
    "data.crop": "center",
    "model.head": "single",
    "model.age_aux_weight": 0.0,
    "data.old_age": 60,
}
# Searches by name: what each changes in demo.yaml (its sampler, pruner, n_trials). `--trials` is
# the budget in trials of 5 epochs (default 12); a search's n_trials scales with it. Pruning saves
# about half the epochs, so demo.yaml ships 24 pruned trials, about the epochs of 12 unpruned ones:
# `shipped` and `random` spend the same compute; `shipped-12` is the shipped search at 12 trials.
BUDGET = 12
SEARCHES: dict[str, dict] = {
    "shipped": {},  # demo.yaml as it is, its own n_trials
    "shipped-12": {"n_trials": 12},
    "random": {"sampler": {"name": "random"}, "pruner": {"name": "none"}, "n_trials": 12},
    "tpe-nopruning": {"pruner": {"name": "none"}, "n_trials": 12},
    "tpe-sh2": {"pruner": {"name": "successive_halving", "min_resource": 2}},
    "random-sh": {"sampler": {"name": "random"}},
}
TOP_KS = (2, 3, 5)
FOLDS = 3


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="work folder (resumable: run again to continue)")
    p.add_argument("--seeds", type=int, default=6, help="stand-in draws (seeds 1..S)")
    p.add_argument("--people", type=int, default=300, help="training people per seed")
    p.add_argument("--heldout", type=int, default=150, help="held-out people per seed (7 photos each)")
    p.add_argument(
        "--trials",
        type=int,
        default=BUDGET,
        help="the budget, in unpruned trials: random search runs this many, the shipped search its "
        "spec's n_trials scaled alike (24 at 12)",
    )
    p.add_argument("--workers", type=int, default=2, help="hpo.run --workers")
    p.add_argument(
        "--searches",
        type=lambda text: text.split(","),
        default=["shipped", "random"],
        help=f"comma-separated, of {', '.join(SEARCHES)} (shipped and random are needed for the last line)",
    )
    p.add_argument(
        "--k",
        type=int,
        choices=TOP_KS,
        help="the top-K of the last line (default: the demo spec's export.top_k, or 3)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, 160 training and 80 held-out people, 12 trials: the whole run, smaller, in <= 20 min",
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.searches) - set(SEARCHES))
    if unknown or not {"shipped", "random"} <= set(args.searches):
        wrong = ", ".join(unknown) or "shipped and random are needed"
        p.error(f"--searches: {wrong}; known: {', '.join(SEARCHES)}")
    if args.k is None:
        args.k = shipped_top_k() if shipped_top_k() in TOP_KS else 3
    if args.quick:
        args.seeds, args.people, args.heldout, args.trials = 2, 160, 80, 12
    return args


class Seed:
    """One draw: its folder, stand-in, studies and results.json (what is done survives a kill)."""

    def __init__(self, out: Path, seed: int, args: argparse.Namespace):
        self.seed, self.args = seed, args
        self.dir = out / f"seed-{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.results_path = self.dir / "results.json"
        saved = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.results: dict[str, float | None] = saved.get("arms", {})
        self.epochs: dict[str, int] = saved.get("epochs", {})  # per search: epochs its trials ran
        self.seconds: float = saved.get("seconds", 0.0)  # over every run that worked on this seed
        self.since = time.monotonic()

    def record(self, arm: str, value: float | None) -> None:
        self.results[arm] = value
        self.save()
        shown = "-" if value is None else f"{value:.4f}"
        print(f"seed {self.seed}: {arm} {shown}", flush=True)

    def save(self) -> None:
        now = time.monotonic()
        self.seconds, self.since = self.seconds + now - self.since, now
        tmp = self.results_path.with_suffix(".tmp")
        saved = {"arms": self.results, "epochs": self.epochs, "seconds": self.seconds}
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(self.results_path)

    def stand_in(self) -> None:
        from maskcls.data import synth

        if not (self.data / "eval" / "gt.csv").is_file():
            synth.generate(
                self.data, self.args.people, self.args.heldout, seed=self.seed, size=(96, 128), progress=False
            )

    def spec(self, arm: str) -> Path:
        """demo.yaml on this seed's stand-in, with the search `arm` (in SEARCHES) and seed."""
        from hpo import spec as specs

        raw = yaml.safe_load(specs.resolve("demo").read_text())
        raw["study"] = arm
        raw["data"] = {"root": str(self.data)}
        raw["fixed"]["data.cache_dir"] = str(self.dir / "cache")
        changes = dict(SEARCHES[arm])
        raw["n_trials"] = max(1, round(changes.pop("n_trials", raw["n_trials"]) * self.args.trials / BUDGET))
        raw.update(changes)
        raw["sampler"] = {**raw["sampler"], "seed": self.seed}
        path = self.dir / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def study(self, arm: str):
        """Run (or finish) the arm's study through hpo.run; returns it loaded."""
        import optuna

        url = f"sqlite:///{self.dir / arm}.db"
        log = self.dir / f"{arm}.log"
        cmd = [
            sys.executable,
            "-m",
            "hpo.run",
            "--study",
            str(self.spec(arm)),
            "--storage",
            url,
            "--workers",
            str(self.args.workers),
            "--no-progress",
            "--status-every",
            "600",
        ]
        started = time.monotonic()
        with log.open("a") as f:
            done = subprocess.run(
                cmd,
                cwd=self.dir,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        if done.returncode != 0:
            raise SystemExit(f"seed {self.seed}: hpo.run for {arm} exited {done.returncode}; see {log}")
        print(f"seed {self.seed}: study {arm} done in {time.monotonic() - started:.0f} s", flush=True)
        return optuna.load_study(study_name=arm, storage=url)


class Scorer:
    """Held-out probabilities of retrained members, cached as .npy files in the seed's folder."""

    def __init__(self, seed: Seed):
        import pandas as pd
        import torch

        from maskcls.data.layout import scan_eval

        self.seed = seed
        self.folder = seed.dir / "probs"
        self.folder.mkdir(exist_ok=True)
        self.paths = list(scan_eval(seed.data)["path"])
        self.labels = pd.read_csv(seed.data / "eval" / "gt.csv")["ans"].to_numpy()
        self.device = torch.device("cpu")

    def probs(self, key: str, train: Callable[[], list]) -> np.ndarray:
        """Mean held-out probabilities of the models `train` returns (each as (model, cfg))."""
        from maskcls.predict import predict_paths

        path = self.folder / f"{key}.npy"
        if path.is_file():
            return np.load(path)
        started = time.monotonic()
        members = train()
        probs = np.mean(
            [
                predict_paths(
                    m,
                    cfg.override({"data.root": str(self.seed.data)}),
                    self.paths,
                    self.device,
                    progress=False,
                )
                for m, cfg in members
            ],
            axis=0,
        )
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, probs)
        tmp.replace(path)  # a run killed while writing leaves no half file to load later
        print(f"seed {self.seed.seed}: trained {key} in {time.monotonic() - started:.0f} s", flush=True)
        return probs

    def f1(self, probs: np.ndarray, biases: Sequence[float] | None = None) -> float:
        from maskcls.metrics import macro_f1

        scores = np.log(np.clip(probs, 1e-12, None)) + (np.asarray(biases) if biases is not None else 0.0)
        return float(macro_f1(self.labels, scores.argmax(1)))


def quiet(fn: Callable, *a):
    """Run an export-best step with its progress lines going nowhere (they are for a terminal)."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*a)


def arms(searches: Sequence[str]) -> list[str]:
    """Every value a seed records: the baseline, each search's single and top-K exports, and the
    shipped search's other export modes."""
    found = ["baseline"]
    for name in searches:
        found += [name, *(f"{name} top-{k}" for k in TOP_KS)]
        if name == "shipped":
            found += [f"shipped folds-{FOLDS}", "shipped holdout"]
    return found


def run_seed(seed: Seed, searches: Sequence[str]) -> None:
    done = all(seed.results.get(arm) is not None for arm in arms(searches))
    if done and all(n in seed.epochs for n in searches):
        return
    seed.stand_in()
    scorer = Scorer(seed)
    if "baseline" not in seed.results:
        seed.record("baseline", scorer.f1(scorer.probs("baseline", lambda: baseline(seed))))
    studies = {name: seed.study(name) for name in searches}
    for name, study in studies.items():
        seed.epochs[name] = sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))
    seed.save()
    for arm, study in studies.items():
        recipe = recipes_of(seed, arm)
        top = best_distinct(study, recipe)
        cfgs = [recipe(t) for t in top]
        members = [
            scorer.probs(f"{arm}-trial{t.number}", lambda t=t, cfg=cfg: single(cfg, t, scorer.device))
            for t, cfg in zip(top, cfgs, strict=True)
        ]
        seed.record(arm, scorer.f1(members[0]))
        for k in TOP_KS:
            seed.record(f"{arm} top-{k}", scorer.f1(np.mean(members[:k], axis=0)))
    if "shipped" not in studies:
        return
    best = top_trial(studies["shipped"])
    cfg = recipes_of(seed, "shipped")(best)
    folds = scorer.probs(f"shipped-trial{best.number}-folds", lambda: k_folds(cfg, best, scorer.device))
    seed.record(f"shipped folds-{FOLDS}", scorer.f1(folds))
    biases = seed.dir / "probs" / f"shipped-trial{best.number}-holdout-biases.json"
    holdout = scorer.probs(
        f"shipped-trial{best.number}-holdout", lambda: on_split(cfg, best, biases, scorer.device)
    )
    seed.record("shipped holdout", scorer.f1(holdout, json.loads(biases.read_text())))


def baseline(seed: Seed) -> list:
    """The baseline recipe on the demo's fixed settings, trained on every training person."""
    from hpo import spec as specs
    from maskcls.train import fit, load_data

    cfg = specs.load(str(seed.spec("shipped"))).base.override(BASELINE)
    return [(quiet(fit, cfg, load_data(cfg, progress=False).everyone()).model, cfg)]


def recipes_of(seed: Seed, arm: str):
    """The arm's trials' configs: its spec with each trial's parameters, checked against the key
    the trial recorded (hpo.record)."""
    from hpo import spec as specs
    from hpo.record import Recipes

    return Recipes(specs.load(str(seed.spec(arm))).base, None)


def single(cfg, trial, device) -> list:
    """`export-best --trial N`: all training people, the epochs at which the trial peaked."""
    from hpo.export_best import retrain

    return [(quiet(retrain, cfg, trial, False, None, device).members[0], cfg)]


def k_folds(cfg, trial, device) -> list:
    """`export-best --folds 3 --calibrate none` (decision biases: the holdout arm measures them)."""
    from hpo.export_best import retrain

    done = quiet(retrain, cfg, trial, False, FOLDS, device)
    return [(m, done.config) for m in done.members]


def on_split(cfg, trial, biases: Path, device) -> list:
    """`export-best --holdout`: the trial's own split; decision biases fitted on its validation
    people, kept (in `biases`) only where their held-back check passed, as the export does."""
    from hpo.export_best import retrain
    from maskcls.calibrate import fit_biases

    done = quiet(retrain, cfg, trial, True, None, device)
    fitted = fit_biases(np.asarray(done.val_labels), np.asarray(done.val_probs))
    tmp = biases.with_suffix(".tmp")
    tmp.write_text(json.dumps(fitted.biases if fitted.applied else None))
    tmp.replace(biases)
    return [(done.members[0], cfg)]


def top_trial(study):
    from hpo.export_best import pick_trial

    return pick_trial(study, None)


def best_distinct(study, recipe) -> list:
    """`export-best --top-k 5`'s members, or all the distinct complete recipes when fewer."""
    from hpo.export_best import distinct_top
    from maskcls.errors import UserError

    for k in range(max(TOP_KS), 0, -1):
        try:
            return quiet(distinct_top, study, k, recipe)
        except UserError:
            continue
    raise SystemExit(f"study {study.study_name} has no complete trial")


def interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences over seeds."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


def signed(x: float) -> str:
    """+0.012, -0.003; nan where a pair has too few seeds."""
    return "nan" if math.isnan(x) else f"{x:+.3f}"


def span(pair: tuple[float, float, float, int]) -> str:
    return f"{signed(pair[0])} [{signed(pair[1])}, {signed(pair[2])}]"


def paired(table: dict[int, dict], a: str, b: str) -> tuple[float, float, float, int]:
    diffs = [r[a] - r[b] for r in table.values() if r.get(a) is not None and r.get(b) is not None]
    return (*interval(diffs), len(diffs)) if diffs else (math.nan, math.nan, math.nan, 0)


def shipped_top_k() -> int:
    """What `export-best` exports by default for the demo: its spec's export.top_k."""
    from hpo import spec as specs

    return specs.load("demo").top_k


def report(
    table: dict[int, dict], epochs: dict[int, dict], searches: Sequence[str], k: int, minutes: float
) -> list[str]:
    """Markdown tables and the last line; `minutes`: the seeds' own time over every run."""
    seeds = sorted(table)
    lines = [
        "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for arm in arms(searches):
        values = [table[s].get(arm) for s in seeds]
        got = [v for v in values if v is not None]
        cells = ["-" if v is None else f"{v:.3f}" for v in values]
        mean = f"{np.mean(got):.3f}" if got else "-"
        lines.append(f"| {arm} | {' | '.join(cells)} | {mean} |")
    lines += ["", "| search | epochs its trials ran, mean per seed |", "|---|---|"]
    for name in searches:
        runs = [epochs[s][name] for s in seeds if name in epochs.get(s, {})]
        lines.append(f"| {name} | {np.mean(runs):.0f} |" if runs else f"| {name} | - |")
    # `shipped`: the shipped search exported as export-best does by default; its rivals exported alike
    default = shipped_top_k()
    mode = "" if default == 1 else f" top-{default}"
    lines += ["", "| paired difference (over seeds) | mean | 95% interval | seeds |", "|---|---|---|---|"]
    pairs = [
        (f"shipped{mode}", f"random{mode}"),
        (f"shipped{mode}", "baseline"),
        ("random", "baseline"),
        *((f"shipped top-{kk}", "shipped") for kk in TOP_KS),
        (f"shipped folds-{FOLDS}", "shipped"),
        ("shipped holdout", "shipped"),
        *((f"random top-{kk}", "random") for kk in TOP_KS),
        ("shipped", "random"),
    ]
    for name in searches:
        if name not in ("shipped", "random"):
            pairs += [(name, "random"), (f"{name} top-{k}", f"random top-{k}"), (name, "shipped")]
    for a, b in dict.fromkeys(pairs):  # in order, each pair once
        m, lo, hi, n = paired(table, a, b)
        lines.append(f"| {a} - {b} | {signed(m)} | [{signed(lo)}, {signed(hi)}] | {n} |")
    s, t, z = (
        paired(table, *p)
        for p in (
            (f"shipped{mode}", f"random{mode}"),
            (f"shipped top-{k}", "shipped"),
            (f"shipped{mode}", "baseline"),
        )
    )
    lines += [
        "",
        f"shipped = the shipped search exported as export-best does by default (shipped{mode}); random alike",
        f"{minutes:.0f} min of work over {len(seeds)} seeds (every run that worked on them)",
        "",
        f"effectiveness over {len(seeds)} seeds: shipped - random {span(s)}; top-k - single {span(t)}; "
        f"shipped - baseline {span(z)}",
    ]
    return lines


def check_settings(path: Path, settings: dict) -> None:
    """A folder continues only the run it holds: other people, trials or workers would mix two
    experiments in one table (--seeds and --searches may grow)."""
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            shown = ", ".join(f"--{k} {old} there, {new} now" for k, (old, new) in changed.items())
            print(
                f"error: {path.parent} holds a run with other settings ({shown}); use another --out",
                file=sys.stderr,
            )
            raise SystemExit(2)
    else:
        path.write_text(json.dumps(settings))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_settings(
        out / "settings.json", {k: getattr(args, k) for k in ("people", "heldout", "trials", "workers")}
    )
    from maskcls.runtime import configure_cpu

    configure_cpu(None)
    table, epochs, seconds = {}, {}, 0.0
    for s in range(1, args.seeds + 1):
        seed = Seed(out, s, args)
        run_seed(seed, args.searches)
        table[s], epochs[s], seconds = seed.results, seed.epochs, seconds + seed.seconds
    lines = report(table, epochs, args.searches, args.k, seconds / 60)
    (out / "effectiveness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
