"""What `hpo.run` shows: live bars on a terminal, one plain line per change elsewhere (a log file,
CI, `docker compose logs`), nothing with --no-progress; and the summary of the study at the end."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import optuna
from tqdm import tqdm

from hpo.protocol import Attr, artifacts_dir, ranked
from hpo.spec import STUDIES_DIR, StudySpec
from hpo.storage import counts, masked, resolve_url

RUNNING = optuna.trial.TrialState.RUNNING


class SlotStatus(NamedTuple):
    name: str  # e.g. gpu0.1, cpu0
    worker: str  # worker_id of its process
    done: bool


class Progress:
    def __init__(self, spec: StudySpec, target: int, slots: Sequence[str], enabled: bool):
        self.spec, self.target = spec, target
        self.bars = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.bars
        self.last_line = ""
        self.overall = tqdm(
            total=target, desc=spec.name, unit="trial", disable=not self.bars, position=0, dynamic_ncols=True
        )
        self.slot_bars = [
            tqdm(total=0, bar_format="{desc}", position=i, disable=not self.bars)
            for i in range(1, len(slots) + 1)
        ]

    def update(self, study: optuna.Study, slots: Sequence[SlotStatus]) -> None:
        now = counts(study)
        best = ranked(study)[:1]
        state = (
            f"best {best[0].values[0]:.4f}" if best else "best -",
            f"{now['pruned']} pruned",
            f"{now['fail']} failed",
            f"{now['running']} running",
        )
        if self.lines:
            line = (
                f"{self.spec.name}: {min(now['finished'], self.target)}/{self.target} finished, "
                + ", ".join(state)
            )
            if line != self.last_line:
                print(line, file=sys.stderr, flush=True)
                self.last_line = line
        if not self.bars:
            return
        self.overall.n = min(now["finished"], self.target)
        self.overall.set_postfix_str(", ".join(state), refresh=False)
        self.overall.refresh()
        running = study.get_trials(deepcopy=False, states=(RUNNING,))
        by_worker = {t.user_attrs.get(Attr.WORKER): t for t in running}
        for bar, slot in zip(self.slot_bars, slots, strict=True):
            bar.set_description_str(f"  {slot.name:>8s} {self.describe(slot, by_worker.get(slot.worker))}")

    def describe(self, slot: SlotStatus, trial: optuna.trial.FrozenTrial | None) -> str:
        if slot.done:
            return "done"
        if trial is None:
            return "waiting for a trial"
        last = max(trial.intermediate_values, default=0)
        f1 = f", val macro-F1 {trial.intermediate_values[last]:.4f}" if last else ""
        return f"trial {trial.number}: epoch {last}/{self.spec.base.train.epochs}{f1}"

    def note(self, message: str) -> None:
        """A message between the bars (or a plain line)."""
        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        for bar in [self.overall, *self.slot_bars]:
            bar.close()


def summary(study: optuna.Study, target: int, spec: StudySpec, url: str, artifacts: Path) -> str:
    """Counts, the five best trials and how to open the dashboard on this very storage."""
    now = counts(study)
    lines = [
        f"study {spec.name}: {now['finished']}/{target} finished ({now['complete']} complete, "
        f"{now['pruned']} pruned), {now['fail']} failed, {now['running']} running"
    ]
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
    lines += ["", "dashboard:", f"  {dashboard_command(spec, url, artifacts)}"]
    return "\n".join(lines)


def dashboard_command(spec: StudySpec, url: str, artifacts: Path) -> str:
    """`hpo.dashboard` on this very storage and artifact store, runnable as printed: the full path of
    this interpreter (no activated environment needed) and the storage unless it resolves by itself
    (a password shows as ***: put the URL in $HPO_STORAGE instead)."""
    study = spec.name if spec.path.parent == STUDIES_DIR else str(spec.path)
    words = [sys.executable, "-m", "hpo.dashboard", "--study", study]
    if url != resolve_url(None, spec):
        words += ["--storage", masked(url)]
    if artifacts != artifacts_dir(None, spec.runs_dir):
        words += ["--artifacts", str(artifacts)]
    return shlex.join(words)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
