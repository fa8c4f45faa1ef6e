"""The GPU check in one call: every step has its own time budget (480 s in all on one GPU), writes
its log and a row of the result table under --out as it goes, and the last line sums it up.

    bash bench/gpu_check.sh [--out DIR]                        # on a CUDA machine
    bash bench/gpu_check.sh --device cpu --quick --out DIR     # every step's code path on the CPU

Steps (each a project command in its own process group, killed at its budget; the others still run):
  setup    every package the steps import is there (one line naming any that is not); the stand-in
  cuda     the real-CUDA tests, tests/test_cuda_real.py only
  step     fit's training step fed by our data path / the same step on a preloaded batch
  packing  the same trials (queued recipes, fixed seeds) at 1, 2 and 4 trials per GPU: trials per
           hour, and each trial's peak GPU memory against the estimate it was placed with
  faq      the same trials the way Optuna's FAQ runs PyTorch (bench/optuna_faq.py): ours / FAQ
  resume   kill -9 a worker mid-trial: the retry resumes from its checkpoint and ends at the value
           the trial had uninterrupted in `packing` (exactly on the CPU; within 0.02 under bf16 on
           a GPU, where cuDNN picks kernels by timing)
  export   export-best of a trial trained on the device, its ONNX check, and predict from the export
On the CPU (--quick) the sizes are small and the figures are CPU figures, said so in the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the steps import beyond the standard library; bench/gpu-wheels.txt brings what a GPU image lacks.
NEEDED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "optuna": "optuna",
    "sqlalchemy": "sqlalchemy",
    "alembic": "alembic",
    "colorlog": "colorlog",
    "albumentations": "albumentations",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "safetensors": "safetensors",
    "pandas": "pandas",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "filelock": "filelock",
    "tqdm": "tqdm",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "pytest": "pytest",
}
PACKINGS = (1, 2, 4)
PACKING_SHARES = (0.28, 0.32, 0.40)  # of the packing step's budget: more workers take longer to start


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run: the check on a GPU, or its quick proof on the CPU."""

    people: int
    eval_people: int
    photo: str  # WxH of the stand-in's photos
    model: str
    image_size: tuple[int, int]  # H, W the trials train at
    batch: int
    epochs: int
    trials: int
    budgets: dict[str, float] = field(default_factory=dict)  # step -> seconds


GPU = Plan(
    300, 50, "384x512", "resnet34", (256, 192), 64, 3, 8,
    {"setup": 45, "cuda": 70, "step": 40, "packing": 150, "faq": 60, "resume": 60, "export": 50},
)  # fmt: skip
QUICK = Plan(
    24, 6, "96x128", "mobilenetv3_small_050", (32, 24), 16, 2, 3,
    # caps, not targets: a CPU proof takes ~170 s, but a cold page cache can double a process start
    {"setup": 20, "cuda": 40, "step": 40, "packing": 180, "faq": 50, "resume": 70, "export": 80},
)  # fmt: skip


@dataclass
class Row:
    step: str
    ok: bool | None  # None: ran out of its budget
    figure: str
    target: str = ""
    seconds: float = 0.0


class Check:
    """The run: its plan, device and folders, the table so far, and the figures for the last line."""

    def __init__(self, plan: Plan, device: str, out: Path):
        import tempfile

        self.plan, self.device, self.out = plan, device, out
        # Data, caches, studies and exports stay out of --out, which holds the table and the step logs
        # only (a device call brings back 8 files).
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.rows: list[Row] = []
        self.figures: dict[str, str] = {}
        self.started = time.perf_counter()

    def run(self, step: str, command: list[str], budget: float, env: dict | None = None) -> tuple[int, str]:
        """A command in its own process group, its output appended to <step>.log as it comes;
        killed with its group once the budget is spent (exit code 124)."""
        log = self.out / f"{step}.log"
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            proc = subprocess.Popen(
                command,
                cwd=self.work,  # what the commands write under runs/ stays in the work folder
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=max(1.0, budget))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                handle.write(f"\n(killed: its budget of {budget:.0f} s ran out)\n")
                code = 124
        return code, log.read_text(errors="replace")

    def add(self, row: Row) -> None:
        """A row, and the table so far written at once: a call cut off still returns it."""
        self.rows.append(row)
        (self.out / "gpu_check.md").write_text(self.table())

    def table(self) -> str:
        lines = [
            f"## GPU check on {describe(self.device)}"
            + (" (quick, CPU figures)" if self.device == "cpu" else ""),
            "",
            "| step | result | figure | target | s |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            result = {True: "ok", False: "FAILED", None: "OUT OF TIME"}[r.ok]
            lines.append(f"| {r.step} | {result} | {r.figure} | {r.target} | {r.seconds:.0f} |")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        passed = sum(r.ok is True for r in self.rows)
        f = self.figures
        return (
            f"gpu check: {passed}/{len(self.rows)} steps pass; data+train/preloaded {f.get('step', '-')}; "
            f"trials/h 1/2/4 per GPU {f.get('packing', '-/-/-')}; ours/FAQ {f.get('faq', '-')}; "
            f"peak/estimate {f.get('peak', '-')}"
        )


def describe(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({len(os.sched_getaffinity(0))} cores), torch {torch.__version__}"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def timed(check: Check, step: str, body: Callable[[float], Row]) -> None:
    """Run one step's body within its budget; a step that raised is a failed row, not a stop."""
    budget = check.plan.budgets[step]
    start = time.perf_counter()
    try:
        row = body(budget)
    except Exception as err:  # a step's own bug must not cost the steps after it
        row = Row(step, False, f"{type(err).__name__}: {str(err)[:150]}")
    row.seconds = time.perf_counter() - start
    check.add(row)


def missing_packages() -> list[str]:
    return [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]


def setup(check: Check, budget: float) -> Row:
    plan = check.plan
    data = check.work / "data"
    command = [sys.executable, "-m", "maskcls.data.synth", "--out", str(data), "--people", str(plan.people)]
    command += ["--eval-people", str(plan.eval_people), "--size", plan.photo, "--seed", "3"]
    code, log = check.run("setup", command, budget)
    if code != 0:
        return Row("setup: stand-in", None if code == 124 else False, last_line(log))
    photos = sum(1 for _ in (data / "train" / "images").rglob("mask1.*")) * 7
    return Row(
        f"setup: stand-in, {plan.people} + {plan.eval_people} people, {plan.photo}", True, f"{photos} photos"
    )


def cuda_tests(check: Check, budget: float) -> Row:
    tests = str(ROOT / "tests" / "test_cuda_real.py")
    # In one process, without pyproject's `-n 2`: pytest-xdist is not on the GPU image.
    command = [sys.executable, "-m", "pytest", tests, "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    command += ["-o", "addopts="]
    code, log = check.run("cuda", command, budget)
    summary = last_line(log)
    if code == 124:
        return Row("real-CUDA tests", None, summary)
    if check.device == "cuda":
        return Row("real-CUDA tests", code == 0 and "skipped" not in summary, summary, "all pass")
    return Row("real-CUDA tests", code == 0 and "skipped" in summary, summary, "skipped without a GPU")


def fit_step(check: Check, budget: float) -> Row:
    plan = check.plan
    out = check.work / "fit_step.json"
    h, w = plan.image_size
    command = [
        sys.executable,
        str(ROOT / "bench" / "fit_step.py"),
        "--data",
        str(check.work / "data"),
        "--device",
        check.device,
    ]
    command += ["--size", f"{h}x{w}", "--model", plan.model, "--batch-size", str(plan.batch)]
    command += [
        "--cache-dir",
        str(check.work / "cache"),
        "--json",
        str(out),
        "--epochs",
        "1" if check.device == "cpu" else "2",
    ]
    code, log = check.run("step", command, budget)
    if code != 0:
        return Row("fit step: data path / preloaded", None if code == 124 else False, last_line(log))
    f = json.loads(out.read_text())
    check.figures["step"] = f"{f['ratio']:.2f}"
    figure = f"ours {f['ours']:.0f} img/s, preloaded {f['preloaded']:.0f} img/s: {f['ratio']:.3f}"
    if check.device == "cuda":
        return Row("fit step: data path / preloaded", f["ratio"] >= 0.95, figure, ">= 0.95")
    return Row("fit step: data path / preloaded", True, figure, "runs (GPU goal 0.95)")


def write_spec(check: Check, name: str = "gpu-check", recipes: int | None = None) -> Path:
    """The trials every comparison runs: queued recipes, so each run gets the same ones in order
    (the first `recipes` of them)."""
    import yaml

    plan = check.plan
    lrs = [round(1e-3 * 1.5**i, 6) for i in range(plan.trials)][:recipes]
    spec = {
        "study": "gpu-check",
        "data": {"root": str(check.work / "data")},
        "n_trials": len(lrs),
        "fixed": {
            "model.name": plan.model,
            "data.image_size": list(plan.image_size),
            "data.cache_dir": str(check.work / "cache"),
            "train.epochs": plan.epochs,
            "train.batch_size": plan.batch,
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "enqueue": [{"optim.lr": lr} for lr in lrs],
        "heartbeat": {"interval": 2, "grace": 8, "max_retry": 2},
    }
    path = check.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def hpo_run(check: Check, step: str, spec: Path, storage: str, per_gpu: int, budget: float, *extra: str):
    packing = ["--trials-per-gpu", str(per_gpu)] if check.device == "cuda" else ["--workers", str(per_gpu)]
    command = [sys.executable, "-m", "hpo.run", "--study", str(spec), "--storage", storage, "--no-progress"]
    command += [*packing, "--artifacts", str(check.work / f"artifacts-{step}"), *extra]
    start = time.perf_counter()
    code, log = check.run(step, command, budget)
    return code, log, time.perf_counter() - start


def trials_of(storage: str):
    import optuna

    return optuna.load_study(study_name="gpu-check", storage=storage).trials


def packing(check: Check, budget: float, spec: Path) -> Row:
    import optuna

    rates, peaks, problems = [], [], []
    for per_gpu, share in zip(PACKINGS, PACKING_SHARES, strict=True):
        storage = f"sqlite:///{check.work / f'packing-{per_gpu}.db'}"
        code, log, wall = hpo_run(check, "packing", spec, storage, per_gpu, budget * share)
        if code != 0:
            problems.append(f"{per_gpu}/GPU: {'out of time' if code == 124 else last_line(log)}")
            rates.append(float("nan"))
            continue
        done = [t for t in trials_of(storage) if t.state == optuna.trial.TrialState.COMPLETE]
        rates.append(len(done) / wall * 3600)
        for t in done:
            need, peak = t.user_attrs.get("memory_need_mb"), t.user_attrs.get("peak_memory_mb")
            if need:
                peaks.append(peak / need)
    check.figures["packing"] = "/".join(f"{r:.0f}" for r in rates)
    check.figures["rates"] = json.dumps(rates)
    unit = "GPU" if check.device == "cuda" else "CPU worker"
    figure = f"trials/h at {'/'.join(map(str, PACKINGS))} per {unit}: "
    figure += check.figures["packing"]
    if peaks:
        check.figures["peak"] = f"{max(peaks):.2f}"
        figure += f"; peak/estimate {min(peaks):.2f}-{max(peaks):.2f}"
    if problems:
        return Row(
            "packing 1/2/4", None if "out of time" in " ".join(problems) else False, "; ".join(problems)
        )
    within = check.device != "cuda" or all(p <= 1.0 for p in peaks)
    return Row("packing 1/2/4", within, figure, "peak <= estimate" if check.device == "cuda" else "runs")


def faq(check: Check, budget: float, spec: Path) -> Row:
    out = check.work / "faq.json"
    storage = f"sqlite:///{check.work / 'faq.db'}"
    command = [
        sys.executable,
        str(ROOT / "bench" / "optuna_faq.py"),
        "--spec",
        str(spec),
        "--storage",
        storage,
    ]
    command += ["--device", check.device, "--json", str(out)]
    code, log = check.run("faq", command, budget)
    if code != 0:
        return Row("Optuna FAQ way, same trials", None if code == 124 else False, last_line(log))
    theirs = json.loads(out.read_text())["trials_per_h"]
    ours = max((r for r in json.loads(check.figures.get("rates", "[]")) if r == r), default=float("nan"))
    check.figures["faq"] = f"{ours / theirs:.1f}"
    figure = f"FAQ {theirs:.0f} trials/h, ours (best packing) {ours:.0f}: {ours / theirs:.2f}x"
    goal = ours / theirs >= 3 if check.device == "cuda" else True
    return Row(
        "Optuna FAQ way, same trials",
        goal,
        figure,
        ">= 3x" if check.device == "cuda" else "runs (GPU goal 3x)",
    )


def resume(check: Check, budget: float) -> Row:
    """One trial (the first recipe), its worker killed with SIGKILL after its first epoch; the
    dispatcher starts a new worker, whose retry resumes from the checkpoint. Its value and every
    epoch's against trial 0 of packing 1, the same recipe uninterrupted."""
    import optuna

    spec = write_spec(check, "resume", recipes=1)
    storage = f"sqlite:///{check.work / 'resume.db'}"
    start = time.perf_counter()
    packing = ["--trials-per-gpu", "1"] if check.device == "cuda" else ["--workers", "1"]
    command = [sys.executable, "-m", "hpo.run", "--study", str(spec), "--storage", storage, "--no-progress"]
    command += [*packing, "--artifacts", str(check.work / "artifacts-resume")]
    log = check.out / "resume.log"
    with open(log, "a") as handle:
        proc = subprocess.Popen(
            command, cwd=check.work, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        victim = wait_for_epoch(storage, 1, budget / 2, proc)
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
        try:
            code = proc.wait(timeout=max(1.0, budget - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Row("resume after kill -9", None, "out of time")
    if victim is None or code != 0:
        return Row(
            "resume after kill -9", False, f"no worker to kill or exit {code}: {last_line(log.read_text())}"
        )
    trials = trials_of(storage)
    retry = next((t for t in trials if t.user_attrs.get("retried_from") is not None), None)
    reference = next(
        iter(t for t in trials_of(f"sqlite:///{check.work / 'packing-1.db'}") if t.number == 0), None
    )
    if retry is None or retry.state != optuna.trial.TrialState.COMPLETE or reference is None:
        return Row("resume after kill -9", False, "no completed retry, or no reference trial")
    tolerance = 0.02 if check.device == "cuda" else 0.0
    gaps = [abs(retry.intermediate_values[e] - v) for e, v in reference.intermediate_values.items()]
    at = retry.user_attrs.get("resumed_at_epoch")
    leftovers = list((check.work / "checkpoints" / "gpu-check").glob("trial-*.pt"))
    figure = f"resumed at epoch {at}: {retry.value:.4f} vs {reference.value:.4f} uninterrupted"
    figure += f", every epoch within {max(gaps):.4f}" + (
        f"; {len(leftovers)} checkpoint(s) left" if leftovers else ""
    )
    ok = at is not None and at >= 1 and max(gaps) <= tolerance and not leftovers
    return Row("resume after kill -9", ok, figure, f"|difference| <= {tolerance}, no checkpoint left")


def wait_for_epoch(storage: str, epoch: int, seconds: float, proc: subprocess.Popen) -> int | None:
    """The pid of the worker whose trial has reported `epoch`, once it has (None: not in time)."""
    import optuna

    end = time.time() + seconds
    while time.time() < end and proc.poll() is None:
        try:
            running = [t for t in trials_of(storage) if t.state == optuna.trial.TrialState.RUNNING]
        except (KeyError, Exception):  # the study is being created
            running = []
        for trial in running:
            if len(trial.intermediate_values) >= epoch and "worker" in trial.user_attrs:
                return int(trial.user_attrs["worker"].rsplit(":", 1)[1])
        time.sleep(0.05)
    return None


def export(check: Check, budget: float, spec: Path) -> Row:
    out = check.work / "export"
    storage = f"sqlite:///{check.work / 'packing-1.db'}"
    command = [sys.executable, "-m", "hpo.export-best", "--study", str(spec), "--storage", storage]
    command += [
        "--device",
        check.device,
        "--out",
        str(out),
        "--artifacts",
        str(check.work / "artifacts-packing"),
    ]
    start = time.perf_counter()
    code, log = check.run("export", command, budget * 0.7)
    if code != 0:
        return Row(f"export-best on {check.device}, predict", None if code == 124 else False, last_line(log))
    predicted = check.work / "predict"
    command = [sys.executable, "-m", "maskcls.predict", str(out), "--data", str(check.work / "data")]
    command += ["--device", check.device, "--out", str(predicted)]
    code, log = check.run("export", command, budget - (time.perf_counter() - start))
    m = json.loads((out / "metrics.json").read_text())
    onnx = m["onnx"]
    same = code == 0 and (predicted / "submission.csv").read_text() == (out / "submission.csv").read_text()
    figure = (
        f"ONNX max abs diff {onnx['max_abs_diff']:.1e}, argmax {onnx['argmax_agree']}/{onnx['images']}; "
        f"predict {'= export' if same else 'DIFFERS'}; "
        f"eval macro-F1 {m.get('eval_macro_f1', float('nan')):.3f}"
    )
    agree = onnx["argmax_agree"] == onnx["images"] and same
    return Row(f"export-best on {check.device}, predict", agree, figure, "ONNX and predict agree")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU proof of the script)")
    parser.add_argument(
        "--out", help="folder for the table and each step's log (default $OUT, else runs/gpu-check)"
    )
    args = parser.parse_args()
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu-check").resolve()
    missing = missing_packages()
    if missing:
        print(
            f"error: missing package(s): {', '.join(missing)} "
            "(bash ../shared/tools/gpu-wheels.sh fetches them)",
            file=sys.stderr,
        )
        return 2
    plan = QUICK if args.quick else GPU
    out.mkdir(parents=True, exist_ok=True)
    assert args.quick or sum(plan.budgets.values()) <= 480  # a device call may take 600 s
    check = Check(plan, args.device, out)
    timed(check, "setup", lambda budget: setup(check, budget))
    if check.rows[-1].ok:
        spec = write_spec(check)
        timed(check, "cuda", lambda budget: cuda_tests(check, budget))
        timed(check, "step", lambda budget: fit_step(check, budget))
        timed(check, "packing", lambda budget: packing(check, budget, spec))
        timed(check, "faq", lambda budget: faq(check, budget, spec))
        timed(check, "resume", lambda budget: resume(check, budget))
        timed(check, "export", lambda budget: export(check, budget, spec))
    text = check.table() + "\n" + check.summary() + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text, end="")
    return 0 if all(r.ok for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
