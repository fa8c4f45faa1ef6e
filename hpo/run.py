"""`python -m hpo.run --study NAME`: run a study on every GPU of this machine (or CPU workers).

Creates or loads the study, then keeps one worker process per GPU slot (CUDA_VISIBLE_DEVICES
pinned) or `--workers` CPU processes (threads split between them) busy until the study holds
`--n-trials` finished trials in total, across workers, machines and re-runs. A worker that dies
has its trial failed and re-queued at once and is replaced; a dead machine's trials are
recovered by the heartbeat. Ctrl-C stops cleanly: no trial is left RUNNING.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from filelock import FileLock
from tqdm import tqdm

from hpo import spec as specs
from hpo.storage import counts, masked, open_storage, resolve_url, retry
from hpo.worker import EXIT_TOO_MANY_FAILURES
from maskcls import weights
from maskcls.cli import run_main
from maskcls.data.layout import scan
from maskcls.data.synth import generate
from maskcls.errors import UserError

RUNNING = optuna.trial.TrialState.RUNNING
MAX_RESTARTS_PER_SLOT = 5
STOP_GRACE_S = 30  # after Ctrl-C/SIGTERM, workers get this long to mark their trials failed


@dataclass
class Slot:
    """One worker position: a GPU (or a share of the CPU) and the process running there."""

    name: str
    device: str
    env: dict[str, str]
    threads: int | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None
    restarts: int = 0
    done: bool = False
    bar: tqdm | None = field(default=None, repr=False)

    @property
    def worker(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}" if self.proc else ""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, each named as CUDA_VISIBLE_DEVICES names it: under
    CUDA_VISIBLE_DEVICES=2,3 they are "2" and "3" (or UUIDs, MIG ids), else "0".."N-1"."""
    import torch

    available = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(available)]
    return [name.strip() for name in listed.split(",")][:available]  # CUDA stops at the first bad entry


def gpu_slots(gpus: str | None, per_gpu: int, workers: int | None) -> list[Slot]:
    """One slot per GPU and trial; `--gpus` indexes the GPUs this process sees (visible_gpus)."""
    visible = visible_gpus()
    if gpus is None and (not visible or workers is not None):
        n = workers or 1
        threads = max(1, (os.cpu_count() or 1) // n)
        return [Slot(f"cpu{i}", "cpu", {"CUDA_VISIBLE_DEVICES": ""}, threads) for i in range(n)]
    if gpus in (None, "all"):
        ids = list(range(len(visible)))
    else:
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UserError(f"--gpus takes all or a list such as 0,1, got {gpus!r}") from None
    missing = [g for g in ids if not 0 <= g < len(visible)]
    if missing or not ids:
        have = f"GPUs 0-{len(visible) - 1}" if visible else "no GPU"
        raise UserError(
            f"--gpus {gpus}: GPU {missing[0] if missing else ''} is not there; this machine has "
            f"{have} (use --workers N for CPU workers)"
        )
    threads = max(1, (os.cpu_count() or 1) // (len(ids) * per_gpu))
    return [
        Slot(f"gpu{g}.{k}", "cuda", {"CUDA_VISIBLE_DEVICES": visible[g]}, threads)
        for g in ids
        for k in range(per_gpu)
    ]


def prepare_data(spec: specs.StudySpec) -> None:
    """Generate the spec's stand-in on first use (once, even with several commands), then scan it."""
    root = Path(spec.base.data.root)
    if spec.synth and not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            if not root.exists():
                size = spec.synth.get("size", [384, 512])
                print(f"generating the stand-in data set in {root} (first use)", file=sys.stderr)
                generate(
                    root,
                    people=spec.synth.get("people", 200),
                    eval_people=spec.synth.get("eval_people", 50),
                    seed=spec.synth.get("seed", 0),
                    size=(size[0], size[1]),
                )
    scan(root, spec.base.data.corrections)


class Dispatcher:
    def __init__(
        self,
        spec: specs.StudySpec,
        url: str,
        target: int,
        slots: list[Slot],
        artifacts: Path,
        deadline: float | None,
        progress: bool,
    ):
        self.spec, self.url, self.target, self.slots = spec, url, target, slots
        self.artifacts, self.deadline = artifacts, deadline
        # Live bars on a terminal; in a log file (CI, nohup) one plain line per change instead.
        self.bars = progress and sys.stderr.isatty()
        self.lines = progress and not self.bars
        self.last_line = ""
        self.study = optuna.load_study(study_name=spec.name, storage=open_storage(url, spec.heartbeat))
        self.log_dir = spec.runs_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, slot: Slot) -> None:
        slot.log = self.log_dir / f"{slot.name}.log"
        command = [
            sys.executable,
            "-m",
            "hpo.worker",
            "--study",
            str(self.spec.path),
            "--storage",
            self.url,
            "--target",
            str(self.target),
            "--device",
            slot.device,
            "--artifacts",
            str(self.artifacts),
            "--data",
            self.spec.base.data.root,
        ]
        if slot.threads:
            command += ["--threads", str(slot.threads)]
        if self.deadline:
            command += ["--deadline", str(self.deadline)]
        with open(slot.log, "a") as log:
            slot.proc = subprocess.Popen(
                command,
                env={**os.environ, **slot.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def running_trials_of(self, slot: Slot) -> list[optuna.trial.FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(deepcopy=False, states=(RUNNING,))
            if t.user_attrs.get("worker") == slot.worker
        ]

    def fail_trials_of(self, slot: Slot, reason: str, requeue: bool) -> list[int]:
        failed = []
        for trial in self.running_trials_of(slot):
            storage = self.study._storage
            try:
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
                if storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                    failed.append(trial.number)
                    if requeue:
                        retry(self.study, storage.get_trial(trial._trial_id), self.spec.heartbeat.max_retry)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # it finished (or the heartbeat failed it) in the meantime
        return failed

    def run(self) -> int:
        for slot in self.slots:
            self.start(slot)
        overall = tqdm(
            total=self.target,
            desc=f"{self.spec.name}",
            unit="trial",
            disable=not self.bars,
            position=0,
            dynamic_ncols=True,
        )
        for i, slot in enumerate(self.slots, start=1):
            slot.bar = tqdm(total=0, bar_format="{desc}", position=i, disable=not self.bars)
        try:
            while not all(s.done for s in self.slots):
                code = self.check_workers()
                if code is not None:
                    return code
                self.show(overall)
                time.sleep(1.0)
            self.show(overall)
        finally:
            for bar in [overall] + [s.bar for s in self.slots]:
                bar.close()
        return 0

    def check_workers(self) -> int | None:
        for slot in self.slots:
            if slot.done or slot.proc is None or slot.proc.poll() is None:
                continue
            code = slot.proc.returncode
            if code == 0:
                slot.done = True
            elif code == EXIT_TOO_MANY_FAILURES:
                self.stop("stopping: a worker saw too many failed trials in a row")
                print(self.log_tail(slot), file=sys.stderr)
                return 1
            else:
                failed = self.fail_trials_of(
                    slot, f"worker {slot.name} died (exit code {code})", requeue=True
                )
                tqdm.write(
                    f"worker {slot.name} died (exit code {code}); trial(s) {failed or 'none'} failed and "
                    f"re-queued; log: {slot.log}",
                    file=sys.stderr,
                )
                slot.restarts += 1
                if slot.restarts > MAX_RESTARTS_PER_SLOT:
                    self.stop(f"stopping: worker {slot.name} died {slot.restarts} times")
                    print(self.log_tail(slot), file=sys.stderr)
                    return 1
                self.start(slot)
        return None

    def show(self, overall: tqdm) -> None:
        trials = self.study.get_trials(deepcopy=False)
        now = counts(self.study)
        overall.n = min(now["finished"], self.target)
        best = max((t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE), default=None)
        overall.set_postfix(
            best=f"{best:.4f}" if best is not None else "-",
            pruned=now["pruned"],
            failed=now["fail"],
            running=now["running"],
            refresh=False,
        )
        overall.refresh()
        by_worker = {t.user_attrs.get("worker"): t for t in trials if t.state == RUNNING}
        epochs = self.spec.base.train.epochs
        for slot in self.slots:
            trial = by_worker.get(slot.worker)
            if slot.done:
                text = "done"
            elif trial is None:
                text = "waiting for a trial"
            else:
                last = max(trial.intermediate_values, default=0)
                f1 = f", val macro-F1 {trial.intermediate_values[last]:.4f}" if last else ""
                text = f"trial {trial.number}: epoch {last}/{epochs}{f1}"
            slot.bar.set_description_str(f"  {slot.name:>8s} {text}")

    def stop(self, message: str) -> None:
        """Interrupt every worker, let each mark its trial failed, and make sure none stays RUNNING."""
        tqdm.write(message, file=sys.stderr)
        live = [s for s in self.slots if s.proc and s.proc.poll() is None]
        for slot in live:
            slot.proc.send_signal(signal.SIGINT)
        end = time.time() + STOP_GRACE_S
        for slot in live:
            try:
                slot.proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
        for slot in self.slots:
            self.fail_trials_of(slot, "interrupted (Ctrl-C or SIGTERM)", requeue=False)

    def log_tail(self, slot: Slot, lines: int = 15) -> str:
        text = slot.log.read_text(errors="replace").splitlines() if slot.log and slot.log.exists() else []
        return f"last lines of {slot.log}:\n" + "\n".join(text[-lines:])


def summary(study: optuna.Study, target: int, spec: specs.StudySpec, url: str, artifacts: Path) -> str:
    now = counts(study)
    study_arg = spec.name if spec.path.parent == specs.STUDIES_DIR else spec.path
    complete = sorted(
        (t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.value,
        reverse=True,
    )
    lines = [
        f"study {spec.name}: {now['finished']}/{target} finished ({now['complete']} complete, "
        f"{now['pruned']} pruned), {now['fail']} failed, {now['running']} running"
    ]
    if complete:
        lines.append(f"{'trial':>6s} {'val macro-F1':>12s} {'epoch':>5s} {'peak GiB':>8s}  params")
        for t in complete[:5]:
            params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            peak = t.user_attrs.get("peak_memory_mb")
            peak_gib = f"{peak / 1024:.2f}" if peak is not None else "-"
            epoch = t.user_attrs.get("best_epoch", "-")
            lines.append(f"{t.number:6d} {t.value:12.4f} {epoch!s:>5s} {peak_gib:>8s}  {params}")
    lines += [
        "",
        "dashboard:",
        f"  python -m hpo.dashboard --study {study_arg}",
        f"  optuna-dashboard {masked(url)} --artifact-dir {artifacts}",
    ]
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _terminate(signum, frame) -> None:
    """SIGTERM (docker stop, a scheduler) stops the run like Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpo.run",
        description=__doc__.split("\n")[0],
        epilog=f"Available studies: {', '.join(specs.available())}",
    )
    parser.add_argument("--study", required=True, help="name in studies/ (e.g. mask, demo) or a spec path")
    parser.add_argument(
        "--n-trials", type=int, help="finished trials the study should hold (default: the spec's)"
    )
    parser.add_argument(
        "--storage", help="storage URL (default: $HPO_STORAGE, the spec's, or runs/<study>/study.db)"
    )
    parser.add_argument("--data", help="data root (default: the spec's)")
    parser.add_argument("--gpus", help="all (default when there are GPUs) or a list such as 0,1")
    parser.add_argument("--trials-per-gpu", type=int, default=1, help="trials sharing one GPU (default 1)")
    parser.add_argument("--workers", type=int, help="CPU worker processes when not using GPUs (default 1)")
    parser.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    parser.add_argument("--artifacts", help="artifact directory (default runs/<study>/artifacts)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1 or args.trials_per_gpu < 1:
        raise UserError("--workers and --trials-per-gpu must be at least 1")

    spec = specs.load(args.study).with_data(args.data)
    target = spec.n_trials if args.n_trials is None else args.n_trials
    if target < 1:
        raise UserError(f"--n-trials must be at least 1, got {target}")
    slots = gpu_slots(args.gpus, args.trials_per_gpu, args.workers)
    url = resolve_url(args.storage, spec)
    storage = open_storage(url, spec.heartbeat)
    prepare_data(spec)  # a data or weights problem stops here, before anything is written to the storage
    weights.ensure(spec.models)  # ImageNet weights fetched once here, not by every worker
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction="maximize",
        sampler=spec.make_sampler(),
        pruner=spec.make_pruner(),
        load_if_exists=True,
    )
    study.set_metric_names([specs.METRIC])  # the dashboard's axes say val_macro_f1, not "Objective 0"
    for recipe in spec.enqueue:
        study.enqueue_trial(recipe, skip_if_exists=True)
    artifacts = Path(args.artifacts or os.environ.get("HPO_ARTIFACTS") or spec.runs_dir / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    before = counts(study)
    print(
        f"study {spec.name} on {masked(url)}: {before['finished']}/{target} finished; "
        f"{len(slots)} worker(s): {', '.join(s.name for s in slots)}",
        file=sys.stderr,
    )

    if before["finished"] >= target:
        print(summary(study, target, spec, url, artifacts))
        return 0
    deadline = time.time() + args.timeout if args.timeout else None
    dispatcher = Dispatcher(spec, url, target, slots, artifacts, deadline, progress=not args.no_progress)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = dispatcher.run()
    except KeyboardInterrupt:
        dispatcher.stop("interrupted: stopping the workers; running trials are marked failed")
        print(summary(study, target, spec, url, artifacts), file=sys.stderr)
        print("re-run the same command to continue the study", file=sys.stderr)
        return 130
    print(summary(study, target, spec, url, artifacts))
    return code


if __name__ == "__main__":
    run_main(main)
