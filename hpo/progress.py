"""What `hpo.run` shows: a line per trial event (started, an epoch now and then, complete, pruned,
failed) everywhere, each with the run's elapsed time; live bars above them on a terminal (not with
--no-progress), elsewhere a status line now and then (counts, best, trials per hour, ETA); no
carriage return in a log file; and the summary of the study at the end (wall time, pace, the
epochs pruning saved)."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import optuna
from tqdm import tqdm

from hpo.protocol import Attr, artifacts_dir, ranked
from hpo.record import has_recipe
from hpo.spec import StudySpec
from hpo.storage import counts, masked, resolve_url, tally
from maskcls import specfiles
from maskcls.labels import NUM_CLASSES
from maskcls.progress import EVERY_S, on_terminal

STATUS_EVERY_S = 60.0  # off a terminal: a status line at most this often (hpo.run --status-every)

RUNNING, COMPLETE = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
PRUNED, FAIL = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL


class SlotStatus(NamedTuple):
    name: str  # e.g. gpu0.1, cpu0
    worker: str  # worker_id of its process
    done: bool


class Progress:
    """One line per trial event, and live bars on a terminal (`bars`)."""

    def __init__(
        self,
        spec: StudySpec,
        target: int,
        slots: Sequence[str],
        bars: bool,
        every_s: float = EVERY_S,
        stream: TextIO | None = None,
        status_every_s: float = STATUS_EVERY_S,
    ):
        self.spec, self.target, self.every_s = spec, target, every_s
        self.began = self.status_shown = time.monotonic()
        self.status_every_s = status_every_s
        self.finished_before = 0  # finished when this run began: the pace counts only its own
        self.stream = stream or sys.stderr
        self.bars = bars and on_terminal(self.stream)
        self.seen: dict[int, optuna.trial.TrialState] | None = None  # trial number -> state last shown
        self.epoch_shown: dict[int, tuple[int, float]] = {}  # trial number -> (epoch, when) of its last line
        self.overall = tqdm(
            total=target,
            desc=spec.name,
            unit="trial",
            disable=not self.bars,
            position=0,
            dynamic_ncols=True,
            file=self.stream,
        )
        self.slot_bars = [
            tqdm(total=0, bar_format="{desc}", position=i, disable=not self.bars, file=self.stream)
            for i in range(1, len(slots) + 1)
        ]

    def update(self, study: optuna.Study, slots: Sequence[SlotStatus]) -> None:
        trials = study.get_trials(deepcopy=False)
        self.events(trials, {s.worker: s.name for s in slots})
        now = tally(trials)
        if not self.bars:
            if time.monotonic() - self.status_shown >= self.status_every_s:
                self.status_shown = time.monotonic()
                finished = min(now["finished"], self.target)
                self.note(
                    f"study {self.spec.name}: {finished}/{self.target} finished, {self.state(trials, now)}; "
                    f"{self.pace(now['finished'])}"
                )
            return
        self.overall.n = min(now["finished"], self.target)
        self.overall.set_postfix_str(self.state(trials, now), refresh=False)
        self.overall.refresh()
        by_worker = {t.user_attrs.get(Attr.WORKER): t for t in trials if t.state == RUNNING}
        for bar, slot in zip(self.slot_bars, slots, strict=True):
            bar.set_description_str(f"  {slot.name:>8s} {self.describe(slot, by_worker.get(slot.worker))}")

    def state(self, trials: Sequence[optuna.trial.FrozenTrial], now: dict[str, int]) -> str:
        complete = [t for t in trials if t.state == COMPLETE]
        best = max(complete, key=lambda t: t.values[0], default=None)
        shown = f"best {best.values[0]:.4f} (trial {best.number})" if best else "best -"
        return f"{shown}, {now['pruned']} pruned, {now['fail']} failed, {now['running']} running"

    def events(self, trials: Sequence[optuna.trial.FrozenTrial], slot_of: dict[str, str]) -> None:
        """A line for each trial that started, finished or failed since the last call, and one for a
        running trial's newest epoch at most every `every_s` seconds. Trials that ended before this
        run started are not shown again."""
        if self.seen is None:
            self.seen = {t.number: t.state for t in trials if t.state in (COMPLETE, PRUNED, FAIL)}
            self.finished_before = sum(t.state in (COMPLETE, PRUNED) for t in trials)
        now = tally(trials)
        for t in trials:
            before = self.seen.get(t.number)
            if t.state == RUNNING:
                if before != RUNNING and not has_recipe(t):
                    continue  # its worker has not drawn its parameters yet: said once it has
                if before != RUNNING:
                    self.started(t, slot_of)
                self.epoch_line(t)
            elif t.state in (COMPLETE, PRUNED, FAIL) and before != t.state:
                if before is None and has_recipe(t):  # it began and ended between two looks
                    self.started(t, slot_of)
                self.seen[t.number] = t.state
                progress = f"{min(now['finished'], self.target)}/{self.target} finished"
                pace = self.pace(now["finished"])
                self.note(f"{ended(t, self.epochs(t))} [{progress}, {self.state(trials, now)}; {pace}]")

    def started(self, trial: optuna.trial.FrozenTrial, slot_of: dict[str, str]) -> None:
        where = slot_of.get(trial.user_attrs.get(Attr.WORKER, ""), "a worker")
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        self.note(f"trial {trial.number} started on {where}: {params} [{clock(self.elapsed())}]")
        assert self.seen is not None  # events() sets it before any line
        self.seen[trial.number] = RUNNING

    def epoch_line(self, trial: optuna.trial.FrozenTrial) -> None:
        if not trial.intermediate_values:
            return
        epoch = max(trial.intermediate_values)
        shown_epoch, when = self.epoch_shown.get(trial.number, (0, 0.0))
        if epoch > shown_epoch and time.monotonic() - when >= self.every_s:
            self.epoch_shown[trial.number] = (epoch, time.monotonic())
            value = trial.intermediate_values[epoch]
            self.note(
                f"trial {trial.number}: epoch {epoch}/{self.epochs(trial)}, val macro-F1 {value:.4f} "
                f"[{clock(self.elapsed())}]"
            )

    def epochs(self, trial: optuna.trial.FrozenTrial) -> int:
        return epochs_of(trial, self.spec)

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def pace(self, finished: int) -> str:
        """Elapsed time, and once this run has finished a trial its trials per hour and the time
        left to the target at that pace."""
        elapsed = self.elapsed()
        done = finished - self.finished_before
        text = f"{clock(elapsed)} elapsed"
        if done <= 0:
            return text
        rate = done * 3600 / elapsed
        left = self.target - finished
        return f"{text}, {per_hour(rate)}" + (f", ETA {clock(left * 3600 / rate)}" if left > 0 else "")

    def describe(self, slot: SlotStatus, trial: optuna.trial.FrozenTrial | None) -> str:
        if slot.done:
            return "done"
        if trial is None:
            return "waiting for a trial"
        last = max(trial.intermediate_values, default=0)
        f1 = f", val macro-F1 {trial.intermediate_values[last]:.4f}" if last else ""
        return f"trial {trial.number}: epoch {last}/{self.epochs(trial)}{f1}"

    def note(self, message: str) -> None:
        """A message between the bars (or a plain line)."""
        tqdm.write(message, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        for bar in [self.overall, *self.slot_bars]:
            bar.close()


def epochs_of(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> int:
    """The trial's own epoch count (it may be searched), else the spec's."""
    if Attr.EPOCHS in trial.user_attrs:
        return int(trial.user_attrs[Attr.EPOCHS])
    config = trial.user_attrs.get(Attr.CONFIG) or {}  # a study recorded before the light record
    return int(config.get("train", {}).get("epochs", spec.base.train.epochs))


def per_hour(rate: float) -> str:
    """Three significant digits, never in exponent notation (1200, not 1.2e+03)."""
    return f"{rate:.0f} trials/h" if rate >= 100 else f"{rate:.3g} trials/h"


def clock(seconds: float) -> str:
    """H:MM:SS."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def ended(trial: optuna.trial.FrozenTrial, epochs: int) -> str:
    """How a trial ended, in one line: its value and epoch, or why it stopped."""
    if trial.state == FAIL:
        return f"trial {trial.number} failed: {trial.user_attrs.get(Attr.FAIL_REASON, 'see the worker log')}"
    last = max(trial.intermediate_values, default=None)
    if trial.state == PRUNED:
        why = trial.user_attrs.get(Attr.PRUNED_WHY)
        if why is None and last:
            why = f"val macro-F1 {trial.intermediate_values[last]:.4f}"
        at = f" at epoch {last}/{epochs}: {why}" if last else ""
        return f"trial {trial.number} pruned{at}"
    best_epoch = trial.user_attrs.get(Attr.BEST_EPOCH, "-")
    others = "".join(f", {v:.4g}" for v in trial.values[1:])
    value = f"val macro-F1 {trial.values[0]:.4f}{others}"
    return f"trial {trial.number} complete: {value} (best epoch {best_epoch})"


def summary(
    study: optuna.Study,
    target: int,
    spec: StudySpec,
    url: str,
    artifacts: Path,
    run: Progress | None = None,
) -> str:
    """Counts, this run's wall time and pace (with `run`), the epochs pruning saved, the five best
    trials beside the chance level, and what to run next on this very storage: the export of the
    best trial and the dashboard."""
    now = counts(study)
    lines = [
        f"study {spec.name}: {now['finished']}/{target} finished ({now['complete']} complete, "
        f"{now['pruned']} pruned), {now['fail']} failed, {now['running']} running"
    ]
    if run is not None:
        done = now["finished"] - run.finished_before
        pace = f" ({per_hour(done * 3600 / run.elapsed())})" if done > 0 else ""
        lines.append(f"wall time {clock(run.elapsed())} for the {done} trial(s) this run finished{pace}")
    if not spec.multi:  # a study of several objectives reports no epochs to prune at
        finished = study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED))
        full = sum(epochs_of(t, spec) for t in finished)
        ran = sum(len(t.intermediate_values) for t in finished)
        if full:
            lines.append(
                f"epochs: {ran} run of the {full} that {len(finished)} finished trial(s) would have "
                f"taken to the end: pruning and early stopping saved {full - ran} ({(full - ran) / full:.0%})"
            )
    best = ranked(study)[:5]
    others = "".join(f" {name:>14s}" for name in spec.objectives[1:])
    if best:
        lines.append(f"{'trial':>6s} {'val macro-F1':>12s}{others} {'epoch':>5s} {'peak GiB':>8s}  params")
        for t in best:
            params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            peak = t.user_attrs.get(Attr.PEAK_MEMORY_MB)
            peak_gib = f"{peak / 1024:.2f}" if peak is not None else "-"
            epoch = t.user_attrs.get(Attr.BEST_EPOCH, "-")
            values = "".join(f" {v:14.4g}" for v in t.values[1:])
            lines.append(f"{t.number:6d} {t.values[0]:12.4f}{values} {epoch!s:>5s} {peak_gib:>8s}  {params}")
        lines.append(
            f"(for scale: guessing one of the {NUM_CLASSES} classes at random scores about "
            f"{1 / NUM_CLASSES:.3f} macro-F1)"
        )
        lines += ["", "export the best trial (retrain it, ONNX, submission, report):"]
        lines.append(f"  {command('export', 'hpo.export-best', spec, url, artifacts)}")
    lines += ["", "dashboard:", f"  {command('dashboard', 'hpo.dashboard', spec, url, artifacts)}"]
    return "\n".join(lines)


def command(name: str, module: str, spec: StudySpec, url: str, artifacts: Path) -> str:
    """A `mask-hpo` subcommand on this very storage and artifact store, runnable as printed without
    an activated environment: the console command's full path (else this interpreter's `-m`), and
    the storage unless it resolves by itself (a password shows as ***: put the URL in $HPO_STORAGE)."""
    console = Path(sys.executable).parent / "mask-hpo"
    words = [str(console), name] if console.is_file() else [sys.executable, "-m", module]
    words += ["--study", spec.name if specfiles.is_shipped(spec.path) else str(spec.path)]
    if url != resolve_url(None, spec):
        words += ["--storage", masked(url)]
    if artifacts != artifacts_dir(None, spec.runs_dir):
        words += ["--artifacts", str(artifacts)]
    return shlex.join(words)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
