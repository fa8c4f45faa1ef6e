"""Learning curves of a spec's space, recorded once for bench/search_replay.py:

    python bench/curves.py --study demo --configs 60          # CPU, the stand-in: ~15 min on 2 cores
    python bench/curves.py --study mask --configs 80 --device cuda --data /data/mask   # a GPU

Configuration 0 is the spec's first enqueued recipe (the one a study starts from); the others are
drawn uniformly from the space by Optuna's RandomSampler (seed `--seed`), so the same command
draws the same configurations. Each trains to the spec's full `train.epochs` without pruning; the
table gets one row per epoch: `config, epoch, val_macro_f1, epoch_s, params` (params as JSON, the
names and values Optuna suggested). Rows are written after every configuration, and a run that
stops continues where it was: configurations already in the table are not trained again. A JSON
file beside the table says how it was made (spec, fixed values, threads, device, wall time).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo import space  # noqa: E402
from hpo import spec as specs  # noqa: E402
from hpo.run import check_weights, prepare_data  # noqa: E402
from maskcls.infer import pick_device  # noqa: E402
from maskcls.rundir import write_csv, write_json  # noqa: E402
from maskcls.runtime import configure_cpu  # noqa: E402
from maskcls.train import fit, load_data  # noqa: E402

COLUMNS = ["config", "epoch", "val_macro_f1", "epoch_s", "params"]


def draw(spec: specs.StudySpec, n: int, seed: int) -> list[tuple[dict, dict]]:
    """The first enqueued recipe, then n - 1 uniform draws: (Optuna params, TrainConfig overrides)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for recipe in spec.enqueue[:1]:
        study.enqueue_trial(recipe)
    drawn = []
    for _ in range(n):
        trial = study.ask()
        overrides = space.suggest(trial, spec.params)
        drawn.append((dict(trial.params), overrides))
        study.tell(trial, 0.0)
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="spec name or path (default demo)")
    parser.add_argument("--configs", type=int, default=60, help="configurations to record (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="RandomSampler seed of the draws (default 0)")
    parser.add_argument("--data", help="data root (default: the spec's, generated if it is a stand-in)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--out", help="table to write (default bench/data/curves-<study>.csv)")
    args = parser.parse_args()

    spec = specs.load(args.study).with_data(args.data)
    out = Path(args.out or ROOT / "bench" / "data" / f"curves-{spec.name}.csv")
    device = pick_device(args.device)
    configure_cpu()
    prepare_data(spec)
    check_weights(spec)  # pretrained backbones (the mask space): fetched once, before the first fit
    configs = draw(spec, args.configs, args.seed)
    rows = pd.read_csv(out).to_dict("records") if out.is_file() else []
    done = {int(r["config"]) for r in rows}
    started, spent = time.perf_counter(), sum(float(r["epoch_s"]) for r in rows)
    for number, (params, overrides) in enumerate(configs):
        if number in done:
            continue
        cfg = spec.base.override(overrides)
        curve = fit(cfg, load_data(cfg, progress=False), device).history
        rows += [
            {
                "config": number,
                "epoch": m.epoch,
                "val_macro_f1": round(float(m.val_macro_f1 or 0.0), 5),
                "epoch_s": round(m.seconds, 3),
                "params": json.dumps(params, sort_keys=True),
            }
            for m in curve
        ]
        write_csv(pd.DataFrame(rows, columns=COLUMNS), out)
        spent += sum(m.seconds for m in curve)
        best = max(m.val_macro_f1 or 0.0 for m in curve)
        print(
            f"config {number + 1}/{len(configs)}: best val macro-F1 {best:.4f}, "
            f"{sum(m.seconds for m in curve):.0f} s ({time.perf_counter() - started:.0f} s this run)",
            flush=True,
        )
    write_json(
        out.with_suffix(".json"),
        {
            "command": "python bench/curves.py " + " ".join(sys.argv[1:]),
            "study": spec.name,
            "spec": str(spec.path.relative_to(ROOT) if spec.path.is_relative_to(ROOT) else spec.path),
            "fixed": {k: v for k, v in spec.base.to_dict().items()},
            "epochs": spec.base.train.epochs,
            "configs": len(configs),
            "seed": args.seed,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "training_s": round(spent, 1),
            "torch": torch.__version__,
        },
    )
    print(f"wrote {out} ({len(configs)} configurations, {spent:.0f} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
