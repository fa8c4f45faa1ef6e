"""optuna-dashboard in a real headless Chromium: the finished study and its trials render."""

import subprocess
from pathlib import Path

import pytest
from helpers import dashboard_server, system_tool

pytestmark = pytest.mark.slow
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
    "--window-size=1400,1800",
]


@pytest.fixture(scope="session")
def chromium():
    return system_tool("chromium", "chromium")


@pytest.fixture
def dashboard(finished_study):
    tmp, spec, storage, _ = finished_study
    with dashboard_server(spec, storage, tmp / "artifacts", tmp) as (base, studies):
        study_id = next(s["study_id"] for s in studies["study_summaries"] if s["study_name"] == "t")
        yield tmp, f"{base}/dashboard/studies/{study_id}"


def test_the_study_renders_in_headless_chromium(chromium, dashboard, summary_line):
    tmp, url = dashboard
    dom = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp / 'chromium-dom'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    for text in ("t (id=", "History", "Best Trial", "val_macro_f1", "Intermediate values", "Timeline"):
        assert text in dom, f"{text!r} is not on the rendered page"
    assert "trial #4" in dom  # every one of the 5 trials is drawn
    screenshot = Path(tmp) / "dashboard.png"
    subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp / 'chromium-shot'}", f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=180,
    )
    assert screenshot.stat().st_size > 20_000 and screenshot.read_bytes().startswith(b"\x89PNG")
    summary_line(f"dashboard screenshot (optimization history of the finished test study): {screenshot}")
