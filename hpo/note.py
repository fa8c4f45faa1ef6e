"""The study's note on optuna-dashboard (the Markdown panel of its study page): the spec, the data,
the command line (hpo.run) and the last export's summary (hpo.export-best).

Each part sits between its own markers and is replaced there only: whatever a user wrote in the
note around them stays as it was.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

import optuna

from maskcls.errors import mask_secrets


def merged(old: str, part: str, body: str) -> str:
    """`old` with the text between part's markers replaced by `body` (appended when absent)."""
    begin = f"<!-- mask-hpo:{part} (written by mask-hpo; edit outside these markers) -->"
    end = f"<!-- /mask-hpo:{part} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in old and end in old.split(begin, 1)[1]:
        before, rest = old.split(begin, 1)
        return before + block + rest.split(end, 1)[1]
    return f"{old.rstrip()}\n\n{block}\n" if old.strip() else f"{block}\n"


def write(study: optuna.Study, part: str, body: str) -> None:
    # Here, not at the top: optuna-dashboard loads scikit-learn (through optuna.importance), which
    # hpo.run's --help and its workers' light start do without.
    from optuna_dashboard import get_note, save_note

    save_note(study, merged(get_note(study), part, body))


def run_part(spec_text: str, data: str, argv: Sequence[str]) -> str:
    """What hpo.run writes: the command (passwords masked), the data and the spec as it was read."""
    command = mask_secrets(shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "hpo.run", *argv]))
    return "\n".join(
        [
            "### Search",
            f"- command: `{command}`",
            f"- data: {data}",
            "",
            "```yaml",
            spec_text.rstrip(),
            "```",
        ]
    )
