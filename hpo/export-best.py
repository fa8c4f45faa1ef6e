"""`python -m hpo.export-best`: the module name has a dash, so this file only starts hpo.export_best."""

from hpo.export_best import main
from maskcls.cli import run_main

run_main(main)
