"""Schemathesis (a fuzzer no one here wrote) against the service's own OpenAPI schema on a real uvicorn.

Every check it has (server errors, status codes, content types, response schemas including the error
shape, valid data accepted, invalid data refused, unsupported methods, auth not ignored) over >= 1,000
generated requests. The server counts what it answered, so the request count and the "no 5xx" bar are read
from its own /metrics, not from the fuzzer's report.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.data import scrape

API_KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def requests_by_status(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for sample in scrape(url, AUTH):
        if sample.name == "scs_requests_total":
            totals[sample.labels["status"]] = totals.get(sample.labels["status"], 0) + sample.value
    return totals


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(service_factory, test_artifact, tmp_path):
    # Small text limits keep generation cheap; the schema states them, so the fuzzer respects and probes them.
    # Two models: the fuzzer loads and unloads "spare" as it likes, while "test-model" stays to be classified.
    repository = tmp_path / "models"
    for name in ("test-model", "spare"):
        shutil.copytree(test_artifact, repository / name / "1")
    svc = service_factory(repository, API_KEY=API_KEY, MAX_TEXT_CHARS=100, MAX_TEXTS=4, DEFAULT_MODEL="test-model")
    # Path parameters: mostly the served model and version (so metadata, readiness and infer are reached), the
    # rest whatever the fuzzer makes up. A V2 infer body can match its schema and still not fit the model (n texts
    # in `shape` but m in `data`): JSON Schema cannot say so, and the service answers 400; every other check (all
    # of them run by default) still runs on those operations.
    (tmp_path / "schemathesis.toml").write_text("""
[dictionaries.models]
values = ["test-model"]

[dictionaries.versions]
values = ["1"]

[parameters]
"path.model_name" = { dictionary = "models", probability = 0.7 }
"path.model_version" = { dictionary = "versions", probability = 0.7 }

[[operations]]
include-path-regex = "/infer$"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "^/v2/repository/models/"
parameters = { "path.model_name" = "spare" }
""")
    before = requests_by_status(svc.url)
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", f"{svc.url}/openapi.json", "--max-examples", "200", "--phases", "examples,coverage,fuzzing", "--seed", "1",
         "--header", f"Authorization: Bearer {API_KEY}", "--no-color", "--request-timeout", "30",
         "--generation-database", "none", "--report", "junit", "--report-dir", str(tmp_path / "report")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", output)
    assert summary and summary.group(1) == summary.group(2), output[-3000:]  # every generated case passed every check
    after = requests_by_status(svc.url)
    answered = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    total = sum(answered.values())
    print(f"\nschemathesis: {summary.group(1)} cases, every check passed; the server answered {int(total)}: "
          + ", ".join(f"{status}: {int(n)}" for status, n in sorted(answered.items()) if n))
    assert total >= 1000, answered
    assert not [s for s, n in answered.items() if s.startswith("5") and n], answered
    assert answered.get("200", 0) > 100 and answered.get("422", 0) + answered.get("400", 0) > 100, answered  # both sides
    assert answered.get("401", 0) > 0, answered  # it tried without the key and was refused
    assert answered.get("404", 0) > 0, answered  # it asked for models that are not served
    assert svc.process.poll() is None
