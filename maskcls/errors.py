"""Errors a user can cause and fix. Command-line entry points turn them into one line and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a path, a config value, a data set. The message names the fix."""


class DataError(UserError):
    """The data set breaks the competition layout. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the data set"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class ConfigError(UserError):
    """A config key or value that does not exist; the message lists the valid ones."""
