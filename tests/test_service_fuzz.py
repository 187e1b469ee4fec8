"""Schemathesis (a fuzzer no one here wrote) against the service's own OpenAPI schema on a real uvicorn.

Every check it has (server errors, status codes, content types, response schemas including the error
shape, valid data accepted, invalid data refused, unsupported methods, auth not ignored) over >= 1,000
generated requests. The server counts what it answered, so the request count and the "no 5xx" bar are read
from its own /metrics, not from the fuzzer's report.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

API_KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def requests_by_status(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'scs_requests_total\{.*status="(\d+)"\} (\S+)', line)
        if match:
            totals[match[1]] = totals.get(match[1], 0) + float(match[2])
    return totals


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(service_factory, test_artifact, tmp_path):
    # Small text limits keep generation cheap; the schema states them, so the fuzzer respects and probes them.
    svc = service_factory(test_artifact, API_KEY=API_KEY, MAX_TEXT_CHARS=100, MAX_TEXTS=4)
    before = requests_by_status(svc.url)
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", f"{svc.url}/openapi.json", "--checks", "all", "--max-examples", "1000", "--seed", "1",
         "--header", f"Authorization: Bearer {API_KEY}", "--no-color", "--request-timeout", "30",
         "--generation-database", "none", "--report", "junit", "--report-dir", str(tmp_path / "report")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "No issues found" in output, output[-3000:]
    after = requests_by_status(svc.url)
    answered = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    total = sum(answered.values())
    assert total >= 1000, answered
    assert not [s for s, n in answered.items() if s.startswith("5") and n], answered
    assert answered.get("200", 0) > 50 and answered.get("422", 0) > 50, answered  # both sides were explored
    assert answered.get("401", 0) > 0, answered  # it tried without the key and was refused
    assert svc.process.poll() is None
    print("schemathesis: requests answered by status", answered)
