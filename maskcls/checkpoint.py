"""A run's checkpoint file: after every epoch, everything fit needs to go on as if it had never
stopped (weights, optimizer, schedule, random streams, the best epoch so far, the history).

A retried run reads its predecessor's file (`resume_from`) and from then on writes its own, so a
chain of retries keeps one file at a time. Files are written atomically (a reader sees the last
complete epoch, never half of one) and load with `weights_only=True`. The cost on disk: the
weights twice (current and best), the optimizer state (one or two copies of the weights for
SGD with momentum or Adam/AdamW) and the best epoch's validation probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maskcls.rundir import write_atomic


class CheckpointFile:
    def __init__(self, path: str | Path, resume_from: str | Path | None = None):
        self.path = Path(path)
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self._loaded: dict[str, Any] | None = None

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The newest state to continue from: this run's own file, else its predecessor's (read
        once: the search looks at its epoch before fit continues from it)."""
        for path in (self.path, self.resume_from):
            if self._loaded is None and path is not None and path.is_file():
                self._loaded = torch.load(path, map_location=device, weights_only=True)
        return self._loaded

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda tmp: torch.save(state, tmp))
        if self.resume_from is not None:
            self.resume_from.unlink(missing_ok=True)  # this run holds the newer state now

    def discard(self) -> None:
        """The run has ended for good (finished, pruned or failed for its recipe)."""
        for path in (self.path, self.resume_from):
            if path is not None:
                path.unlink(missing_ok=True)
