"""`mask-hpo COMMAND ...`: every entry point of the project under one installed command.

`mask-hpo run ...` is `python -m hpo.run ...`: the words after the command go to that module's
`main` unchanged. The module is imported only once chosen, so `mask-hpo --help` and the help of
the light commands never load PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import version

from maskcls.cli import COMMAND, run_main

# command -> (module whose main it runs, what it does)
COMMANDS = {
    "run": ("hpo.run", "run a study on every GPU of this machine (or CPU workers)"),
    "export": ("hpo.export_best", "retrain the best trial and export a deployable model"),
    "dashboard": ("hpo.dashboard", "optuna-dashboard for a study, with its artifacts"),
    "studies": ("hpo.studies", "list the studies in a storage, show the best trial, delete a study"),
    "proxy": ("hpo.proxy", "a storage proxy: the workers of this machine share its few database connections"),
    "train": ("maskcls.train", "train one model from a config (no search)"),
    "predict": ("maskcls.predict", "predict classes for the eval set or single images"),
    "check": ("maskcls.data.check", "check that a folder is a usable competition data set"),
    "synth": ("maskcls.data.synth", "write a synthetic stand-in for the competition data"),
    "faces": ("maskcls.data.faces", "find every photo's face box once: the table data.crop face reads"),
    "weights": ("maskcls.weights", "fill the hub cache with ImageNet backbone weights, for offline machines"),
}


def dispatch(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Every entry point of the mask-status classifier and its search, as one command.",
        epilog=f"`{COMMAND} COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('mask-hpo')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    words = list(sys.argv[1:] if argv is None else argv)
    command = parser.parse_args(words[:1]).command  # the rest is the command's, --help included
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(words[1:]))


def main() -> None:
    """The console script: errors end as the other entry points' do (maskcls.cli.run_main)."""
    run_main(dispatch)


if __name__ == "__main__":
    main()
