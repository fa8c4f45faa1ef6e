"""`python -m hpo.studies list|best|delete`: what a storage holds, without opening the dashboard.

`list` shows every study of a storage with its trials per state and best value, `best` one study's
best trial and the command that exports it, `delete` removes a study after asking (its artifacts
and checkpoints on disk stay). The storage resolves as for the other commands: --storage, else
$HPO_STORAGE, else the storage of the spec --study names; a SQLite file that is not there is an
error, never a new empty database.
"""

from __future__ import annotations

import argparse
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
        ("delete", "delete --study and all its trials from the storage, after asking"),
    ):
        command = commands.add_parser(
            name, help=summary, description=summary, epilog=EPILOG, formatter_class=HelpFormatter
        )
        command.add_argument(
            "--storage", help="storage URL (default: $HPO_STORAGE, else the storage of the --study spec)"
        )
        command.add_argument(
            "--study",
            required=name != "list",
            help="the study's name, or a spec (name in studies/ or a path) whose storage and study to use",
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
    trial = best_trial(study)
    if trial is None:
        raise UserError(f"study {quoted(name)} has no complete trial yet")
    print(describe_best(study, trial, export_command(args.study, trial.number, args.storage)))
    return 0


if __name__ == "__main__":
    run_main(main)
