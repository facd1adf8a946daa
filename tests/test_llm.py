"""Tests of kplib.io.llm against a real HTTP server on 127.0.0.1 with canned chat-completions replies."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kplib.errors import KPLInputError, LLMError
from kplib.io import knowledge as K
from kplib.io import llm

KEY = "sk-test-SECRET-7f3a9c0e1b2d"


def completion(content: str, finish: str = "stop") -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": finish}]}).encode()


GOOD = "\n".join(f"{i}. feature number {i}" for i in range(1, 51))


class FakeServer:
    """Serves scripted replies in order: (status, body bytes, headers dict, delay s); the last one repeats."""

    def __init__(self):
        self.script: list[tuple[int, bytes, dict, float]] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                idx = min(len(outer.requests) - 1, len(outer.script) - 1)
                status, payload, headers, delay = outer.script[idx]
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def reply(self, *items):
        self.script = [tuple(it) + ({}, 0.0)[len(it) - 2:] for it in items]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def cfg(server, **kw):
    base = {"base_url": f"http://127.0.0.1:{server.port}/v1", "model": "test-model", "api_key": KEY, "timeout": 5.0,
            "max_retries": 3, "backoff": 0.01, "max_backoff": 0.05, "max_total_time": 10.0}
    base.update(kw)
    return llm.LLMConfig(**base)


@pytest.fixture
def all_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_no_key(caplog, *texts):
    for rec in caplog.records:
        assert KEY not in rec.getMessage()
        assert KEY not in str(rec.args)
    for t in texts:
        assert KEY not in t


# ------------------------------------------------------------------ happy paths
def test_generate_kb_good_list(server, all_logs):
    server.reply((200, completion(GOOD)))
    kb = llm.generate_kb(["glaucoma", "normal_fundus"], dataset="eyes", config=cfg(server))
    assert kb.class_names == ["glaucoma", "normal_fundus"] and kb.method == "generated"
    assert kb.get("glaucoma").texts == [f"feature number {i}" for i in range(1, 51)]
    g = kb.generator
    assert g["model"] == "test-model" and g["base_url_host"] == f"127.0.0.1:{server.port}"
    assert g["prompt"] == llm.RELEASED_PROMPT and g["temperature"] == 0.7 and g["date"] == kb.created
    # one POST per class to /v1/chat/completions, bearer key in the header only
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 2
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    sent = server.requests[1]["json"]
    assert sent["model"] == "test-model" and "normal fundus" in sent["messages"][0]["content"]
    assert "at least 50" in sent["messages"][0]["content"]
    dumped = json.dumps(kb.to_dict())
    assert KEY not in dumped and "/v1" not in dumped
    assert KEY not in repr(cfg(server))
    K.from_dict(kb.to_dict())  # schema-valid
    assert K.validate(kb, min_count=50).ok
    assert_no_key(all_logs)


def test_preamble_and_closing_are_dropped(server):
    server.reply((200, completion(
        "Sure! Here are 4 visual features of glaucoma:\n\n1. **Enlarged optic cup**.\n2) Thin neuroretinal rim;\n"
        "- *Notching* of the rim\n* \"Disc haemorrhage\"\n\nThese features can help distinguish glaucoma.")))
    items = llm.generate_descriptions("glaucoma", cfg(server))
    assert items == ["Enlarged optic cup", "Thin neuroretinal rim", "Notching of the rim", "Disc haemorrhage"]


def test_medical_prompt_needs_modality(server):
    with pytest.raises(KPLInputError, match="modality"):
        llm.generate_kb(["glaucoma"], prompt="medical", config=cfg(server))
    assert server.requests == []  # failed before any request
    server.reply((200, completion(GOOD)))
    kb = llm.generate_kb(["glaucoma"], prompt="medical", modality="fundus photograph", config=cfg(server),
                         temperature=0.0)
    msg = server.requests[0]["json"]["messages"][0]["content"]
    assert "fundus photograph" in msg and "glaucoma" in msg
    assert kb.generator["prompt_name"] == "medical" and kb.generator["temperature"] == 0.0
    assert server.requests[0]["json"]["temperature"] == 0.0


def test_finish_length_drops_partial_last_item(server):
    server.reply((200, completion("1. one\n2. two\n3. thr", finish="length")))
    assert llm.generate_descriptions("x", cfg(server)) == ["one", "two"]


# ------------------------------------------------------------------ malformed replies: immediate errors
@pytest.mark.parametrize("body, pattern", [
    (b"<html>not json</html>", "not valid JSON"),
    (completion(GOOD)[:-40], "not valid JSON"),                       # truncated
    (json.dumps({"object": "chat.completion"}).encode(), "no 'choices'"),
    (json.dumps({"choices": []}).encode(), "no 'choices'"),
    (json.dumps({"choices": [{"message": {"content": ""}}]}).encode(), "no message content"),
    (completion("I cannot help with that."), "no list items"),      # empty list
])
def test_malformed_reply_is_immediate_error(server, all_logs, body, pattern):
    server.reply((200, body))
    with pytest.raises(LLMError, match=pattern) as e:
        llm.generate_kb(["cataract"], config=cfg(server))
    assert "class 'cataract'" in str(e.value)
    assert len(server.requests) == 1
    assert_no_key(all_logs, str(e.value))


def test_client_error_not_retried_and_key_redacted(server, all_logs):
    server.reply((401, json.dumps({"error": f"invalid key {KEY}"}).encode()))
    with pytest.raises(LLMError, match=r"class 'glioma': HTTP 401") as e:
        llm.generate_descriptions("glioma", cfg(server))
    assert len(server.requests) == 1
    assert "***" in str(e.value)
    assert_no_key(all_logs, str(e.value), repr(e.value))
    assert e.value.__cause__ is None and KEY not in str(e.value.__context__)


def test_redirect_not_followed(server):
    server.reply((307, b"", {"Location": "http://127.0.0.1:1/elsewhere"}))
    with pytest.raises(LLMError, match="redirect"):
        llm.generate_descriptions("glioma", cfg(server))
    assert len(server.requests) == 1


# ------------------------------------------------------------------ retries
@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_error_then_success(server, all_logs, status):
    server.reply((status, b'{"error": "busy"}'), (200, completion(GOOD)))
    items = llm.generate_descriptions("glioma", cfg(server))
    assert len(items) == 50 and len(server.requests) == 2
    assert any("retry 1/3" in r.getMessage() for r in all_logs.records)
    assert_no_key(all_logs)


def test_persistent_500_is_bounded(server, all_logs):
    server.reply((500, b"{}"))
    t0 = time.monotonic()
    with pytest.raises(LLMError, match=r"class 'glioma': HTTP 500 .* gave up after 4 attempt") as e:
        llm.generate_descriptions("glioma", cfg(server, max_retries=3))
    assert len(server.requests) == 4 and time.monotonic() - t0 < 3
    assert_no_key(all_logs, str(e.value))


def test_total_time_budget_bounds_retries(server):
    server.reply((503, b"{}", {"Retry-After": "0.3"}))
    with pytest.raises(LLMError, match="gave up after 2 attempt"):
        llm.generate_descriptions("glioma", cfg(server, max_retries=10, max_backoff=0.3, max_total_time=0.5))
    assert len(server.requests) == 2


def test_timeout_is_retried_then_error(server, all_logs):
    server.reply((200, completion(GOOD), {}, 1.0))
    t0 = time.monotonic()
    with pytest.raises(LLMError, match=r"no answer within timeout=0.2s .* 2 attempt") as e:
        llm.generate_descriptions("glioma", cfg(server, timeout=0.2, max_retries=1))
    assert time.monotonic() - t0 < 1.5 and len(server.requests) == 2
    assert_no_key(all_logs, str(e.value))


def test_refused_connection(all_logs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = llm.LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY, timeout=1.0,
                      max_retries=2, backoff=0.01, max_backoff=0.02)
    with pytest.raises(LLMError, match=r"class 'glioma': connection failed .* 3 attempt") as e:
        llm.generate_descriptions("glioma", c)
    assert_no_key(all_logs, str(e.value))


# ------------------------------------------------------------------ configuration and parsing
def test_config_from_env(monkeypatch):
    monkeypatch.delenv("KPL_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("KPL_LLM_MODEL", raising=False)
    with pytest.raises(KPLInputError, match="KPL_LLM_BASE_URL"):
        llm.LLMConfig.from_env()
    monkeypatch.setenv("KPL_LLM_BASE_URL", "http://127.0.0.1:9/v1/")
    with pytest.raises(KPLInputError, match="KPL_LLM_MODEL"):
        llm.LLMConfig.from_env()
    monkeypatch.setenv("KPL_LLM_MODEL", "m1")
    monkeypatch.setenv("KPL_LLM_API_KEY", KEY)
    c = llm.LLMConfig.from_env(temperature=0.2)
    assert (c.base_url, c.model, c.api_key, c.temperature, c.host) == ("http://127.0.0.1:9/v1", "m1", KEY, 0.2,
                                                                       "127.0.0.1:9")
    assert KEY not in repr(c)
    assert llm.LLMConfig.from_env(model="m2").model == "m2"
    with pytest.raises(KPLInputError, match="credentials") as e:
        llm.LLMConfig.from_env(base_url="http://user:pw@127.0.0.1/v1")
    assert "pw" not in str(e.value)
    with pytest.raises(KPLInputError, match="http"):
        llm.LLMConfig.from_env(base_url="ftp://127.0.0.1")


def test_parse_numbered_list_variants():
    text = ("Here is the list:\n1. Round shape.\n2) round shape\n(3) __Bold__ rim:\n4 - dashed item\n"
            "5.1 nested item\n• bullet item\n+ plus item\n\n   10.   spaced item ;\nIn summary, these help.\n"
            "2023 was a year.\n")
    assert llm.parse_numbered_list(text) == ["Round shape", "Bold rim", "dashed item", "nested item",
                                             "bullet item", "plus item", "spaced item"]
    assert llm.parse_numbered_list("no list here at all") == []


def test_build_prompt():
    assert llm.build_prompt("glioma") == llm.RELEASED_PROMPT.format(class_name="glioma")
    assert "brain MRI" in llm.build_prompt("glioma", "medical", "brain MRI")
    assert llm.build_prompt("x", "list features of {class_name}") == "list features of x"
    with pytest.raises(KPLInputError, match="class_name"):
        llm.build_prompt("x", "no placeholder")
