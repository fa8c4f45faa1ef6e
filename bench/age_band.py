"""The 60+ band: a study's best recipe with and without the age head, with and without decision
biases, scored side by side on a stand-in evaluation set of another seed that no search saw:

    python -m hpo.run --study demo --workers 2        # a finished demo study first
    python bench/age_band.py [--study demo] [--age-weight 0.5] [--eval-people 150]

For each age-head weight (0 and --age-weight) the best trial's recipe is retrained as
`hpo.export-best --folds 3` does (three person-level folds, one ensemble); its out-of-fold
predictions fit the decision biases (maskcls.calibrate). Each of the four models then predicts the
hidden set; the table gives macro-F1 and the mean F1 of the six 60+ classes, and the differences
against the plain export.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optuna.artifacts import FileSystemArtifactStore  # noqa: E402

from hpo import spec as specs  # noqa: E402
from hpo.export_best import retrain  # noqa: E402
from hpo.protocol import artifacts_dir, ranked  # noqa: E402
from hpo.record import Recipes  # noqa: E402
from hpo.storage import open_storage, resolve_url  # noqa: E402
from maskcls import models  # noqa: E402
from maskcls.calibrate import fit_biases  # noqa: E402
from maskcls.data.layout import scan_eval  # noqa: E402
from maskcls.data.synth import generate  # noqa: E402
from maskcls.labels import NUM_CLASSES, AgeBand, decode  # noqa: E402
from maskcls.metrics import per_class_f1  # noqa: E402
from maskcls.predict import predict_paths  # noqa: E402
from maskcls.runtime import configure_cpu  # noqa: E402

OLD = [c for c in range(NUM_CLASSES) if decode(c)[2] == AgeBand.OLD]  # the six 60+ classes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="spec of a finished study (default demo)")
    parser.add_argument("--storage", help="storage URL (default: as hpo.run resolves it)")
    parser.add_argument("--age-weight", type=float, default=0.5, help="model.age_aux_weight to compare (0.5)")
    parser.add_argument("--eval-people", type=int, default=150, help="people in the hidden set (default 150)")
    parser.add_argument("--seed", type=int, default=1, help="stand-in seed of the hidden set (default 1)")
    args = parser.parse_args()
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = specs.load(args.study)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(resolve_url(args.storage, spec)))
    trial = ranked(study)[0]
    store = FileSystemArtifactStore(str(artifacts_dir(None, spec.runs_dir)))
    cfg = Recipes(spec.base, store, study._storage)(trial)
    configure_cpu()
    with tempfile.TemporaryDirectory() as folder:
        size = spec.synth.size if spec.synth else (384, 512)
        hidden = generate(Path(folder) / "hidden", 6, args.eval_people, args.seed, size, progress=False)
        paths = list(scan_eval(hidden)["path"])
        truth = pd.read_csv(hidden / "eval" / "gt.csv")["ans"].to_numpy()
        rows = []
        for weight in (0.0, args.age_weight):
            recipe = cfg.override(
                {"model.age_aux_weight": weight, "data.cache_dir": str(Path(folder) / "cache")}
            )
            done = retrain(recipe, trial, False, 3, torch.device("cpu"))
            assert done.val_labels is not None and done.val_probs is not None
            calibration = fit_biases(done.val_labels, done.val_probs)
            for biases in (None, calibration.biases):
                model = models.Ensemble(done.members, biases=biases).eval()
                probs = predict_paths(model, recipe, paths, torch.device("cpu"), progress=False)
                f1 = per_class_f1(truth, probs.argmax(1))
                rows.append(
                    {
                        "age head weight": weight,
                        "decision biases": "fitted" if biases is not None else "none",
                        "applied": calibration.applied if biases is not None else "-",
                        "hidden macro-F1": f1.mean(),
                        "hidden 60+ F1 (6 classes)": f1[OLD].mean(),
                    }
                )
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    table["macro-F1 vs plain"] = table["hidden macro-F1"] - base["hidden macro-F1"]
    table["60+ vs plain"] = table["hidden 60+ F1 (6 classes)"] - base["hidden 60+ F1 (6 classes)"]
    print(
        f"study {spec.name}, trial {trial.number} (val macro-F1 {trial.values[0]:.4f}); hidden set: "
        f"{args.eval_people} people of seed {args.seed}, {len(truth)} images, "
        f"{np.isin(truth, OLD).sum()} of them 60+"
    )
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for _, row in table.iterrows():
        print(
            "| "
            + " | ".join(
                f"{v:+.4f}"
                if k.endswith("plain")
                else f"{v:.4f}"
                if isinstance(v, float) and k.startswith("hidden")
                else str(v)
                for k, v in row.items()
            )
            + " |"
        )
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
