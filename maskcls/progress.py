"""Progress in the form that fits where it goes: a live bar on a terminal; elsewhere (a log file,
CI, `docker compose logs`, a pipe) one plain line at most every `every_s` seconds and one when it
ends, never a carriage return.

Every long step of the project (decoding, the stand-in, an epoch, an export) goes through `bar`,
which returns a tqdm: the callers use tqdm's interface whatever the destination.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

EVERY_S = 30.0  # plain lines: at most one per bar this often (and one at the end)
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves between stacked bars


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


class Lines(io.TextIOBase):
    """A file for tqdm that turns its redraws (`\\r` + the whole meter) into whole lines, and drops
    the blank ones it writes to clear a bar."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        line = _ESCAPES.sub("", text).replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _PlainLines(tqdm):
    """tqdm for plain lines: a new postfix waits for the next timed line. (tqdm's own set_postfix
    redraws at once, and while it iterates, with the count of its last timed line: the log would
    read `0/120 batch` after every loss update until the first interval passed.)"""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    every_s: float = EVERY_S,
    stream: TextIO | None = None,
) -> tqdm:
    """A tqdm bar on a terminal, plain lines elsewhere, nothing when not `enabled`. `leave` keeps a
    finished bar on a terminal; plain lines always keep their last line (a log should say it ended)."""
    stream = stream or sys.stderr
    if not enabled or on_terminal(stream):
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not enabled, file=stream
        )
    return _PlainLines(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=True,
        file=Lines(stream),
        mininterval=every_s,
        maxinterval=every_s,
        bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )
