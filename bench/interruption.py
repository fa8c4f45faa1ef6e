"""Training time lost when a worker is killed mid-trial, for this checkout and another one side by
side in one run (e.g. the commit before per-epoch checkpoints):

    git worktree add /tmp/before c7e4d3a
    python bench/interruption.py --before /tmp/before [--epochs 6 --kill-at 3]

For each checkout, one `hpo.run` trains a single enqueued recipe uninterrupted; a second one is
killed (SIGKILL of the worker) once the trial has reported `--kill-at` epochs and is left to
recover on its own. Lost = wall time of the killed run - wall time of the uninterrupted one
(a worker's restart, about 8 s of imports here, is in both); epochs redone = epochs the retry
trained that the killed trial had already reported.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

from maskcls.data.synth import generate

ROOT = Path(__file__).resolve().parent.parent


def spec_for(folder: Path, data: Path, epochs: int) -> Path:
    spec = {
        "study": "bench",
        "data": {"root": str(data)},
        "n_trials": 1,
        "fixed": {
            "model.name": "mobilenetv3_small_050",
            "data.image_size": [64, 48],
            "train.batch_size": 32,
            "train.epochs": epochs,
            "data.cache_dir": str(folder / "cache"),
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "enqueue": [{"optim.lr": 3e-3}],
        "heartbeat": {"interval": 2, "grace": 10, "max_retry": 2},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def reported_epochs(storage: str) -> tuple[int, str | None]:
    """Epochs reported by the running trial and its worker's host:pid."""
    try:
        study = optuna.load_study(study_name="bench", storage=storage)
    except KeyError:
        return 0, None
    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        return len(trial.intermediate_values), trial.user_attrs.get("worker")
    return 0, None


def redone(storage: str, epochs: int) -> int:
    """Epochs trained twice: the retry's epochs beyond those the killed trial had not reached."""
    killed, retry = optuna.load_study(study_name="bench", storage=storage).trials
    retrained = epochs - retry.user_attrs.get("resumed_at_epoch", 0)
    return retrained - (epochs - len(killed.intermediate_values))


def one_run(checkout: Path, folder: Path, data: Path, epochs: int, kill_at: int | None) -> float:
    folder.mkdir(parents=True)
    spec = spec_for(folder, data, epochs)
    storage = f"sqlite:///{folder / 'study.db'}"
    command = [sys.executable, "-m", "hpo.run", "--study", str(spec), "--storage", storage, "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(checkout), "HPO_STORAGE": storage}
    started = time.perf_counter()
    run = subprocess.Popen(command + ["--no-progress"], cwd=folder, env=env, stdout=subprocess.DEVNULL)
    while kill_at is not None:
        done, worker = reported_epochs(storage)
        if done >= kill_at and worker:
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
            break
        time.sleep(0.05)
    if run.wait() != 0:
        raise SystemExit(f"hpo.run in {checkout} failed; see {folder}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="another checkout of the project to compare with")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=3, help="kill once this many epochs are reported")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-interruption-"))
    data = generate(work / "data", people=200, eval_people=10, seed=0, size=(96, 128), progress=False)
    print(f"1 trial of {args.epochs} epochs, worker killed after epoch {args.kill_at}; wall seconds")
    print(f"{'checkout':10s} {'uninterrupted':>14s} {'killed':>8s} {'lost':>6s} {'epochs redone':>14s}")
    lost = {}
    for name, checkout in (("before", Path(args.before).resolve()), ("this", ROOT)):
        straight = one_run(checkout, work / name / "straight", data, args.epochs, None)
        killed = one_run(checkout, work / name / "killed", data, args.epochs, args.kill_at)
        lost[name] = killed - straight
        again = redone(f"sqlite:///{work / name / 'killed' / 'study.db'}", args.epochs)
        print(f"{name:10s} {straight:14.1f} {killed:8.1f} {lost[name]:6.1f} {again:14d}")
    reference = f"sqlite:///{work / 'this' / 'straight' / 'study.db'}"
    trial = optuna.load_study(study_name="bench", storage=reference).trials[0]
    epoch_s = trial.user_attrs["wall_s"] / args.epochs
    print(
        f"lost per interruption: {lost['before']:.1f} s before, {lost['this']:.1f} s now; one epoch "
        f"takes {epoch_s:.1f} s"
    )


if __name__ == "__main__":
    main()
