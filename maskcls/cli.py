"""The one way our command-line entry points end: 0 on success, 2 with one clear message on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from maskcls.errors import UserError


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run `main` and exit; a UserError becomes `error: ...` on stderr and exit code 2, no traceback."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
