"""Bad paths and busy ports: one `error:` line and exit code 2 from every command, no traceback."""

import socket
import subprocess
import sys

import pytest


def run(*args, timeout=120):
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def test_train_refuses_an_output_that_is_a_file_before_training(small_root, tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep")
    code, err = run("maskcls.train", "--data", str(small_root), "--out", str(target))
    assert code == 2 and f"--out {target} is a file" in err and "Traceback" not in err
    assert target.read_text() == "keep"


def test_synth_names_the_folder_it_cannot_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run("maskcls.data.synth", str(blocker / "data"), "--people", "2")
    assert code == 2 and f"{blocker / 'data'}: cannot create it there" in err and "Traceback" not in err


def test_a_file_system_error_on_a_user_path_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run("maskcls.data.check", str(blocker))
    assert code == 2 and "Traceback" not in err


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
