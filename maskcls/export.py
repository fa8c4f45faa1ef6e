"""ONNX export of a saved model, checked against PyTorch with onnxruntime on real images.

The ONNX graph takes the normalised float32 batch [N, 3, H, W] (see `preprocessing` in
config.json) and returns class probabilities [N, 18]; the batch axis is dynamic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from maskcls.data.augment import Normalize, to_input


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
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = _Probabilities(model.cpu().eval())
    worst, agree, norm = 0.0, 0, Normalize.on("cpu")
    for start in range(0, len(images), batch_size):
        x = to_input(
            torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])),
            norm,
            channels_last=False,
        )
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["probabilities"], {"image": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
    return OnnxCheck(images=len(images), max_abs_diff=worst, argmax_agree=agree)
