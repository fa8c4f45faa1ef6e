"""The one way our command-line entry points end: 0 on success, 2 with one clear message on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from maskcls.errors import UserError


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
