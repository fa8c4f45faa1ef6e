"""`python -m hpo.studies list|best|trials|delete`: what a storage holds, without the dashboard.

`list` shows every study of a storage with its trials per state and best value, `best` one study's
best trial and the command that exports it, `trials` one compact row per trial (a table, CSV or
JSON, like Optuna's trials_dataframe without the stored config), `delete` removes a study after
asking (its artifacts and checkpoints on disk stay). The storage resolves as for the other
commands: --storage, else $HPO_STORAGE, else the storage of the spec --study names; a SQLite file
that is not there is an error, never a new empty database.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna

from hpo import spec as specs
from hpo.outage import ResilientStorage
from hpo.protocol import STORAGE_ENV, Attr, quiet_experimental
from hpo.spec import Heartbeat
from hpo.storage import counts, masked, open_storage, resolve_url
from maskcls.cli import COMMAND, HelpFormatter, prog, run_main
from maskcls.errors import UserError, quoted

EPILOG = """Optuna's own command line works on the same storage:
  optuna studies --storage URL
  optuna best-trial --study-name NAME --storage URL"""
TIME = "%Y-%m-%d %H:%M"
FORMATS = ("table", "csv", "json")
SORTS = ("number", "value", "duration")
COLUMNS = ("number", "state", "value", "best_epoch", "epochs", "duration_s", "pruned_at", "pruned_why")
TABLE_WIDTH = 120
LIVE_S = Heartbeat().grace  # a trial whose heartbeat is younger than this has a worker on it


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("hpo.studies"),
        description="What a storage holds: list its studies, show a study's best trial, delete a study.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in (
        ("list", "every study of the storage: trials per state, best value, first and last trial"),
        ("best", "the best trial of --study: values, parameters, best epoch, the command to export it"),
        ("trials", "one row per trial of --study: state, value, epochs, duration, where pruned, parameters"),
        ("delete", "delete --study and all its trials from the storage, after asking"),
    ):
        command = commands.add_parser(
            name, help=summary, description=summary, epilog=EPILOG, formatter_class=HelpFormatter
        )
        default = "$HPO_STORAGE, else the storage of the --study spec"
        if name == "list":
            default += ", else every runs/<study>/study.db here"
        command.add_argument("--storage", help=f"storage URL (default: {default})")
        command.add_argument(
            "--study",
            required=name != "list",
            help="the study's name, or a spec (name in studies/ or a path) whose storage and study to use",
        )
        if name == "trials":
            command.add_argument(
                "--format", choices=FORMATS, default="table", help="table (120 columns), csv or json"
            )
            command.add_argument("--top", type=int, metavar="N", help="only the first N rows after sorting")
            command.add_argument(
                "--sort",
                choices=SORTS,
                default="number",
                help="number (ascending), value (best first; no value last), duration (longest first)",
            )
        if name == "delete":
            command.add_argument("--yes", action="store_true", help="delete without asking")
            command.add_argument(
                "--force",
                action="store_true",
                help="delete even while a run is on the study (trials with a heartbeat in the last "
                f"{LIVE_S} s); that run then stops",
            )
    return parser.parse_args(argv)


def locate(storage: str | None, study: str | None) -> tuple[str, str | None]:
    """The storage URL and the study's name. With a URL (--storage or $HPO_STORAGE) --study is the
    study's name, unless it is a spec file; without one it must name a spec, whose storage it is."""
    url = storage or os.environ.get(STORAGE_ENV)
    if study is None:
        if not url:
            raise UserError(f"pass --storage URL (or set ${STORAGE_ENV}, or name a spec with --study)")
        return url, None
    if url and not is_spec_file(study):
        return url, study
    try:
        spec = specs.load(study)
    except UserError as err:
        raise UserError(f"{err}; for a study without a spec pass --storage URL") from None
    return resolve_url(storage, spec), spec.name


def local_storages() -> list[str]:
    """hpo.run's default storages under this folder: runs/<study>/study.db."""
    return [f"sqlite:///{path}" for path in sorted(Path("runs").glob("*/study.db"))]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial best in the first objective (validation macro-F1 in every study of
    hpo.run, as hpo.protocol.ranked orders them), in its direction, so any Optuna study reads right."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(complete, key=lambda t: sign * t.values[0], default=None)


def listing(storage: ResilientStorage, url: str) -> str:
    names = optuna.get_all_study_names(storage)
    if not names:
        return f"no studies in {masked(url)}"
    width = max(len(n) for n in [*names, "study"])
    counted = ("finished", "complete", "pruned", "failed", "running", "best")
    head = f"{'study':<{width}s} {'directions':<20s} " + " ".join(f"{c:>8s}" for c in counted)
    lines = [f"studies in {masked(url)}:", f"{head}  {'first trial':<16s}  last trial"]
    lines += [row(optuna.load_study(study_name=name, storage=storage), width) for name in names]
    return "\n".join(lines)


def row(study: optuna.Study, width: int) -> str:
    """One line of `list`; first and last trial stand in for a creation time, which Optuna does not keep."""
    now = counts(study)
    best = best_trial(study)
    trials = study.get_trials(deepcopy=False)
    stamps = [d for t in trials for d in (t.datetime_start, t.datetime_complete) if d is not None]
    directions = ",".join(d.name.lower() for d in study.directions)
    tally = [now["finished"], now["complete"], now["pruned"], now["fail"], now["running"]]
    value = f"{best.values[0]:.4g}" if best else "-"
    when = [f"{min(stamps):{TIME}}", f"{max(stamps):{TIME}}"] if stamps else ["-", "-"]
    return (
        f"{study.study_name:<{width}s} {directions:<20s} "
        + " ".join(f"{n:8d}" for n in tally)
        + f" {value:>8s}  {when[0]:<16s}  {when[1]}"
    )


def describe_best(study: optuna.Study, trial: optuna.trial.FrozenTrial, export: str) -> str:
    unnamed = ["value"] if len(trial.values) == 1 else [f"values[{i}]" for i in range(len(trial.values))]
    with quiet_experimental():
        names = study.metric_names or unnamed
    first = " (best in the first objective)" if len(trial.values) > 1 else ""
    lines = [f"study {study.study_name}: best trial {trial.number}{first}"]
    lines += [f"  {name}: {value:.4g}" for name, value in zip(names, trial.values, strict=True)]
    lines.append(f"  {Attr.BEST_EPOCH}: {trial.user_attrs.get(Attr.BEST_EPOCH, '-')}")
    lines.append("  params:" if trial.params else "  params: none")
    lines += [f"    {key} = {value}" for key, value in trial.params.items()]
    return "\n".join([*lines, "export it:", f"  {export}"])


def export_command(study: str, number: int, storage: str | None) -> str:
    """As the user named the study and the storage if --storage gave it (a password shows as ***:
    put the URL in $HPO_STORAGE instead). Export rebuilds the trial from the study's spec, so a
    bare study name that is no spec gets a note instead of a command that would fail unexplained."""
    words = [COMMAND, "export", "--study", study, "--trial", str(number)]
    command = shlex.join([*words, "--storage", masked(storage)] if storage else words)
    if is_spec_file(study) or study in specs.available():
        return command
    return f"{command}\n  (there --study takes the study's spec: its name in studies/ or its path)"


def trial_rows(study: optuna.Study, sort: str = "number", top: int | None = None) -> list[dict]:
    """One flat dict per trial: COLUMNS, then `params`. The value is the first objective's; epochs
    are the intermediate values reported (one per epoch); pruned_at the last of them when pruned,
    pruned_why what hpo.objective recorded then (the table leaves it out: too wide)."""
    trials = study.get_trials(deepcopy=False)
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    if sort == "value":
        trials = sorted(trials, key=lambda t: (t.values is None, -sign * t.values[0] if t.values else 0))
    elif sort == "duration":
        trials = sorted(trials, key=lambda t: -(t.duration.total_seconds() if t.duration else -1))
    rows = []
    for t in trials[:top] if top is not None else trials:
        steps = sorted(t.intermediate_values)
        pruned = t.state == optuna.trial.TrialState.PRUNED and steps
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.values[0] if t.values else None,
                "best_epoch": t.user_attrs.get(Attr.BEST_EPOCH),
                "epochs": len(steps),
                "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
                "pruned_at": steps[-1] if pruned else None,
                "pruned_why": t.user_attrs.get(Attr.PRUNED_WHY),
                "params": dict(t.params),
            }
        )
    return rows


def render_trials(rows: list[dict], form: str) -> str:
    if form == "json":
        return json.dumps(rows, indent=1)
    if form == "csv":
        names = sorted({key for r in rows for key in r["params"]})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*COLUMNS, *names])
        for r in rows:
            writer.writerow(
                [*("" if r[c] is None else r[c] for c in COLUMNS), *(r["params"].get(n, "") for n in names)]
            )
        return out.getvalue().rstrip("\n")
    head = f"{'trial':>5s} {'state':<8s} {'value':>7s} {'best':>4s} "
    lines = [head + f"{'epochs':>6s} {'time':>7s} {'pruned':>6s}  params"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        duration = "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}s"
        params = " ".join(f"{k}={_short(v)}" for k, v in r["params"].items())
        line = (
            f"{r['number']:5d} {r['state']:<8s} {value:>7s} {_dash(r['best_epoch']):>4s} {r['epochs']:6d} "
            f"{duration:>7s} {_dash(r['pruned_at']):>6s}  {params}"
        )
        lines.append(line if len(line) <= TABLE_WIDTH else line[: TABLE_WIDTH - 3] + "...")
    return "\n".join(lines)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value).replace(" ", "")


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def is_spec_file(study: str) -> bool:
    return Path(study).suffix in (".yaml", ".yml")


def delete(study: optuna.Study, storage: ResilientStorage, url: str, yes: bool, force: bool = False) -> int:
    """Asks on a terminal; elsewhere (a script, CI) only --yes deletes, so that nothing is lost to
    a command pasted into the wrong place. A study a run is working on is deleted only with --force."""
    count = len(study.get_trials(deepcopy=False))
    what = f"study {study.study_name} with {count} trials from {masked(url)}"
    live = storage.beating_trials(study._study_id, LIVE_S)
    if live and not force:
        raise UserError(
            f"not deleting {what}: a run is on it (trial(s) {', '.join(map(str, live))} running, with a "
            f"heartbeat in the last {LIVE_S} s); stop that run first, or pass --force"
        )
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"not deleting {what}: no terminal to ask on; pass --yes to delete it")
        try:
            answer = input(f"delete {what}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    optuna.delete_study(study_name=study.study_name, storage=storage)
    print(f"deleted {what} (its artifacts and checkpoints on disk are left as they are)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.command == "list" and args.study is None and not (args.storage or os.environ.get(STORAGE_ENV)):
        found = local_storages()
        if not found:
            raise UserError(
                f"pass --storage URL (or set ${STORAGE_ENV}, or name a spec with --study): no "
                "runs/<study>/study.db here, where hpo.run keeps a study by default"
            )
        print("\n\n".join(listing(open_storage(url, existing=True), url) for url in found))
        return 0
    url, name = locate(args.storage, args.study)
    storage = open_storage(url, existing=True)
    if args.command == "list":
        print(listing(storage, url))
        return 0
    existing = optuna.get_all_study_names(storage)
    if name not in existing:
        raise UserError(
            f"no study {quoted(name)} in {masked(url)}; the studies there: {', '.join(existing) or 'none'}"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    if args.command == "delete":
        return delete(study, storage, url, args.yes, args.force)
    if args.command == "trials":
        if args.top is not None and args.top < 1:
            raise UserError(f"--top must be at least 1, got {args.top}")
        print(render_trials(trial_rows(study, args.sort, args.top), args.format))
        return 0
    trial = best_trial(study)
    if trial is None:
        raise UserError(f"study {quoted(name)} has no complete trial yet")
    print(describe_best(study, trial, export_command(args.study, trial.number, args.storage)))
    return 0


if __name__ == "__main__":
    run_main(main)
