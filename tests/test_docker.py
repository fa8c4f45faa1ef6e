"""The compose file validates; no Docker engine runs here, so images are not built in tests."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import system_tool

DOCKER = Path(__file__).resolve().parent.parent / "docker"
ROOT = DOCKER.parent


@pytest.mark.slow
def test_compose_file_validates_with_docker_compose(tmp_path):
    resolved = resolved_compose(tmp_path)  # the v2 plugin is not packaged for Debian 12: compose v1
    assert {"postgres", "dashboard", "worker", "export"} <= set(resolved)
    for service in ("dashboard", "postgres"):
        port = resolved[service]["ports"][0]  # compose v1 prints a string, v2 a mapping
        assert (port["host_ip"] if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1"
    storage = resolved["worker"]["environment"]["HPO_STORAGE"]
    assert "***" not in storage and "change-me" in storage


def test_no_secret_is_committed_and_the_worker_image_runs_hpo_run():
    compose = (DOCKER / "compose.yaml").read_text()
    assert "POSTGRES_PASSWORD:?" in compose  # required from the env file, no default password
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "hpo.run"]' in dockerfile
    assert "docker/.env" in (DOCKER.parent / ".gitignore").read_text()


@pytest.mark.parametrize("service", ["worker", "dashboard"])
def test_services_take_the_storage_from_the_env_file(service):
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert "${POSTGRES_PASSWORD" in str(spec["services"][service]["environment"]["HPO_STORAGE"])


def resolved_compose(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text((DOCKER / "example.env").read_text())
    tool = system_tool("docker-compose", "docker-compose")
    done = subprocess.run(
        [tool, "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


@pytest.mark.slow
def test_one_worker_container_per_host_uses_every_gpu_and_the_docs_say_so(tmp_path):
    """Compose has no GPU scheduler: `--scale worker=N` with `count: 1` gave every replica the same
    GPU. One container per host reserves all GPUs and hpo.run spreads trials over them."""
    worker = resolved_compose(tmp_path)["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all" and "gpu" in device["capabilities"]
    assert "--gpus" not in worker["command"] and "--trials-per-gpu" in worker["command"]
    for doc in (ROOT / "README.md", ROOT / "docs" / "DISTRIBUTED.md", DOCKER / "compose.yaml"):
        text = doc.read_text()
        commands = re.findall(r"^[#\s]*(docker compose .*)$", text, flags=re.M)
        assert commands and not any("--scale" in c for c in commands), f"{doc} scales the worker service"
        assert "up -d worker" in text or "up -d --no-deps worker" in text, f"{doc} lacks the per-host command"


@pytest.mark.slow
def test_workers_stop_cleanly_and_restart_a_bounded_number_of_times(tmp_path):
    from hpo.run import STOP_GRACE_S

    services = resolved_compose(tmp_path)
    for name in ("worker", "cpu-worker"):
        service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"][name]
        assert re.fullmatch(r"on-failure:[1-9]", service["restart"]), service["restart"]
        assert int(service["stop_grace_period"].rstrip("s")) > STOP_GRACE_S
    export = services["export"]
    assert export["entrypoint"][-1] == "hpo.export-best"


def test_the_build_context_leaves_out_the_venv_and_the_image_runs_the_tested_torch():
    import torch

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "runs/", ".git/"} <= set(ignored)
    pinned = re.search(r"ARG TORCH=([\d.]+)", (DOCKER / "Dockerfile").read_text()).group(1)
    tested = torch.__version__.split("+")[0]
    assert pinned.split(".")[:2] == tested.split(".")[:2], (
        f"Dockerfile pins torch {pinned}, tests run {tested}"
    )


def stages(dockerfile: str) -> dict[str, str]:
    """The Dockerfile's stages by name: the text from each FROM ... AS name to the next FROM."""
    parts = re.split(r"(?m)^FROM ", dockerfile)[1:]
    return {re.match(r"\S+ AS (\w+)", part).group(1): part for part in parts}


def test_both_images_run_as_an_unprivileged_user_and_the_dashboard_image_has_no_torch():
    built = stages((DOCKER / "Dockerfile").read_text())
    assert list(built) == ["dashboard", "worker"]  # the worker last: the default target
    for name, text in built.items():
        users = re.findall(r"(?m)^USER (\S+)", text)
        assert users and users[-1] not in ("root", "0"), name
    assert "torch" not in built["dashboard"] and "optuna-dashboard" in built["dashboard"]
    assert (
        "facenet" not in (DOCKER / "Dockerfile").read_text()
    )  # its weights come from `weights fetch --detector`
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert compose["dashboard"]["build"]["target"] == "dashboard"
    assert "entrypoint" not in compose["dashboard"]  # the image's: docker/dashboard.py
    assert 'ENTRYPOINT ["python", "/opt/mask-hpo/dashboard.py"]' in built["dashboard"]


@pytest.mark.slow
def test_the_slim_images_dashboard_serves_a_study_with_the_url_only_in_its_environment(tmp_path):
    """docker/dashboard.py as the slim image runs it: optuna-dashboard answering HTTP for a real
    study, the URL nowhere in its arguments; without HPO_STORAGE one line and exit 2."""
    import json
    import os
    import socket
    import sys
    import time
    import urllib.request

    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="seen", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    env = {k: v for k, v in os.environ.items() if k not in ("HPO_STORAGE", "HPO_ARTIFACTS")}
    script = str(DOCKER / "dashboard.py")
    refused = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env |= {"HPO_STORAGE": url, "HPO_ARTIFACTS": str(tmp_path / "artifacts")}
    server = subprocess.Popen([sys.executable, script, "--port", str(port)], env=env, stderr=subprocess.PIPE)
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as reply:
                    body = json.load(reply)
            except OSError:
                time.sleep(0.2)
        assert body is not None, "the dashboard never answered"
        assert [s["study_name"] for s in body["study_summaries"]] == ["seen"]
        assert (tmp_path / "artifacts").is_dir()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert "sqlite" not in cmdline and "study.db" not in cmdline
    finally:
        server.terminate()
        server.wait(timeout=30)
