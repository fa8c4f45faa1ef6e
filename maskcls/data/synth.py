"""A synthetic stand-in for the competition data, in exactly its layout.

Each person is a drawn face whose cues carry the labels with the real task's difficulty:
- mask status is easy: five mask styles when worn; incorrect = under the nose or on the chin;
- gender is moderate: hair length, face width and lip colour shift with gender but overlap;
- age is hard: grey hair, wrinkles and skin tone change continuously with age plus noise,
  so neighbouring ages (57-59 vs 60) look alike and the band edges blur.
Pose, scale, background and lighting vary; images are JPEG-compressed; a few files are
`.png`/`.jpeg`, `._` AppleDouble junk and `.ipynb_checkpoints` folders appear as in the real
archive, and a small share of people carry a wrong label in train.csv. The true face box of every
photo goes to train/face_boxes.csv and eval/face_boxes.csv (maskcls.data.faces reads them).

Every person is drawn from its own generator seeded by (seed, split, index), so the output is
byte-identical for the same arguments whatever the number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.data.faces import COLUMNS, STANDIN_TABLES, Box
from maskcls.errors import UserError
from maskcls.labels import MASK_STEMS, AgeCutoffs, Gender, Mask, age_band, encode
from maskcls.progress import bar
from maskcls.rundir import building

FEMALE_SHARE = 0.614  # 1,658 of 2,700 people
OLD_SHARE = 0.071  # 192 of 2,700 people are 60
YOUNG_SHARE = 0.47  # of the people under 60, about half are under 30
LABEL_NOISE = 0.01  # share of people whose train.csv row is wrong (gender or age)
ODD_EXTENSION = 0.03  # share of files saved as .png or .jpeg instead of .jpg
JUNK_SHARE = 0.05  # share of person folders with a macOS `._` file next to a photo

SKIN = np.array([[255, 224, 196], [241, 194, 158], [224, 172, 135], [198, 145, 104], [141, 96, 66]])
HAIR = np.array([[25, 20, 18], [60, 40, 25], [105, 70, 40], [160, 120, 70], [200, 170, 110]])
GREY = np.array([200, 200, 205])
MASK_STYLES = (  # (colour, pattern) for mask1..mask5
    ((235, 238, 240), "pleats"),
    ((40, 40, 45), "plain"),
    ((120, 170, 220), "pleats"),
    ((200, 80, 90), "stripes"),
    ((245, 245, 235), "beak"),
)


@dataclass(frozen=True)
class Person:
    id: str
    gender: Gender
    age: int
    race: str = "Asian"


SOURCE = "stand-in (true box)"  # the boxes table's source column


@dataclass(frozen=True)
class Options:
    width: int = 384
    height: int = 512


def draw_person(rng: np.random.Generator) -> Person:
    gender = Gender.FEMALE if rng.random() < FEMALE_SHARE else Gender.MALE
    if rng.random() < OLD_SHARE:
        age = 60
    elif rng.random() < YOUNG_SHARE:
        age = int(min(29, 18 + rng.exponential(4.0)))  # mostly 18-23, like the real students
    else:
        age = int(max(30, 59 - rng.exponential(7.0)))  # mostly 50s, like their parents
    return Person(id="", gender=gender, age=age)


def _face_traits(person: Person, rng: np.random.Generator) -> dict:
    """Per-person look. Cues are continuous functions of gender and age plus noise."""
    femininity = (1.0 if person.gender == Gender.FEMALE else -1.0) * 0.9 + rng.normal(0, 0.8)
    ageing = np.clip((person.age - 18) / 42 + rng.normal(0, 0.12), 0, 1.2)
    skin = SKIN[rng.integers(len(SKIN))] * (1 - 0.12 * ageing) + rng.normal(0, 8, 3)
    hair = HAIR[rng.integers(len(HAIR))]
    grey = float(np.clip((ageing - 0.45) * 1.6, 0, 1))
    return {
        "skin": tuple(int(c) for c in np.clip(skin, 0, 255)),
        "hair": tuple(int(c) for c in (1 - grey) * hair + grey * GREY),
        "hair_length": float(np.clip(0.55 + 0.35 * femininity, 0.05, 1.3)),
        "face_width": float(np.clip(0.34 - 0.025 * femininity + rng.normal(0, 0.01), 0.27, 0.42)),
        "lips": (int(np.clip(150 + 40 * femininity, 90, 230)), 70, 80),
        "wrinkles": int(np.clip(round(ageing * 7 + rng.normal(0, 1.0)), 0, 9)),
        "eye_gap": float(rng.uniform(0.16, 0.22)),
        "background": rng.integers(40, 230, size=(2, 3)),
    }


def _render(
    traits: dict, mask: Mask, style: int, opts: Options, rng: np.random.Generator
) -> tuple[Image.Image, Box]:
    """Draw at half resolution and upscale: four times cheaper, and the upscale softens edges.
    Returns the photo and its true face box (the skin's ellipse, after the head's tilt)."""
    w, h = max(8, opts.width // 2), max(8, opts.height // 2)
    top, bottom = traits["background"]
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)

    # Pose and scale: the face centre moves, its size varies, the head tilts slightly.
    scale = rng.uniform(0.85, 1.15) * w
    cx = w / 2 + rng.normal(0, 0.06) * w
    cy = h * 0.5 + rng.normal(0, 0.05) * h
    fw, fh = traits["face_width"] * scale, 0.5 * scale

    def box(x0, y0, x1, y1):  # face-relative coordinates -> pixels
        return [cx + x0 * fw, cy + y0 * fh, cx + x1 * fw, cy + y1 * fh]

    hair_len = traits["hair_length"]
    draw.ellipse(box(-1.15, -1.2, 1.15, -0.1 + 1.3 * hair_len), fill=traits["hair"])
    draw.rectangle(box(-0.7, 0.6, 0.7, 1.4), fill=tuple(int(c * 0.8) for c in traits["skin"]))  # neck
    draw.ellipse(box(-1.0, -1.0, 1.0, 1.0), fill=traits["skin"])
    draw.chord(box(-1.05, -1.15, 1.05, -0.35), 180, 360, fill=traits["hair"])  # fringe
    gap = traits["eye_gap"] * w / fw
    for side in (-1, 1):
        draw.ellipse(box(side * gap - 0.18, -0.32, side * gap + 0.18, -0.18), fill=(250, 250, 250))
        draw.ellipse(box(side * gap - 0.07, -0.31, side * gap + 0.07, -0.19), fill=(40, 30, 30))
        draw.line(box(side * gap - 0.22, -0.45, side * gap + 0.2, -0.48), fill=traits["hair"], width=2)
    wrinkle = tuple(int(c * 0.7) for c in traits["skin"])
    for i in range(traits["wrinkles"]):
        y = -0.62 + 0.07 * (i % 4)
        x = -0.45 if i < 4 else 0.35
        draw.line(box(x - 0.2 * (i >= 4), y, x + 0.35, y + rng.normal(0, 0.02)), fill=wrinkle, width=1)
    draw.polygon(
        [tuple(box(0, -0.2, 0, 0)[:2]), tuple(box(-0.1, 0.12, 0, 0)[:2]), tuple(box(0.1, 0.12, 0, 0)[:2])],
        fill=wrinkle,
    )  # nose
    draw.ellipse(box(-0.3, 0.33, 0.3, 0.48), fill=traits["lips"])

    if mask != Mask.NOT_WEAR:
        _draw_mask(draw, box, mask, style, fw, ears=(cx - fw * 1.1, cx + fw * 1.1, cy - 0.2 * fh), rng=rng)

    angle = float(rng.normal(0, 6))
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=tuple(int(c) for c in top))
    face = _face_box((cx, cy, fw, fh), angle, (w, h), (opts.width, opts.height))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.BoxBlur(1))

    # Lighting: brightness, contrast and a side light; then sensor noise at low resolution.
    pixels = np.asarray(img, dtype=np.float32)
    side_light = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None] * rng.normal(0, 18)
    pixels = (pixels - 128) * rng.uniform(0.75, 1.2) + 128 + rng.normal(0, 18) + side_light
    pixels += rng.normal(0, rng.uniform(2, 8), size=(h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img.resize((opts.width, opts.height), Image.Resampling.BILINEAR), face


def _face_box(
    ellipse: tuple[float, float, float, float], angle: float, drawn: tuple[int, int], size: tuple[int, int]
) -> Box:
    """The box of the face ellipse (centre, half axes) drawn on a `drawn` canvas, turned `angle`
    degrees counter-clockwise about the canvas centre as PIL's rotate does, in pixels of the photo."""
    cx, cy, a, b = ellipse
    t = math.radians(angle)
    dx, dy = cx - drawn[0] / 2, cy - drawn[1] / 2
    x = drawn[0] / 2 + dx * math.cos(t) + dy * math.sin(t)
    y = drawn[1] / 2 - dx * math.sin(t) + dy * math.cos(t)
    half_w = math.hypot(a * math.cos(t), b * math.sin(t))
    half_h = math.hypot(a * math.sin(t), b * math.cos(t))
    sx, sy = size[0] / drawn[0], size[1] / drawn[1]
    x0, y0 = max(0.0, (x - half_w) * sx), max(0.0, (y - half_h) * sy)
    x1, y1 = min(float(size[0]), (x + half_w) * sx), min(float(size[1]), (y + half_h) * sy)
    return round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)


def _draw_mask(
    draw: ImageDraw.ImageDraw,
    box: Callable[[float, float, float, float], list[float]],
    mask: Mask,
    style: int,
    face_width: float,
    ears: tuple[float, float, float],
    rng: np.random.Generator,
) -> None:
    """A mask worn, or worn incorrectly (under the nose or on the chin), with its ear loops to
    `ears` (left x, right x, y)."""
    colour, pattern = MASK_STYLES[style]
    if mask == Mask.WEAR:
        y0, y1 = -0.12, 0.85
    elif rng.random() < 0.5:  # under the nose: mouth covered, nose out
        y0, y1 = 0.2, 0.95
    else:  # on the chin
        y0, y1 = 0.55, 1.05
    outline = box(-0.95, y0, 0.95, y1)
    if pattern == "beak":
        draw.polygon(
            [
                (outline[0], outline[1] + 10),
                ((outline[0] + outline[2]) / 2, outline[1]),
                (outline[2], outline[1] + 10),
                (outline[2], outline[3] - 15),
                ((outline[0] + outline[2]) / 2, outline[3]),
                (outline[0], outline[3] - 15),
            ],
            fill=colour,
        )
    else:
        draw.rounded_rectangle(outline, radius=int(face_width * 0.15), fill=colour)
    shade = tuple(int(c * 0.75) for c in colour)
    if pattern in ("pleats", "stripes"):
        for k in range(1, 4):
            y = outline[1] + k * (outline[3] - outline[1]) / 4
            draw.line(
                [outline[0] + 4, y, outline[2] - 4, y], fill=shade, width=1 if pattern == "pleats" else 4
            )
    for side in (0, 2):  # ear loops
        draw.line(
            [outline[side], outline[1] + 6, ears[side // 2], ears[2]],
            fill=shade,
            width=2,
        )


def _encode(img: Image.Image, suffix: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if suffix == ".png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def _person_photos(
    person: Person, rng: np.random.Generator, opts: Options
) -> list[tuple[str, Mask, bytes, Box]]:
    """The seven photos of one person: (stem, true mask status, file bytes with suffix chosen, the
    true face box)."""
    traits = _face_traits(person, rng)
    photos = []
    for stem, mask in MASK_STEMS.items():
        style = int(stem[-1]) - 1 if mask == Mask.WEAR else int(rng.integers(len(MASK_STYLES)))
        img, face = _render(traits, mask, style, opts, rng)
        odd = rng.random() < ODD_EXTENSION
        suffix = (".png" if rng.random() < 0.5 else ".jpeg") if odd else ".jpg"
        photos.append((stem + suffix, mask, _encode(img, suffix, rng), face))
    return photos


def _train_job(args: tuple[int, int, Options, str]) -> dict:
    seed, index, opts, out = args
    rng = np.random.default_rng([seed, 0, index])
    person = draw_person(rng)
    pid = f"{index + 1:06d}" if rng.random() > 0.01 else f"{index + 1:06d}-1"  # ids are strings
    person = Person(id=pid, gender=person.gender, age=person.age)
    recorded = person
    if rng.random() < LABEL_NOISE:  # the annotator got it wrong, as in the real archive
        if rng.random() < 0.5:
            recorded = Person(pid, Gender(1 - person.gender), person.age)
        else:
            recorded = Person(pid, person.gender, int(np.clip(person.age + rng.choice([-8, 8]), 18, 60)))
    gender = recorded.gender.name.lower()
    folder = f"{pid}_{gender}_{recorded.race}_{recorded.age}"
    target = Path(out) / "train" / "images" / folder
    target.mkdir(parents=True, exist_ok=True)
    photos = _person_photos(person, rng, opts)
    boxes = []
    for name, _, data, face in photos:
        (target / name).write_bytes(data)
        boxes.append((f"train/images/{folder}/{name}", *face))
    if rng.random() < JUNK_SHARE:
        (target / f"._{photos[0][0]}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    row = {"id": pid, "gender": gender, "race": recorded.race, "age": str(recorded.age), "path": folder}
    return {**row, "boxes": boxes}


def _eval_job(args: tuple[int, int, Options, str]) -> list[tuple[str, int, Box]]:
    seed, index, opts, out = args
    rng = np.random.default_rng([seed, 1, index])
    person = draw_person(rng)
    rows = []
    for name, mask, data, face in _person_photos(person, rng, opts):
        digest = hashlib.sha1(f"{seed}/{index}/{name}".encode()).hexdigest()
        image_id = digest + Path(name).suffix
        (Path(out) / "eval" / "images" / image_id).write_bytes(data)
        band = age_band(person.age, AgeCutoffs())
        rows.append((image_id, int(encode(mask, person.gender, band)), face))
    return rows


def generate(
    out: str | Path,
    people: int = 2700,
    eval_people: int = 1800,
    seed: int = 0,
    size: tuple[int, int] = (384, 512),
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the stand-in data set to `out` atomically (built beside it, then renamed)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder or remove it")
    if people < 1 or eval_people < 0:
        raise UserError("--people must be at least 1 and --eval-people at least 0")
    opts = Options(width=size[0], height=size[1])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create it there ({err.strerror})") from None
    with building(out) as tmp:
        (tmp / "train" / "images").mkdir(parents=True)
        (tmp / "train" / "images" / ".ipynb_checkpoints").mkdir()
        if eval_people:
            (tmp / "eval" / "images").mkdir(parents=True)
        workers = workers or os.cpu_count() or 1
        shown = bar(total=people + eval_people, unit="person", desc="synth", enabled=progress, leave=True)
        with ProcessPoolExecutor(workers) as pool:
            train_rows = []
            for row in pool.map(_train_job, [(seed, i, opts, str(tmp)) for i in range(people)], chunksize=8):
                train_rows.append(row)
                shown.update()
            eval_rows = []
            for rows in pool.map(
                _eval_job, [(seed, i, opts, str(tmp)) for i in range(eval_people)], chunksize=8
            ):
                eval_rows.extend(rows)
                shown.update()
        shown.close()
        _write_csv(
            tmp / "train" / "train.csv",
            ["id", "gender", "race", "age", "path"],
            [[r[k] for k in ("id", "gender", "race", "age", "path")] for r in train_rows],
        )
        boxes = [[*box, 1.0, SOURCE] for r in train_rows for box in r["boxes"]]
        _write_csv(tmp / STANDIN_TABLES[0], list(COLUMNS), boxes)
        if eval_people:
            order = np.random.default_rng([seed, 2]).permutation(len(eval_rows))
            shuffled = [eval_rows[i] for i in order]
            _write_csv(tmp / "eval" / "info.csv", ["ImageID", "ans"], [[i, 0] for i, _, _ in shuffled])
            _write_csv(tmp / "eval" / "gt.csv", ["ImageID", "ans"], [[i, a] for i, a, _ in shuffled])
            boxes = [[f"eval/images/{i}", *box, 1.0, SOURCE] for i, _, box in shuffled]
            _write_csv(tmp / STANDIN_TABLES[1], list(COLUMNS), boxes)
    return out


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 384x512 (width x height), got {text!r}"
        ) from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return w, h


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.data.synth"),
        formatter_class=HelpFormatter,
        description="Write a synthetic stand-in for the mask-status competition data, in its exact "
        "layout, plus eval/gt.csv with the true eval classes.",
    )
    parser.add_argument("--out", help="data root to create (must not exist or be empty)")
    parser.add_argument("root", nargs="?", help=argparse.SUPPRESS)  # --out, as it was first given
    parser.add_argument("--people", type=int, default=2700, help="training people, 7 images each")
    parser.add_argument("--eval-people", type=int, default=1800, help="eval people, 7 images each")
    parser.add_argument("--seed", type=int, default=0, help="same seed and arguments give identical bytes")
    parser.add_argument("--size", type=_size, default="384x512", help="image WIDTHxHEIGHT")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    if not (args.out or args.root):
        raise UserError("give the data root to create: --out DIR")
    out = generate(args.out or args.root, args.people, args.eval_people, args.seed, args.size, args.workers)
    print(f"wrote {args.people} train and {args.eval_people} eval people to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
