"""The hostile-input sweep: every entry point, fed what a careless user or an operator in a hurry
gives it, ends with one `error:` line and exit 2: no traceback, nothing half-written, no password
in what it prints. Every case runs in-process (the fast lane); the parsers of user files are also
fuzzed with Hypothesis (generated YAML, configs, specs and boxes tables never raise anything but
a UserError)."""

from __future__ import annotations

import importlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpo import spec as specs
from maskcls.cli import run_main
from maskcls.config import field_paths

SECRET = "hunter2-secret"
BOMB = "".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x]\n",
        *(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
        "study: *i\n",
    ]
)


def call(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as end:
        run_main(main, argv)
    out, err = capsys.readouterr()
    return end.value.code, out, err


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, in 60 bytes: a decompression bomb as
    an image library first sees it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@dataclass
class World:
    """What the cases point at: a copy of the tiny stand-in, a spec, a folder for outputs."""

    tmp: Path
    root: Path  # a stand-in data root the case may damage
    spec: Path  # a valid spec on `root`
    storage: str

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    def spec_with(self, **changes) -> Path:
        values = yaml.safe_load(self.spec.read_text())
        values.update(changes)
        return self.write("changed.yaml", yaml.safe_dump(values))

    def fixed_with(self, **fixed) -> Path:
        values = yaml.safe_load(self.spec.read_text())
        values["fixed"].update(fixed)
        return self.write("fixed.yaml", yaml.safe_dump(values))


@pytest.fixture
def world(tiny_root, tmp_path):
    import shutil

    from helpers import write_spec

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    spec = write_spec(tmp_path, root)
    return World(tmp_path, root, spec, f"sqlite:///{tmp_path / 'study.db'}")


def face_table(world: World, rows: list[str]) -> Path:
    header = "path,x0,y0,x1,y1,score,source\n"
    return world.write("boxes.csv", header + "".join(r + "\n" for r in rows))


def first_photo(world: World) -> str:
    return str(
        next(iter(sorted((world.root / "train" / "images").glob("*/mask1.*")))).relative_to(world.root)
    )


def with_boxes(world: World, *rows: str) -> list[str]:
    """maskcls.train cropping faces with a boxes table of these rows; PHOTO stands for a real photo."""
    table = face_table(world, [row.replace("PHOTO", first_photo(world)) for row in rows])
    return train_argv(world, "data.crop=face", f"data.face_boxes={table}")


def train_argv(world: World, *sets: str) -> list[str]:
    argv = ["--data", str(world.root), "--out", str(world.tmp / "run")]
    for item in ("model.name=mobilenetv3_small_050", "data.image_size=[32,24]", "train.epochs=1", *sets):
        argv += ["--set", item]
    return argv


Case = tuple[str, str, Callable[[World], list[str]], str]  # id, module, argv, words the line holds

# fmt: off
CASES: list[Case] = [
    # YAML: alias bombs, bad bytes, keys given twice, a study name that is not one
    ("spec-alias-bomb", "hpo.run", lambda w: ["--study", str(w.write("bomb.yaml", BOMB))], "aliases"),
    ("config-alias-bomb", "maskcls.train", lambda w: [*train_argv(w), "--config", str(w.write("b.yaml", BOMB))], "aliases"),
    ("spec-not-utf8", "hpo.run", lambda w: ["--study", str(w.write("l.yaml", b"study: caf\xe9\n"))], "UTF-8"),
    ("spec-duplicate-key", "hpo.export_best", lambda w: ["--study", str(w.write("d.yaml", "study: a\nstudy: b\n"))], "twice"),
    ("spec-study-list", "hpo.run", lambda w: ["--study", str(w.spec_with(study=["a", "b"]))], "study must be a name"),
    ("spec-study-escapes", "hpo.dashboard", lambda w: ["--study", str(w.spec_with(study="../../x"))], "study must be a name"),
    ("spec-model-path", "hpo.run", lambda w: ["--study", str(w.fixed_with(**{"model.name": "/tmp/model.pt"}))], "not a timm model name"),
    ("spec-model-url", "hpo.export_best", lambda w: ["--study", str(w.fixed_with(**{"model.name": "hf-hub:timm/x"}))], "not a timm model name"),
    # config values that would fail late or silently
    ("eval-batch-0", "maskcls.train", lambda w: train_argv(w, "train.eval_batch_size=0"), "eval_batch_size"),
    ("clip-negative", "maskcls.train", lambda w: train_argv(w, "train.clip_grad=-1"), "clip_grad"),
    ("lr-infinite", "maskcls.train", lambda w: train_argv(w, "optim.lr=.inf"), "finite"),
    ("model-url", "maskcls.train", lambda w: train_argv(w, "model.name=https://x.org/m.pt"), "not a timm model name"),
    ("unknown-model", "maskcls.train", lambda w: train_argv(w, "model.name=resnet_nope"), "unknown timm model"),
    ("weights-model-path", "maskcls.weights", lambda w: ["fetch", "--model", "../x"], "unknown timm model"),
    # face boxes tables
    ("boxes-empty-path", "maskcls.train", lambda w: with_boxes(w, ",1,1,5,5,1,x"), "empty path"),
    ("boxes-disagree", "maskcls.train", lambda w: with_boxes(w, "PHOTO,1,1,5,5,1,x", "PHOTO,2,2,6,6,1,x"), "another box"),
    ("boxes-extra-field", "maskcls.train", lambda w: with_boxes(w, "PHOTO,1,1,5,5,1,x", "PHOTO,1,1,5,5,1,x,y"), "line 3 has 8"),
    ("boxes-infinite", "maskcls.train", lambda w: with_boxes(w, "PHOTO,1,1,inf,5,1,x"), "finite numbers"),
    ("boxes-outside", "maskcls.train", lambda w: with_boxes(w, "PHOTO,1,1,5000,5,1,x"), "outside their photo"),
    ("faces-resume-damaged", "maskcls.data.faces", lambda w: ["--data", str(w.root), "--out", str(damaged_detector_table(w))], "empty path"),
    # storages and trackers: one line, the password masked
    ("storage-bad-port", "hpo.run", lambda w: ["--study", str(w.spec), "--storage", f"postgresql+psycopg://u:{SECRET}@h:port/db"], "does not parse"),
    ("storage-garbage", "hpo.studies", lambda w: ["list", "--storage", f"not a url {SECRET}"], "does not parse"),
    ("proxy-storage-garbage", "hpo.proxy", lambda w: ["--study", str(w.spec), "--storage", f"not a url {SECRET}"], "does not parse"),
    ("proxy-for-sqlite", "hpo.proxy", lambda w: ["--study", str(w.spec), "--storage", w.storage], "SQLite needs none"),
    ("stop-terminator-one", "hpo.run", lambda w: ["--study", str(w.spec), "--stop", "terminator:1"], "--stop takes"),
    ("mlflow-mysql", "hpo.run", lambda w: ["--study", str(w.spec), "--storage", w.storage, "--mlflow", f"mysql://u:{SECRET}@127.0.0.1:1/x"], "cannot use MLflow"),
    ("mlflow-no-database", "hpo.run", lambda w: ["--study", str(w.spec), "--storage", w.storage, "--mlflow", f"postgresql://postgres:{SECRET}@127.0.0.1:5432/no_such_db"], "cannot use MLflow"),
    ("mlflow-unopenable", "hpo.run", lambda w: ["--study", str(w.spec), "--storage", w.storage, "--mlflow", f"sqlite:///{w.write('a-file', 'x')}/mlflow.db"], "cannot use MLflow"),
    ("mlflow-unreachable", "hpo.run", lambda w: ["--study", str(w.spec), "--storage", w.storage, "--mlflow", f"http://u:{SECRET}@127.0.0.1:9"], "cannot use MLflow"),
    # photos
    ("bomb-photo-run", "hpo.run", lambda w: bomb_in(w) and ["--study", str(w.spec), "--storage", w.storage], "not a decodable image"),
    ("bomb-photo-predict", "maskcls.predict", lambda w: [str(model_dir(w)), str(w.write("bomb.png", png_header(30000, 30000)))], "not a decodable image"),
    ("truncated-photo-predict", "maskcls.predict", lambda w: [str(model_dir(w)), str(w.write("cut.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 20))], "not a decodable image"),
    ("box-outside-predict", "maskcls.predict", lambda w: [str(model_dir(w)), str(w.root / first_photo(w)), "--face-boxes", str(face_table(w, ["PHOTO,1,1,5000,5,1,x".replace("PHOTO", first_photo(w))]))], "outside their photo"),
    ("text-as-photo-predict", "maskcls.predict", lambda w: [str(model_dir(w)), str(w.write("note.jpg", "not an image"))], "not a decodable image"),
    # outputs: --force replaces only a previous export
    ("export-force-study-folder", "hpo.export_best", lambda w: ["--study", str(w.spec), "--storage", finished_storage(w), "--out", str(w.tmp), "--force"], "not one"),
    ("export-force-data-root", "maskcls.export", lambda w: [str(model_dir(w)), "--out", str(w.root), "--force"], "not one"),
    ("synth-into-a-file", "maskcls.data.synth", lambda w: ["--out", str(w.write("a-file", "x")), "--people", "2"], ""),
]
# fmt: on


def damaged_detector_table(world: World) -> Path:
    """A detector output folder whose table (as if killed and then edited) has a row without a path."""
    folder = world.tmp / "faces"
    folder.mkdir()
    (folder / "face_boxes.csv").write_text("path,x0,y0,x1,y1,score,source\n,1,1,5,5,1,mtcnn\n")
    return folder


def bomb_in(world: World) -> bool:
    photo = next(iter(sorted((world.root / "train" / "images").glob("*/mask1.*"))))
    photo.unlink()
    (photo.parent / "mask1.png").write_bytes(png_header(30000, 30000))
    return True


def model_dir(world: World) -> Path:
    """A face-crop model directory (untrained: what it predicts does not matter here)."""
    from maskcls import models
    from maskcls.config import load
    from maskcls.rundir import write_model_dir

    cfg = load(
        None, {"model.name": "mobilenetv3_small_050", "data.image_size": [32, 24], "data.crop": "face"}
    )
    cfg = cfg.override({"data.root": str(world.root), "data.cache_dir": str(world.tmp / "cache")})
    return write_model_dir(world.tmp / "model", cfg, [models.build(cfg.model)])


def finished_storage(world: World) -> str:
    """The world's storage holding its study with one complete trial (made without training)."""
    import optuna

    from hpo.storage import open_storage

    spec = specs.load(str(world.spec))
    study = optuna.create_study(
        study_name=spec.name, storage=open_storage(world.storage), direction="maximize"
    )
    lr = optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)
    study.add_trial(
        optuna.trial.create_trial(
            value=0.5,
            params={"optim.lr": 0.003},
            distributions={"optim.lr": lr},
            user_attrs={"config": spec.base.to_dict()},
        )
    )
    return world.storage


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written_no_secret(case, world, capsys):
    name, module, argv_of, words = case
    argv = argv_of(world)
    before = listing(world.tmp)
    code, out, err = call(module, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in out + err and SECRET not in out + err
    assert len(lines[0]) < 600, "an error line quotes at most ~200 characters of input"
    after = listing(world.tmp)
    assert after == before, sorted(set(after) ^ set(before))


def test_the_sweep_covers_every_entry_point():
    from hpo.cli import COMMANDS

    modules = {module for _, (module, _) in COMMANDS.items()} | {"maskcls.export"}
    swept = {case[1] for case in CASES} | {"maskcls.data.check"}  # check: the test below
    assert modules <= swept, modules - swept


def test_the_data_check_reports_a_decompression_bomb_as_a_problem(world, capsys):
    """maskcls.data.check is a report: its problems go to stdout, one per line, exit 2."""
    bomb_in(world)
    code, out, err = call("maskcls.data.check", ["--data", str(world.root)], capsys)
    assert code == 2 and "error" not in err and "Traceback" not in out + err
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert (
        len(problems) == 1 and "mask1.png: not a decodable image" in problems[0] and "900000000 pixels" in out
    )


# Parsers of user files, fuzzed: whatever the bytes, a UserError (one line) or a parsed value.
LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
CONFIG_KEYS = field_paths()


def parsed_or_user_error(parse: Callable[[Path], object], text: str | bytes) -> None:
    import tempfile

    from maskcls.errors import UserError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        try:
            parse(path)
        except UserError as err:
            assert "\n" not in str(err).strip() and len(str(err)) < 2000, str(err)[:300]  # valid keys listed


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_any_bytes_as_a_train_config(text):
    from maskcls.config import load

    parsed_or_user_error(lambda path: load(path), text)


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS + ["data.nope", "nope"]), VALUES, max_size=6))
def test_any_values_as_a_train_config(values):
    from maskcls.config import load

    nested: dict = {}
    for key, value in values.items():
        group, _, name = key.partition(".")
        nested.setdefault(group, {})[name] = value
    parsed_or_user_error(lambda path: load(path), yaml.safe_dump(nested))


SPEC_KEYS = [*specs.SPEC_KEYS, "other"]  # every key a spec may hold, and one it may not


@FUZZ
@given(st.dictionaries(st.sampled_from(SPEC_KEYS), VALUES, max_size=5), st.sampled_from(CONFIG_KEYS))
@example({"space": {"\n\n    ": None}}, "optim.lr")  # found by Hypothesis: a key echoed unquoted
def test_any_values_as_a_study_spec(values, path):
    values.setdefault("space", {path: {"type": "categorical", "choices": [1, 2]}})
    parsed_or_user_error(lambda file: specs.load(str(file)), yaml.safe_dump(values))


CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10) | st.floats().map(str)


@FUZZ
@given(st.lists(st.lists(CELL, min_size=0, max_size=9), max_size=6), st.booleans())
def test_any_rows_as_a_face_boxes_table(rows, with_header):
    import csv
    import io

    from maskcls.data.faces import read_boxes

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if with_header:
        writer.writerow(["path", "x0", "y0", "x1", "y1", "score", "source"])
    writer.writerows(rows)
    parsed_or_user_error(lambda file: read_boxes([file], file.parent), buffer.getvalue())
