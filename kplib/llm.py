"""Generate a knowledge base with an LLM through an OpenAI-compatible chat-completions endpoint (KPL stage 0).

The KPL authors asked gpt-3.5-turbo, once per class, for a numbered list of at least 50 visual features that
distinguish the class in an image, and kept each numbered line as one description (method doc, Stage 0). This
module does the same against any endpoint speaking ``POST {base_url}/chat/completions`` (OpenAI, vLLM, llama.cpp,
Ollama's OpenAI API, ...), using only the standard library.

Configuration: arguments, else ``$KPL_LLM_BASE_URL``, ``$KPL_LLM_MODEL``, ``$KPL_LLM_API_KEY``. The API key is sent
in the ``Authorization`` header and nowhere else: it is never logged, stored in the KB, or put in an exception.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import http.client
import json
import logging
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import KPLInputError, LLMError
from .knowledge import SCHEMA_VERSION, Description, KBClass, KnowledgeBase

log = logging.getLogger("kplib")

#: The released KPL prompt. NOTE: the exact string the authors sent is not public; this paraphrases the paper's
#: description (one prompt per class asking for a numbered list of at least 50 useful visual features for
#: distinguishing the class in an image — method doc, Stage 0). Each numbered line becomes one description.
RELEASED_PROMPT = ("What are useful visual features for distinguishing a {class_name} in an image? "
                   "Give a numbered list of at least 50 such features, one short feature per line.")

#: Medical-modality-aware variant (an option of this project, not the paper's): names the imaging modality and asks
#: for short noun phrases that read well after "which has" in the KPL prompt, without naming other diagnoses.
MEDICAL_PROMPT = ("You are an expert in reading {modality} images. What are useful visual features for "
                  "distinguishing {class_name} in a {modality}? Give a numbered list of at least 50 features that "
                  "are visible in the image itself, one short noun phrase per line (each should read naturally "
                  "after the words \"which has\"), without naming other diagnoses and without explanations.")

PROMPTS = {"released": RELEASED_PROMPT, "medical": MEDICAL_PROMPT}

_REDACTED = "***"


@dataclass
class LLMConfig:
    """Endpoint settings. ``api_key`` is excluded from ``repr`` and never written anywhere."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.7
    timeout: float = 120.0              # seconds per HTTP request
    max_retries: int = 4                # retries after the first attempt (connection errors, timeouts, 429, 5xx)
    backoff: float = 2.0                # first retry waits backoff s, then doubles (capped by max_backoff)
    max_backoff: float = 30.0
    max_total_time: float = 600.0       # give up when the next wait would cross this budget (seconds)
    max_tokens: int | None = None

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 **kw) -> "LLMConfig":
        """Arguments win; otherwise ``$KPL_LLM_BASE_URL``, ``$KPL_LLM_MODEL``, ``$KPL_LLM_API_KEY``."""
        base_url = base_url or os.environ.get("KPL_LLM_BASE_URL")
        model = model or os.environ.get("KPL_LLM_MODEL")
        api_key = api_key if api_key is not None else os.environ.get("KPL_LLM_API_KEY")
        if not base_url:
            raise KPLInputError("no LLM endpoint: pass base_url or set KPL_LLM_BASE_URL "
                                "(e.g. https://api.openai.com/v1).")
        if not model:
            raise KPLInputError("no LLM model: pass model or set KPL_LLM_MODEL (e.g. gpt-3.5-turbo).")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KPLInputError(f"KPL_LLM_BASE_URL / base_url must be an http(s) URL, got scheme "
                                f"{parts.scheme!r} and host {parts.hostname!r}.")
        if parts.username or parts.password:
            raise KPLInputError("base_url must not carry credentials (user:password@); put the key in "
                                "KPL_LLM_API_KEY.")
        return cls(base_url=base_url.rstrip("/"), model=model, api_key=api_key or None, **kw)

    @property
    def host(self) -> str:
        """Host (and port) of the endpoint — the only part of the URL recorded in a KB."""
        p = urllib.parse.urlsplit(self.base_url)
        return f"{p.hostname}:{p.port}" if p.port else str(p.hostname)


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, _REDACTED)
    return text


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: following one would resend the Authorization header, possibly to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post_json(cfg: LLMConfig, payload: dict) -> tuple[int, bytes]:
    """One POST. Returns (status, body) for 2xx; raises _Retryable or LLMError otherwise."""
    url = cfg.base_url + "/chat/completions"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    req = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
    try:
        with _OPENER.open(req, timeout=cfg.timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        try:
            body = e.read()[:300].decode("utf-8", "replace")
        except Exception:
            body = ""
        body = _redact(body, cfg.api_key)
        if e.code == 429 or 500 <= e.code < 600:
            ra = e.headers.get("Retry-After") if e.headers else None
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
            raise _Retryable(f"HTTP {e.code}", retry_after) from None
        if 300 <= e.code < 400:
            raise LLMError(f"HTTP {e.code} redirect from {cfg.host}; redirects are not followed (the API key would "
                           "be resent): set base_url to the final endpoint URL.") from None
        raise LLMError(f"HTTP {e.code} from {cfg.host}: {body.strip() or e.reason}") from None
    except (TimeoutError, socket.timeout):
        raise _Retryable(f"no answer within timeout={cfg.timeout}s") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _Retryable(f"no answer within timeout={cfg.timeout}s") from None
        raise _Retryable(f"connection failed ({_redact(str(reason), cfg.api_key)})") from None
    except http.client.HTTPException as e:  # e.g. IncompleteRead: the connection dropped in the middle of the reply
        raise _Retryable(f"connection dropped during the reply ({type(e).__name__})") from None
    except (ConnectionError, OSError) as e:
        raise _Retryable(f"connection failed ({type(e).__name__})") from None


def chat_completion(messages: list[dict], cfg: LLMConfig, what: str = "request",
                    sleep: Callable[[float], None] = time.sleep) -> tuple[str, str | None]:
    """POST a chat completion with bounded retries; return (content, finish_reason).

    Retries (exponential backoff, at most ``cfg.max_retries`` and ``cfg.max_total_time``) on connection errors,
    timeouts, HTTP 429 and 5xx; any other 4xx and any malformed reply raise :class:`LLMError` at once. ``what``
    names the class in messages.
    """
    payload = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature}
    if cfg.max_tokens:
        payload["max_tokens"] = cfg.max_tokens
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            _, body = _post_json(cfg, payload)
            break
        except _Retryable as e:
            wait = min(cfg.max_backoff, cfg.backoff * (2 ** attempt))
            if e.retry_after is not None:
                wait = min(cfg.max_backoff, max(wait, e.retry_after))
            wait *= 1.0 + 0.1 * random.random()   # small jitter
            elapsed = time.monotonic() - start
            if attempt >= cfg.max_retries or elapsed + wait > cfg.max_total_time:
                raise LLMError(f"{what}: {e.reason} from {cfg.host}; gave up after {attempt + 1} attempt(s) in "
                               f"{elapsed:.1f}s (max_retries={cfg.max_retries}, "
                               f"max_total_time={cfg.max_total_time}s).") from None
            attempt += 1
            log.warning("%s: %s from %s; retry %d/%d in %.2fs", what, e.reason, cfg.host, attempt,
                        cfg.max_retries, wait)
            sleep(wait)
        except LLMError as e:
            raise LLMError(_redact(f"{what}: {e}", cfg.api_key)) from None
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMError(f"{what}: the reply from {cfg.host} is not valid JSON (truncated or not an OpenAI-compatible "
                       f"endpoint?): {type(e).__name__} {getattr(e, 'msg', '')} at char "
                       f"{getattr(e, 'pos', '?')} of {len(body)}.") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise LLMError(f"{what}: the reply from {cfg.host} has no 'choices' (is base_url an OpenAI-compatible "
                       "chat-completions endpoint?).")
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message") if isinstance(first.get("message"), dict) else {}
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise LLMError(f"{what}: the reply from {cfg.host} has no message content.")
    return content, first.get("finish_reason")


_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}(?:\.\d{1,3})*\s*[.):\]]|\d{1,3}(?:\.\d{1,3})+|\d{1,3}\s+-|[-*•–+])\s+"
                   r"(?P<text>.+?)\s*$")


def parse_numbered_list(text: str) -> list[str]:
    """Items of a numbered/bulleted list ("1.", "1)", "(1)", "- ", "* ", "•"); other lines are dropped.

    Drops preambles and closing sentences (lines that are not list items), strips bold/italic markers, surrounding
    quotes and trailing punctuation, and removes duplicates (case-insensitive, first kept).
    """
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        m = _ITEM.match(line)
        if not m:
            continue
        item = m.group("text")
        item = re.sub(r"(\*\*|__)(.+?)\1", r"\2", item)      # **bold** / __bold__
        item = item.replace("**", "").replace("__", "")
        item = re.sub(r"(?<!\w)\*(?!\s)(.+?)(?<!\s)\*(?!\w)", r"\1", item)  # *italic*
        item = item.strip().strip("\"'“”‘’`").strip()
        item = re.sub(r"[\s.;,:!]+$", "", item).strip()
        if not item:
            continue
        key = re.sub(r"\s+", " ", item.lower())
        if key in seen:
            continue
        seen.add(key)
        out.append(item)
    return out


def build_prompt(class_name: str, prompt: str = "released", modality: str | None = None) -> str:
    """The user message for one class: ``prompt`` is "released", "medical" or a template with ``{class_name}``."""
    template = PROMPTS.get(prompt, prompt)
    if "{class_name}" not in template:
        raise KPLInputError(f"prompt must be 'released', 'medical' or a template containing '{{class_name}}'; "
                            f"got {prompt!r}.")
    if "{modality}" in template:
        if not modality:
            raise KPLInputError(f"the {prompt!r} prompt needs modality=... (e.g. 'fundus photograph').")
        return template.format(class_name=class_name, modality=modality)
    return template.format(class_name=class_name)


def generate_descriptions(class_name: str, cfg: LLMConfig, prompt: str = "released", modality: str | None = None,
                          min_items: int = 1, sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Ask the LLM for one class's features and return the parsed list (LLMError when nothing usable came)."""
    what = f"class {class_name!r}"
    content, finish = chat_completion([{"role": "user", "content": build_prompt(class_name, prompt, modality)}],
                                      cfg, what=what, sleep=sleep)
    items = parse_numbered_list(content)
    if finish == "length" and items:
        log.warning("%s: the reply was cut at max_tokens; dropping its last (possibly partial) item", what)
        items = items[:-1]
    if not items:
        raise LLMError(f"{what}: the reply from {cfg.host} contains no list items (got {len(content)} characters "
                       "of text without '1.'/'-' items).")
    if len(items) < min_items:
        raise LLMError(f"{what}: only {len(items)} feature(s) parsed, fewer than min_items={min_items}.")
    return items


def generate_kb(class_names: Sequence[str], dataset: str | None = None, modality: str | None = None,
                prompt: str = "released", display_names: Sequence[str] | None = None,
                config: LLMConfig | None = None, base_url: str | None = None, model: str | None = None,
                api_key: str | None = None, temperature: float | None = None, kb_id: str | None = None,
                min_items: int = 1, sleep: Callable[[float], None] = time.sleep, **config_kw) -> KnowledgeBase:
    """A KB (method ``generated``) with one LLM request per class; ``display_names`` go into the prompt.

    The KB records ``generator = {model, base_url_host, prompt, prompt_name, temperature, date}`` — host only,
    never the key. Descriptions are parsed, de-duplicated and checked for emptiness; run
    :func:`kplib.knowledge.validate` on the result for counts, token lengths and cross-class mentions.
    """
    class_names = list(class_names)
    if not class_names:
        raise KPLInputError("generate_kb: class_names is empty.")
    if len(set(class_names)) != len(class_names):
        raise KPLInputError(f"generate_kb: duplicate class names in {class_names}.")
    names_in_prompt = list(display_names) if display_names is not None else [c.replace("_", " ")
                                                                            for c in class_names]
    if len(names_in_prompt) != len(class_names):
        raise KPLInputError(f"generate_kb: {len(names_in_prompt)} display_names for {len(class_names)} classes.")
    if config is None:
        if temperature is not None:
            config_kw["temperature"] = temperature
        config = LLMConfig.from_env(base_url=base_url, model=model, api_key=api_key, **config_kw)
    elif temperature is not None:
        config = dataclasses.replace(config, temperature=temperature)
    template = PROMPTS.get(prompt, prompt)
    build_prompt(names_in_prompt[0], prompt, modality)  # fail before any request on a bad prompt/modality
    today = _dt.date.today().isoformat()
    classes = []
    for name, shown in zip(class_names, names_in_prompt):
        items = generate_descriptions(shown, config, prompt=prompt, modality=modality, min_items=min_items,
                                      sleep=sleep)
        log.info("class %r: %d descriptions from %s", name, len(items), config.host)
        classes.append(KBClass(name=name, display_name=shown,
                               descriptions=[Description(t, None) for t in items], references=[]))
    generator = {"model": config.model, "base_url_host": config.host, "prompt": template,
                 "prompt_name": prompt if prompt in PROMPTS else "custom", "modality": modality,
                 "temperature": config.temperature, "date": today}
    return KnowledgeBase(schema_version=SCHEMA_VERSION,
                         kb_id=kb_id or f"{dataset or 'classes'}-generated-{config.model}-{today}",
                         dataset=dataset, modality=modality, created=today, method="generated",
                         authors=f"LLM {config.model} (kplib.llm)", generator=generator, source=None,
                         classes=classes)
