"""The one way our command-line entry points end: 0 on success, 2 with one clear message on bad input."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from maskcls.errors import UserError

COMMAND = "mask-hpo"  # the console command (hpo.cli) that runs every entry point as a subcommand


def prog(module: str) -> str:
    """The name a usage line should show: the way this process was started, `mask-hpo run` or
    `python -m hpo.run`, so that the usage a user reads is the command they typed. Read from
    sys.argv (hpo.cli passes its arguments on unchanged) rather than set by the dispatcher."""
    if len(sys.argv) > 1 and os.path.basename(sys.argv[0]) == COMMAND:
        return f"{COMMAND} {sys.argv[1]}"
    return f"python -m {module}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows each option's default (argparse's formatter), except where there is none to
    show (None, False), and keeps the description's own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run `main` and exit; a UserError, or a file-system error on a named path (a file where a
    folder should be, no permission), becomes one `error: ...` line on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a real failure, keep the traceback
            raise
        print(f"error: cannot use {err.filename}: {err.strerror}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
