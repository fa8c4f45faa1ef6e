"""Bad paths and busy ports: one `error:` line and exit code 2 from every command, no traceback."""

import socket
import subprocess
import sys

import pytest


def run(*args, timeout=120):
    """The command in a process of its own (a port taken, a real server)."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


@pytest.fixture
def here(capsys):
    """The command's main in this process (what it refuses needs no fresh interpreter): code, stderr."""
    import importlib

    from maskcls.cli import run_main

    def call(module, *argv):
        with pytest.raises(SystemExit) as end:
            run_main(importlib.import_module(module).main, list(argv))
        return end.value.code, capsys.readouterr().err

    return call


def test_train_refuses_an_output_that_is_a_file_before_training(small_root, tmp_path, here):
    target = tmp_path / "afile"
    target.write_text("keep")
    code, err = here("maskcls.train", "--data", str(small_root), "--out", str(target))
    assert code == 2 and f"--out {target} is a file" in err and "Traceback" not in err
    assert target.read_text() == "keep"


def test_synth_names_the_folder_it_cannot_create(tmp_path, here):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = here("maskcls.data.synth", "--out", str(blocker / "data"), "--people", "2")
    assert code == 2 and f"{blocker / 'data'}: cannot create it there" in err and "Traceback" not in err


def test_a_data_root_that_is_a_file_is_one_problem_line(tmp_path, capsys):
    from maskcls.cli import run_main
    from maskcls.data.check import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as end:
        run_main(main, ["--data", str(blocker)])
    out, err = capsys.readouterr()
    assert end.value.code == 2 and err == ""  # nothing to decode, no progress bar
    assert out.splitlines() == [
        f"problem: {blocker}: data root is a file, not a folder (pass the folder holding train/)",
        f"1 problem(s) found in {blocker}",
    ]


@pytest.mark.slow
def test_dashboard_on_a_busy_port_says_so(finished_study):
    tmp, spec, storage, _ = finished_study
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run(
            "hpo.dashboard",
            "--study",
            str(spec),
            "--storage",
            storage,
            "--artifacts",
            str(tmp / "artifacts"),
            "--port",
            str(port),
            timeout=60,
        )
    assert code == 2 and f"cannot serve on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_the_dashboard_and_export_refuse_a_missing_sqlite_file_and_create_nothing(tmp_path, here):
    spec = tmp_path / "s.yaml"
    spec.write_text("study: s\nspace: {optim.lr: {type: float, low: 0.001, high: 0.01}}\n")
    missing = tmp_path / "runs" / "nothing.db"
    for command in (["hpo.dashboard"], ["hpo.export_best", "--out", str(tmp_path / "x")]):
        code, err = here(*command, "--study", str(spec), "--storage", f"sqlite:///{missing}")
        assert code == 2 and err.strip().splitlines() == [
            f"error: no study database at {missing}: run the study first, or pass --storage"
        ], err
    assert not missing.exists() and not missing.parent.exists() and not (tmp_path / "x").exists()
