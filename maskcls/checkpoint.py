"""A run's checkpoint file: after every epoch, everything fit needs to go on as if it had never
stopped (weights, optimizer, schedule, random streams, the best epoch so far, the history).

A run writes its own file; a retried run reads its predecessor's (`resume_from`) and from its
first epoch on writes its own, so a chain of retries keeps one file at a time. A file carries a
`key` (the caller's: which study, recipe and device type it belongs to) and is ignored when the
key differs, so a file left by another study or another recipe is never resumed. Files are
written atomically (a reader sees the last complete epoch, never half of one), read on the CPU
(nothing of them stays on a GPU) and load with `weights_only=True`. The cost on disk: the weights
twice (current and best), the optimizer state (one or two copies of the weights for SGD with
momentum or Adam/AdamW) and the best epoch's validation probabilities.

A file that cannot be read (truncated, or written by a version whose state no longer fits) is set
aside, never deleted: renamed to `<name>.unreadable`, with the reason in `set_aside`; the run then
starts from its first epoch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from maskcls.rundir import write_atomic


class CheckpointFile:
    def __init__(self, path: str | Path, resume_from: str | Path | None = None, key: str = ""):
        self.path = Path(path)
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.key = key
        self._state: dict[str, Any] | None = None
        self._read = False
        self.set_aside: str | None = None  # why the predecessor's file was set aside, if it was

    def peek(self) -> dict[str, Any] | None:
        """The predecessor's state to continue from, or None; read once."""
        if not self._read and self.resume_from is not None and self.resume_from.is_file():
            try:
                state = torch.load(self.resume_from, map_location="cpu", weights_only=True)
            except Exception as err:  # torch.load fails in many ways on a damaged file
                self.refuse(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
            else:
                self._state = state if isinstance(state, dict) and state.get("key") == self.key else None
        self._read = True
        return self._state

    def refuse(self, reason: str) -> None:
        """Set the predecessor's file aside (the caller found it unreadable or its state unfit): it is
        renamed, not deleted, and the run starts from its first epoch."""
        self._state, self._read = None, True
        if self.resume_from is None or not self.resume_from.exists():
            return
        aside = self.resume_from.with_name(self.resume_from.name + ".unreadable")
        self.resume_from.replace(aside)
        self.set_aside = f"checkpoint {self.resume_from.name} could not be used ({reason}); kept as {aside}"

    def take(self) -> dict[str, Any] | None:
        """The state to continue from, handed over: this object keeps no reference to it."""
        state, self._state = self.peek(), None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Serialised in memory first: torch.save's own file writer reports a full disk as
        "unexpected pos"; a plain write reports ENOSPC, naming the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key}, buffer)
        try:
            write_atomic(self.path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
        except OSError as err:
            if err.filename is None:
                raise OSError(err.errno, err.strerror, str(self.path.parent)) from err
            raise
        if self.resume_from is not None:
            self.resume_from.unlink(missing_ok=True)  # this run holds the newer state now

    def discard(self) -> None:
        """The run has ended for good (finished, pruned or failed for its recipe)."""
        for path in (self.path, self.resume_from):
            if path is not None:
                path.unlink(missing_ok=True)
