"""hpo.run's lines off a terminal, on a clock the test sets: every event line carries the elapsed
time, an ended trial's line the pace and the time left, a status line comes at most every
--status-every seconds, and the summary gives this run's wall time and pace."""

import io

import optuna
import pytest

from hpo import progress as shown
from hpo import spec as specs
from hpo.protocol import Attr


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(shown.time, "monotonic", clock)
    return clock


def test_lines_carry_the_elapsed_time_the_pace_and_the_eta(clock, tmp_path):
    spec = specs.load("demo")
    study = optuna.create_study(direction="maximize")
    out = io.StringIO()
    lines = shown.Progress(spec, target=3, slots=["cpu0"], bars=False, stream=out, status_every_s=60)
    slots = [shown.SlotStatus("cpu0", "w1", done=False)]

    trial = study.ask()
    clock.now = 1010.0
    lines.update(study, slots)
    assert out.getvalue() == ""  # its worker has not drawn its parameters yet
    trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
    trial.set_user_attr(Attr.CONFIG, {"train": {"epochs": 4}})
    trial.set_user_attr(Attr.WORKER, "w1")
    lines.update(study, slots)
    (start,) = out.getvalue().splitlines()
    assert start.startswith("trial 0 started on cpu0: optim.lr=") and start.endswith(" [0:00:10]")

    trial.report(0.5, 1)
    study.tell(trial, 0.5)
    clock.now = 2800.0  # 30 min after the run began: 1 trial, 2 trials/h, 2 left
    lines.update(study, slots)
    ended, status = out.getvalue().splitlines()[1:]
    assert ended == (
        "trial 0 complete: val macro-F1 0.5000 (best epoch -) [1/3 finished, best 0.5000 (trial 0), "
        "0 pruned, 0 failed, 0 running; 0:30:00 elapsed, 2 trials/h, ETA 1:00:00]"
    )
    assert status == (
        "study demo: 1/3 finished, best 0.5000 (trial 0), 0 pruned, 0 failed, 0 running; "
        "0:30:00 elapsed, 2 trials/h, ETA 1:00:00"
    )
    clock.now = 2830.0
    lines.update(study, slots)
    assert len(out.getvalue().splitlines()) == 3  # no status line again within 60 s

    text = shown.summary(study, 3, spec, "sqlite://", tmp_path, run=lines)
    assert "wall time 0:30:30 for the 1 trial(s) this run finished (1.97 trials/h)" in text.splitlines()
    # 1 epoch run of the 4 the trial's config names
    assert "epochs: 1 run of the 4 that 1 finished trial(s) would have taken to the end" in text

    # A trial that starts and ends between two looks still gets its start line, before its end.
    quick = study.ask()
    quick.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
    quick.set_user_attr(Attr.CONFIG, {"train": {"epochs": 4}})
    quick.set_user_attr(Attr.WORKER, "w1")
    study.tell(quick, 0.4)
    lines.update(study, slots)
    start, end = out.getvalue().splitlines()[3:5]
    assert start.startswith("trial 1 started on cpu0: optim.lr=") and end.startswith("trial 1 complete:")


def test_the_pace_counts_only_this_runs_trials(clock):
    """A run that continues a study does not claim the trials an earlier run finished."""
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    lines = shown.Progress(specs.load("demo"), 10, ["cpu0"], bars=False, stream=io.StringIO())
    lines.update(study, [])
    clock.now = 4600.0
    assert lines.pace(5) == "1:00:00 elapsed"
    assert lines.pace(7) == "1:00:00 elapsed, 2 trials/h, ETA 1:30:00"
    assert shown.clock(3 * 3600 + 62.9) == "3:01:02"
    assert [shown.per_hour(r) for r in (1234.5, 99.94, 0.5)] == [
        "1234 trials/h",
        "99.9 trials/h",
        "0.5 trials/h",
    ]


def test_the_study_note_replaces_only_its_own_parts():
    """What hpo.run and export-best write to the dashboard's note sits between markers; a user's
    text around them stays, and a run's command line shows no password."""
    from optuna_dashboard import get_note, save_note

    from hpo import note

    study = optuna.create_study()
    note.write(study, "run", "### Search\nfirst")
    assert get_note(study).count("### Search") == 1
    mine = get_note(study) + "\nmy own remark\n"
    save_note(study, "a title of mine\n\n" + mine)
    note.write(study, "run", "### Search\nsecond")
    note.write(study, "export", "### Last export\nthird")
    text = get_note(study)
    assert text.startswith("a title of mine\n\n") and "my own remark" in text
    assert "first" not in text and text.index("second") < text.index("my own remark") < text.index("third")

    part = note.run_part(
        "study: t\n", "`/data`: 3 photos", ["--study", "t", "--storage", "postgresql://u:s3cret@h/db"]
    )
    assert "s3cret" not in part and "--study t" in part and "```yaml\nstudy: t\n```" in part


def test_plain_batch_lines_show_the_count_moving_and_the_loss_at_the_next_timed_line():
    """Off a terminal a loss update (set_postfix, every 20 batches in training) waits for the next
    timed line instead of redrawing at once with the count of the last one (`0/40 batch` again)."""
    import re
    import time

    from maskcls.progress import bar

    log = io.StringIO()
    batches = bar(range(40), total=40, desc="epoch 1", unit="batch", every_s=0.2, stream=log)
    for step in batches:
        time.sleep(0.02)
        if step % 5 == 0:
            batches.set_postfix(loss=f"{step / 10:.3f}")
    counts = [
        int(re.match(r"epoch 1: (\d+)/40 batch", line).group(1)) for line in log.getvalue().splitlines()
    ]
    moving = counts[:-1]  # closing the bar writes its last line once more, with the final rate
    assert counts[0] == 0 and counts[-1] == 40 and moving == sorted(set(moving)), counts
    assert len(moving) >= 3  # the count moved between the first and the last line


@pytest.mark.slow
def test_a_six_trial_study_with_two_workers_reads_well_in_a_log_file(
    small_root, tmp_path, capsys, monkeypatch
):
    """Issue 25's acceptance, end to end: the run's output to a file, then the trials table, the
    pruned trials' reasons, the dashboard note and export-best's output."""
    import re
    import subprocess
    import sys

    from helpers import load, write_spec
    from optuna_dashboard import get_note

    from hpo import studies

    spec = write_spec(tmp_path, small_root, n_trials=6)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    log = tmp_path / "run.log"
    with log.open("w") as out:
        command = [
            sys.executable,
            "-m",
            "hpo.run",
            "--study",
            str(spec),
            "--storage",
            storage,
            "--workers",
            "2",
        ]
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    started = [line for line in text.splitlines() if " started on " in line]
    assert len(started) == 6 and all(re.search(r" started on \S+: \S+=", line) for line in started), started
    assert re.search(r"trials/h, ETA \d+:\d\d:\d\d\]", text) and "\r" not in text
    assert re.search(r"^wall time \d+:\d\d:\d\d for the 6 trial\(s\)", text, re.M), text

    monkeypatch.chdir(tmp_path)
    assert studies.main(["trials", "--study", str(spec), "--storage", storage, "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    study = load(storage)
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 6 and len(rows) == len(study.trials)
    pruned = [t for t in finished if t.state.name == "PRUNED"]
    assert pruned and all(t.user_attrs.get("pruned_why") for t in pruned)
    assert "### Search" in get_note(study)

    export = [sys.executable, "-m", "hpo.export-best", "--study", str(spec), "--storage", storage]
    shown = subprocess.run(
        [*export, "--out", str(tmp_path / "export")], capture_output=True, text=True, timeout=600
    )
    assert shown.returncode == 0, shown.stderr
    printed = (shown.stdout + shown.stderr).splitlines()
    assert len(printed) <= 80 and not [line for line in printed if "Warning" in line], printed
    helped = subprocess.run(
        [sys.executable, "-m", "hpo.run", "--help"], capture_output=True, text=True, timeout=120
    )
    rules = " ".join(helped.stdout.split())
    assert "--stop RULE also stop" in rules and "plateau:N" in rules and "terminator[:N]" in rules
