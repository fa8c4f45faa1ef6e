import hashlib
from pathlib import Path

import pandas as pd
import pytest

from maskcls.data.check import check
from maskcls.data.synth import generate, main
from maskcls.labels import NUM_CLASSES


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_300_people_pass_the_check_with_the_real_marginals(standin300):
    train = check(str(standin300), progress=False)
    people = train.groupby("person").first()
    assert len(people) == 300 and len(train) == 2100
    assert 0.55 <= (people["gender"] == 1).mean() <= 0.68  # real: 61.4% female
    assert people["age"].between(18, 60).all()
    assert 0.035 <= (people["age"] == 60).mean() <= 0.11  # real: 7.1% in the 60 band
    assert (people["age"] < 30).mean() > 0.3 and (people["age"].between(30, 59)).mean() > 0.3
    assert set(train["label"]) == set(range(NUM_CLASSES))


def test_real_archive_quirks_are_present(standin300):
    names = [p.name for p in (standin300 / "train" / "images").rglob("*")]
    assert any(n.startswith("._") for n in names)
    assert ".ipynb_checkpoints" in names
    assert any(n.endswith((".png", ".jpeg")) for n in names)


def test_eval_set_and_ground_truth(standin300):
    info = pd.read_csv(standin300 / "eval" / "info.csv")
    gt = pd.read_csv(standin300 / "eval" / "gt.csv")
    assert len(info) == 140 and (info["ans"] == 0).all()
    assert list(gt["ImageID"]) == list(info["ImageID"])
    assert gt["ans"].between(0, NUM_CLASSES - 1).all()
    assert info["ImageID"].str.fullmatch(r"[0-9a-f]{40}\.(jpg|jpeg|png)").all()


@pytest.mark.slow
def test_identical_bytes_for_same_seed_whatever_the_workers(tmp_path):
    args = dict(people=12, eval_people=3, size=(32, 40), progress=False)
    a = tree_digest(generate(tmp_path / "a", seed=7, workers=1, **args))
    b = tree_digest(generate(tmp_path / "b", seed=7, workers=2, **args))
    c = tree_digest(generate(tmp_path / "c", seed=8, workers=2, **args))
    assert a == b
    assert a != c


def test_refuses_a_non_empty_output_and_bad_sizes(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit) as exit_:
        from maskcls.cli import run_main

        run_main(main, [str(tmp_path / "full"), "--people", "2"])
    assert exit_.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "new"), "--size", "big"])
    assert exit_.value.code == 2 and not (tmp_path / "new").exists()
