"""The face detector on a real face photo that ships in a registry package (scikit-image's
astronaut), bare, masked and cut to a competition-sized portrait; offline, a second or two each."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data

from maskcls.data import detector
from maskcls.errors import UserError

# The astronaut's face in skimage.data.astronaut() (512x512), read off the image: cheek to cheek,
# hairline to chin. MTCNN boxes it at about (181, 63, 267, 173), IoU 0.8 with this.
FACE = (180.0, 78.0, 270.0, 178.0)
MASK_BLUE = (110, 160, 215)
UNDER_NOSE = (176, 133, 274, 184)  # worn incorrectly: just below the nose to below the chin
OVER_NOSE = (174, 110, 276, 186)  # worn: from the bridge of the nose, the harder case
PORTRAIT_CUT = (125, 20, 325, 287)  # 200x267 around the face, scaled to 384x512: face upper-middle


def iou(a, b):
    wide = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    high = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = wide * high
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def save(img: Image.Image, path, **options) -> str:
    img.save(path, **options)
    return str(path)


def masked(box) -> Image.Image:
    img = Image.fromarray(data.astronaut())
    ImageDraw.Draw(img).rounded_rectangle(box, radius=16, fill=MASK_BLUE)
    return img


def test_finds_the_astronauts_face(tmp_path):
    path = save(Image.fromarray(data.astronaut()), tmp_path / "astronaut.png")
    [found] = detector.detect([path], workers=1, progress=False)
    assert found is not None
    assert iou(found[:4], FACE) >= 0.5, found
    assert 0.9 <= found[4] <= 1.0
    assert 0 <= found[0] < found[2] <= 512 and 0 <= found[1] < found[3] <= 512


@pytest.mark.parametrize("mask", [UNDER_NOSE, OVER_NOSE], ids=["under the nose", "over the nose"])
def test_finds_the_face_under_a_drawn_mask(tmp_path, mask):
    path = save(masked(mask), tmp_path / "masked.jpg", quality=90)
    [found] = detector.detect([path], workers=1, progress=False)
    assert found is not None and iou(found[:4], FACE) >= 0.5, found


def test_boxes_a_competition_sized_portrait_in_its_own_pixels(tmp_path):
    """384x512 like the competition photos, the face in the upper middle and larger than in the
    astronaut: the box must come back in this photo's pixels, not the detector's pyramid's."""
    x0, y0, x1, y1 = PORTRAIT_CUT
    portrait = masked(OVER_NOSE).crop(PORTRAIT_CUT).resize((384, 512), Image.LANCZOS)
    path = save(portrait, tmp_path / "mask1.jpg", quality=90)
    sx, sy = 384 / (x1 - x0), 512 / (y1 - y0)
    face = ((FACE[0] - x0) * sx, (FACE[1] - y0) * sy, (FACE[2] - x0) * sx, (FACE[3] - y0) * sy)
    [found] = detector.detect([path], workers=1, progress=False)
    assert found is not None and iou(found[:4], face) >= 0.5, (found, face)


def test_photos_without_a_face_give_none_and_results_keep_the_order(tmp_path):
    grey = save(Image.new("RGB", (384, 512), (128, 128, 128)), tmp_path / "grey.png")
    face = save(Image.fromarray(data.astronaut()), tmp_path / "face.png")
    coffee = save(Image.fromarray(data.coffee()), tmp_path / "coffee.jpg")
    rocket = save(Image.fromarray(data.rocket()), tmp_path / "rocket.jpg")
    threads = torch.get_num_threads()
    found = detector.detect([grey, face, coffee, rocket], workers=2, progress=False)
    assert found[0] is None and found[2] is None and found[3] is None
    assert found[1] is not None and iou(found[1][:4], FACE) >= 0.5
    assert torch.get_num_threads() == threads  # the one-thread-per-worker setting is given back


def test_never_imports_facenet_pytorch_and_its_pins():
    """Importing it would run code written for torch<2.3 and numpy<2: only its weight files count."""
    detector.detect_one(np.zeros((64, 48, 3), np.uint8))
    assert "facenet_pytorch" not in sys.modules
    assert "," not in detector.SOURCE  # a plain CSV cell


@pytest.fixture
def reload_weights():
    detector.networks.cache_clear()
    yield
    detector.networks.cache_clear()


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch, reload_weights):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == detector.PACKAGE else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps 'facenet-pytorch==2.6.0'") as raised:
        detector.detect(["any.jpg"], progress=False)
    assert "\n" not in str(raised.value)


def test_a_package_without_its_weight_files_is_the_same_error(monkeypatch, tmp_path, reload_weights):
    (tmp_path / "facenet_pytorch").mkdir()
    (tmp_path / "facenet_pytorch" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "facenet_pytorch", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(UserError, match="facenet-pytorch"):
        detector.detect(["any.jpg"], progress=False)
