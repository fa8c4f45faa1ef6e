"""Errors a user can cause and fix. Command-line entry points turn them into one line and exit 2."""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input from the user: a path, a config value, a data set. The message names the fix."""


class DataError(UserError):
    """The data set breaks the competition layout. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = len(self.problems)
        if count == 1:  # one line
            super().__init__(f"1 problem in the data set: {self.problems[0]}")
            return
        head = f"{count} problems in the data set"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class ConfigError(UserError):
    """A config key or value that does not exist; the message lists the valid ones."""


_CREDENTIALS = re.compile(
    r"(?P<head>\b[A-Za-z][\w+.-]*://[^\s/:@]*:)\S*@"
)  # to the last @: a raw @ may be in it
QUOTE_LIMIT = 200  # characters of user input an error message repeats


def mask_secrets(text: str) -> str:
    """`text` with the password of every URL in it (scheme://user:password@host) shown as ***."""
    return _CREDENTIALS.sub(r"\g<head>***@", text)


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """User input as an error message repeats it: repr, passwords masked, at most `limit` characters
    (a YAML alias bomb or a pasted file must not become a megabyte-long message)."""
    text = mask_secrets(repr(value) if isinstance(value, str) else _short_repr(value, limit))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: object, limit: int) -> str:
    """repr that stops early on huge nested values instead of expanding them whole."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlist = shortener.maxdict = shortener.maxtuple = shortener.maxset = 8
    shortener.maxlevel = 4
    return shortener.repr(value)
