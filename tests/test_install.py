"""Installed like a package, used from anywhere: the wheel, installed into a fresh virtual
environment whose dependencies come from this one (nothing downloaded), runs a demo trial, an
export and the dashboard from an empty folder outside the checkout, which it cannot import."""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel in a venv of its own; its site sees this venv's packages as plain paths, so their
    .pth hooks, this checkout's editable install among them, do not run there."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp / "dist",
            ROOT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("mask_hpo-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            text=True,
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # This venv's pip, run by the new interpreter: the console script's first line names that one.
    install = [venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return venv, wheel


def in_empty_folder(venv, tmp_path, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPO_STORAGE", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [venv / "bin" / "mask-hpo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )


def test_the_wheel_carries_the_specs_and_not_the_checkout(installed):
    venv, wheel = installed
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert {"hpo/specs/demo.yaml", "hpo/specs/mask.yaml"} <= set(names)
    probe = "import hpo, maskcls; print(hpo.__file__); print(maskcls.__file__)"
    where = subprocess.run([venv / "bin" / "python", "-c", probe], capture_output=True, text=True, cwd="/")
    assert where.returncode == 0 and str(ROOT) not in where.stdout and str(venv) in where.stdout, where


def test_from_an_empty_folder_a_demo_trial_an_export_and_the_dashboard_run(installed, small_root, tmp_path):
    venv, _ = installed
    code = in_empty_folder(
        venv,
        tmp_path,
        "run",
        "--study",
        "demo",
        "--data",
        str(small_root),
        "--n-trials",
        "1",
        "--no-progress",
    )
    assert code.returncode == 0, code.stderr
    assert "study demo: 1/1 finished" in code.stdout and (tmp_path / "runs" / "demo" / "study.db").is_file()
    exported = in_empty_folder(venv, tmp_path, "export", "--study", "demo", "--data", str(small_root))
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "runs" / "demo" / "export" / "config.json").read_text())["members"] == 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(
        [venv / "bin" / "mask-hpo", "dashboard", "--study", "demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answer = None
        for _ in range(100):
            try:
                answer = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2))
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.3)
        assert answer and [s["study_name"] for s in answer["study_summaries"]] == ["demo"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_setup_venv_has_no_broken_requirements():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
