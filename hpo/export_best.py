"""`python -m hpo.export-best --study NAME`: retrain the best trial and export a deployable model.

The trial's recipe is rebuilt exactly from the config stored on it (not re-derived from the
space), then retrained: by default on all training people for the epoch count at which the trial
peaked; with --holdout on the trial's own split (its validation macro-F1 reported next to the
trial's); with --folds K as K person-level folds exported as an ensemble (mean of probabilities).

The export directory (built in a temporary folder, then renamed into place):
  model.safetensors, config.json   weights; TrainConfig, class map and preprocessing
  model.onnx                       dynamic batch, checked with onnxruntime against PyTorch
  report.md, confusion_matrix.png  study best, retrain metrics, per-class F1, confusion matrix
  submission.csv                   for eval/info.csv, when the data has an eval set
  metrics.json                     every figure of the report, for machines
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo import spec as specs
from hpo.storage import FINISHED, masked, open_storage, resolve_url
from maskcls import plots
from maskcls.cli import run_main
from maskcls.config import TrainConfig
from maskcls.data import cache
from maskcls.data.layout import scan_eval
from maskcls.errors import UserError
from maskcls.export import check_onnx, export_onnx
from maskcls.labels import NUM_CLASSES, class_name
from maskcls.metrics import confusion, macro_f1, per_class_f1
from maskcls.models import Ensemble
from maskcls.predict import submission, write_csv
from maskcls.runtime import configure_cpu
from maskcls.train import fit, load_data, pick_device, write_json, write_model_dir

MAX_ONNX_DIFF = 1e-4


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
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise UserError(
                f"study {study.study_name!r} has no finished trial yet; run "
                f"`python -m hpo.run --study {study.study_name}` first"
            )
        trial = max(complete, key=lambda t: t.value)
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
    if "config" not in trial.user_attrs:
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
        members, scores, labels, probs = [], [], [], []
        for k in range(folds):
            fold_cfg = cfg.override({"data.folds": folds, "data.fold": k})
            print(f"fold {k + 1}/{folds}", file=sys.stderr)
            result = fit(fold_cfg, load_data(fold_cfg), device, progress=True)
            members.append(result.model)
            scores.append(result.best_val_macro_f1)
            labels.append(result.val_labels)
            probs.append(result.val_probs)
        labels, probs = np.concatenate(labels), np.concatenate(probs)
        return Retrain(
            f"{folds}-fold ensemble",
            members,
            cfg.override({"data.folds": folds}),
            macro_f1(labels, probs.argmax(1)),
            scores,
            labels,
            probs,
        )
    epochs = int(trial.user_attrs.get("best_epoch") or cfg.train.epochs)
    everyone = cfg.override({"train.epochs": epochs, "train.patience": None})
    result = fit(everyone, load_data(everyone).everyone(), device, progress=True)
    return Retrain(f"all training people, {epochs} epochs", [result.model], everyone)


def build_export(tmp: Path, study: optuna.Study, trial, cfg: TrainConfig, done: Retrain, device) -> dict:
    model = Ensemble(done.members).eval()
    write_model_dir(tmp, done.config, done.members)
    root = cfg.data.root
    has_eval = (Path(root) / "eval" / "info.csv").is_file()
    figures: dict = {
        "study": study.study_name,
        "study_best_value": study.best_value,
        "trial": trial.number,
        "trial_value": trial.value,
        "mode": done.mode,
        "val_macro_f1": done.val_macro_f1,
        "fold_macro_f1": done.fold_f1,
    }

    # The checked ONNX model: every eval image (else validation images) through both runtimes.
    paths = (
        list(scan_eval(root)["path"])
        if has_eval
        else list(load_data(cfg, progress=False).table["path"][:512])
    )
    images = cache.build(paths, cfg.data.image_size, cfg.data.cache_dir, cfg.data.center_crop)
    export_onnx(model, cfg.data.image_size, tmp / "model.onnx")
    check = check_onnx(tmp / "model.onnx", model, images)
    figures["onnx"] = {
        "images": check.images,
        "max_abs_diff": check.max_abs_diff,
        "argmax_agree": check.argmax_agree,
    }
    if check.argmax_agree != check.images or check.max_abs_diff > MAX_ONNX_DIFF:
        raise RuntimeError(
            f"ONNX and PyTorch disagree: max |diff| {check.max_abs_diff:.2e}, "
            f"{check.images - check.argmax_agree} different classes"
        )

    labels = predicted = None
    if done.val_labels is not None:
        labels, predicted, scored_on = (
            done.val_labels,
            done.val_probs.argmax(1),
            "validation people of the retrain",
        )
    if has_eval:
        table = submission(model.to(device), done.config.override({"data.root": root}), root, device)
        write_csv(table, tmp / "submission.csv")
        gt_path = Path(root) / "eval" / "gt.csv"
        if gt_path.is_file():  # the stand-in knows its eval classes
            labels, predicted = pd.read_csv(gt_path)["ans"].to_numpy(), table["ans"].to_numpy()
            scored_on = "eval set (eval/gt.csv)"
            figures["eval_macro_f1"] = macro_f1(labels, predicted)
    if labels is not None:
        figures["scored_on"] = scored_on
        figures["per_class_f1"] = per_class_f1(labels, predicted).round(4).tolist()
        plots.confusion_matrix(confusion(labels, predicted), tmp / "confusion_matrix.png")
    write_json(tmp / "metrics.json", figures)
    (tmp / "report.md").write_text(report(figures, trial))
    return figures


def report(f: dict, trial) -> str:
    def fmt(value):
        return f"{value:.4f}" if isinstance(value, float) else "-"

    lines = [
        f"# Export of study `{f['study']}`, trial {f['trial']}",
        "",
        "| | val macro-F1 |",
        "|---|---|",
        f"| study best value | {fmt(f['study_best_value'])} |",
        f"| trial {f['trial']} (search) | {fmt(f['trial_value'])} |",
    ]
    if f["val_macro_f1"] is not None:
        lines.append(f"| retrain ({f['mode']}) | {fmt(f['val_macro_f1'])} |")
    if f.get("eval_macro_f1") is not None:
        lines.append(f"| submission vs eval/gt.csv | {fmt(f['eval_macro_f1'])} |")
    lines += [
        "",
        f"Retrained on: {f['mode']}.",
        f"ONNX check: {f['onnx']['images']} images, "
        f"max |p_onnx - p_torch| = {f['onnx']['max_abs_diff']:.2e}, "
        f"argmax agrees on {f['onnx']['argmax_agree']}/{f['onnx']['images']}.",
        "",
    ]
    if f.get("fold_macro_f1"):
        lines += ["Per fold: " + ", ".join(fmt(v) for v in f["fold_macro_f1"]), ""]
    if f.get("per_class_f1"):
        lines += [f"## Per-class F1 ({f['scored_on']})", "", "| class | name | F1 |", "|---|---|---|"]
        lines += [
            f"| {c} | {class_name(c)} | {v:.4f} |"
            for c, v in zip(range(NUM_CLASSES), f["per_class_f1"], strict=True)
        ]
        lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    params = "\n".join(f"- `{k}` = {v}" for k, v in trial.params.items())
    return "\n".join(lines) + f"\n## Trial parameters\n\n{params}\n"


def install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished export into place; an old one (--force) goes only once the new is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    out = Path(args.out or spec.runs_dir / "export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it or choose another --out")
    url = resolve_url(args.storage, spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    except KeyError:
        raise UserError(
            f"no study {spec.name!r} in {masked(url)}; run `python -m hpo.run --study {args.study}`"
        ) from None
    trial = pick_trial(study, args.trial)
    cfg = TrainConfig.from_dict(trial.user_attrs["config"])
    if args.data:
        cfg = cfg.override({"data.root": str(Path(args.data).expanduser())})
    device = pick_device(args.device)
    # On the CPU the thread count changes the order of float sums, and over a few epochs that moves
    # validation macro-F1 by a few points on a small set; --holdout reproduces the trial with its own.
    threads = trial.user_attrs.get("threads") if args.holdout and device.type == "cpu" else None
    configure_cpu(threads)
    print(
        f"exporting trial {trial.number} (val macro-F1 {trial.value}) of study {spec.name}", file=sys.stderr
    )

    done = retrain(cfg, trial, args.holdout, args.folds, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        figures = build_export(tmp, study, trial, cfg, done, device)
        install(tmp, out, args.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifacts = Path(args.artifacts or os.environ.get("HPO_ARTIFACTS") or spec.runs_dir / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as zdir:
        archive = shutil.make_archive(str(Path(zdir) / f"export-trial{trial.number}"), "zip", out)
        artifact_id = upload_artifact(
            artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=archive, study_or_trial=study
        )
    study.set_user_attr(
        "export",
        {
            "path": str(out.resolve()),
            "trial": trial.number,
            "mode": done.mode,
            "artifact_id": artifact_id,
            "val_macro_f1": figures["val_macro_f1"],
            "eval_macro_f1": figures.get("eval_macro_f1"),
        },
    )
    print((out / "report.md").read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
