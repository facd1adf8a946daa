"""Generate a knowledge base with an LLM through an OpenAI-compatible chat-completions endpoint (KPL stage 0).

The KPL authors asked gpt-3.5-turbo, once per class, for a numbered list of at least 50 visual features and kept
each numbered line as a description; :func:`generate_kb` does the same against any ``POST {base_url}/chat/completions``
endpoint (OpenAI, vLLM, llama.cpp, Ollama). The API key travels in the ``Authorization`` header only: never logged,
stored or put in an exception; redirects (which would resend it) are refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import http.client
import itertools
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import KPLInputError, LLMError, fix
from .knowledge import SCHEMA_VERSION, Description, KBClass, KnowledgeBase

log = logging.getLogger("kplib")

#: The released KPL prompt, paraphrased from the paper (the exact string the authors sent is not public): one
#: request per class for a numbered list of at least 50 visual features; each numbered line becomes a description.
RELEASED_PROMPT = ("What are useful visual features for distinguishing a {class_name} in an image? "
                   "Give a numbered list of at least 50 such features, one short feature per line.")
#: This project's medical variant (not the paper's): names the modality and asks for noun phrases that read well
#: after "which has" in the KPL prompt, without naming other diagnoses.
MEDICAL_PROMPT = ("You are an expert in reading {modality} images. What are useful visual features for "
                  "distinguishing {class_name} in a {modality}? Give a numbered list of at least 50 features that "
                  "are visible in the image itself, one short noun phrase per line (each should read naturally "
                  "after the words \"which has\"), without naming other diagnoses and without explanations.")
PROMPTS = {"released": RELEASED_PROMPT, "medical": MEDICAL_PROMPT}


@dataclass
class LLMConfig:
    """Endpoint settings (``api_key`` is kept out of ``repr``). A retry (connection error, timeout, HTTP 429 or 5xx)
    waits ``backoff`` s, doubling up to ``max_backoff`` (or Retry-After, capped alike), at most ``max_retries`` times
    and within ``max_total_time`` s."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.7
    timeout: float = 120.0
    max_retries: int = 4
    backoff: float = 2.0
    max_backoff: float = 30.0
    max_total_time: float = 600.0
    max_tokens: int | None = None

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 **options) -> LLMConfig:
        """Arguments win; otherwise ``$KPL_LLM_BASE_URL``, ``$KPL_LLM_MODEL``, ``$KPL_LLM_API_KEY``."""
        base_url = base_url or os.environ.get("KPL_LLM_BASE_URL")
        model = model or os.environ.get("KPL_LLM_MODEL")
        api_key = api_key if api_key is not None else os.environ.get("KPL_LLM_API_KEY")
        if not base_url or not model:
            what, flag, env, eg = (("endpoint", "base-url", "BASE_URL", "https://api.openai.com/v1") if not base_url
                                   else ("model", "model", "MODEL", "gpt-3.5-turbo"))
            raise KPLInputError(f"no LLM {what}: set KPL_LLM_{env} (e.g. {eg}) or pass it "
                                + fix(cli=f"--{flag} ...", python=f"{flag.replace('-', '_')}=..."))
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise KPLInputError(f"KPL_LLM_BASE_URL / base_url must be an http(s) URL without credentials (put the key "
                                f"in KPL_LLM_API_KEY); got scheme {parts.scheme!r}, host {parts.hostname!r}"
                                f"{', and user:password@' if parts.username or parts.password else ''}.")
        return cls(base_url=base_url.rstrip("/"), model=model, api_key=api_key or None, **options)

    @property
    def host(self) -> str:
        """Host (and port) of the endpoint: the only part of the URL recorded in a KB."""
        p = urllib.parse.urlsplit(self.base_url)
        return f"{p.hostname}:{p.port}" if p.port else str(p.hostname)


class _Retryable(Exception):
    """``(reason, Retry-After seconds or None)`` of a failure worth another try."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: following one would resend the Authorization header, possibly to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(cfg: LLMConfig, payload: dict, what: str) -> bytes:
    """One POST; the body of a 2xx reply. Raises _Retryable (worth another try) or LLMError (key redacted)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               **({"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {})}
    req = urllib.request.Request(cfg.base_url + "/chat/completions", json.dumps(payload).encode(), headers)
    try:
        with _OPENER.open(req, timeout=cfg.timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            wait = (e.headers.get("Retry-After") or "").strip() if e.headers else ""
            raise _Retryable(f"HTTP {e.code}", float(wait) if re.fullmatch(r"\d+(\.\d*)?", wait) else None) from None
        body = ""
        with contextlib.suppress(OSError, http.client.HTTPException):  # the error body itself may be cut short
            body = e.read()[:300].decode("utf-8", "replace").strip()
        detail = ("a redirect, not followed (the API key would be resent): set base_url to the final endpoint URL"
                  if 300 <= e.code < 400 else body or e.reason)
        raise LLMError(_redact(f"{what}: HTTP {e.code} from {cfg.host}: {detail}", cfg)) from None
    except (http.client.HTTPException, OSError) as e:  # URLError, a timeout, or a reset/IncompleteRead mid-reply
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise _Retryable(f"no answer within timeout={cfg.timeout}s" if isinstance(reason, TimeoutError) else
                         f"connection failed ({type(reason).__name__}: {reason})" if reason is not e else
                         f"connection dropped during the reply ({type(e).__name__})", None) from None


def chat_completion(messages: list[dict], cfg: LLMConfig, what: str = "request",
                    sleep: Callable[[float], None] = time.sleep) -> tuple[str, str | None]:
    """POST a chat completion with bounded retries; return ``(content, finish_reason)``.

    Retries with exponential backoff on connection errors, timeouts, HTTP 429 and 5xx; any other 4xx and any
    malformed reply raise :class:`LLMError` at once. ``what`` names the class in messages.
    """
    payload = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
               **({"max_tokens": cfg.max_tokens} if cfg.max_tokens else {})}
    start = time.monotonic()
    for attempt in itertools.count():
        try:
            body = _post(cfg, payload, what)
            break
        except _Retryable as e:
            reason, retry_after = e.args
            wait = min(cfg.max_backoff, max(cfg.backoff * 2 ** attempt, retry_after or 0.0))
            wait *= 1.0 + 0.1 * random.random()  # jitter
            elapsed = time.monotonic() - start
            if attempt >= cfg.max_retries or elapsed + wait > cfg.max_total_time:
                raise LLMError(_redact(f"{what}: {reason} from {cfg.host}; gave up after {attempt + 1} attempt(s) "
                                       f"in {elapsed:.1f}s (max_retries={cfg.max_retries}, max_total_time="
                                       f"{cfg.max_total_time}s).", cfg)) from None
            log.warning("%s: %s from %s; retry %d/%d in %.2fs", what, _redact(reason, cfg), cfg.host, attempt + 1,
                        cfg.max_retries, wait)
            sleep(wait)
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMError(f"{what}: the reply from {cfg.host} is not valid JSON (truncated, or not an OpenAI-compatible "
                       f"endpoint?): {type(e).__name__} at byte {getattr(e, 'pos', getattr(e, 'start', '?'))} of "
                       f"{len(body)}.") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise LLMError(f"{what}: the reply from {cfg.host} has no 'choices' (is base_url an OpenAI-compatible "
                       "chat-completions endpoint?).")
    first = choices[0] if isinstance(choices[0], dict) else {}
    content = (first.get("message") if isinstance(first.get("message"), dict) else {}).get("content")
    if not isinstance(content, str) or not content.strip():
        raise LLMError(f"{what}: the reply from {cfg.host} has no message content.")
    return content, first.get("finish_reason")


def _redact(text: str, cfg: LLMConfig) -> str:
    return text.replace(cfg.api_key, "***") if cfg.api_key else text


_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}(?:\.\d{1,3})*\s*[.):\]]|\d{1,3}(?:\.\d{1,3})+|\d{1,3}\s+-|[-*•–+])\s+"
                   r"(?P<text>.+?)\s*$")


def parse_numbered_list(text: str) -> list[str]:
    """Items of a numbered or bulleted list ("1.", "1)", "(1)", "- ", "* ", "•"); other lines (preamble, closing)
    are dropped; bold/italic, quotes and trailing punctuation stripped; case-insensitive duplicates removed."""
    out: dict[str, str] = {}
    for m in filter(None, map(_ITEM.match, text.splitlines())):
        item = re.sub(r"(\*\*|__)(.+?)\1", r"\2", m.group("text")).replace("**", "").replace("__", "")
        item = re.sub(r"(?<!\w)\*(?!\s)(.+?)(?<!\s)\*(?!\w)", r"\1", item)  # *italic*
        item = re.sub(r"[\s.;,:!]+$", "", item.strip().strip("\"'“”‘’`").strip()).strip()
        if item:
            out.setdefault(re.sub(r"\s+", " ", item.lower()), item)
    return list(out.values())


def build_prompt(class_name: str, prompt: str = "released", modality: str | None = None) -> str:
    """The user message for one class: ``prompt`` is "released", "medical" or a template with ``{class_name}``."""
    template = PROMPTS.get(prompt, prompt)
    if "{class_name}" not in template:
        raise KPLInputError(f"prompt must be 'released', 'medical' or a template containing '{{class_name}}'; got "
                            f"{prompt!r}.")
    if "{modality}" in template and not modality:
        raise KPLInputError(f"the {prompt!r} prompt needs the imaging modality "
                            + fix(cli="--modality 'fundus photograph'", python="modality='fundus photograph'"))
    return template.format(class_name=class_name, modality=modality)


def generate_descriptions(class_name: str, cfg: LLMConfig, prompt: str = "released", modality: str | None = None,
                          sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Ask the LLM for one class's features and return the parsed list (:class:`LLMError` when nothing usable)."""
    what = f"class {class_name!r}"
    content, finish = chat_completion([{"role": "user", "content": build_prompt(class_name, prompt, modality)}],
                                      cfg, what=what, sleep=sleep)
    items = parse_numbered_list(content)
    if finish == "length" and items:
        log.warning("%s: the reply was cut at max_tokens; dropping its last (possibly partial) item", what)
        items = items[:-1]
    if not items:
        raise LLMError(f"{what}: the reply from {cfg.host} contains no list items (got {len(content)} characters "
                       "without '1.'/'-' items).")
    return items


def generate_kb(class_names: Sequence[str], dataset: str | None = None, modality: str | None = None,
                prompt: str = "released", display_names: Sequence[str] | None = None,
                config: LLMConfig | None = None, temperature: float | None = None,
                kb_id: str | None = None) -> KnowledgeBase:
    """A KB (method ``generated``) with one LLM request per class; ``display_names`` go into the prompt.

    ``config`` defaults to :meth:`LLMConfig.from_env`; ``temperature`` overrides its own. The KB records
    ``generator = {model, base_url_host, prompt, prompt_name, modality, temperature, date}`` (the host, never the
    key). :func:`kplib.io.knowledge.validate` checks the result.
    """
    class_names = list(class_names)
    shown = list(display_names) if display_names is not None else [c.replace("_", " ") for c in class_names]
    if not class_names or len(set(class_names)) < len(class_names) or len(shown) != len(class_names):
        raise KPLInputError(f"generate_kb: class_names must be distinct and non-empty, with one display name each; "
                            f"got {class_names} and display_names {display_names}.")
    config = config or LLMConfig.from_env()
    if temperature is not None:
        config = dataclasses.replace(config, temperature=temperature)
    build_prompt(shown[0], prompt, modality)  # fail before any request on a bad prompt or a missing modality
    today = _dt.date.today().isoformat()
    classes = []
    for name, display in zip(class_names, shown):
        items = generate_descriptions(display, config, prompt, modality)
        log.info("class %r: %d descriptions from %s", name, len(items), config.host)
        classes.append(KBClass(name, display, [Description(t) for t in items]))
    generator = {"model": config.model, "base_url_host": config.host, "prompt": PROMPTS.get(prompt, prompt),
                 "prompt_name": prompt if prompt in PROMPTS else "custom", "modality": modality,
                 "temperature": config.temperature, "date": today}
    return KnowledgeBase(SCHEMA_VERSION, kb_id or f"{dataset or 'classes'}-generated-{config.model}-{today}", dataset,
                         modality, today, "generated", f"LLM {config.model} (kplib.io.llm)", generator, None, classes)
