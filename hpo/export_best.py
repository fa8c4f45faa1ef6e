"""`python -m hpo.export-best --study NAME`: retrain the best trial and export a deployable model.

What is exported by default is the spec's `export: {top_k: K}` (1, the single best trial, when it
sets none; demo.yaml sets 2, the best mean of bench/effectiveness.py on held-out people).
The trial's recipe is rebuilt exactly from the config stored on it (not re-derived from the
space), then retrained: by default on all training people for the epoch count at which the trial
peaked; with --holdout on the trial's own split (its validation macro-F1 reported next to the
trial's); with --folds K as K person-level folds exported as an ensemble (mean of probabilities).
With --top-k K the K best complete trials with distinct recipes are each retrained so and
exported as one ensemble that soft-votes their probabilities (equally, or weighted by each
trial's validation macro-F1 with --weighting f1); members share the best trial's preprocessing
(image size, crop), so a trial with other preprocessing is passed over for the next one.

The export itself is maskcls.export's (the same as `python -m maskcls.export RUN --out DIR`):
model.safetensors and config.json, model.onnx checked with onnxruntime, submission.csv, report.md
with the study's and the retrain's scores, confusion_matrix.png and metrics.json. It is attached
to the study as a zip artifact and recorded in the study's `export` user attr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo import note
from hpo import spec as specs
from hpo.protocol import Attr, artifacts_dir, export_dir, quiet_experimental, ranked
from hpo.record import Recipes, has_recipe
from hpo.storage import FINISHED, masked, open_storage, resolve_url
from maskcls import plots
from maskcls.calibrate import Calibration, fit_biases
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.config import TrainConfig
from maskcls.errors import UserError, quoted
from maskcls.export import ExportFigures, ExportInfo, complete
from maskcls.infer import pick_device
from maskcls.labels import class_name
from maskcls.metrics import macro_f1
from maskcls.rundir import building, check_out, write_model_dir
from maskcls.runtime import add_threads_argument, configure_cpu
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
    recipes: list[TrainConfig] | None = None  # top-k: each member's config
    weights: list[float] | None = None  # top-k: each member's vote
    member_f1: list[float | None] | None = None  # top-k with --holdout: each member's own val F1
    scored_on: str = "-"  # what val_macro_f1 was measured on
    calibration: Calibration | None = None  # decision biases fitted on val_probs (--calibrate bias)

    @property
    def biases(self) -> list[float] | None:
        return self.calibration.biases if self.calibration is not None and self.calibration.applied else None


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if number is None:
        best = ranked(study)[:1]
        if not best:
            raise UserError(
                f"study {quoted(study.study_name)} has no finished trial yet; run "
                f"`python -m hpo.run --study {study.study_name}` first"
            )
        trial = best[0]
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            raise UserError(
                f"trial {number} does not exist in study {quoted(study.study_name)} "
                f"(its trials are numbered 0-{len(trials) - 1})"
                if trials
                else "(it has no trials)"
            )
        trial = found[0]
        if trial.state not in FINISHED:
            raise UserError(f"trial {number} is {trial.state.name}; export a complete or pruned trial")
    if not has_recipe(trial):
        raise UserError(f"trial {trial.number} has no stored recipe (was it run by hpo.run?)")
    return trial


def distinct_top(
    study: optuna.Study, k: int, recipes: Recipes, exactly: bool = True
) -> list[optuna.trial.FrozenTrial]:
    """The k best complete trials with different parameters and the best one's preprocessing
    (fewer when the study has fewer and not `exactly`)."""
    chosen: list[optuna.trial.FrozenTrial] = []
    seen, passed_over = set(), []
    for trial in ranked(study):
        if not has_recipe(trial):
            continue
        recipe = json.dumps(trial.params, sort_keys=True)
        if recipe in seen:
            continue
        seen.add(recipe)
        if chosen and preprocessing_of(recipes(trial)) != preprocessing_of(recipes(chosen[0])):
            passed_over.append(trial.number)
            continue
        chosen.append(trial)
        if len(chosen) == k:
            break
    if len(chosen) < k and (exactly or not chosen):
        other = f" ({len(passed_over)} more with other preprocessing)" if passed_over else ""
        raise UserError(
            f"--top-k {k}: study {quoted(study.study_name)} has only {len(chosen)} complete trials with "
            f"distinct recipes and the best trial's preprocessing{other}"
        )
    if passed_over:
        print(
            f"passed over trials {passed_over}: other preprocessing than trial {chosen[0].number}",
            file=sys.stderr,
        )
    return chosen


def default_trials(study: optuna.Study, top_k: int, recipes: Recipes) -> list[optuna.trial.FrozenTrial]:
    """No --trial, --top-k or --folds: the spec's `export.top_k` best distinct recipes, or as many
    as the study has (the single best trial when that is one)."""
    if top_k == 1:
        return [pick_trial(study, None)]
    if not ranked(study):
        pick_trial(study, None)  # the one message for a study without a finished trial
    trials = distinct_top(study, top_k, recipes, exactly=False)
    if len(trials) < top_k:
        print(
            f"the spec's export.top_k is {top_k}; study {study.study_name} has {len(trials)} complete "
            f"trial{'s' if len(trials) > 1 else ''} with distinct recipes: exporting "
            + ("the best alone" if len(trials) == 1 else f"the {len(trials)} as one ensemble"),
            file=sys.stderr,
        )
    return trials


def pick_tradeoff(
    study: optuna.Study, objectives: Sequence[str], pick: str
) -> tuple[optuna.trial.FrozenTrial, str]:
    """`best-f1`, or `f1-within:D`: of the trials within D of the best validation macro-F1, the one
    with the lowest other objectives (in the spec's order). Returns the trial and what was chosen."""
    if len(study.directions) < 2:
        raise UserError(
            f"--pick chooses between objectives; study {quoted(study.study_name)} has one ({objectives[0]}): "
            "drop --pick to export its best trial"
        )
    ranking = ranked(study)
    if not ranking:
        raise UserError(f"study {quoted(study.study_name)} has no complete trial yet")
    best = ranking[0]
    if pick == "best-f1":
        return best, f"best-f1: trial {best.number}, the best validation macro-F1 ({best.values[0]:.4f})"
    try:
        tolerance = float(pick.removeprefix("f1-within:")) if pick.startswith("f1-within:") else -1.0
    except ValueError:
        tolerance = -1.0
    if not 0 <= tolerance < 1:
        raise UserError(
            f"--pick {quoted(pick)}: expected best-f1 or f1-within:D with 0 <= D < 1, e.g. f1-within:0.01"
        )
    near = [t for t in ranking if t.values[0] >= best.values[0] - tolerance]
    chosen = min(near, key=lambda t: (list(t.values[1:]), -t.values[0]))
    other = objectives[1]
    return chosen, (
        f"{pick}: of the {len(near)} trials within {tolerance} of the best validation macro-F1 "
        f"({best.values[0]:.4f}, trial {best.number}), trial {chosen.number} has the lowest {other}: "
        f"{chosen.values[1]:.4g} against {best.values[1]:.4g}, at val macro-F1 {chosen.values[0]:.4f}"
    )


def preprocessing_of(recipe: TrainConfig) -> tuple:
    """What an ensemble's members must share: one input tensor for them all."""
    cfg = recipe.data
    crop = (cfg.crop, cfg.face_boxes, cfg.face_margin) if cfg.crop == "face" else (cfg.crop,)
    return cfg.image_size, cfg.center_crop, *crop


def retrain_top(
    trials: list[optuna.trial.FrozenTrial], cfgs: list[TrainConfig], holdout: bool, weighting: str, device
) -> Retrain:
    """Each trial retrained as a single export would be, then one ensemble of them all."""
    if holdout and len({split_of(c) for c in cfgs}) > 1:
        raise UserError(
            "--holdout: the ensemble's trials were validated on different splits; drop --holdout, or "
            "export one trial (--trial N)"
        )
    done = []
    for i, (cfg, trial) in enumerate(zip(cfgs, trials, strict=True)):
        print(f"member {i + 1}/{len(trials)}: trial {trial.number}", file=sys.stderr)
        done.append(retrain(cfg, trial, holdout, None, device))
    votes = [t.values[0] for t in trials] if weighting == "f1" else [1.0] * len(trials)
    weights = [v / sum(votes) for v in votes]
    ensemble = Retrain(
        f"top-{len(trials)} ensemble, each on {done[0].mode}",
        [d.members[0] for d in done],
        done[0].config,
        recipes=[d.config for d in done],
        weights=weights,
        member_f1=[d.val_macro_f1 for d in done],
        scored_on=done[0].scored_on,
    )
    if holdout:
        labels = np.asarray(done[0].val_labels)
        probs = np.sum([w * np.asarray(d.val_probs) for w, d in zip(weights, done, strict=True)], axis=0)
        ensemble.val_labels, ensemble.val_probs = labels, probs
        ensemble.val_macro_f1 = macro_f1(labels, probs.argmax(1))
    return ensemble


def split_of(cfg: TrainConfig) -> tuple:
    d = cfg.data
    return d.root, d.corrections, d.val_ratio, d.seed, d.folds, d.fold


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
            scored_on=f"the trial's validation people ({cfg.data.val_ratio:.0%} of the training people)",
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
            scored_on="out-of-fold predictions: every training person once",
        )
    epochs = int(trial.user_attrs.get(Attr.BEST_EPOCH) or cfg.train.epochs)
    everyone = cfg.override({"train.epochs": epochs, "train.patience": None})
    print(f"retraining trial {trial.number} on all training people for {epochs} epochs", file=sys.stderr)
    result = fit(everyone, load_data(everyone).everyone(), device, progress=True)
    return Retrain(f"all training people, {epochs} epochs", [result.model], everyone)


def export_info(
    study: optuna.Study,
    trials: list[optuna.trial.FrozenTrial],
    recipe: TrainConfig,
    done: Retrain,
    folder: Path,
    pick: str | None,
) -> ExportInfo:
    """The report's content; the study's learning curves go to `folder` as study_curves.png.
    `recipe` is the (best) trial's own config, which recipe.yaml holds: what the retrain changed
    for itself (epochs, folds) the report says beside it."""
    trial, cfg, best = trials[0], done.config, ranked(study)[0].values[0]
    numbers = ", ".join(str(t.number) for t in trials)
    search = f"the search's validation people ({cfg.data.val_ratio:.0%} of the training people)"
    members = []
    if done.recipes is not None:  # an ensemble of trials: each member beside the ensemble
        assert done.weights is not None and done.member_f1 is not None
        members = [
            {"trial": t.number, "search": t.values[0], "retrain": f1, "weight": w}
            for t, f1, w in zip(trials, done.member_f1, done.weights, strict=True)
        ]
    return ExportInfo(
        title=f"Export of study `{study.study_name}`, trial{'s' if len(trials) > 1 else ''} {numbers}",
        trained_on=done.mode,
        scores={
            "study best value": (best, search),
            f"trial {trial.number} (search)": (trial.values[0], search),
            f"retrain ({done.mode})": (done.val_macro_f1, done.scored_on),
        },
        facts={
            "study": study.study_name,
            "study_best_value": best,
            "trial": trial.number,
            "trial_value": trial.values[0],
            **({"pick": pick} if pick else {}),
            "val_macro_f1": done.val_macro_f1,
            "fold_macro_f1": done.fold_f1,
            **({"members": members} if members else {}),
            **({"calibration": dataclasses.asdict(done.calibration)} if done.calibration else {}),
        },
        params=trial.params,
        recipe=recipe.to_dict(),
        origin=f"The recipe of trial {trial.number} of study {study.study_name} "
        f"(val macro-F1 {trial.values[0]:.4f} in the search)",
        members=members,
        sections=(["## Trade-off", "", f"Picked by {pick}.", ""] if pick else [])
        + calibration_section(done)
        + study_sections(study, {t.number for t in trials}, folder),
        validation=None
        if done.val_labels is None or done.val_probs is None
        else (done.val_labels, done.val_probs),
    )


def calibration_section(done: Retrain) -> list[str]:
    """What the decision biases did, on the predictions they were fitted on and held back."""
    cal = done.calibration
    if cal is None:
        return []
    lines = [
        "## Decision biases for macro-F1 (--calibrate bias)",
        "",
        f"Fitted on {done.scored_on}: macro-F1 {cal.before:.4f} -> {cal.after:.4f} (on the same "
        "predictions, so optimistic). Held-back check, fitted on one half of the images and scored on "
        f"the other, both ways: {cal.check_before:.4f} -> {cal.check_after:.4f}.",
        "",
    ]
    if not cal.applied:
        return [
            *lines,
            "Not applied: the held-back check did not improve, so the decisions stay plain argmax.",
            "",
        ]
    shown = ", ".join(f"{c} ({class_name(c)}) {b:+.1f}" for c, b in enumerate(cal.biases) if b)
    return [*lines, f"Applied (baked into model.onnx), per class: {shown}.", ""]


def study_sections(study: optuna.Study, exported: set[int], folder: Path) -> list[str]:
    """The study at a glance: every trial's curve (pruned ones greyed) and what mattered."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    curves = [
        (t.intermediate_values, "exported" if t.number in exported else t.state.name.lower())
        for t in trials
        if t.intermediate_values
    ]
    lines = ["## The study", ""]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    lines.append(f"{len(trials)} finished trials ({pruned} pruned), validation macro-F1 per epoch:")
    if curves:
        plots.study_curves(curves, folder / "study_curves.png")
        lines += ["", "![study learning curves](study_curves.png)"]
    lines += ["", "Parameter importances (optuna.importance with its default evaluator, PED-ANOVA):", ""]
    try:
        with quiet_experimental():
            importances = optuna.importance.get_param_importances(study)
        lines += [f"- `{name}`: {value:.3f}" for name, value in importances.items()]
    except (ValueError, RuntimeError) as err:  # too few complete trials, or a one-point space
        lines.append(f"- not computed: {err}")
    return [*lines, ""]


def record(
    study: optuna.Study,
    trials: list[optuna.trial.FrozenTrial],
    done: Retrain,
    out: Path,
    figures: ExportFigures,
    artifacts: Path,
) -> None:
    """Attach the export to the study as a zip artifact and note it in the study's `export` attr."""
    artifacts.mkdir(parents=True, exist_ok=True)
    name = "export-trial" + "-".join(str(t.number) for t in trials)
    with tempfile.TemporaryDirectory() as zdir:
        archive = shutil.make_archive(str(Path(zdir) / name), "zip", out)
        artifact_id = upload_artifact(
            artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=archive, study_or_trial=study
        )
    study.set_user_attr(
        Attr.EXPORT,
        {
            "path": str(out.resolve()),
            "trial": trials[0].number,
            "members": [t.number for t in trials],
            "mode": done.mode,
            "artifact_id": artifact_id,
            "val_macro_f1": done.val_macro_f1,
            "eval_macro_f1": figures.eval_macro_f1,
        },
    )
    members = ", ".join(str(t.number) for t in trials)
    val, scored = ("-" if v is None else f"{v:.4f}" for v in (done.val_macro_f1, figures.eval_macro_f1))
    values = f"retrain's val macro-F1 {val}, eval macro-F1 {scored}"
    note.write(
        study,
        "export",
        "\n".join(
            [
                "### Last export",
                f"- trial(s) {members}, {done.mode}: {values}",
                f"- in `{out.resolve()}` (report.md there), and as the study artifact `{artifact_id}`",
            ]
        ),
    )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("hpo.export-best"),
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--study", required=True, help="name in studies/ or a spec path")
    parser.add_argument("--storage", help="storage URL (default: as hpo.run resolves it)")
    parser.add_argument("--data", help="data root (default: the trial's)")
    parser.add_argument("--out", help="export directory (default runs/<study>/export)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--trial", type=int, help="trial number (default: the best complete trial)")
    choice.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="export the K best distinct recipes as one ensemble (default: the spec's export.top_k, "
        "or as many as the study has; 1 when the spec sets none)",
    )
    choice.add_argument(
        "--pick",
        metavar="RULE",
        help="a study with several objectives: best-f1 (its default) or f1-within:D, the trial lowest in "
        "the other objectives among those within D of the best validation macro-F1",
    )
    parser.add_argument(
        "--weighting",
        choices=("equal", "f1"),
        default="equal",
        help="an ensemble of trials (--top-k, or the spec's export.top_k): members vote equally or by "
        "their trial's validation macro-F1",
    )
    parser.add_argument(
        "--calibrate",
        choices=("none", "bias"),
        help="bias: fit 18 decision biases for macro-F1 on the held-out predictions of --holdout or "
        "--folds and bake them into the model and its ONNX graph (default: bias when there are "
        "held-out predictions, else none)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--holdout", action="store_true", help="retrain on the trial's own split and report its val F1"
    )
    mode.add_argument("--folds", type=int, help="train K person-level folds and export their ensemble")
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--artifacts", help="artifact directory (default runs/<study>/artifacts)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    add_threads_argument(
        parser,
        "CPU threads for torch (default: the trial's own with --holdout on the CPU, which reproduces its "
        "sums exactly, else the cores this process owns)",
    )
    args = parser.parse_args(argv)
    if args.folds is not None and args.folds < 2:
        raise UserError("--folds must be at least 2")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.calibrate == "bias" and not (args.holdout or args.folds):
        raise UserError(
            "--calibrate bias fits decision biases on held-out predictions: add --holdout or --folds K "
            "(an export trained on everyone has none)"
        )
    if args.calibrate is None:
        args.calibrate = "bias" if args.holdout or args.folds else "none"
    if args.top_k is not None and args.folds is not None:
        raise UserError("--top-k and --folds do not combine: choose an ensemble of trials or of folds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = specs.load(args.study)
    out = export_dir(args.out, spec.runs_dir)
    check_out(out, args.force)
    url = resolve_url(args.storage, spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(url, existing=True))
    except KeyError:
        raise UserError(
            f"no study {quoted(spec.name)} in {masked(url)}; run `python -m hpo.run --study {args.study}`"
        ) from None
    picked = None
    artifacts = artifacts_dir(args.artifacts, spec.runs_dir)
    store = FileSystemArtifactStore(str(artifacts)) if artifacts.is_dir() else None
    recipes = Recipes(spec.base, store, study._storage)
    if args.pick or (len(study.directions) > 1 and args.trial is None and not args.top_k):
        trial, picked = pick_tradeoff(study, spec.objectives, args.pick or "best-f1")
        trials = [trial]
    elif args.top_k:
        trials = distinct_top(study, args.top_k, recipes)
    elif args.trial is not None or args.folds:
        trials = [pick_trial(study, args.trial)]
    else:
        trials = default_trials(study, spec.top_k, recipes)
    if picked:
        print(f"picked {picked}", file=sys.stderr)
    cfgs = [recipes(t) for t in trials]
    if args.data:
        cfgs = [c.override({"data.root": str(Path(args.data).expanduser())}) for c in cfgs]
    if os.environ.get("HPO_CACHE"):  # this machine's cache, not the one the trial's machine used
        cfgs = [c.override({"data.cache_dir": str(specs.cache_root(study.study_name))}) for c in cfgs]
    device = pick_device(args.device)
    # On the CPU the thread count changes the order of float sums, and over a few epochs that moves
    # validation macro-F1 by a few points on a small set; --holdout reproduces the trial with its own.
    threads = trials[0].user_attrs.get(Attr.THREADS) if args.holdout and device.type == "cpu" else None
    configure_cpu(args.threads or threads)
    values = ", ".join(f"trial {t.number} (val macro-F1 {t.values[0]:.4f})" for t in trials)
    print(f"exporting {values} of study {spec.name}", file=sys.stderr)

    if args.top_k or len(trials) > 1:
        done = retrain_top(trials, cfgs, args.holdout, args.weighting, device)
    else:
        done = retrain(cfgs[0], trials[0], args.holdout, args.folds, device)
    if args.calibrate == "bias" and done.val_labels is not None and done.val_probs is not None:
        done.calibration = fit_biases(done.val_labels, done.val_probs)
    print("exporting: ONNX (checked with onnxruntime), submission, report", file=sys.stderr)
    with building(out, replace=args.force, mark=True) as tmp:
        write_model_dir(tmp, done.config, done.members, done.recipes, done.weights, done.biases)
        figures = complete(
            tmp, cfgs[0].data.root, device, export_info(study, trials, cfgs[0], done, tmp, picked)
        )
    record(study, trials, done, out, figures, artifacts)
    print(outcome(done, figures, out))
    return 0


def outcome(done: Retrain, figures: ExportFigures, out: Path) -> str:
    """What the export measured, in a few lines; the whole story is in report.md."""
    check = figures.onnx
    scored = "" if figures.eval_macro_f1 is None else f", eval macro-F1 {figures.eval_macro_f1:.4f}"
    retrained = "" if done.val_macro_f1 is None else f"retrain's val macro-F1 {done.val_macro_f1:.4f}"
    return "\n".join(
        [
            f"exported ({done.mode}): {retrained or 'trained on every training person'}{scored}",
            f"ONNX agrees with PyTorch: argmax {check.argmax_agree}/{check.images}, "
            f"max |difference| {check.max_abs_diff:.1e}",
            f"report: {out / 'report.md'}",
            f"wrote {out}",
        ]
    )


if __name__ == "__main__":
    run_main(main)
