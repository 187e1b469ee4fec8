"""Security: optional bearer auth, CORS off unless configured, slow clients cut off, no internals in answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"
TEXT = "I still have not received my new card"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code and set(response.json()["error"]) == {"code", "message", "details"}


@pytest.mark.slow
def test_api_key_guards_everything_but_probes_and_docs_and_cors_is_opt_in(service_factory, test_artifact):
    svc = service_factory(test_artifact, API_KEY=KEY, CORS_ORIGINS="https://app.example")
    good = {"Authorization": f"Bearer {KEY}"}
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert httpx.get(svc.url + path).status_code == 200, path
    for method, path in (("POST", "/classify"), ("GET", "/v1/model"), ("GET", "/metrics")):
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789ab"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            refused = httpx.request(method, svc.url + path, json={"text": TEXT}, headers=headers)
            assert_error(refused, 401, "unauthorized")
            assert refused.headers["www-authenticate"] == "Bearer" and refused.headers["x-request-id"]
        assert httpx.request(method, svc.url + path, json={"text": TEXT}, headers=good).status_code == 200
    schema = httpx.get(svc.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert "401" in schema["paths"]["/classify"]["post"]["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]

    # CORS: the allowed origin may call /classify from a browser (preflight needs no key); others may not.
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(svc.url + "/classify", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    answer = httpx.post(svc.url + "/classify", json={"text": TEXT}, headers=good | {"Origin": "https://app.example"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(svc.url + "/classify", headers=preflight | {"Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(service):
    answer = httpx.post(service.url + "/classify", json={"text": TEXT}, headers={"Origin": "https://evil.example"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    preflight = httpx.options(service.url + "/classify", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert_error(preflight, 405, "method_not_allowed")
    assert "access-control-allow-origin" not in preflight.headers


def test_a_short_api_key_is_refused_at_start(test_artifact):
    result = subprocess.run([sys.executable, "-m", "service", "--model-dir", str(test_artifact)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=os.environ | {"SCS_API_KEY": "short"})
    assert result.returncode == 2 and "error: invalid settings: api_key" in result.stderr
    assert "short" not in result.stderr and "Traceback" not in result.stderr


def closed_by_server(sock: socket.socket, wait: float = 30) -> bool:
    sock.settimeout(wait)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.slow
def test_slow_and_idle_clients_are_cut_off_and_hold_nothing(service_factory, test_artifact):
    """Slowloris on loopback: connections that never finish a request are closed after SCS_READ_TIMEOUT_S;
    while they hang on, other clients are served and nothing waits in the batch queue."""
    svc = service_factory(test_artifact, READ_TIMEOUT_S=1)
    body = json.dumps({"text": TEXT}).encode()
    partial = {
        "idle": b"",
        "half a request line": b"POST /classi",
        "headers never end": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
        "body never ends": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body) + 50, body),
    }
    held = []
    for name, data in partial.items():
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", int(svc.url.rsplit(":", 1)[1])))
            if data:
                sock.sendall(data)
            held.append((name, sock))
    assert httpx.post(svc.url + "/classify", json={"text": TEXT}, timeout=30).status_code == 200
    assert svc.metric("scs_queue_depth") == 0
    still_open = [name for name, sock in held if not closed_by_server(sock)]
    assert not still_open, still_open
    for _, sock in held:
        sock.close()
    # A keep-alive client that answers promptly is not affected: two requests on one connection.
    with httpx.Client(base_url=svc.url) as client:
        assert client.post("/classify", json={"text": TEXT}).status_code == 200
        time.sleep(0.2)
        assert client.post("/classify", json={"text": TEXT}).status_code == 200
    assert svc.process.poll() is None


BAD_REQUESTS = [
    ("POST", "/classify", b"{", {}),
    ("POST", "/classify", b"\xff\xfe{}", {}),
    ("POST", "/classify", b"[" * 100_000 + b"]" * 100_000, {}),
    ("POST", "/classify", b'{"text": "a\\u0000b"}', {}),
    ("POST", "/classify", b'{"text": 1e999999}', {}),
    ("POST", "/classify", b'{"texts": ' + json.dumps(["x" * 3000]).encode() + b"}", {}),
    ("POST", "/classify", b'{"text": "card", "top_k": 99999999999999999999999}', {}),
    ("POST", "/classify", b'{"text": "card"}', {"Content-Type": "text/plain"}),  # 200: the body decides
    ("POST", "/classify", b"x" * 2_000_000, {}),
    ("POST", "/classify", b"{}", {"Content-Length": "abc"}),
    ("GET", "/classify", b"", {}),
    ("DELETE", "/v1/model", b"", {}),
    ("GET", "/../../etc/passwd", b"", {}),
    ("GET", "/%2e%2e/%2e%2e/service/app.py", b"", {}),
    ("GET", "/docs/../metrics", b"", {}),
    ("POST", "/readyz", b"{}", {}),
    ("GET", "/classify?text=" + "a" * 5000, b"", {}),
    ("POST", "/classify", b'{"text": "card"}', {"X-Request-ID": "\u00ff".encode("latin-1") * 200}),  # 200, new id
]


def test_no_stack_traces_or_internal_paths_in_any_error(service):
    leaks = ("Traceback", 'File "', ".py\"", "site-packages", str(ROOT), str(Path.home()) + "/", "/home/", "onnxruntime")
    seen = set()
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for method, path, body, headers in BAD_REQUESTS:
            try:
                response = client.request(method, path, content=body, headers=headers)
            except httpx.HTTPError as error:  # the client itself refused to send it: nothing to scan
                seen.add(type(error).__name__)
                continue
            seen.add(response.status_code)
            assert response.status_code < 500, (path, body[:40], response.status_code, response.text[:300])
            text = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items())
            assert not [leak for leak in leaks if leak in text], (path, body[:40], text[:500])
    assert {400, 404, 405, 413, 422} <= seen, seen
