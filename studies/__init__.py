"""The study specs shipped with mask-hpo (demo.yaml, mask.yaml). Installed as the package data of
`hpo.specs` (pyproject.toml maps this folder there), so that `--study demo` resolves in a wheel
installed anywhere, not only beside a checkout; hpo.spec.resolve says in which order names resolve."""
