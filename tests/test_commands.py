"""`mask-hpo`, the installed command: each subcommand is its module's own program, the light ones
load no PyTorch, and `mask-hpo studies` lists, shows and deletes studies on SQLite and PostgreSQL."""

import csv
import io
import json
import os
import pty
import re
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from importlib.metadata import version

import optuna
import pytest
from helpers import storage_at

from hpo.cli import COMMANDS
from hpo.protocol import Attr, ranked
from hpo.storage import counts

SCRIPT = os.path.join(os.path.dirname(sys.executable), "mask-hpo")
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# No storage from the developer's shell; a fixed width, so that two helps wrap alike.
ENV = {**{k: v for k, v in os.environ.items() if k != "HPO_STORAGE"}, "COLUMNS": "100"}


def mask_hpo(*args, env=None, cwd=None, timeout=120, stdin=subprocess.DEVNULL):
    assert os.path.isfile(SCRIPT), f"{SCRIPT} missing: `pip install -e .` (make setup) installs it"
    done = subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
        cwd=cwd,
        stdin=stdin,
    )
    return done.returncode, done.stdout, done.stderr


def answered(args, answer):
    """`mask-hpo ARGS` with a terminal as its stdin, on which the user types `answer`."""
    main_fd, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [SCRIPT, *args],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        os.write(main_fd, answer.encode())
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(terminal)
        os.close(main_fd)
    return proc.returncode, out, err


def imported(*args):
    """Every module that `mask-hpo ARGS` has loaded when it exits: the console script run in a
    fresh interpreter that then prints sys.modules."""
    probe = f"""
import contextlib, io, runpy, sys
sys.argv = [{SCRIPT!r}, *{list(args)!r}]
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    runpy.run_path({SCRIPT!r}, run_name="__main__")
print(" ".join(sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def study_names(url):
    return optuna.get_all_study_names(storage_at(url))


def row_of(listing, name):
    """The `studies list` columns of one study: name, directions, 5 counts, best, first and last trial."""
    rows = [line.split() for line in listing.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, listing
    return rows[0]


@pytest.mark.slow
def test_version_is_the_installed_distributions():
    code, out, err = mask_hpo("--version")
    assert code == 0 and out == f"mask-hpo {version('mask-hpo')}\n" and err == ""


@pytest.mark.slow
def test_help_lists_every_command_with_its_line_and_a_wrong_command_is_exit_2():
    code, out, _ = mask_hpo("--help")
    flat = " ".join(out.split())
    assert code == 0 and out.startswith("usage: mask-hpo")
    for name, (_, summary) in COMMANDS.items():
        assert f" {name} {summary} " in flat, name
    for wrong in ([], ["nope"]):
        code, out, err = mask_hpo(*wrong)
        assert code == 2 and out == "" and "COMMAND" in err, wrong


def module_help(module, capsys, monkeypatch):
    """`python -m MODULE --help`, in this process."""
    import importlib

    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])
    with pytest.raises(SystemExit) as end:
        importlib.import_module(module).main(["--help"])
    assert end.value.code == 0
    return capsys.readouterr().out


@pytest.mark.slow  # one process start per command: the console script's smoke test
@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_is_its_modules_program(name, capsys, monkeypatch):
    module = COMMANDS[name][0]
    code, out, err = mask_hpo(name, "--help")
    assert code == 0 and out.startswith(f"usage: mask-hpo {name} ") and err == "", err  # maskcls.cli.prog
    direct = module_help(module, capsys, monkeypatch)
    # The same words, but for the name it shows itself under (mask-hpo run / python -m hpo.run),
    # whose length moves the usage's line breaks.
    prog = re.compile(rf"mask-hpo {name}|python -m [\w.-]+")
    assert prog.sub("PROG", out).split() == prog.sub("PROG", direct).split()


@pytest.mark.slow
def test_studies_usage_names_the_command_typed(capsys, monkeypatch):
    assert mask_hpo("studies", "best", "--help")[1].startswith("usage: mask-hpo studies best ")
    assert module_help("hpo.studies", capsys, monkeypatch).startswith("usage: python -m hpo.studies ")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["run", "--help"], ["studies", "list", "--help"]]
)
def test_help_and_version_load_neither_torch_nor_timm(args):
    modules = imported(*args)
    assert not modules & {"torch", "timm"}
    if args[0] in COMMANDS:  # the probe sees the command's module: it would see torch too
        assert COMMANDS[args[0]][0] in modules


@pytest.fixture
def sqlite_copy(finished_study, tmp_path):
    """The session's finished study (5 trials, named "t") in a copy of its own, under
    runs/t/study.db where its spec puts it, so that deleting from it leaves the shared one alone."""
    run_dir, spec, storage, _ = finished_study
    target = tmp_path / "runs" / "t" / "study.db"
    target.parent.mkdir(parents=True)
    with closing(sqlite3.connect(run_dir / "study.db")) as source, closing(sqlite3.connect(target)) as copy:
        source.backup(copy)  # consistent, WAL included, while other tests may hold it open
    return spec, f"sqlite:///{target}", tmp_path


@pytest.mark.slow
def test_studies_list_and_best_on_sqlite(sqlite_copy):
    spec, url, cwd = sqlite_copy
    study = optuna.load_study(study_name="t", storage=storage_at(url))
    now, best = counts(study), ranked(study)[0]
    code, out, err = mask_hpo("studies", "list", "--storage", url)
    assert code == 0 and err == "" and out.splitlines()[0] == f"studies in {url}:"  # no optuna log lines
    tally = [now[k] for k in ("finished", "complete", "pruned", "fail", "running")]
    assert row_of(out, "t")[1:8] == ["maximize", *map(str, tally), f"{best.values[0]:.4g}"]
    assert now["finished"] == 5 and now["complete"] >= 1 and now["pruned"] >= 1  # the fixture's mix

    code, out, err = mask_hpo("studies", "best", "--storage", url, "--study", "t")
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[:3] == [
        f"study t: best trial {best.number}",
        f"  val_macro_f1: {best.values[0]:.4g}",  # hpo.run names the objectives
        f"  {Attr.BEST_EPOCH}: {best.user_attrs[Attr.BEST_EPOCH]}",
    ]
    assert all(f"    {k} = {v}" in lines for k, v in best.params.items())
    assert f"  mask-hpo export --study t --trial {best.number} --storage {url}" in lines
    assert "there --study takes the study's spec" in out  # "t" is no spec in studies/

    # Through the spec: its storage (runs/t/study.db, relative to the working folder), no --storage.
    code, out, err = mask_hpo("studies", "best", "--study", str(spec), cwd=cwd)
    assert code == 0 and out.splitlines()[-1] == f"  mask-hpo export --study {spec} --trial {best.number}", (
        err
    )


def made_study(tmp_path):
    """A SQLite study with one trial in each state, made without training: what `studies trials`
    reads from a study of hpo.run (per-epoch intermediate values, best_epoch, parameters)."""
    import datetime

    url = f"sqlite:///{tmp_path / 'made.db'}"
    study = optuna.create_study(study_name="made", storage=url, direction="maximize")
    dist = {
        "optim.lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True),
        "model.name": optuna.distributions.CategoricalDistribution(["resnet34", "convnext_tiny_" + "x" * 90]),
    }
    start = datetime.datetime(2026, 12, 1, 12, 0, 0)

    def trial(state, curve, name, seconds, value=None):
        made = optuna.trial.create_trial(
            state=state,
            value=value,
            params={"optim.lr": 0.000123456, "model.name": name},
            distributions=dist,
            intermediate_values=dict(enumerate(curve, start=1)),
            user_attrs={Attr.BEST_EPOCH: len(curve), Attr.CONFIG: {"long": "x" * 2000}} if value else {},
        )
        made.datetime_start, made.datetime_complete = start, start + datetime.timedelta(seconds=seconds)
        study.add_trial(made)

    complete, pruned, failed = (optuna.trial.TrialState[s] for s in ("COMPLETE", "PRUNED", "FAIL"))
    trial(complete, [0.2, 0.4], "resnet34", 30, value=0.4)
    trial(pruned, [0.1], "resnet34", 300)
    trial(complete, [0.3, 0.6, 0.5], "convnext_tiny_" + "x" * 90, 60, value=0.6)
    trial(failed, [], "resnet34", 5)
    return url


def studies_trials(capsys, *args):
    from hpo.studies import main
    from maskcls.cli import run_main

    with pytest.raises(SystemExit) as end:
        run_main(main, ["trials", "--study", "made", *args])
    captured = capsys.readouterr()
    return end.value.code, captured.out, captured.err


def test_studies_trials_gives_one_compact_row_per_trial_as_a_table_csv_or_json(tmp_path, capsys):
    url = made_study(tmp_path)
    code, out, err = studies_trials(capsys, "--storage", url)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["trial", "state", "value", "best", "epochs", "time", "pruned", "params"]
    assert [line.split()[:7] for line in lines[1:]] == [
        ["0", "complete", "0.4000", "2", "2", "30s", "-"],
        ["1", "pruned", "-", "-", "1", "300s", "1"],
        ["2", "complete", "0.6000", "3", "3", "60s", "-"],
        ["3", "fail", "-", "-", "0", "5s", "-"],
    ]
    assert all(len(line) <= 120 for line in lines) and lines[3].endswith("...")  # the long name, cut
    assert "optim.lr=0.000123 model.name=resnet34" in lines[1] and "long" not in out  # no stored config

    code, out, _ = studies_trials(
        capsys, "--storage", url, "--format", "csv", "--sort", "value", "--top", "2"
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["number"] for r in rows] == ["2", "0"]  # best first
    assert rows[0]["model.name"].startswith("convnext") and float(rows[0]["optim.lr"]) == 0.000123456

    code, out, _ = studies_trials(capsys, "--storage", url, "--format", "json", "--sort", "duration")
    assert code == 0 and [r["number"] for r in json.loads(out)] == [1, 2, 0, 3]  # longest first
    assert json.loads(out)[0]["pruned_at"] == 1 and json.loads(out)[0]["value"] is None

    code, out, err = studies_trials(capsys, "--storage", url, "--top", "0")
    assert code == 2 and out == "" and err == "error: --top must be at least 1, got 0\n"


@pytest.mark.slow
def test_studies_delete_on_sqlite_asks_and_refuses_without_a_terminal(sqlite_copy):
    _, url, _ = sqlite_copy
    total = len(optuna.load_study(study_name="t", storage=storage_at(url)).trials)
    question = f"delete study t with {total} trials from {url}? [y/N] "
    code, out, err = mask_hpo("studies", "delete", "--storage", url, "--study", "t")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: not deleting study t with {total} trials from {url}: "
        "no terminal to ask on; pass --yes to delete it"
    ]
    code, out, err = answered(["studies", "delete", "--storage", url, "--study", "t"], "n\n")
    assert (code, out, err) == (1, question, "nothing deleted\n")
    assert study_names(url) == ["t"]

    code, out, err = answered(["studies", "delete", "--storage", url, "--study", "t"], "y\n")
    assert code == 0 and out.startswith(f"{question}deleted study t with {total} trials") and err == ""
    assert study_names(url) == []
    assert mask_hpo("studies", "list", "--storage", url)[1] == f"no studies in {url}\n"


@pytest.mark.slow
def test_an_unknown_study_names_the_existing_ones(sqlite_copy):
    _, url, _ = sqlite_copy
    for command in ("best", "delete"):
        extra = ["--yes"] if command == "delete" else []
        code, out, err = mask_hpo("studies", command, "--storage", url, "--study", "nope", *extra)
        assert code == 2 and out == ""
        assert err.splitlines() == [f"error: no study 'nope' in {url}; the studies there: t"]
    assert study_names(url) == ["t"]


@pytest.mark.slow
def test_a_missing_sqlite_file_is_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "study.db"
    for args in (["list"], ["best", "--study", "t"], ["delete", "--study", "t", "--yes"]):
        code, out, err = mask_hpo("studies", *args, "--storage", f"sqlite:///{missing}")
        assert code == 2 and out == ""
        assert err.splitlines() == [
            f"error: no study database at {missing}: run the study first, or pass --storage"
        ]
    assert not missing.parent.exists()


def test_list_without_a_storage_lists_the_studies_hpo_run_keeps_here(tmp_path, capsys, monkeypatch):
    """hpo.run's default storage is runs/<study>/study.db: `studies list` alone reads those."""
    from hpo.studies import main
    from maskcls.cli import run_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HPO_STORAGE", raising=False)

    def studies_list():
        with pytest.raises(SystemExit) as end:
            run_main(main, ["list"])
        return end.value.code, *capsys.readouterr()

    code, out, err = studies_list()
    assert code == 2 and err.splitlines() == [
        "error: pass --storage URL (or set $HPO_STORAGE, or name a spec with --study): no "
        "runs/<study>/study.db here, where hpo.run keeps a study by default"
    ]
    assert list(tmp_path.iterdir()) == []
    for name in ("b", "a"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        optuna.create_study(study_name=name, storage=f"sqlite:///runs/{name}/study.db")
    code, out, err = studies_list()
    assert code == 0 and err == ""
    heads = [line for line in out.splitlines() if line.startswith("studies in")]
    assert heads == ["studies in sqlite:///runs/a/study.db:", "studies in sqlite:///runs/b/study.db:"]


@pytest.fixture
def pg_study():
    """A study of our own in the shared PostgreSQL database: 2 complete trials, 1 pruned, 1 failed."""
    name = f"commands-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage_at(POSTGRES), direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for value, state in ((0.25, "COMPLETE"), (0.625, "COMPLETE"), (None, "PRUNED"), (None, "FAIL")):
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState[state],
                value=value,
                params={"optim.lr": 0.003},
                distributions={"optim.lr": lr},
                user_attrs={Attr.BEST_EPOCH: 4},
            )
        )
    yield name
    if name in study_names(POSTGRES):
        optuna.delete_study(study_name=name, storage=storage_at(POSTGRES))


@pytest.mark.slow
def test_studies_list_best_and_delete_on_postgresql(pg_study):
    code, out, err = mask_hpo(
        "studies", "list", env={"HPO_STORAGE": POSTGRES}
    )  # the URL from the environment
    assert code == 0 and err == "", err
    assert row_of(out, pg_study)[1:8] == ["maximize", "3", "2", "1", "1", "0", "0.625"]

    code, out, err = mask_hpo("studies", "best", "--study", pg_study, env={"HPO_STORAGE": POSTGRES})
    assert code == 0 and err == "", err
    assert out.splitlines()[:5] == [
        f"study {pg_study}: best trial 1",
        "  value: 0.625",
        "  best_epoch: 4",
        "  params:",
        "    optim.lr = 0.003",
    ]
    assert (
        f"  mask-hpo export --study {pg_study} --trial 1" in out.splitlines()
    )  # no --storage: it is in $HPO_STORAGE

    code, _, err = mask_hpo("studies", "best", "--storage", POSTGRES, "--study", "nope")
    assert code == 2 and err.startswith(f"error: no study 'nope' in {POSTGRES}; the studies there: ")
    assert pg_study in err.split("the studies there: ")[1].strip().split(", ")

    code, out, err = mask_hpo("studies", "delete", "--storage", POSTGRES, "--study", pg_study)
    assert code == 2 and "no terminal to ask on; pass --yes" in err and pg_study in study_names(POSTGRES)
    code, out, err = mask_hpo("studies", "delete", "--storage", POSTGRES, "--study", pg_study, "--yes")
    assert code == 0 and out.startswith(f"deleted study {pg_study} with 4 trials from {POSTGRES}"), err
    assert pg_study not in study_names(POSTGRES)
