"""The compose file validates; no Docker engine runs here, so images are not built in tests."""

import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import debian_tool

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_compose_file_validates_with_docker_compose(tmp_path):
    tool = debian_tool("docker-compose", "docker-compose")  # the v2 plugin is not packaged for Debian 12
    env_file = tmp_path / ".env"
    env_file.write_text((DOCKER / "example.env").read_text())
    done = subprocess.run(
        [tool, "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert {"postgres", "dashboard", "worker"} <= set(resolved["services"])
    for service in ("dashboard", "postgres"):
        port = resolved["services"][service]["ports"][0]  # compose v1 prints a string, v2 a mapping
        assert (port["host_ip"] if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1"
    assert (
        "***" not in done.stdout
        and "change-me" in resolved["services"]["worker"]["environment"]["HPO_STORAGE"]
    )


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
