"""KPL and its baselines behind one interface (kpl-method.md; ARCHITECTURE.md "methods.py").

* ``zero_shot`` — class-name prompts, template ensemble (mean of normalised template embeddings, renormalised).
* ``descriptor_mean`` — each class's proxy is the normalised mean of *all* its description embeddings.
* ``inmap`` — InMaP: zero-shot class-name proxies, ``P0 = softmax(L/tau_t)``, balanced Sinkhorn
  (:func:`~kplib.transport.inmap_sinkhorn`, rows sum to 1), hardening, proxy learning.
* ``kpl`` — text proxies from retrieved descriptions (stage 1), pseudo-labels, transport, hardening, proxy
  learning (stage 2), in ``"reference"`` (released computation) or ``"corrected"`` mode.

Every stage's output, timing and iteration count is kept in :class:`MethodResult` so a notebook can inspect it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from . import proxy as _proxy
from . import text_proxy as _tp
from . import transport as _ot
from ._checks import (
    check_choice,
    check_description_embeddings,
    check_embeddings,
    check_finite,
    check_int,
    check_positive,
    check_unit_rows,
)
from .errors import KPLInputError

__all__ = [
    "TextEmbeddings",
    "KPLConfig",
    "MethodResult",
    "run_method",
    "resolve_config",
    "zero_shot",
    "descriptor_mean",
    "inmap",
    "kpl",
    "METHODS",
    "TRANSPORTS",
]

METHODS: tuple[str, ...] = ("zero_shot", "descriptor_mean", "inmap", "kpl_reference", "kpl_corrected")
TRANSPORTS: tuple[str, ...] = (
    "released_greenkhorn", "inmap_sinkhorn", "sinkhorn_log", "greenkhorn", "semidual_newton", "none"
)


@dataclass
class TextEmbeddings:
    """Everything text-side a method needs, already encoded (rows L2-normalised)."""

    class_names: list[str]
    name_embeddings: Tensor  # (C, T, d) class-name prompts for T templates (zero_shot); T may be 1
    description_embeddings: list[Tensor]  # C items (M_c, d): embeddings of the KPL prompt per description
    descriptions: list[list[str]] | None = None  # the raw description texts, for display
    templates: list[str] | None = None
    meta: dict = field(default_factory=dict)  # encoder identity, KB id, prompt template


@dataclass(frozen=True)
class KPLConfig:
    """Every switch of kpl-method.md. Defaults are the released code's defaults (reference mode).

    Fields beyond ARCHITECTURE.md (additions): ``ot_max_iter`` (sweep budget of the corrected solvers) and
    ``normalize_rows`` (rescale transported rows to sum to 1 before hardening; None = the mode's default:
    reference False — the released 1/N rows are kept —, corrected True).
    """

    mode: str = "reference"  # "reference" | "corrected"
    k: int = 8
    retrieval: str = "dataset"  # "dataset" (released) | "per_image" (extension)
    tau_t: float = 0.01
    tau_i: float = 0.04
    alpha: float = 0.6
    class_marginal: str = "uniform"  # "uniform" | "gamma" | "em"
    gamma: float = 0.0
    lr: float = 10.0
    iters_proxy: int = 2000
    iters_ot: int = 20
    # None: reference -> "released_greenkhorn"; corrected -> "semidual_newton" (measured: POT's log-domain Sinkhorn
    # needs O(1/tau_t) sweeps — at N=27,558, C=2, tau_t=0.01 it had not met tol=1e-6 after 1,000 sweeps (11 s)
    # where Newton met it in 4 iterations (0.01 s); "sinkhorn_log" (POT) stays selectable and agrees, see tests)
    transport: str | None = None
    ot_tol: float = 1e-6  # corrected solvers only
    proxy_tol: float = 1e-6  # corrected mode only
    no_transport_baseline: bool = False  # also learn proxies from P0 (the released code's middle accuracy)
    record_every: int | None = None
    seed: int = 0
    ot_max_iter: int = 1000
    normalize_rows: bool | None = None

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", ("reference", "corrected"))
        check_int(self.k, "k", minimum=1)
        check_choice(self.retrieval, "retrieval", ("dataset", "per_image"))
        check_positive(self.tau_t, "tau_t")
        check_positive(self.tau_i, "tau_i")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise KPLInputError(f"alpha must be a finite number (hardening threshold), got {self.alpha!r}")
        check_choice(self.class_marginal, "class_marginal", ("uniform", "gamma", "em"))
        if (
            isinstance(self.gamma, bool)
            or not isinstance(self.gamma, (int, float))
            or not math.isfinite(self.gamma)
            or self.gamma < 0
        ):
            raise KPLInputError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        check_positive(self.lr, "lr")
        check_int(self.iters_proxy, "iters_proxy", minimum=0)
        check_int(self.iters_ot, "iters_ot", minimum=0)
        if self.transport is not None:
            check_choice(self.transport, "transport", TRANSPORTS)
        check_positive(self.ot_tol, "ot_tol")
        check_positive(self.proxy_tol, "proxy_tol")
        if self.record_every is not None:
            check_int(self.record_every, "record_every", minimum=1)
        check_int(self.seed, "seed", minimum=0)
        check_int(self.ot_max_iter, "ot_max_iter", minimum=1)

    @classmethod
    def reference(cls, **kw) -> "KPLConfig":
        """The released computation (every default as in the authors' code)."""
        return cls(mode="reference", **kw)

    @classmethod
    def corrected(cls, **kw) -> "KPLConfig":
        """What the method intends: log-domain OT to ``ot_tol``, rows summing to 1, proxy learning to ``proxy_tol``."""
        return cls(mode="corrected", **kw)

    @property
    def resolved_transport(self) -> str:
        if self.transport is not None:
            return self.transport
        return "released_greenkhorn" if self.mode == "reference" else "semidual_newton"

    @property
    def resolved_normalize_rows(self) -> bool:
        return (self.mode == "corrected") if self.normalize_rows is None else bool(self.normalize_rows)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["transport"] = self.resolved_transport
        d["normalize_rows"] = self.resolved_normalize_rows
        return d


@dataclass
class MethodResult:
    """Everything a method computed; fields a method does not have are None."""

    method: str  # "zero_shot" | "descriptor_mean" | "inmap" | "kpl"
    class_names: list[str]
    config: dict
    predictions: Tensor  # (N,) int64
    logits: Tensor  # (N, C) final scores
    text_proxies: Tensor | None = None
    text_logits: Tensor | None = None
    text_predictions: Tensor | None = None
    selected_descriptions: list[Tensor] | None = None
    description_scores: list[Tensor] | None = None
    pseudo_labels_initial: Tensor | None = None
    pseudo_labels_transported: Tensor | None = None
    pseudo_labels_final: Tensor | None = None
    hardened: Tensor | None = None
    class_marginal: Tensor | None = None
    transport: _ot.TransportResult | None = None
    proxy_learning: _proxy.ProxyLearningResult | None = None
    proxies: Tensor | None = None
    no_transport_predictions: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------- checks


def _check_inputs(image_embeddings, text: TextEmbeddings, need_names: bool, need_descs: bool):
    x = check_embeddings(image_embeddings, "image_embeddings")
    d = x.shape[1]
    if not isinstance(text, TextEmbeddings):
        raise KPLInputError(f"text must be a kplib.methods.TextEmbeddings, got {type(text).__name__}")
    names = list(text.class_names)
    c = len(names)
    if c < 2:
        raise KPLInputError(f"text.class_names must list at least 2 classes, got {c}")
    name_emb = None
    if need_names:
        name_emb = text.name_embeddings
        if not isinstance(name_emb, Tensor):
            name_emb = torch.as_tensor(name_emb)
        if name_emb.ndim == 2:
            name_emb = name_emb.unsqueeze(1)
        if name_emb.ndim != 3 or name_emb.shape[2] != d:
            raise KPLInputError(
                f"text.name_embeddings must have shape (C, T, d) = ({c}, T, {d}), got {tuple(name_emb.shape)}"
            )
        if name_emb.shape[0] != c:
            raise KPLInputError(
                f"text.name_embeddings has {name_emb.shape[0]} classes but text.class_names has {c}; "
                "they must describe the same classes in the same order"
            )
        name_emb = name_emb.to(x.dtype)
        check_finite(name_emb, "text.name_embeddings")
        check_unit_rows(name_emb, "text.name_embeddings")
    descs = None
    if need_descs:
        raw = text.description_embeddings
        if not isinstance(raw, (list, tuple)) or len(raw) != c:
            got = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise KPLInputError(
                f"text.description_embeddings must hold one (M_c, d) tensor per class ({c} classes: {names}), "
                f"got {got}"
            )
        descs = [t.to(x.dtype) for t in check_description_embeddings(raw, dim=d, class_names=names)]
        if text.name_embeddings is not None and need_names is False:
            n_name = text.name_embeddings.shape[0] if hasattr(text.name_embeddings, "shape") else None
            if n_name is not None and n_name != c:
                raise KPLInputError(
                    f"text.name_embeddings has {n_name} classes but text.description_embeddings has {c}; "
                    "they must describe the same classes in the same order"
                )
    return x, names, name_emb, descs


def _ensemble(name_emb: Tensor) -> Tensor:
    """Zero-shot class proxies: mean of the normalised template embeddings, renormalised."""
    return F.normalize(F.normalize(name_emb, dim=-1).mean(dim=1), dim=-1)


def _timed(timings: dict, key: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[key] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------------------- methods


def zero_shot(image_embeddings: Tensor, text: TextEmbeddings) -> MethodResult:
    """CLIP zero-shot with a class-name template ensemble."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, names, name_emb, _ = _check_inputs(image_embeddings, text, need_names=True, need_descs=False)
    w = _ensemble(name_emb)
    logits = x @ w.T
    timings["total"] = time.perf_counter() - t0
    pred = logits.argmax(dim=1)
    return MethodResult(
        "zero_shot", names, {"templates": name_emb.shape[1]}, pred, logits,
        text_proxies=w, text_logits=logits, text_predictions=pred, proxies=w, timings=timings,
    )


def descriptor_mean(image_embeddings: Tensor, text: TextEmbeddings) -> MethodResult:
    """Each class's proxy = normalised mean of all its description embeddings (no retrieval, no learning)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, names, _, descs = _check_inputs(image_embeddings, text, need_names=False, need_descs=True)
    w = torch.stack([F.normalize(d.mean(dim=0), dim=0) for d in descs])
    logits = x @ w.T
    timings["total"] = time.perf_counter() - t0
    pred = logits.argmax(dim=1)
    return MethodResult(
        "descriptor_mean", names, {"n_descriptions": [int(d.shape[0]) for d in descs]}, pred, logits,
        text_proxies=w, text_logits=logits, text_predictions=pred, proxies=w, timings=timings,
    )


def _class_marginal(p0: Tensor, cfg: KPLConfig) -> Tensor:
    if cfg.class_marginal == "uniform":
        return torch.full((p0.shape[1],), 1.0 / p0.shape[1], dtype=p0.dtype)
    if cfg.class_marginal == "gamma":
        return _ot.class_marginal_from_pseudo_labels(p0, cfg.gamma)
    return _ot.em_class_prior(p0)


def _transport(name: str, text_logits: Tensor, p0: Tensor, q: Tensor, cfg: KPLConfig) -> _ot.TransportResult | None:
    if name == "released_greenkhorn":
        return _ot.released_greenkhorn(text_logits, cfg.tau_t, q, cfg.iters_ot)
    if name == "inmap_sinkhorn":
        return _ot.inmap_sinkhorn(p0, q, cfg.iters_ot)
    if name in ("sinkhorn_log", "greenkhorn", "semidual_newton"):
        method = "newton" if name == "semidual_newton" else name
        return _ot.sinkhorn_log(text_logits, cfg.tau_t, q, cfg.ot_tol, cfg.ot_max_iter, method=method)
    return None  # "none": no transport


def _stage2(
    result: MethodResult, x: Tensor, init: Tensor, text_logits: Tensor, cfg: KPLConfig, transport: str
) -> MethodResult:
    """Pseudo-labels → class marginal → transport → hardening → proxy learning → prediction."""
    t = result.timings
    p0 = _timed(t, "pseudo_labels", _proxy.pseudo_labels, text_logits, cfg.tau_t)
    q = _timed(t, "class_marginal", _class_marginal, p0, cfg)
    tr = _timed(t, "transport", _transport, transport, text_logits, p0, q, cfg)
    transported = p0 if tr is None else tr.plan
    rows = transported
    if cfg.resolved_normalize_rows:
        rows = transported / transported.sum(dim=1, keepdim=True)
    y, mask = _timed(t, "hardening", _proxy.harden, rows, cfg.alpha)
    proxy_mode = cfg.mode
    learn = _timed(
        t, "proxy_learning", _proxy.learn_proxies, x, y, init, cfg.tau_i, cfg.lr, cfg.iters_proxy,
        proxy_mode, cfg.proxy_tol, cfg.record_every,
    )
    if cfg.no_transport_baseline:
        base = _timed(
            t, "proxy_learning_no_transport", _proxy.learn_proxies, x, p0, init, cfg.tau_i, cfg.lr,
            cfg.iters_proxy, proxy_mode, cfg.proxy_tol,
        )
        result.no_transport_predictions = _proxy.predict(x, base.proxies)
    logits = x @ learn.proxies.T
    result.logits = logits
    result.predictions = logits.argmax(dim=1)
    result.pseudo_labels_initial = p0
    result.pseudo_labels_transported = transported
    result.pseudo_labels_final = y
    result.hardened = mask
    result.class_marginal = q
    result.transport = tr
    result.proxy_learning = learn
    result.proxies = learn.proxies
    return result


def inmap(image_embeddings: Tensor, text: TextEmbeddings, config: KPLConfig | None = None) -> MethodResult:
    """InMaP: class-name zero-shot proxies + balanced Sinkhorn (``iters_ot`` sweeps, rows sum to 1) + hardening +
    proxy learning in ``config.mode`` (reference = the released descent InMaP and KPL share).

    ``config.class_marginal``/``gamma`` choose q; ``config.transport`` is ignored (always ``inmap_sinkhorn``);
    retrieval/k are unused (no descriptions).
    """
    cfg = config if config is not None else KPLConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, names, name_emb, _ = _check_inputs(image_embeddings, text, need_names=True, need_descs=False)
    w0 = _ensemble(name_emb)
    text_logits = x @ w0.T
    timings["text_proxies"] = time.perf_counter() - t0
    conf = cfg.to_dict()
    conf["transport"] = "inmap_sinkhorn"
    conf["normalize_rows"] = False
    res = MethodResult(
        "inmap", names, conf, torch.empty(0, dtype=torch.long), text_logits,
        text_proxies=w0, text_logits=text_logits, text_predictions=text_logits.argmax(dim=1), timings=timings,
    )
    cfg_inmap = dataclasses.replace(cfg, transport="inmap_sinkhorn", normalize_rows=False)
    _stage2(res, x, w0, text_logits, cfg_inmap, "inmap_sinkhorn")
    timings["total"] = time.perf_counter() - t0
    return res


def kpl(
    image_embeddings: Tensor, text: TextEmbeddings, config: KPLConfig | None = None, mode: str | None = None
) -> MethodResult:
    """Knowledge Proxy Learning (both stages). ``mode`` overrides ``config.mode`` when given."""
    cfg = config if config is not None else KPLConfig()
    if mode is not None:
        check_choice(mode, "mode", ("reference", "corrected"))
        cfg = dataclasses.replace(cfg, mode=mode)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, names, _, descs = _check_inputs(image_embeddings, text, need_names=False, need_descs=True)
    tp = _timed(timings, "text_proxies", _tp.build_text_proxies, x, descs, cfg.k)
    if cfg.retrieval == "dataset":
        text_logits = x @ tp.proxies.T
    else:  # extension: per-image retrieval; proxy learning still starts from the dataset-level text proxies
        text_logits = _timed(timings, "per_image_retrieval", _tp.per_image_text_logits, x, descs, cfg.k)
    res = MethodResult(
        "kpl", names, cfg.to_dict(), torch.empty(0, dtype=torch.long), text_logits,
        text_proxies=tp.proxies, text_logits=text_logits, text_predictions=text_logits.argmax(dim=1),
        selected_descriptions=tp.selected, description_scores=tp.scores, timings=timings,
    )
    _stage2(res, x, tp.proxies, text_logits, cfg, cfg.resolved_transport)
    timings["total"] = time.perf_counter() - t0
    return res


def resolve_config(config: KPLConfig | None = None, **overrides) -> KPLConfig:
    """The config :func:`run_method` uses: ``config`` (default ``KPLConfig()``) with ``overrides`` applied.

    Unknown field names and invalid values raise :class:`KPLInputError` (even for methods that ignore the config).
    """
    if config is not None and not isinstance(config, KPLConfig):
        raise KPLInputError(f"config must be a kplib.methods.KPLConfig or None, got {type(config).__name__}")
    cfg = config if config is not None else KPLConfig()
    if overrides:
        known = {f.name for f in dataclasses.fields(KPLConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise KPLInputError(f"unknown KPLConfig field(s) {bad}; valid fields: {sorted(known)}")
        cfg = dataclasses.replace(cfg, **overrides)  # validated even when the method does not use it
    return cfg


def run_method(
    method: str, image_embeddings: Tensor, text: TextEmbeddings, config: KPLConfig | None = None, **overrides
) -> MethodResult:
    """Run one of :data:`METHODS` (or ``"kpl"``, which uses ``config.mode``). ``overrides`` replace config fields.

    Unknown field names and invalid values always raise; ``zero_shot`` and ``descriptor_mean`` have no parameters,
    so a valid config/overrides is accepted and does not change them (lets callers loop over METHODS uniformly).
    """
    check_choice(method, "method", METHODS + ("kpl",))
    cfg = resolve_config(config, **overrides)
    if method in ("zero_shot", "descriptor_mean"):  # parameter-free: a (valid) config does not apply
        return zero_shot(image_embeddings, text) if method == "zero_shot" else descriptor_mean(image_embeddings, text)
    if method == "inmap":
        return inmap(image_embeddings, text, cfg)
    mode = {"kpl_reference": "reference", "kpl_corrected": "corrected"}.get(method)
    return kpl(image_embeddings, text, cfg, mode=mode)
