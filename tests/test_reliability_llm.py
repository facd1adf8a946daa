"""Reliability (issue 7): the LLM endpoint misbehaving at the socket level, and through ``kpl kb generate``.

test_llm.py covers well-formed HTTP failures (429/500/503 then success, persistent 500, timeouts before the
headers, refused connections, malformed JSON bodies). This file adds what a flaky proxy or an overloaded server
does *inside* a response: the connection dropped mid-body, a stall after the headers, a reset before any answer,
``Retry-After`` being honoured, a top-level empty JSON list, an empty list as content — and, end to end through
the CLI, that no key reaches stdout, stderr, the log, an exception or the KB file, and that a failure leaves no
partial KB behind. Every server listens on 127.0.0.1 only.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from kplib.errors import LLMError
from kplib.io import llm

KEY = "sk-reliability-SECRET-93e1d2c4b5a6"


def completion(content: str, finish: str = "stop") -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": finish}]}).encode()


GOOD = "\n".join(f"{i}. visual feature {i}" for i in range(1, 31))


class RawServer:
    """A TCP server on 127.0.0.1 that answers each connection with the next scripted behaviour (the last one
    repeats). A behaviour is a function ``(conn, request_bytes) -> None`` writing whatever bytes it likes."""

    def __init__(self, *behaviours):
        self.behaviours = list(behaviours)
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read_request(self, conn) -> bytes:
        data = b""
        conn.settimeout(5)
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            try:
                req = self._read_request(conn)
                self.requests.append(req)
                behaviour = self.behaviours[min(len(self.requests) - 1, len(self.behaviours) - 1)]
                behaviour(conn, req)
            except OSError:
                pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self._stop = True
        self.sock.close()


def http(status: int, body: bytes, headers: dict | None = None, declared: int | None = None,
         stall_after_headers: float = 0.0):
    """Behaviour: an HTTP/1.1 response; ``declared`` overrides Content-Length (to cut the body short)."""
    def act(conn, req):
        head = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
                f"Content-Length: {declared if declared is not None else len(body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if stall_after_headers:
            time.sleep(stall_after_headers)
        conn.sendall(body)
    return act


def reset(conn, req):
    """Behaviour: close the connection with RST before answering."""
    import struct
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def hang_up(conn, req):
    """Behaviour: close the connection cleanly without any answer."""


@pytest.fixture
def servers():
    made = []

    def make(*behaviours):
        s = RawServer(*behaviours)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def cfg(server, **kw):
    base = {"base_url": server.url, "model": "m", "api_key": KEY, "timeout": 2.0, "max_retries": 2, "backoff": 0.01,
            "max_backoff": 0.05, "max_total_time": 10.0}
    base.update(kw)
    return llm.LLMConfig(**base)


def assert_no_key(caplog, *texts):
    for rec in caplog.records:
        assert KEY not in rec.getMessage() and KEY not in str(rec.args) and KEY not in str(rec.exc_info)
    for t in texts:
        assert KEY not in str(t)


def chain_text(exc: BaseException) -> str:
    """Every message in an exception's cause/context chain."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(f"{type(exc).__name__}: {exc!r} {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ socket-level faults
BODY_CUT = "body cut short"


@pytest.mark.parametrize("behaviour", [BODY_CUT, "reset", "hang up"])
def test_dropped_connection_is_retried_then_succeeds(servers, logs, behaviour):
    body = completion(GOOD)
    first = {"body cut short": http(200, body[: len(body) // 2], declared=len(body)),
             "reset": reset, "hang up": hang_up}[behaviour]
    server = servers(first, http(200, body))
    items = llm.generate_descriptions("glioma", cfg(server))
    assert len(items) == 30 and len(server.requests) == 2
    assert any("retry 1/2" in r.getMessage() for r in logs.records)
    assert_no_key(logs)


@pytest.mark.parametrize("behaviour", [BODY_CUT, "reset", "hang up"])
def test_dropped_connection_every_time_is_a_bounded_llm_error(servers, logs, behaviour):
    body = completion(GOOD)
    act = {"body cut short": http(200, body[:100], declared=len(body)), "reset": reset, "hang up": hang_up}[behaviour]
    server = servers(act)
    t0 = time.monotonic()
    with pytest.raises(LLMError, match=r"class 'glioma': .*gave up after 3 attempt") as info:
        llm.generate_descriptions("glioma", cfg(server))
    assert time.monotonic() - t0 < 5 and len(server.requests) == 3
    assert_no_key(logs, chain_text(info.value))


def test_stall_after_headers_times_out_and_is_retried(servers, logs):
    server = servers(http(200, completion(GOOD), stall_after_headers=1.5), http(200, completion(GOOD)))
    t0 = time.monotonic()
    items = llm.generate_descriptions("glioma", cfg(server, timeout=0.3))
    assert len(items) == 30 and len(server.requests) == 2 and time.monotonic() - t0 < 1.4
    assert any("timeout" in r.getMessage() for r in logs.records)


def test_retry_after_is_honoured_and_capped(servers):
    server = servers(http(429, b'{"error": "slow down"}', {"Retry-After": "3"}),
                     http(503, b"{}", {"Retry-After": "120"}), http(200, completion(GOOD)))
    waits: list[float] = []
    items = llm.generate_descriptions("glioma", cfg(server, max_backoff=10.0, max_total_time=60.0),
                                     sleep=waits.append)
    assert len(items) == 30 and len(waits) == 2
    assert 3.0 <= waits[0] <= 3.0 * 1.1 + 1e-9           # the server's Retry-After, not the 0.01 s backoff
    assert 10.0 <= waits[1] <= 10.0 * 1.1 + 1e-9          # a 120 s Retry-After is capped at max_backoff


@pytest.mark.parametrize("body, pattern", [
    (b"[]", "no 'choices'"),                                  # a top-level empty JSON list
    (completion("[]"), "no list items"),                      # the model answered with an empty list
    (completion("1.\n2.\n3."), "no list items"),              # numbered lines without text
    (b'{"choices": [{"message": {"content": "1. a"}}]' , "not valid JSON"),   # truncated JSON, full length
    (b"\xff\xfe{}", "not valid JSON"),                        # not UTF-8
])
def test_unusable_answers_are_immediate_clear_errors(servers, logs, body, pattern):
    server = servers(http(200, body))
    with pytest.raises(LLMError, match=pattern) as info:
        llm.generate_descriptions("cataract", cfg(server))
    assert "class 'cataract'" in str(info.value) and len(server.requests) == 1   # not retried
    assert_no_key(logs, chain_text(info.value))


def test_key_echoed_by_the_server_never_leaks(servers, logs):
    """Servers echo request headers in error bodies; the key must not come back through any channel."""
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: Bearer {KEY}"}}).encode()
    server = servers(http(500, echo), http(401, echo))
    with pytest.raises(LLMError, match="HTTP 401") as info:
        llm.generate_descriptions("glioma", cfg(server))
    assert_no_key(logs, chain_text(info.value), repr(info.value))
    assert f"Bearer {KEY}".encode() in server.requests[0]          # it was sent, in the header only
    assert server.requests[0].count(KEY.encode()) == 1


# ------------------------------------------------------------------------------------------------ through the CLI
def kb_generate(server, out: Path, monkeypatch, *extra: str) -> int:
    from kplib.cli import main

    monkeypatch.setenv("KPL_LLM_BASE_URL", server.url)
    monkeypatch.setenv("KPL_LLM_MODEL", "m")
    monkeypatch.setenv("KPL_LLM_API_KEY", KEY)
    return main(["-vv", "kb", "generate", "--classes", "glioma,meningioma", "--timeout", "2",
                 "--max-retries", "1", "-o", str(out), *extra])


def test_cli_generate_failure_on_second_class_leaves_no_file_and_no_key(servers, tmp_path, monkeypatch, capsys,
                                                                      logs):
    echo = json.dumps({"error": f"key {KEY} rate limited"}).encode()
    server = servers(http(200, completion(GOOD)), http(429, echo, {"Retry-After": "0"}))
    out = tmp_path / "kb.json"
    rc = kb_generate(server, out, monkeypatch)
    stdout, stderr = capsys.readouterr()
    assert rc == 2
    assert "meningioma" in stderr and "HTTP 429" in stderr and "gave up" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert KEY not in stdout and KEY not in stderr
    assert_no_key(logs)


def test_cli_generate_success_records_host_not_key(servers, tmp_path, monkeypatch, capsys, logs):
    server = servers(http(500, b"{}"), http(200, completion(GOOD)))
    out = tmp_path / "kb.json"
    rc = kb_generate(server, out, monkeypatch)
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    text = out.read_text(encoding="utf-8")
    kb = json.loads(text)
    assert [c["name"] for c in kb["classes"]] == ["glioma", "meningioma"]
    assert kb["generator"]["base_url_host"] == f"127.0.0.1:{server.port}"
    for blob in (text, stdout, stderr):
        assert KEY not in blob
    assert_no_key(logs)
