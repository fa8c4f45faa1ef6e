"""The GPU check, one run: real CUDA tests, the data path on the device, a packed study, an export.

Run through bench/gpu_check.sh (which installs carried wheels first). Each step is a real command
of the project; the figures go into one table, printed and written to $OUT/gpu_check.md (or --out).
With --device cpu --quick the same steps run small on the CPU, to prove the script itself works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpo.protocol import Attr
from maskcls.data.layout import scan, scan_eval

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    step: str
    ok: bool
    figure: str
    target: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: a real check on a GPU, or a quick proof on the CPU."""

    people: int
    eval_people: int
    photo: str  # WxH of the stand-in photos
    bench_model: str
    bench_sizes: tuple[str, ...]
    bench_trials: int
    bench_seconds: float
    study_model: str
    study_size: list[int]
    study_epochs: int
    study_batch: int


FULL = Plan(200, 30, "384x512", "resnet18", ("128x96", "224x224"), 3, 2.0, "resnet18", [128, 96], 3, 64)
QUICK = Plan(
    30, 10, "96x128", "resnet18", ("128x96", "224x224"), 1, 0.5, "mobilenetv3_small_050", [32, 24], 2, 16
)


def run(command: list[str], timeout: float, log: Path) -> tuple[int, str, float]:
    """Run a project command from the repository root; its output goes to `log` and is returned."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
    log.write_text(output)
    return code, output, time.perf_counter() - start


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def cuda_tests(work: Path, device: str) -> Row:
    code, out, s = run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
        300,
        work / "pytest.log",
    )
    summary = last_line(out)
    if device == "cuda":
        return Row("pytest -m cuda", code == 0 and "skipped" not in summary, summary, "all pass", s)
    return Row("pytest -m cuda", code == 0, summary, "skipped without a GPU", s)


def data_path(work: Path, device: str, plan: Plan, data: Path, size: str) -> Row:
    out_json = work / f"data_path_{size}.json"
    command = [sys.executable, "bench/data_path.py", "--data", str(data), "--device", device, "--size", size]
    command += [
        "--model",
        plan.bench_model,
        "--trials",
        str(plan.bench_trials),
        "--seconds",
        str(plan.bench_seconds),
    ]
    code, out, s = run(command + ["--json", str(out_json)], 300, work / f"data_path_{size}.log")
    if code != 0:
        return Row(f"data path {size}", False, last_line(out), seconds=s)
    f = json.loads(out_json.read_text())
    step = f["data_and_train_step"]
    figure = (
        f"data+step {step['b']:.0f} img/s = {f['fraction_of_preloaded']:.2f} of preloaded "
        f"({f['preloaded']:.0f} img/s); {step['b'] / step['a']:.1f}x PIL+DataLoader"
    )
    if device == "cuda":
        return Row(
            f"data path {size}, {plan.bench_model}, bf16",
            f["fraction_of_preloaded"] >= 0.95,
            figure,
            ">= 0.95",
            s,
        )
    return Row(f"data path {size}, {plan.bench_model}", True, figure, "runs (GPU target 0.95)", s)


def write_spec(work: Path, data: Path, plan: Plan) -> Path:
    spec = {
        "study": "gpu-check",
        "data": {"root": str(data)},
        "n_trials": 6,
        "fixed": {
            "model.name": plan.study_model,
            "data.image_size": plan.study_size,
            "data.cache_dir": str(work / "cache"),
            "train.epochs": plan.study_epochs,
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "space": {
            "optim.lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True},
            "train.batch_size": {"type": "categorical", "choices": [plan.study_batch, plan.study_batch * 2]},
        },
    }
    path = work / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study(work: Path, device: str, spec: Path, storage: str) -> Row:
    import optuna

    packing = ["--trials-per-gpu", "2"] if device == "cuda" else ["--workers", "2"]
    command = [sys.executable, "-m", "hpo.run", "--study", str(spec), "--storage", storage, "--no-progress"]
    code, out, s = run(command + packing + ["--artifacts", str(work / "artifacts")], 600, work / "study.log")
    if code != 0:
        return Row("study, 6 trials, 2 per GPU", False, last_line(out), seconds=s)
    trials = optuna.load_study(study_name="gpu-check", storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    workers = {t.user_attrs.get(Attr.WORKER) for t in complete}
    peaks = [t.user_attrs.get(Attr.PEAK_MEMORY_MB, 0) for t in complete]
    peak = max(peaks, default=0)
    figure = f"{len(complete)} complete, {len(failed)} failed, {len(workers)} workers; peak {peak:.0f} MiB"
    if device == "cuda":
        needs = [t.user_attrs.get(Attr.MEMORY_NEED_MB, 0) for t in complete]
        over = sum(p > n for p, n in zip(peaks, needs, strict=True))
        figure += f", estimate {min(needs, default=0):.0f}-{max(needs, default=0):.0f} MiB, {over} over it"
        ok = len(complete) == 6 and not failed and len(workers) == 2 and over == 0
        return Row("study, 6 trials, 2 per GPU", ok, figure, "0 failed, both slots, peak <= estimate", s)
    return Row("study, 6 trials, 2 CPU workers", len(complete) == 6 and not failed, figure, "0 failed", s)


def export(work: Path, device: str, spec: Path, storage: str) -> Row:
    out = work / "export"
    command = [sys.executable, "-m", "hpo.export-best", "--study", str(spec), "--storage", storage]
    command += ["--device", device, "--out", str(out), "--artifacts", str(work / "artifacts")]
    code, output, s = run(command, 600, work / "export.log")
    if code != 0:
        return Row(f"export-best on {device}", False, last_line(output), seconds=s)
    m = json.loads((out / "metrics.json").read_text())
    onnx = m["onnx"]
    figure = (
        f"ONNX max abs diff {onnx['max_abs_diff']:.1e}, argmax {onnx['argmax_agree']}/{onnx['images']}; "
        f"eval macro-F1 {m.get('eval_macro_f1', float('nan')):.3f}"
    )
    return Row(f"export-best on {device}", True, figure, "ONNX agrees", s)


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| step | result | figure | target | s |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.step} | {'ok' if r.ok else 'FAILED'} | {r.figure} | {r.target} | {r.seconds:.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def describe(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU proof of the script)")
    parser.add_argument("--out", help="write the table here too (default $OUT/gpu_check.md when $OUT is set)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = work / "data"
    synth = [sys.executable, "-m", "maskcls.data.synth", "--out", str(data), "--people", str(plan.people)]
    synth += ["--eval-people", str(plan.eval_people), "--size", plan.photo]
    code, out, s = run(synth, 300, work / "synth.log")
    made = f"{len(scan(data))} + {len(scan_eval(data))} photos" if code == 0 else last_line(out)
    rows = [
        Row(f"stand-in, {plan.people} + {plan.eval_people} people, {plan.photo}", code == 0, made, seconds=s)
    ]
    if code == 0:
        rows.append(cuda_tests(work, args.device))
        rows += [data_path(work, args.device, plan, data, size) for size in plan.bench_sizes]
        spec, storage = write_spec(work, data, plan), f"sqlite:///{work / 'study.db'}"
        rows.append(study(work, args.device, spec, storage))
        if rows[-1].ok:
            rows.append(export(work, args.device, spec, storage))
    header = (
        f"## GPU check on {describe(args.device)}{' (quick)' if args.quick else ''}: "
        f"{time.perf_counter() - started:.0f} s; logs in {work}"
    )
    text = table(rows, header)
    print(text)
    target = args.out or (os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "gpu_check.md"))
    if target:
        Path(target).write_text(text)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
