"""The model-directory format, one for training runs and exports, and the atomic writes behind
every file and folder the project makes.

A model directory holds `model.safetensors` (an Ensemble of one or more members) and `config.json`
(the TrainConfig, the member count, the class names and the preprocessing a deployment repeats);
a training run adds `metrics.json`, an export its ONNX model, report and submission.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskcls.config import MEAN, STD, TrainConfig
from maskcls.errors import UserError
from maskcls.labels import NUM_CLASSES, AgeCutoffs, class_name

if TYPE_CHECKING:  # torch and the models load only where a model directory is written or read:
    import pandas as pd  # the data cache and the stand-in use the atomic writes without them
    import torch

    from maskcls import models


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(path: Path) -> None:
    """The permissions a plain `open` or `mkdir` gives under the umask (0644 / 0755 by default):
    temporary files and folders start private (0600 / 0700), and a serving container running as
    another user must still read what we write."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a temporary name beside `path`, which is then renamed into place: a
    reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    return write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))


EXPORT_MARK = ".mask-hpo-export"  # in every export: the files it wrote; only such a folder is replaced


def check_out(out: Path, force: bool) -> None:
    """`out` may receive an export: it is new or empty, or, with `force`, a previous export that
    holds nothing but its own files. Anything else stays as it is: --force never deletes a folder
    we did not write (a study's database, its artifacts, a user's files)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the export")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it or choose another --out")
    listed = export_files(out)
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    if listed is None:
        raise UserError(
            f"--force replaces only a previous export, and {out} is not one (it holds {shown}); "
            "nothing was deleted: choose another --out"
        )
    foreign = [name for name in entries if name not in listed]
    if foreign:
        raise UserError(
            f"{out} is a previous export but also holds {', '.join(foreign[:3])}, which --force would "
            "delete; move them away or choose another --out"
        )


def export_files(folder: Path) -> set[str] | None:
    """The names an export wrote into `folder` (its mark among them), or None when it is not one."""
    try:
        listed = json.loads((folder / EXPORT_MARK).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(name) for name in listed} | {EXPORT_MARK} if isinstance(listed, list) else None


@contextlib.contextmanager
def building(out: Path, replace: bool = False, mark: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out` to build a directory in. When the block ends it becomes
    `out`; with `mark` (an export) it is marked as ours (EXPORT_MARK lists its files). With
    `replace`, a previous export there goes, once the new one is complete and only if check_out
    still allows it. Without it, an `out` that another command filled meanwhile is left alone and
    this one fails. When the block fails, the temporary folder goes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if mark:
            names = sorted(p.name for p in tmp.iterdir())
            (tmp / EXPORT_MARK).write_text(json.dumps({"files": names}) + "\n")
        for path in [tmp, *tmp.rglob("*")]:
            readable(path)
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        if replace and out.exists() and any(out.iterdir()):
            check_out(out, force=True)
            out.rename(old)
        try:
            tmp.rename(out)  # fails on a folder that is not empty: nothing of it is replaced
        except OSError:
            raise UserError(
                f"{out} was filled by another command meanwhile; nothing was written there"
            ) from None
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda p: table.to_csv(p, index=False))


def preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """What a deployment must do to a photo before the model sees it."""
    return {
        "image_size": list(cfg.data.image_size),
        "crop": cfg.data.crop,
        "center_crop": cfg.data.center_crop,
        "face_margin": cfg.data.face_margin,
        "mean": list(MEAN),
        "std": list(STD),
        "input": "RGB; crop: none keeps the photo, center its central center_crop share, face the "
        "photo's face box grown by face_margin and fitted to the image_size aspect (centre crop when "
        "a photo has no box; README, maskcls.data.faces.face_window); bilinear resize to image_size "
        "[H, W], scale to [0, 1], subtract mean and divide by std per channel; float32 [batch, 3, H, W]",
    }


def write_model_dir(
    out: str | Path,
    cfg: TrainConfig,
    members: list[models.Classifier],
    recipes: list[TrainConfig] | None = None,
    weights: list[float] | None = None,
    biases: list[float] | None = None,
) -> Path:
    """model.safetensors (an Ensemble of `members`) and config.json: the TrainConfig whose
    preprocessing every member shares, the classes, the preprocessing, and for an ensemble of
    different recipes each member's own config (`recipes`) and its vote's weight, and the decision
    biases when they were fitted (maskcls.calibrate)."""
    from safetensors.torch import save_file

    from maskcls import models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ensemble = models.Ensemble(members, weights, biases)
    state = {k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda p: save_file(state, str(p)))
    cutoffs = AgeCutoffs()
    config: dict[str, Any] = {
        "train_config": cfg.to_dict(),
        "members": len(members),
        "weights": [round(float(w), 6) for w in ensemble.weights],
        "biases": [float(b) for b in ensemble.biases],
        "classes": {str(c): class_name(c, cutoffs) for c in range(NUM_CLASSES)},
        "preprocessing": preprocessing(cfg),
    }
    if recipes is not None:
        config["member_configs"] = [r.to_dict() for r in recipes]
    write_json(out / "config.json", config)
    return out


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, models.Ensemble]:
    """The config and model of a run or export directory (weights only, never pickled code)."""
    from safetensors.torch import load_file

    from maskcls import models

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "model.safetensors").is_file():
        raise UserError(
            f"{run_dir}: not a run or export directory (expected config.json and model.safetensors)"
        )
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = TrainConfig.from_dict(saved["train_config"])
        members = int(saved["members"])
        recipes = [
            TrainConfig.from_dict(r) for r in saved.get("member_configs") or [saved["train_config"]] * members
        ]
        weights, biases = saved.get("weights"), saved.get("biases")
        if len(recipes) != members or (weights is not None and len(weights) != members):
            raise ValueError(f"{members} members but {len(recipes)} member configs or weights")
        if biases is not None and len(biases) != NUM_CLASSES:
            raise ValueError(f"{len(biases)} decision biases for {NUM_CLASSES} classes")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{run_dir / 'config.json'}: not a model config written by this project ({err})"
        ) from None
    # The saved weights replace whatever the backbone started from: no ImageNet download, no
    # weights file needed where a model is deployed.
    built = [models.build(dataclasses.replace(r.model, pretrained=None)) for r in recipes]
    model = models.Ensemble(built, weights, biases)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return cfg, model.to(device).eval()
