"""`python -m hpo.export-best --study NAME`: retrain the best trial and export a deployable model.

The trial's recipe is rebuilt exactly from the config stored on it (not re-derived from the
space), then retrained: by default on all training people for the epoch count at which the trial
peaked; with --holdout on the trial's own split (its validation macro-F1 reported next to the
trial's); with --folds K as K person-level folds exported as an ensemble (mean of probabilities).

The export itself is maskcls.export's (the same as `python -m maskcls.export RUN --out DIR`):
model.safetensors and config.json, model.onnx checked with onnxruntime, submission.csv, report.md
with the study's and the retrain's scores, confusion_matrix.png and metrics.json. It is attached
to the study as a zip artifact and recorded in the study's `export` user attr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo import spec as specs
from hpo.protocol import Attr, artifacts_dir, export_dir, ranked
from hpo.storage import FINISHED, masked, open_storage, resolve_url
from maskcls.cli import run_main
from maskcls.config import TrainConfig
from maskcls.errors import UserError
from maskcls.export import ExportFigures, ExportInfo, check_out, complete
from maskcls.infer import pick_device
from maskcls.metrics import macro_f1
from maskcls.rundir import building, write_model_dir
from maskcls.runtime import configure_cpu
from maskcls.train import fit, load_data


@dataclass
class Retrain:
    mode: str
    members: list
    config: TrainConfig  # what the (first) member was trained with
    val_macro_f1: float | None = None  # holdout: on the trial's split; folds: out-of-fold
    fold_f1: list[float] | None = None
    val_labels: np.ndarray | None = None
    val_probs: np.ndarray | None = None


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if number is None:
        best = ranked(study)[:1]
        if not best:
            raise UserError(
                f"study {study.study_name!r} has no finished trial yet; run "
                f"`python -m hpo.run --study {study.study_name}` first"
            )
        trial = best[0]
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            raise UserError(
                f"trial {number} does not exist in study {study.study_name!r} "
                f"(its trials are numbered 0-{len(trials) - 1})"
                if trials
                else "(it has no trials)"
            )
        trial = found[0]
        if trial.state not in FINISHED:
            raise UserError(f"trial {number} is {trial.state.name}; export a complete or pruned trial")
    if Attr.CONFIG not in trial.user_attrs:
        raise UserError(f"trial {trial.number} has no stored config (was it run by hpo.run?)")
    return trial


def retrain(
    cfg: TrainConfig, trial: optuna.trial.FrozenTrial, holdout: bool, folds: int | None, device
) -> Retrain:
    if holdout:
        result = fit(cfg, load_data(cfg), device, progress=True)
        return Retrain(
            "holdout",
            [result.model],
            cfg,
            result.best_val_macro_f1,
            val_labels=result.val_labels,
            val_probs=result.val_probs,
        )
    if folds:
        members, scores, fold_labels, fold_probs = [], [], [], []
        for k in range(folds):
            fold_cfg = cfg.override({"data.folds": folds, "data.fold": k})
            print(f"fold {k + 1}/{folds}", file=sys.stderr)
            result = fit(fold_cfg, load_data(fold_cfg), device, progress=True)
            members.append(result.model)
            scores.append(float(result.best_val_macro_f1 or 0.0))
            fold_labels.append(result.val_labels)
            fold_probs.append(np.asarray(result.val_probs))
        labels, probs = np.concatenate(fold_labels), np.concatenate(fold_probs)
        return Retrain(
            f"{folds}-fold ensemble",
            members,
            cfg.override({"data.folds": folds}),
            macro_f1(labels, probs.argmax(1)),
            scores,
            labels,
            probs,
        )
    epochs = int(trial.user_attrs.get(Attr.BEST_EPOCH) or cfg.train.epochs)
    everyone = cfg.override({"train.epochs": epochs, "train.patience": None})
    result = fit(everyone, load_data(everyone).everyone(), device, progress=True)
    return Retrain(f"all training people, {epochs} epochs", [result.model], everyone)


def export_info(study: optuna.Study, trial: optuna.trial.FrozenTrial, done: Retrain) -> ExportInfo:
    return ExportInfo(
        title=f"Export of study `{study.study_name}`, trial {trial.number}",
        trained_on=done.mode,
        scores={
            "study best value": study.best_value,
            f"trial {trial.number} (search)": trial.value,
            f"retrain ({done.mode})": done.val_macro_f1,
        },
        facts={
            "study": study.study_name,
            "study_best_value": study.best_value,
            "trial": trial.number,
            "trial_value": trial.value,
            "val_macro_f1": done.val_macro_f1,
            "fold_macro_f1": done.fold_f1,
        },
        params=trial.params,
        validation=None
        if done.val_labels is None or done.val_probs is None
        else (done.val_labels, done.val_probs),
    )


def record(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    done: Retrain,
    out: Path,
    figures: ExportFigures,
    artifacts: Path,
) -> None:
    """Attach the export to the study as a zip artifact and note it in the study's `export` attr."""
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as zdir:
        archive = shutil.make_archive(str(Path(zdir) / f"export-trial{trial.number}"), "zip", out)
        artifact_id = upload_artifact(
            artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=archive, study_or_trial=study
        )
    study.set_user_attr(
        Attr.EXPORT,
        {
            "path": str(out.resolve()),
            "trial": trial.number,
            "mode": done.mode,
            "artifact_id": artifact_id,
            "val_macro_f1": done.val_macro_f1,
            "eval_macro_f1": figures.eval_macro_f1,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpo.export-best",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", required=True, help="name in studies/ or a spec path")
    parser.add_argument("--storage", help="storage URL (default: as hpo.run resolves it)")
    parser.add_argument("--data", help="data root (default: the trial's)")
    parser.add_argument("--out", help="export directory (default runs/<study>/export)")
    parser.add_argument("--trial", type=int, help="trial number (default: the best complete trial)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--holdout", action="store_true", help="retrain on the trial's own split and report its val F1"
    )
    mode.add_argument("--folds", type=int, help="train K person-level folds and export their ensemble")
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--artifacts", help="artifact directory (default runs/<study>/artifacts)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.folds is not None and args.folds < 2:
        raise UserError("--folds must be at least 2")

    spec = specs.load(args.study)
    out = export_dir(args.out, spec.runs_dir)
    check_out(out, args.force)
    url = resolve_url(args.storage, spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    except KeyError:
        raise UserError(
            f"no study {spec.name!r} in {masked(url)}; run `python -m hpo.run --study {args.study}`"
        ) from None
    trial = pick_trial(study, args.trial)
    cfg = TrainConfig.from_dict(trial.user_attrs[Attr.CONFIG])
    if args.data:
        cfg = cfg.override({"data.root": str(Path(args.data).expanduser())})
    device = pick_device(args.device)
    # On the CPU the thread count changes the order of float sums, and over a few epochs that moves
    # validation macro-F1 by a few points on a small set; --holdout reproduces the trial with its own.
    threads = trial.user_attrs.get(Attr.THREADS) if args.holdout and device.type == "cpu" else None
    configure_cpu(threads)
    print(
        f"exporting trial {trial.number} (val macro-F1 {trial.value}) of study {spec.name}", file=sys.stderr
    )

    done = retrain(cfg, trial, args.holdout, args.folds, device)
    with building(out) as tmp:
        write_model_dir(tmp, done.config, done.members)
        figures = complete(tmp, cfg.data.root, device, export_info(study, trial, done))
    record(study, trial, done, out, figures, artifacts_dir(args.artifacts, spec.runs_dir))
    print((out / "report.md").read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
