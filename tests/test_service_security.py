"""Security: optional bearer auth, CORS off unless configured, slow clients cut off, no internals in answers."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, TEXT, assert_error

KEY = "test-key-0123456789abcdef"


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


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request as raw bytes, sent as given (no client library can refuse to send it)."""
    fields = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body))} | (headers or {})
    head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n" for k, v in fields.items())
    return head + b"\r\n" + body


def exchange(url: str, data: bytes) -> http.client.HTTPResponse:
    """Send ``data`` on a fresh connection and read the whole answer; a server that drops the connection instead
    of answering makes this raise (and the test fail)."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
    try:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.body = response.read()
        return response
    finally:
        sock.close()


BAD_REQUESTS = {
    "unterminated JSON": request("POST", "/classify", b"{"),
    "UTF-16 bytes": request("POST", "/classify", b"\xff\xfe{}"),
    "100,000-deep nesting": request("POST", "/classify", b"[" * 100_000 + b"]" * 100_000),
    "escaped NUL in text": request("POST", "/classify", b'{"text": "a\\u0000b"}'),
    "number out of range": request("POST", "/classify", b'{"text": 1e999999}'),
    "text over the limit": request("POST", "/classify", b'{"texts": ' + json.dumps(["x" * 3000]).encode() + b"}"),
    "huge top_k": request("POST", "/classify", b'{"text": "card", "top_k": 99999999999999999999999}'),
    "text/plain content type": request("POST", "/classify", b'{"text": "card"}', {"Content-Type": "text/plain"}),
    "2 MB body": request("POST", "/classify", b"x" * 2_000_000),
    "Content-Length not a number": request("POST", "/classify", b"{}", {"Content-Length": "abc"}),
    "GET on /classify": request("GET", "/classify"),
    "DELETE on /v1/model": request("DELETE", "/v1/model"),
    "path traversal": request("GET", "/../../etc/passwd"),
    "encoded traversal": request("GET", "/%2e%2e/%2e%2e/service/app.py"),
    "dot segments": request("GET", "/docs/../metrics"),
    "POST on a probe": request("POST", "/readyz", b"{}"),
    "5,000-character query": request("GET", "/classify?text=" + "a" * 5000),
    "non-ASCII request id": request("POST", "/classify", b'{"text": "card"}', {"X-Request-ID": "\u00ff".encode("latin-1") * 200}),
    "not HTTP at all": b"HELLO THERE\r\n\r\n",
    "header without a colon": b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_no_stack_traces_or_internal_paths_in_any_error(service, case):
    """Every bad request gets an answer below 500 that names no file, library or home folder."""
    leaks = ("Traceback", 'File "', ".py\"", "site-packages", str(ROOT), str(Path.home()) + "/", "/home/", "onnxruntime")
    response = exchange(service.url, BAD_REQUESTS[case])
    assert response.status < 500, (case, response.status, response.body[:300])
    text = response.body.decode("utf-8", "replace") + " ".join(f"{k}: {v}" for k, v in response.getheaders())
    assert not [leak for leak in leaks if leak in text], (case, text[:500])
    if response.getheader("content-type", "").startswith("application/json"):
        assert set(json.loads(response.body)) == {"error"} or response.status == 200, (case, response.body[:300])
