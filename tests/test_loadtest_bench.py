"""The benchmark harness on tiny real runs: real servers on 127.0.0.1, real load generators, real files out.

No figure is asserted (the machine is shared): only that points were measured without errors, that the
table, plot and BENCHMARKS section are written, and that every process it started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import psutil
import pytest

from loadtest import report
from loadtest.bench import resolve_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "artifacts" / "test-model" / "1"

pytestmark = pytest.mark.skipif(not (ARTIFACT / "manifest.json").is_file(),
                                reason="run `make test-artifact` first (make test does)")


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest.bench", "--model-dir", str(ARTIFACT), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def leftovers(marker: str) -> list[str]:
    """Processes still alive whose command line mentions ``marker`` (the run's own output folder)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])}")
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_tiny_run_writes_table_plot_and_section(tmp_path: Path) -> None:
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nHand-written notes stay.\n", encoding="utf-8")
    result = bench("--configs", "constant,naive-torch", "--generator", "locust", "--concurrency", "1,4",
                   "--seconds", "2", "--warmup", "0.5", "--open-fractions", "0.3", "--open-seconds", "1",
                   "--ceiling-seconds", "0.2", "--max-other-cpu", "1", "--out", str(tmp_path / "out"),
                   "--benchmarks", str(benchmarks))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    run = json.loads((tmp_path / "out" / "bench.json").read_text())
    closed = [p for p in run["points"] if p["mode"] == "closed"]
    assert sorted((p["config"], p["load"]) for p in closed) == [
        ("constant", 1), ("constant", 4), ("naive-torch", 1), ("naive-torch", 4)]
    assert all(p["errors"] == 0 and p["rps"] > 0 and p["sentences_per_s"] >= p["rps"] for p in closed)
    opened = [p for p in run["points"] if p["mode"] == "open"]
    assert {p["config"] for p in opened} == {"constant", "naive-torch"}
    assert all(p["ok"] > 0 for p in opened)
    assert [r["batch"] for r in run["ceiling"]["rows"]] == [1, 8, 32, 64, 128, 256]

    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| constant-answer FastAPI (HTTP ceiling) |" in table and "| naive torch FastAPI" in table
    assert "| configuration | c=1 | c=4 |" in table
    image = matplotlib.image.imread(tmp_path / "out" / "bench.png")
    assert image.shape[0] > 100 and image.shape[1] > 100

    text = benchmarks.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written notes stay.\n")
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "](out/bench.png)" in text  # the plot, linked relative to BENCHMARKS.md
    assert not leftovers(str(tmp_path))

    (tmp_path / "out" / "bench.png").unlink()  # redrawn from the JSON alone, nothing measured
    redraw = subprocess.run([sys.executable, "-m", "loadtest.report", str(tmp_path / "out" / "bench.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert redraw.returncode == 0, redraw.stderr
    assert matplotlib.image.imread(tmp_path / "out" / "bench.png").shape == image.shape


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (make bench-tools)")
def test_wrk_generator_measures_the_constant_app(tmp_path: Path) -> None:
    result = bench("--configs", "constant", "--generator", "wrk", "--concurrency", "2", "--seconds", "1",
                   "--warmup", "0", "--no-open", "--no-ceiling", "--no-generator-check",
                   "--out", str(tmp_path), "--benchmarks", "none")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [point] = json.loads((tmp_path / "bench.json").read_text())["points"]
    assert point["generator"] == "wrk" and point["errors"] == 0 and point["requests"] > 0
    assert point["sentences_per_s"] > point["rps"] > 0  # the mix has multi-text requests
    assert 0 < point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"]


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2, reason="needs taskset and 2 cores")
def test_a_point_disturbed_by_other_work_is_measured_again_and_marked(tmp_path: Path) -> None:
    hog = subprocess.Popen(["timeout", "60", "taskset", "-c", "0", sys.executable, "-c", "while True: pass"],
                           start_new_session=True)
    try:
        result = bench("--configs", "constant", "--concurrency", "2", "--seconds", "1", "--warmup", "0",
                       "--no-open", "--no-ceiling", "--no-generator-check", "--out", str(tmp_path),
                       "--benchmarks", "none")
    finally:
        os.killpg(hog.pid, signal.SIGKILL)
        hog.wait()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "went to other processes; measuring again" in result.stdout
    [point] = json.loads((tmp_path / "bench.json").read_text())["points"]
    assert point["attempts"] == 2 and point["other_cpu"] > 0.1
    assert " †" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_stops_every_process_it_started(tmp_path: Path, sig: int) -> None:
    harness = subprocess.Popen(
        [sys.executable, "-m", "loadtest.bench", "--model-dir", str(ARTIFACT), "--configs", "constant",
         "--generator", "locust", "--concurrency", "4", "--seconds", "60", "--warmup", "0", "--no-ceiling",
         "--out", str(tmp_path), "--benchmarks", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in harness.stdout:  # ends when the harness exits, so this cannot wait forever
            lines.append(line)
            if "ready on" in line:
                break
        assert lines and "ready on" in lines[-1], "".join(lines)[-2000:]
        server_pid = int(lines[-1].rsplit("pid ", 1)[1].rstrip(")\n"))
        deadline = time.monotonic() + 30
        children: list[psutil.Process] = []
        while len(children) < 2 and time.monotonic() < deadline:  # the server, then the load generator
            children = psutil.Process(harness.pid).children()
            time.sleep(0.2)
        assert len(children) >= 2, "the load generator never started"
        time.sleep(1)
        harness.send_signal(sig)
        output = "".join(lines) + harness.communicate(timeout=60)[0]
    finally:
        if harness.poll() is None:
            os.killpg(harness.pid, signal.SIGKILL)
            harness.wait()
    assert harness.returncode == 130, output[-2000:]
    assert "interrupted: stopping every process started" in output
    assert server_pid in [child.pid for child in children]
    for child in children:
        assert not child.is_running(), f"still running after the harness exited: {child.cmdline()}"
    assert not leftovers(str(tmp_path))


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    for args, message in ((["--configs", "nope"], "--configs: unknown nope"),
                          (["--concurrency", "0,8"], "expected positive numbers"),
                          (["--data", str(tmp_path / "missing.csv")], "not found")):
        result = bench(*args, "--out", str(tmp_path), "--benchmarks", "none", timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_model_folder_or_version_folder(tmp_path: Path) -> None:
    assert resolve_model(ARTIFACT) == (ARTIFACT.parent, ARTIFACT)
    assert resolve_model(ARTIFACT.parent) == (ARTIFACT.parent, ARTIFACT)
    with pytest.raises(ValueError, match="no version folder"):
        resolve_model(tmp_path)


def test_benchmarks_section_is_replaced_not_appended(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    report.update_benchmarks(path, "first\n")
    path.write_text(path.read_text() + "\n## Notes kept after the section\n")
    report.update_benchmarks(path, "second\n")
    text = path.read_text()
    assert "first" not in text and text.count("second") == 1 and text.endswith("## Notes kept after the section\n")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (make bench-tools)")
def test_bench_service_prints_the_throughput_table(tmp_path: Path) -> None:
    """scripts/bench_service.py (the serving issue's bar) end to end, tiny: M, H and two off/on rounds."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "scripts/bench_service.py", "--model-dir", str(ARTIFACT.parent),
                           "--seconds", "1", "--rounds", "2", "--connections", "8", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    for pair in result["rounds"]:
        assert pair["off"]["requests_per_s"] > 0 and pair["on"]["requests_per_s"] > 0
        assert pair["off"]["non_2xx"] == 0 and pair["on"]["non_2xx"] == 0
        assert pair["off"]["mean_batch"] == 1.0  # batching off really ran one sentence per model run
        for run in (pair["off"], pair["on"]):  # the per-thread CPU split, read from /proc
            assert run["cpu_us_per_request"]["event_loop"] > 0 and run["cpu_us_per_request"]["model_thread"] > 0
    ratios = sorted(pair["on_over_off"] for pair in result["rounds"])
    assert result["on_over_off"] == pytest.approx(sum(ratios) / 2)  # the median of two rounds
    assert result["model"]["sentences_per_s"] > 0 and result["constant"]["requests_per_s"] > 0
    assert "| on / off, median of rounds |" in done.stdout and "2 off/on rounds" in done.stdout
    bad = subprocess.run([sys.executable, "scripts/bench_service.py", "--rounds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds" in bad.stderr
