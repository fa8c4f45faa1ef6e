"""A study through a PostgreSQL outage of `--seconds`: a private server (tests/pg.py) is stopped
once a trial has reported its first epoch and started again after the outage; the same `hpo.run`
must end with every trial finished, none failed, none refused.

    python bench/outage.py --seconds 90
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import private_server  # noqa: E402

from hpo.storage import counts  # noqa: E402
from maskcls.data.synth import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90, help="how long the server stays down")
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    data = generate(work / "data", people=60, eval_people=5, seed=0, size=(48, 64), progress=False)
    spec = {
        "study": "outage",
        "data": {"root": str(data)},
        "n_trials": args.trials,
        "fixed": {"model.name": "mobilenetv3_small_050", "data.image_size": [32, 24], "train.epochs": 8},
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "heartbeat": {"interval": 2, "grace": 10, "max_retry": 2, "outage": 300},
    }
    (work / "outage.yaml").write_text(yaml.safe_dump(spec))
    with private_server() as server:
        command = [sys.executable, "-m", "hpo.run", "--study", str(work / "outage.yaml"), "--workers", "2"]
        env = {**os.environ, "HPO_STORAGE": server.url}
        started = time.perf_counter()
        command.append("--no-progress")
        pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
        run = subprocess.Popen(command, cwd=work, env=env, text=True, **pipes)
        while not any(
            t.intermediate_values for t in _trials(server.url) if t.state == optuna.trial.TrialState.RUNNING
        ):
            time.sleep(0.2)
        server.stop()
        time.sleep(args.seconds)
        server.start()
        _, err = run.communicate()
        wall = time.perf_counter() - started
        study = optuna.load_study(study_name="outage", storage=server.url)
        now = counts(study)
    logs = "".join(p.read_text() for p in (work / "runs").rglob("*.log"))
    print(
        f"outage of {args.seconds:.0f} s mid-study, {args.trials} trials, 2 workers: rc {run.returncode}, "
        f"{now['finished']} finished, {now['fail']} failed, {now['running']} running, "
        f"{logs.count('UpdateFinishedTrialError')} results refused, {wall:.0f} s in all"
    )
    print("\n".join(line for line in err.splitlines() if "storage" in line))


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="outage", storage=url).trials
    except KeyError:
        return []


if __name__ == "__main__":
    main()
