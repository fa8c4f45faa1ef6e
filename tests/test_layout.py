"""Each problem the check must report gives one clear line and exit code 2."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from maskcls.data.check import check, main
from maskcls.data.layout import scan, scan_eval
from maskcls.errors import DataError


@pytest.fixture
def root(tiny_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(tiny_root, copy)
    return copy


def first_person(root: Path) -> Path:
    return sorted(p for p in (root / "train" / "images").iterdir() if not p.name.startswith("."))[0]


def rewrite_train_csv(root: Path, edit) -> None:
    path = root / "train" / "train.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(table).to_csv(path, index=False)


def rename_person(root: Path, new_name: str, **row) -> None:
    folder = first_person(root)
    old = folder.name
    folder.rename(folder.with_name(new_name))

    def edit(table):
        i = table.index[table["path"] == old][0]
        table.loc[i, "path"] = new_name
        for key, value in row.items():
            table.loc[i, key] = value
        return table

    rewrite_train_csv(root, edit)


def run_check(root, capsys) -> tuple[int, str]:
    code = main([str(root)])
    return code, capsys.readouterr().out


def test_clean_tiny_set_passes(root, capsys):
    code, out = run_check(root, capsys)
    assert code == 0, out
    assert "people: 6" in out and "images: 42" in out and "no problems found" in out


def test_scan_table(root):
    train = scan(root)
    assert len(train) == 42 and train["person"].nunique() == 6
    assert {"path", "person", "gender", "race", "age", "mask", "label"} <= set(train.columns)
    assert all(Path(p).is_absolute() and Path(p).exists() for p in train["path"])
    assert train["person"].map(type).eq(str).all()
    assert (train.groupby("person")["stem"].nunique() == 7).all()


def test_stems_match_any_extension_and_dot_files_are_skipped(root):
    folder = first_person(root)
    (folder / "normal.jpg").rename(folder / "normal.png")
    (folder / "mask2.jpg").rename(folder / "mask2.jpeg")
    (folder / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07")
    (folder / ".ipynb_checkpoints").mkdir()
    (root / "train" / "images" / ".ipynb_checkpoints").mkdir(exist_ok=True)
    (root / "train" / "images" / "._junk").write_bytes(b"x")
    train = check(str(root), progress=False)
    rows = train[train["path"].str.startswith(str(folder))]
    assert sorted(Path(p).name for p in rows["path"])[-2:] == ["mask5.jpg", "normal.png"]
    assert len(train) == 42


def test_ids_with_suffix_stay_strings(root):
    folder = first_person(root)
    gender, race, age = folder.name.split("_")[1:]
    rename_person(root, f"001498-1_{gender}_{race}_{age}", id="001498-1")
    assert "001498-1" in set(scan(root)["person"])


def test_eval_rows_in_info_csv_order(root):
    evals = scan_eval(root)
    info = pd.read_csv(root / "eval" / "info.csv")
    assert list(evals["ImageID"]) == list(info["ImageID"]) and len(evals) == 14


def test_corrections_change_the_table_not_the_files(root, tmp_path):
    train = scan(root)
    person = train["person"].iloc[0]
    gender = 1 - int(train["gender"].iloc[0])
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(
        f"id,field,value\n{person},gender,{['male', 'female'][gender]}\n"
        f"{person},incorrect_mask,not_wear\n{person},normal,incorrect\n{person},age,60\n"
    )
    before = sorted(p.name for p in first_person(root).iterdir())
    fixed = scan(root, corrections=fixes)
    rows = fixed[fixed["person"] == person].set_index("stem")
    assert (rows["gender"] == gender).all() and (rows["age"] == 60).all() and (rows["age_band"] == 2).all()
    assert rows.loc["incorrect_mask", "mask"] == 2 and rows.loc["normal", "mask"] == 1
    assert rows.loc["normal", "label"] == 1 * 6 + gender * 3 + 2
    assert sorted(p.name for p in first_person(root).iterdir()) == before
    bad = tmp_path / "bad.csv"
    bad.write_text(f"id,field,value\nnobody,gender,male\n{person},height,3\n{person},gender,robot\n")
    with pytest.raises(DataError) as err:
        scan(root, corrections=bad)
    assert len(err.value.problems) == 3
    assert "unknown person id 'nobody'" in str(err.value)
    assert "unknown field 'height'" in str(err.value) and "invalid value 'robot'" in str(err.value)


def _missing_root(root):
    shutil.rmtree(root)


def _missing_train(root):
    shutil.rmtree(root / "train")


def _missing_images(root):
    shutil.rmtree(root / "train" / "images")


def _missing_csv(root):
    (root / "train" / "train.csv").unlink()


def _unparsable_folder(root):
    rename_person(root, "000001_female_Asian")


def _unknown_gender(root):
    rename_person(root, "000001_robot_Asian_30", id="000001", gender="robot", race="Asian", age="30")


def _bad_age(root):
    rename_person(root, "000001_male_Asian_old", id="000001", gender="male", race="Asian", age="old")


def _missing_image(root):
    (first_person(root) / "mask3.jpg").unlink()


def _duplicated_image(root):
    shutil.copy(first_person(root) / "mask3.jpg", first_person(root) / "mask3.png")


def _truncated_jpeg(root):
    path = first_person(root) / "mask1.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _row_without_folder(root):
    shutil.rmtree(first_person(root))


def _folder_without_row(root):
    rewrite_train_csv(root, lambda t: t.drop(index=0))


def _eval_row_without_file(root):
    next((root / "eval" / "images").iterdir()).unlink()


PROBLEMS = {
    _missing_root: "data root does not exist",
    _missing_train: "train: missing",
    _missing_images: "images: missing",
    _missing_csv: "train.csv: missing",
    _unparsable_folder: "folder name does not parse",
    _unknown_gender: "unknown gender 'robot'",
    _bad_age: "age 'old' is not a whole number",
    _missing_image: "missing image 'mask3'",
    _duplicated_image: "image 'mask3' appears 2 times",
    _truncated_jpeg: "not a decodable image",
    _row_without_folder: ": no folder",
    _folder_without_row: "folder has no row in train.csv",
    _eval_row_without_file: "listed in info.csv but missing",
}


@pytest.mark.parametrize("breakage", PROBLEMS, ids=lambda f: f.__name__.strip("_"))
def test_each_problem_gives_its_line_and_exit_2(root, capsys, breakage):
    breakage(root)
    code, out = run_check(root, capsys)
    assert code == 2
    problem_lines = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert problem_lines, out
    assert any(PROBLEMS[breakage] in line for line in problem_lines), out
    assert "Traceback" not in out


def test_problems_are_a_typed_exception_from_python(root):
    _missing_image(root)
    _truncated_jpeg(root)
    with pytest.raises(DataError) as err:
        check(str(root), progress=False)
    assert len(err.value.problems) == 2
    with pytest.raises(DataError, match="missing image 'mask3'"):
        scan(root)


@pytest.mark.slow
def test_cli_exit_code_from_a_fresh_process(root):
    import subprocess
    import sys

    _missing_csv(root)
    proc = subprocess.run(
        [sys.executable, "-m", "maskcls.data.check", "--data", str(root)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "train.csv: missing" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
