"""The Locust file against a real service (uvicorn on 127.0.0.1, onnxruntime, the test artifact): short real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "artifacts" / "test-model" / "1"
LOCUST = str(Path(sys.executable).with_name("locust"))

pytestmark = pytest.mark.skipif(not (ARTIFACT / "manifest.json").is_file(),
                                reason="run `make test-artifact` first (make test does)")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("service") / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                    "--model-dir", str(ARTIFACT.parent), "--log-level", "warning"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service not ready in 120 s: " + log.read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def locust(url: str, tmp_path: Path, users: int, seconds: int, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    stats = tmp_path / "stats"
    result = subprocess.run(
        [LOCUST, "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
         "-t", f"{seconds}s", "--only-summary", "--json-file", str(stats), "--exit-code-on-error", "1",
         "--html", str(tmp_path / "report.html"), "--stop-timeout", "10"],
        cwd=tmp_path, env={**os.environ, "LOCUST_HOST": url, **env}, capture_output=True, text=True,
        timeout=seconds + 60)
    entries = json.loads(stats.with_suffix(".json").read_text()) if stats.with_suffix(".json").exists() else []
    return result, entries


def test_short_run_has_zero_failures(service_url: str, tmp_path: Path) -> None:
    result, entries = locust(service_url, tmp_path, users=16, seconds=4)
    assert result.returncode == 0, result.stderr[-3000:]
    requests = {entry["name"]: entry["num_requests"] for entry in entries}
    assert sum(requests.values()) > 0
    assert sum(entry["num_failures"] for entry in entries) == 0
    assert requests.get("/classify [1 text]", 0) > 0, requests  # both kinds of request were sent
    assert any(name != "/classify [1 text]" for name in requests), requests
    assert (tmp_path / "report.html").stat().st_size > 0


def test_wrong_answers_count_as_failures(service_url: str, tmp_path: Path) -> None:
    # Requests of up to 100 texts break the service's limit (64 by default): refused with 422, which the
    # user must record as failures, so the run exits non-zero.
    result, entries = locust(service_url, tmp_path, users=4, seconds=2, LOADTEST_MULTI_PERCENT="100",
                             LOADTEST_MULTI_MAX="100")
    assert result.returncode == 1
    sizes = {int(entry["name"].split("[")[1].split()[0]): entry for entry in entries}
    assert sum(entry["num_failures"] for size, entry in sizes.items() if size > 64) > 0
    assert all(entry["num_failures"] == 0 for size, entry in sizes.items() if size <= 64)  # good answers pass
    assert all(entry["num_failures"] == entry["num_requests"] for size, entry in sizes.items() if size > 64)


@pytest.mark.parametrize(("env", "message"), [
    ({"LOADTEST_DATA": "/nonexistent/test.csv"}, "error: LOADTEST_DATA: cannot read /nonexistent/test.csv"),
    ({"LOADTEST_TEXT_COLUMN": "sentence"}, "no column 'sentence'"),
    ({"LOADTEST_MULTI_PERCENT": "150"}, "error: LOADTEST_MULTI_PERCENT='150': expected an integer 0-100"),
    ({"LOADTEST_WAIT": "2,1"}, "error: LOADTEST_WAIT='2,1'"),
])
def test_bad_settings_are_one_line_errors(tmp_path: Path, env: dict, message: str) -> None:
    result, _ = locust("http://127.0.0.1:9", tmp_path, users=1, seconds=1, **env)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_runs_as_the_compose_profile_runs_it(service_url: str, tmp_path: Path) -> None:
    """Only the locustfile and the CSV, laid out as in the image; every option from LOCUST_* variables."""
    app = tmp_path / "app"
    (app / "loadtest").mkdir(parents=True)
    (app / "data" / "banking77").mkdir(parents=True)
    (app / "loadtest" / "locustfile.py").write_bytes((ROOT / "loadtest" / "locustfile.py").read_bytes())
    (app / "data" / "banking77" / "test.csv").write_bytes((ROOT / "data" / "banking77" / "test.csv").read_bytes())
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LOCUST_", "LOADTEST_"))}
    env.pop("PYTHONPATH", None)
    env.update(LOCUST_LOCUSTFILE=str(app / "loadtest" / "locustfile.py"), LOCUST_HEADLESS="true",
               LOCUST_HOST=service_url, LOCUST_USERS="8", LOCUST_SPAWN_RATE="8", LOCUST_RUN_TIME="3s",
               LOCUST_HTML=str(reports / "report.html"), LOCUST_CSV=str(reports / "locust"),
               LOCUST_ONLY_SUMMARY="true", LOADTEST_MULTI_PERCENT="20", LOADTEST_WAIT="0")
    result = subprocess.run([LOCUST], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (reports / "report.html").stat().st_size > 0
    rows = (reports / "locust_stats.csv").read_text().splitlines()
    assert rows[0].startswith("Type,Name,Request Count,Failure Count")
    assert "/classify [1 text]" in "\n".join(rows)
