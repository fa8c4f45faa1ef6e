"""The deployable export of any model directory: `python -m maskcls.export RUN_DIR --out DIR`.

An export is a model directory (model.safetensors, config.json) plus what a deployment and a
reviewer need:
  model.onnx                       probabilities [N, 18] for a normalised float32 batch [N, 3, H, W],
                                   dynamic batch axis; checked against PyTorch with onnxruntime on
                                   every eval image (else up to 512 training images)
  submission.csv                   `ImageID,ans` for eval/info.csv, when the data has an eval set
  report.md, confusion_matrix.png  the scores, per-class F1 and the confusion matrix
  metrics.json                     every figure of the report, for machines
  recipe.yaml                      the recipe (a TrainConfig file): `maskcls.train --config` and a
                                   study spec's `fixed:` take it as it is
It is built in a temporary folder and renamed into place. `hpo.export-best` retrains a trial and
exports it through the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from maskcls import plots
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.config import portable
from maskcls.data import cache
from maskcls.data.augment import Normalize, to_input
from maskcls.data.layout import scan, scan_eval
from maskcls.infer import pick_device
from maskcls.labels import NUM_CLASSES, class_name
from maskcls.metrics import attribute_accuracy, confusion, macro_f1, per_class_f1
from maskcls.predict import submission
from maskcls.rundir import building, check_out, load_run, write_atomic, write_csv, write_json
from maskcls.runtime import add_threads_argument, configure_cpu

MAX_ONNX_DIFF = 1e-4
PHOTOS_PER_PERSON = 7  # the competition's layout: 5 masked, 1 incorrect, 1 normal photo per person
MODEL_FILES = ("model.safetensors", "config.json")


class _Probabilities(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.model(image), dim=1)


@dataclass(frozen=True)
class OnnxCheck:
    images: int
    max_abs_diff: float  # largest |p_onnx - p_torch| over every image and class
    argmax_agree: int  # images whose predicted class is the same


@dataclass(frozen=True)
class ExportInfo:
    """Where the exported model comes from, for its report and metrics.json."""

    title: str
    trained_on: str  # e.g. "all training people, 5 epochs"
    scores: dict[str, tuple[float | None, str]]  # report label -> (macro-F1, what it was measured on)
    facts: dict[str, Any] = field(default_factory=dict)  # recorded in metrics.json as they are
    params: dict[str, Any] = field(default_factory=dict)  # the recipe's searched values
    recipe: dict[str, Any] = field(default_factory=dict)  # the complete TrainConfig, fixed and searched
    origin: str = ""  # where the recipe comes from, for recipe.yaml's first line
    members: list[dict[str, Any]] = field(default_factory=list)  # an ensemble of trials, member by member
    sections: list[str] = field(default_factory=list)  # markdown the caller adds (study curves...)
    validation: tuple[np.ndarray, np.ndarray] | None = None  # (labels, probabilities) to score


@dataclass
class ExportFigures:
    """What an export measured; metrics.json holds these and the ExportInfo's facts."""

    mode: str
    onnx: OnnxCheck
    eval_macro_f1: float | None = None  # the submission against eval/gt.csv, where it exists
    eval_images: int | None = None  # how many eval/gt.csv scores
    scored_on: str | None = None  # what per_class_f1 was measured on
    per_class_f1: list[float] | None = None
    attribute_accuracy: dict[str, float] | None = None  # mask, gender, age_band, on the same images

    def to_dict(self, facts: dict[str, Any]) -> dict[str, Any]:
        values = {"mode": self.mode, "onnx": dataclasses.asdict(self.onnx)}
        values.update(
            {k: v for k, v in dataclasses.asdict(self).items() if k not in values and v is not None}
        )
        return {**facts, **values}


def export_onnx(model: nn.Module, image_size: tuple[int, int], path: str | Path) -> Path:
    model = _Probabilities(model.cpu().eval())
    example = torch.zeros(2, 3, *image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return Path(path)


def check_onnx(path: str | Path, model: nn.Module, images: np.ndarray, batch_size: int = 64) -> OnnxCheck:
    """Run uint8 images [N, H, W, 3] through onnxruntime and PyTorch (fp32, CPU) and compare."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = _Probabilities(model.cpu().eval())
    worst, agree, norm = 0.0, 0, Normalize.on("cpu")
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size]))  # a writable copy
        x = to_input(batch, norm, channels_last=False)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["probabilities"], {"image": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
    return OnnxCheck(images=len(images), max_abs_diff=worst, argmax_agree=agree)


def complete(model_dir: Path, data_root: str, device: torch.device, info: ExportInfo) -> ExportFigures:
    """Turn a model directory into an export (the files in the module docstring); returns the
    figures written to metrics.json. Raises when ONNX and PyTorch disagree."""
    cfg, model = load_run(model_dir)
    has_eval = (Path(data_root) / "eval" / "info.csv").is_file()
    paths = list(scan_eval(data_root)["path"] if has_eval else scan(data_root)["path"][:512])
    images, _ = cache.images_for(cfg.override({"data.root": data_root}).data, paths)
    export_onnx(model, cfg.data.image_size, model_dir / "model.onnx")
    check = check_onnx(model_dir / "model.onnx", model, images)
    if check.argmax_agree != check.images or check.max_abs_diff > MAX_ONNX_DIFF:
        raise RuntimeError(
            f"ONNX and PyTorch disagree: max |diff| {check.max_abs_diff:.2e}, "
            f"{check.images - check.argmax_agree} different classes"
        )
    figures = ExportFigures(mode=info.trained_on, onnx=check)
    scored = None
    if info.validation is not None:
        labels, probs = info.validation
        scored = (labels, probs.argmax(1), "the retrain's validation people")
    if has_eval:
        table = submission(model.to(device), cfg.override({"data.root": data_root}), data_root, device)
        write_csv(table, model_dir / "submission.csv")
        gt_path = Path(data_root) / "eval" / "gt.csv"
        if gt_path.is_file():  # the stand-in knows its eval classes
            scored = (
                pd.read_csv(gt_path)["ans"].to_numpy(),
                table["ans"].to_numpy(),
                f"the data root's eval/gt.csv, {len(table)} images",
            )
            figures.eval_macro_f1 = macro_f1(scored[0], scored[1])
            figures.eval_images = len(scored[0])
    if scored is not None:
        labels, predicted, figures.scored_on = scored
        figures.per_class_f1 = per_class_f1(labels, predicted).round(4).tolist()
        figures.attribute_accuracy = attribute_accuracy(labels, predicted)
        plots.confusion_matrix(confusion(labels, predicted), model_dir / "confusion_matrix.png")
    write_json(model_dir / "metrics.json", figures.to_dict(info.facts))
    (model_dir / "report.md").write_text(report(info, figures))
    write_recipe(model_dir / "recipe.yaml", info.recipe or cfg.to_dict(), info.origin or info.title)
    return figures


def write_recipe(path: Path, recipe: dict[str, Any], origin: str) -> Path:
    """The recipe as a TrainConfig YAML file, so that the winning recipe re-runs as it is, on any
    machine: without data.root and data.cache_dir."""
    header = (
        f"# {origin}\n"
        f"# Re-run it: python -m maskcls.train --config recipe.yaml --data ROOT --out DIR\n"
        f"# or put it under `fixed:` in a study spec. data.root and data.cache_dir are left out:\n"
        f"# they named folders of the machine that trained it.\n"
    )
    text = header + yaml.safe_dump(portable(recipe), sort_keys=False)
    return write_atomic(path, lambda p: p.write_text(text))


def report(info: ExportInfo, f: ExportFigures) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "-"

    scores = dict(info.scores)
    if f.eval_macro_f1 is not None and f.eval_images:
        people = (
            f" (about {f.eval_images // PHOTOS_PER_PERSON} people)"
            if f.eval_images >= PHOTOS_PER_PERSON
            else ""
        )
        scores["submission vs eval/gt.csv"] = (
            f.eval_macro_f1,
            f"the data root's eval set: {f.eval_images} images{people}",
        )
    lines = [f"# {info.title}", "", "| figure | macro-F1 | measured on |", "|---|---|---|"]
    lines += [f"| {label} | {fmt(v)} | {on} |" for label, (v, on) in scores.items() if v is not None]
    if info.members:
        lines += ["", "## Members", "", "| trial | search val macro-F1 | retrain val macro-F1 | weight |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {m['trial']} | {fmt(m['search'])} | {fmt(m['retrain'])} | {m['weight']:.3f} |"
            for m in info.members
        ]
        lines.append(f"| ensemble | - | {fmt(info.facts.get('val_macro_f1'))} | 1.000 |")
    onnx = f.onnx
    lines += [
        "",
        f"Trained on: {info.trained_on}.",
        f"ONNX check: {onnx.images} images, max |p_onnx - p_torch| = {onnx.max_abs_diff:.2e}, "
        f"argmax agrees on {onnx.argmax_agree}/{onnx.images}.",
        "",
    ]
    if info.facts.get("fold_macro_f1"):
        lines += ["Per fold: " + ", ".join(fmt(v) for v in info.facts["fold_macro_f1"]), ""]
    if f.per_class_f1:
        lines += [f"## Per-class F1 ({f.scored_on})", "", "| class | name | F1 |", "|---|---|---|"]
        lines += [
            f"| {c} | {class_name(c)} | {v:.4f} |"
            for c, v in zip(range(NUM_CLASSES), f.per_class_f1, strict=True)
        ]
        if f.attribute_accuracy:
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in f.attribute_accuracy.items())
            lines += ["", f"Accuracy per attribute: {shown}."]
        lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    lines += info.sections
    if info.params:
        lines += ["## Searched parameters", ""] + [f"- `{k}` = {v}" for k, v in info.params.items()] + [""]
    if info.recipe:
        lines += [
            "## Complete recipe (fixed and searched values)",
            "",
            "```json",
            json.dumps(info.recipe, indent=2),
        ]
        lines += ["```", ""]
    return "\n".join(lines)


def run_info(run_dir: Path) -> ExportInfo:
    """What a plain training run's metrics.json says about it (nothing, if it has none)."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    epoch = metrics.get("best_epoch")
    return ExportInfo(
        title=f"Export of run `{run_dir}`",
        origin=f"The recipe of run {run_dir}",
        trained_on=f"the run's training people, best epoch {epoch}" if epoch else "the run's training people",
        scores={"run": (metrics.get("val_macro_f1"), "the run's validation people")},
        facts={
            "run": str(run_dir.resolve()),
            "val_macro_f1": metrics.get("val_macro_f1"),
            "best_epoch": epoch,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.export"),
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run_dir", help="a run or export directory (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--data", help="data root for the submission and ONNX check (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda ...")
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    configure_cpu(args.threads)
    run_dir, out = Path(args.run_dir), Path(args.out)
    cfg, _ = load_run(run_dir)  # a bad run directory stops here, before anything is written
    check_out(out, args.force)
    data_root = str(Path(args.data).expanduser()) if args.data else cfg.data.root
    with building(out, replace=args.force, mark=True) as tmp:
        for name in MODEL_FILES:
            shutil.copy2(run_dir / name, tmp / name)
        figures = complete(tmp, data_root, pick_device(args.device), run_info(run_dir))
    print((out / "report.md").read_text())
    scored = f" (eval macro-F1 {figures.eval_macro_f1:.4f})" if figures.eval_macro_f1 is not None else ""
    print(f"wrote {out}{scored}")
    return 0


if __name__ == "__main__":
    run_main(main)
