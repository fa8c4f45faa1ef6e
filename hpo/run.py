"""`python -m hpo.run --study NAME`: run a study on every GPU of this machine (or CPU workers).

Creates or loads the study, then keeps one worker process per GPU slot (CUDA_VISIBLE_DEVICES
pinned) or `--workers` CPU processes (threads split between them) busy until the study holds
`--n-trials` finished trials in total, across workers, machines and re-runs. A worker that dies
has its trial failed and re-queued at once and is replaced; a dead machine's trials are
recovered by the heartbeat. Ctrl-C stops cleanly: no trial is left RUNNING.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from filelock import FileLock
from tqdm import tqdm

from hpo import note, stopping
from hpo import spec as specs
from hpo.outage import ResilientStorage, StorageUnreachable
from hpo.progress import STATUS_EVERY_S, Progress, SlotStatus, summary
from hpo.protocol import (
    INTERRUPTED,
    Attr,
    Exit,
    WorkerArgs,
    artifacts_dir,
    checkpoints_dir,
    quiet_experimental,
    ranked,
    worker_id,
)
from hpo.storage import (
    POOL,
    PROXIED_POOL,
    counts,
    masked,
    open_storage,
    parse_url,
    requeue,
    resolve_url,
    setup_lock,
    study_deleted,
)
from hpo.tracking import check_available, end_study_run
from maskcls import weights
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.errors import UserError, mask_secrets, quoted
from maskcls.runtime import add_threads_argument, owned_cores

if TYPE_CHECKING:
    from hpo import proxy as proxies

MAX_RESTARTS_PER_SLOT = 5
# CUDA errors that broke a worker's context (hpo.failures.CudaPoisoned), from this many different
# trials on one GPU within the window, take that GPU out of the rotation; fewer are the trials' own.
CUDA_ERRORS_TO_RETIRE, CUDA_ERROR_WINDOW_S = 3, 1800.0
STOP_GRACE_S = 30  # after Ctrl-C/SIGTERM, workers get this long to mark their trials failed
STALE_TMP_S = 3600  # a checkpoint being written is never this old


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
    retired: bool = False  # its GPU kept breaking CUDA contexts: no worker runs here any more

    @property
    def worker(self) -> str:
        return worker_id(self.proc.pid) if self.proc else ""

    def status(self) -> SlotStatus:
        return SlotStatus(self.name, self.worker, self.done)


def gpu_count() -> int:
    """The NVIDIA GPUs of this machine, from the driver's NVML library (as nvidia-smi counts them);
    0 without a driver. The dispatcher never imports torch."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, each named as CUDA_VISIBLE_DEVICES names it: under
    CUDA_VISIBLE_DEVICES=2,3 they are "2" and "3" (UUIDs and MIG ids stay as given), else
    "0".."N-1". Like CUDA, the list ends at its first invalid entry (`-1` hides every GPU)."""
    available = gpu_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None or not available:
        return [str(i) for i in range(available)]
    names = []
    for name in (entry.strip() for entry in listed.split(",")):
        if not name.startswith(("GPU-", "MIG-")) and not (name.isdigit() and int(name) < available):
            break
        names.append(name)
    return names


def gpu_slots(gpus: str | None, per_gpu: int, workers: int | None, threads: int | None = None) -> list[Slot]:
    """One slot per GPU and trial; `--gpus` indexes the GPUs this process sees (visible_gpus). Each
    worker gets `threads` CPU threads, by default an equal share of the cores this process owns."""
    visible = visible_gpus()
    if gpus is None and (not visible or workers is not None):
        n = workers or 1
        share = threads or max(1, owned_cores() // n)
        return [Slot(f"cpu{i}", "cpu", {"CUDA_VISIBLE_DEVICES": ""}, share) for i in range(n)]
    if gpus in (None, "all"):
        ids = list(range(len(visible)))
    else:
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UserError(f"--gpus takes all or a list such as 0,1, got {quoted(gpus)}") from None
    missing = [g for g in ids if not 0 <= g < len(visible)]
    if missing or not ids:
        have = f"GPUs 0-{len(visible) - 1}" if visible else "no GPU"
        raise UserError(
            f"--gpus {gpus}: GPU {missing[0] if missing else ''} is not there; this machine has "
            f"{have} (use --workers N for CPU workers)"
        )
    share = threads or max(1, owned_cores() // (len(ids) * per_gpu))
    return [
        Slot(
            f"gpu{g}.{k}",
            "cuda",
            {"CUDA_VISIBLE_DEVICES": visible[g], "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            share,
        )
        for g in ids
        for k in range(per_gpu)
    ]


def prepare_data(spec: specs.StudySpec) -> str:
    """Generate the spec's stand-in on first use (once, even with several commands), then check it:
    its layout, and that every photo decodes (a bad one stops the run before any trial). Returns
    what it found, in a line."""
    from maskcls.data import faces
    from maskcls.data.check import verify_decodable  # pandas and PIL load here, not for --help
    from maskcls.data.layout import read_layout
    from maskcls.data.synth import generate
    from maskcls.errors import DataError

    root = Path(spec.base.data.root)
    if spec.synth and not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            if not root.exists():
                print(f"generating the stand-in data set in {root} (first use)", file=sys.stderr)
                synth = spec.synth
                generate(root, synth.people, synth.eval_people, synth.seed, (synth.size[0], synth.size[1]))
    found = read_layout(root, spec.base.data.corrections)
    eval_paths = list(found.eval["path"]) if found.eval is not None else []
    try:
        verify_decodable([*found.train["path"], *eval_paths], spec.base.data.cache_dir, sys.stderr.isatty())
        undecodable = []
    except DataError as err:
        undecodable = err.problems
    if found.problems or undecodable:  # every problem at once: layout and photos
        raise DataError(found.problems + undecodable)
    crops = {spec.base.data.crop, *(c for p in spec.params if p.path == "data.crop" for c in p.choices)}
    if "face" in crops:  # a trial may crop to faces: its boxes table must fit this data
        faces.check(spec.base.override({"data.crop": "face"}).data)
    people = found.train["person"].nunique()
    return f"`{root}`: {len(found.train)} training photos of {people} people, {len(eval_paths)} eval photos"


def check_weights(spec: specs.StudySpec) -> None:
    """Every backbone the spec can choose has its weights before the first trial: ImageNet ones are
    fetched once here (in a subprocess: timm stays out of the dispatcher), files must exist."""
    weights.ensure(m for m in spec.models if m.pretrained != weights.IMAGENET)
    if any(m.pretrained == weights.IMAGENET for m in spec.models):
        command = [sys.executable, "-m", "maskcls.weights", "fetch", "--study", str(spec.path)]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
            raise UserError(errors[-1].removeprefix("error: ") if errors else done.stderr.strip()[-2000:])


class Dispatcher:
    """Keeps one worker process per slot running until the study holds its target: restarts a
    worker that dies (failing and re-queueing its trial), stops everything cleanly on Ctrl-C."""

    def __init__(
        self,
        spec: specs.StudySpec,
        study: optuna.Study,
        url: str,
        slots: list[Slot],
        args: WorkerArgs,
        progress: Progress,
        rule: stopping.Rule | None = None,
        proxy: proxies.Child | None = None,
    ):
        self.spec, self.study, self.url, self.slots, self.args = spec, study, url, slots, args
        self.progress, self.rule, self.proxy = progress, rule, proxy
        self.finished_seen = -1  # the rule is evaluated when this count moves
        self.cuda_errors: dict[str, list[tuple[float, int]]] = {}  # GPU -> (when, trial lineage)
        self.log_dir = spec.runs_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, slot: Slot) -> None:
        slot.log = self.log_dir / f"{slot.name}.log"
        args = dataclasses.replace(self.args, device=slot.device, threads=slot.threads)
        with open(slot.log, "a") as log:
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "hpo.worker", *args.to_argv()],
                env={**os.environ, **slot.env, **args.secrets_env(self.url)},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def fail_trials_of(self, slot: Slot, reason: str) -> list[int]:
        """Mark the RUNNING trials of a slot's (dead or stopped) worker failed, and re-queue them:
        they resume from their last checkpoint."""
        failed = []
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        storage = self.study._storage
        for trial in (t for t in running if t.user_attrs.get(Attr.WORKER) == slot.worker):
            try:
                storage.set_trial_user_attr(trial._trial_id, Attr.FAIL_REASON, reason)
                if storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                    failed.append(trial.number)
                    requeue(self.study, storage.get_trial(trial._trial_id), self.spec.heartbeat.max_retry)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # it finished (or the heartbeat failed it) in the meantime
        return failed

    def run(self) -> int:
        try:
            reason = self.rule_met()
            if reason is not None:  # a study that met the rule in an earlier run: no trial starts
                self.progress.note(f"not starting: {reason}")
                return Exit.OK
            for slot in self.slots:
                self.start(slot)
            while not all(s.done for s in self.slots):
                if self.proxy is not None and self.proxy.proc.poll() is not None:
                    self.stop(
                        f"stopping: the storage proxy exited (code {self.proxy.proc.returncode}); "
                        f"its log: {self.proxy.log}"
                    )
                    return Exit.FAILED
                code = self.check_workers()
                if code is not None:
                    return code
                self.progress.update(self.study, [s.status() for s in self.slots])
                reason = self.rule_met()
                if reason is not None:
                    self.stop(f"stopping: {reason}; running trials are marked failed and queued again")
                    return Exit.OK
                time.sleep(1.0)
            self.progress.update(self.study, [s.status() for s in self.slots])
        except KeyError:  # Optuna's "Record does not exist": was the study deleted meanwhile?
            if not study_deleted(self.study._storage, self.spec.name):
                raise
            self.stop(None)
            print(
                f"error: study {self.spec.name} was deleted from the storage during the run", file=sys.stderr
            )
            return Exit.FAILED
        finally:
            self.progress.close()
        return Exit.OK

    def rule_met(self) -> str | None:
        """The stopping rule's reason, evaluated only when the number of finished trials moved."""
        if self.rule is None:
            return None
        finished = counts(self.study)["finished"]
        if finished == self.finished_seen:
            return None
        self.finished_seen = finished
        return self.rule.reason(self.study)

    def check_workers(self) -> int | None:
        for slot in self.slots:
            if slot.done or slot.proc is None or slot.proc.poll() is None:
                continue
            code = slot.proc.returncode
            if code == Exit.OK:
                slot.done = True
            elif code == Exit.STORAGE_LOST:
                self.stop("stopping: a worker lost the storage")
                raise StorageUnreachable(f"a worker could not reach it for {self.spec.heartbeat.outage} s")
            elif code == Exit.USAGE:  # the spec asks for something that cannot be (an unknown backbone)
                self.stop(None)
                raise UserError(self.error_line(slot))
            elif code == Exit.DISK_FULL:
                self.stop(None)
                print(
                    f"error: {self.error_line(slot)}; free some space and re-run the same command",
                    file=sys.stderr,
                )
                return Exit.FAILED
            elif code == Exit.CUDA_POISONED:
                stop = self.cuda_broke(slot)
                if stop is not None:
                    return stop
            elif code == Exit.TOO_MANY_FAILURES:
                self.stop("stopping: a worker saw too many failed trials in a row")
                print(self.log_tail(slot), file=sys.stderr)
                return Exit.FAILED
            else:
                failed = self.fail_trials_of(slot, f"worker {slot.name} died (exit code {code})")
                self.progress.note(
                    f"worker {slot.name} died (exit code {code}); trial(s) {failed or 'none'} failed and "
                    f"re-queued; log: {slot.log}"
                )
                slot.restarts += 1
                if slot.restarts > MAX_RESTARTS_PER_SLOT:
                    self.stop(f"stopping: worker {slot.name} died {slot.restarts} times")
                    print(self.log_tail(slot), file=sys.stderr)
                    return Exit.FAILED
                self.start(slot)
        return None

    def cuda_broke(self, slot: Slot) -> int | None:
        """The slot's worker exited on a broken CUDA context, its trial failed and queued again: a
        fresh worker takes the slot, unless trials of several recipes broke on this GPU lately."""
        gpu = slot.env.get("CUDA_VISIBLE_DEVICES") or slot.name
        failed = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
            if t.user_attrs.get(Attr.WORKER) == slot.worker
        ]
        now = time.monotonic()
        events = self.cuda_errors.setdefault(gpu, [])
        events += [(now, t.system_attrs.get("failed_trial", t.number)) for t in failed]
        recent = sorted({lineage for when, lineage in events if now - when <= CUDA_ERROR_WINDOW_S})
        numbers = ", ".join(str(t.number) for t in failed) or "none"
        if len(recent) < CUDA_ERRORS_TO_RETIRE:
            self.progress.note(
                f"worker {slot.name} exited on a CUDA error (trial {numbers}, queued again); "
                f"starting a fresh worker there; log: {slot.log}"
            )
            self.start(slot)
            return None
        shown = gpu if gpu == slot.name else f"GPU {gpu}"
        self.progress.note(
            f"{shown}: CUDA errors broke trials of {len(recent)} recipes (trials {recent}) within "
            f"{CUDA_ERROR_WINDOW_S / 60:.0f} min; taking it out of the rotation; log: {slot.log}"
        )
        for other in self.slots:
            if (other.env.get("CUDA_VISIBLE_DEVICES") or other.name) == gpu:
                other.done = other.retired = True
                if other.proc is not None and other.proc.poll() is None:
                    other.proc.send_signal(signal.SIGINT)  # its trial is failed and queued again
        if all(s.retired for s in self.slots):
            self.stop("stopping: every device is out of the rotation")
            return Exit.FAILED
        return None

    def stop(self, message: str | None) -> None:
        """Interrupt every worker, let each mark its trial failed, and make sure none stays RUNNING."""
        if message is not None:
            self.progress.note(message)
        live = [s.proc for s in self.slots if s.proc and s.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGINT)
        end = time.time() + STOP_GRACE_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(StorageUnreachable, KeyError):  # then the heartbeat fails them later
            for slot in self.slots:
                self.fail_trials_of(slot, INTERRUPTED)

    def error_line(self, slot: Slot) -> str:
        """The `error:` line a worker ended with (maskcls.cli.run_main wrote it to its log)."""
        text = slot.log.read_text(errors="replace").splitlines() if slot.log and slot.log.exists() else []
        errors = [line.removeprefix("error: ") for line in text if line.startswith("error: ")]
        return errors[-1] if errors else f"worker {slot.name} refused the spec; see {slot.log}"

    def log_tail(self, slot: Slot, lines: int = 15) -> str:
        text = slot.log.read_text(errors="replace").splitlines() if slot.log and slot.log.exists() else []
        return f"last lines of {slot.log}:\n" + "\n".join(text[-lines:])


def _terminate(signum, frame) -> None:
    """SIGTERM (docker stop, a scheduler) stops the run like Ctrl-C does."""
    raise KeyboardInterrupt


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("hpo.run"),
        description=__doc__.split("\n")[0],
        epilog=f"Available studies: {', '.join(specs.available())}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--study", required=True, help="name in studies/ (e.g. mask, demo) or a spec path")
    total = parser.add_mutually_exclusive_group()
    total.add_argument(
        "--n-trials",
        type=int,
        help="finished (complete + pruned) trials the study should hold in all, counting those of "
        "earlier runs and other machines (default: the spec's)",
    )
    total.add_argument(
        "--add", type=int, metavar="N", help="run N trials more than the study holds finished now"
    )
    parser.add_argument(
        "--storage", help="storage URL (default: $HPO_STORAGE, the spec's, or runs/<study>/study.db)"
    )
    parser.add_argument("--data", help="data root (default: the spec's)")
    parser.add_argument("--gpus", help="all (default when there are GPUs) or a list such as 0,1")
    parser.add_argument("--trials-per-gpu", type=int, default=1, help="trials sharing one GPU")
    parser.add_argument("--workers", type=int, help="CPU worker processes when not using GPUs (default 1)")
    parser.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    parser.add_argument(
        "--stop",
        metavar="RULE",
        help="also stop, on every machine of the study: plateau:N once N trials have finished "
        "(complete or pruned) since the best one; terminator[:N] once Optuna's Terminator finds the "
        "regret bound below the noise of the best value (its spread over groups of validation people), "
        "weighed from N complete trials on (default 20). Default: only --n-trials and --timeout",
    )
    add_threads_argument(
        parser,
        f"CPU threads of each worker (default: the {owned_cores()} cores this process owns, shared "
        "equally between the workers)",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="the workers of this machine share one storage proxy (hpo.proxy) that alone holds "
        "PostgreSQL connections (2, and 2 of this process): for many workers per machine "
        "(docs/DISTRIBUTED.md)",
    )
    parser.add_argument("--artifacts", help="artifact directory (default runs/<study>/artifacts)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no live bars on a terminal, only the plain lines a log file gets (one per trial event)",
    )
    parser.add_argument(
        "--status-every",
        type=float,
        default=STATUS_EVERY_S,
        metavar="SECONDS",
        help="without bars: a status line (counts, best, trials per hour, ETA) at most this often",
    )
    parser.add_argument(
        "--tensorboard", metavar="DIR", help="write each trial's per-epoch scalars to DIR/<study>/trial-<n>"
    )
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="log each trial as an MLflow run at this tracking URI (pip install -e '.[mlflow]')",
    )
    args = parser.parse_args(argv)
    if any(n is not None and n < 1 for n in (args.workers, args.trials_per_gpu, args.threads)):
        raise UserError("--workers, --trials-per-gpu and --threads must be at least 1")
    stopping.parse(args.stop)  # a malformed rule is refused with the other arguments
    if not args.status_every > 0:  # NaN too
        raise UserError(f"--status-every must be a positive number of seconds, got {args.status_every}")
    return args


def open_study(spec: specs.StudySpec, storage: ResilientStorage) -> optuna.Study:
    """Create the study, or load it when another machine or an earlier run made it; one run at a
    time, so that runs started together create it once and queue its recipes once."""
    with setup_lock(storage, spec.name):
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            directions=spec.directions,
            sampler=spec.make_sampler(),
            pruner=spec.make_pruner(),
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != spec.directions:
            raise UserError(
                f"study {quoted(spec.name)} in this storage optimises {len(study.directions)} objective(s), "
                f"the spec {len(spec.objectives)} ({', '.join(spec.objectives)}); use another study name "
                "or storage"
            )
        with quiet_experimental():
            study.set_metric_names(list(spec.objectives))  # the dashboard's axes say what they are
        for recipe in spec.enqueue:
            study.enqueue_trial(recipe, skip_if_exists=True)
    return study


def sweep_checkpoints(study: optuna.Study, folder: Path) -> None:
    """Delete the checkpoints that no trial will continue from: a trial deletes its own when it
    ends, but one that died with no retry left (max_retry) leaves its file behind, and a worker
    killed while writing one leaves a temporary file."""
    trials = study.get_trials(deepcopy=False)
    alive = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    wanted = {f"trial-{t.number}" for t in trials if t.state == optuna.trial.TrialState.RUNNING}
    wanted |= {f"trial-{t.user_attrs.get(Attr.RETRIED_FROM)}" for t in trials if t.state in alive}
    for path in folder.glob("trial-*.pt"):
        if path.stem not in wanted:
            path.unlink(missing_ok=True)
    for path in folder.glob(".trial-*.tmp"):
        if time.time() - path.stat().st_mtime > STALE_TMP_S:
            path.unlink(missing_ok=True)


def outage_note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the workers' INFO lines go to their logs
    spec = specs.load(args.study).with_data(args.data)
    check_available(args.tensorboard, args.mlflow, spec.name)  # before anything is written
    args.rule = stopping.parse(args.stop, spec.multi)
    target = spec.n_trials if args.n_trials is None else args.n_trials
    if target < 1:
        raise UserError(f"--n-trials must be at least 1, got {target}")
    if args.add is not None and args.add < 1:
        raise UserError(f"--add must be at least 1, got {args.add}")
    slots = gpu_slots(args.gpus, args.trials_per_gpu, args.workers, args.threads)
    url = resolve_url(args.storage, spec)
    if args.proxy and parse_url(url).get_backend_name() == "sqlite":
        raise UserError("--proxy serves a PostgreSQL or MySQL storage; a SQLite study needs none")
    if args.proxy and importlib.util.find_spec("grpc") is None:
        raise UserError("--proxy needs the grpcio package: pip install 'mask-hpo[postgres]'")
    parse_url(url)  # a URL that does not parse stops here, before the photos are checked
    data = prepare_data(spec)  # a data or weights problem stops here, before the storage is even opened
    check_weights(spec)
    pool = PROXIED_POOL if args.proxy else POOL
    storage = open_storage(url, spec.heartbeat, on_outage=outage_note, pool=pool)
    try:
        about = note.run_part(spec.path.read_text(), data, sys.argv[1:] if argv is None else argv)
        return search(args, spec, target, slots, url, storage, about)
    except StorageUnreachable as err:
        print(
            f"error: storage {masked(url)} unreachable ({err}); every worker is stopped. Their running "
            "trials are failed and queued again by the heartbeat once it is back: re-run the same command",
            file=sys.stderr,
        )
        return Exit.FAILED


def search(
    args: argparse.Namespace,
    spec: specs.StudySpec,
    target: int,
    slots: list[Slot],
    url: str,
    storage: ResilientStorage,
    about: str,
) -> int:
    """Set the study up, then supervise the workers until it holds its target."""
    study = open_study(spec, storage)
    note.write(study, "run", about)  # the dashboard's study note: spec, data, command line
    artifacts = artifacts_dir(args.artifacts, spec.runs_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    before = counts(study)
    if args.add is not None:
        target = before["finished"] + args.add
    print(
        f"study {spec.name} on {masked(url)}: {before['finished']}/{target} finished; "
        f"{len(slots)} worker(s): {', '.join(s.name for s in slots)}",
        file=sys.stderr,
    )
    if before["finished"] >= target:
        sweep_checkpoints(study, checkpoints_dir(artifacts, spec.name))
        print(summary(study, target, spec, url, artifacts))
        finish_tracking(args.mlflow, study)
        return Exit.OK
    deadline = time.time() + args.timeout if args.timeout else None
    with proxied(args.proxy, spec, url) as proxy:
        worker_args = WorkerArgs(
            str(spec.path),
            target,
            data=spec.base.data.root,
            artifacts=str(artifacts),
            deadline=deadline,
            parent=os.getpid(),
            tensorboard=args.tensorboard,
            mlflow=args.mlflow,
            proxy=proxy.address if proxy else None,
            stop=args.stop,
        )
        progress = Progress(
            spec, target, [s.name for s in slots], bars=not args.no_progress, status_every_s=args.status_every
        )
        dispatcher = Dispatcher(spec, study, url, slots, worker_args, progress, args.rule, proxy)
        signal.signal(signal.SIGTERM, _terminate)
        try:
            code = dispatcher.run()
        except StorageUnreachable:
            dispatcher.stop("the storage is unreachable: stopping the workers")
            raise
        except KeyboardInterrupt:
            storage.outage.limit(STOP_GRACE_S)  # stopping: an outage is waited out no longer than this
            dispatcher.stop(
                "interrupted: stopping the workers; running trials are marked failed and queued again"
            )
            print(summary(study, target, spec, url, artifacts, progress), file=sys.stderr)
            print("re-run the same command to continue the study", file=sys.stderr)
            return Exit.INTERRUPTED
    if code != Exit.OK and study_deleted(storage, spec.name):
        return code  # it said so; nothing is left to sum up
    sweep_checkpoints(study, checkpoints_dir(artifacts, spec.name))
    print(summary(study, target, spec, url, artifacts, progress))
    if code == Exit.OK and counts(study)["finished"] >= target:
        finish_tracking(args.mlflow, study)
    return code


def proxied(enabled: bool, spec: specs.StudySpec, url: str) -> AbstractContextManager[proxies.Child | None]:
    """This machine's storage proxy for the run's workers (`--proxy`), or none."""
    if not enabled:
        return contextlib.nullcontext()
    from hpo import proxy

    logs = spec.runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return proxy.started(str(spec.path), url, logs / "proxy.log")


def finish_tracking(mlflow: str | None, study: optuna.Study) -> None:
    """The study holds its trials: its MLflow parent run ends FINISHED with the study's best trial
    (by validation macro-F1) in its tags (a failure here is a warning: tracking never decides the
    run's outcome)."""
    if mlflow is None:
        return
    best = ranked(study)[:1]
    try:
        end_study_run(mlflow, study.study_name, (best[0].number, best[0].values[0]) if best else None)
    except Exception as err:
        shown = mask_secrets(f"{type(err).__name__}: {err}")
        print(f"warning: MLflow: the study's parent run stays open: {shown}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
