r"""KPL and its baselines behind one interface: ``run_method(name, X, text, config) -> MethodResult``.

KPL, as the paper states it (kpl-method.md), in ten steps on unlabelled image embeddings :math:`X` (N, d):

1. score every description of every class against all images and keep the top K (:mod:`.text_proxy`);
2. average the kept descriptions into one text proxy :math:`w_c` per class;
3. text logits :math:`L = XW^\top` and the text-proxy prediction;
4. soft pseudo-labels :math:`P^0 = \mathrm{softmax}(L/\tau_t)` (:mod:`.proxy`);
5. a class marginal :math:`q` (uniform, or estimated: :func:`.transport.class_marginal`);
6. optimal transport of the pseudo-labels towards :math:`q` (:func:`.transport.transport`);
7. rows rescaled to sum to one (corrected mode only; the released rows sum to 1/N);
8. confident rows hardened to one-hot (:func:`.proxy.harden`);
9. class proxies learned in the image space from the text proxies (:func:`.proxy.learn_proxies`);
10. each image assigned to its nearest learned proxy.

The baselines share the pieces: ``zero_shot`` (class-name prompts), ``descriptor_mean`` (all descriptions
averaged), ``inmap`` (class-name proxies + InMaP's Sinkhorn + the same proxy learning). Every switch of
kpl-method.md is a field of :class:`KPLConfig`; ``mode="reference"`` reproduces the released computation and
``mode="corrected"`` implements what the method intends. :data:`METHODS` is the table the command line reads.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..errors import KPLInputError, fix
from ..params import (K_RULES, MODES, POSITIVE, Boolean, Interval, Options, check, check_descriptions,
                      check_embeddings, param, replace, unit, validate)
from .baselines import CLIPDNConfig, clip_dn as _clip_dn
from .controls import CONTROLS
from .proxy import ProxyLearningResult, harden, learn_proxies, predict, pseudo_labels
from .text_proxy import TextProxies, build_text_proxies, per_image_text_logits
from .transclip import TransCLIPConfig, transclip as _transclip
from .transport import TRANSPORT_METHODS, TransportResult, class_marginal, transport

__all__ = ["TextEmbeddings", "KPLConfig", "MethodResult", "MethodSpec", "METHODS", "run_method"]


@dataclass
class TextEmbeddings:
    """Everything text-side a method needs, already encoded (rows L2-normalised).

    ``controls`` holds alternative description sets for the knowledge controls (e.g. ``"random_words"``), encoded
    like the real descriptions, one (M_c, d) tensor per class.
    """

    class_names: list[str]
    name_embeddings: Tensor  # (C, T, d) class-name prompts for T templates (zero_shot, inmap)
    description_embeddings: list[Tensor]  # C items (M_c, d): the KPL prompt of every description
    descriptions: list[list[str]] | None = None  # the description texts, for display
    templates: list[str] | None = None
    meta: dict = field(default_factory=dict)  # encoder identity, knowledge base, prompt template
    controls: dict[str, list[Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class KPLConfig:
    """Every switch of KPL (kpl-method.md). ``None`` means "the mode's default" (resolved by :func:`run_method`)."""

    mode: str | None = param(None, MODES,
                             "reference: the released computation; corrected: what the method intends", none_ok=True)
    k: int = param(8, Interval(int, 1), "descriptions kept per class (top-K of stage 1)")
    k_rule: str | None = param(None, K_RULES,
                               "how K meets classes with fewer descriptions (default: running_min in reference "
                               "mode, as released; per_class in corrected mode)", none_ok=True)
    retrieval: str = param("dataset", Options("dataset", "per_image"),
                           "dataset: one selection for all images (released); per_image: an extension")
    tau_t: float = param(0.01, POSITIVE, "temperature of the pseudo-labels softmax(L / tau_t) and of the transport")
    tau_i: float = param(0.04, POSITIVE, "temperature of the image-proxy softmax in proxy learning")
    alpha: float = param(0.6, Interval(float), "hardening threshold: rows whose largest entry exceeds it become "
                                               "one-hot")
    class_marginal: str = param("uniform", Options("uniform", "gamma", "em"),
                                "class shares the transport aims at: uniform (released), gamma or em (estimated)")
    gamma: float = param(0.0, Interval(float, 0), "exponent of the gamma class marginal q_c ∝ (Σ_i P0_ic)^gamma")
    transport: str | None = param(None, Options(*TRANSPORT_METHODS),
                                  "transport solver (default: released_greenkhorn in reference mode, semidual in "
                                  "corrected mode, inmap_sinkhorn for inmap)", none_ok=True)
    iters_ot: int = param(20, Interval(int, 0), "updates of the fixed-iteration transport routines")
    ot_tol: float = param(1e-6, POSITIVE, "class-marginal tolerance of the converging transport solvers")
    ot_max_iter: int = param(1000, Interval(int, 1), "iteration budget of the converging transport solvers")
    normalize_rows: bool | None = param(None, Boolean(), "rescale transported rows to sum to 1 before hardening "
                                                         "(default: no in reference mode, yes in corrected)",
                                        none_ok=True)
    lr: float = param(10.0, POSITIVE, "initial step of the reference proxy descent")
    iters_proxy: int = param(2000, Interval(int, 0), "proxy-learning steps (reference) or L-BFGS budget (corrected)")
    proxy_tol: float = param(1e-6, POSITIVE, "proxy-learning tolerance (corrected mode)")
    no_transport_baseline: bool = param(False, Boolean(), "also learn proxies from the hardened P0, without "
                                                          "transport (the released code's middle accuracy)")
    record_every: int | None = param(None, Interval(int, 1), "keep a proxy snapshot every N steps", none_ok=True)
    seed: int = param(0, Interval(int, 0), "seed of the randomised methods (knowledge controls, WaffleCLIP)")

    def __post_init__(self) -> None:
        validate(self)
        if self.gamma != 0 and self.class_marginal != "gamma":
            raise KPLInputError(f"gamma={self.gamma} only acts with the gamma class marginal; set it too "
                                + fix(cli="--class-marginal gamma", python="class_marginal='gamma'")
                                + " or leave gamma at 0")

    @classmethod
    def reference(cls, **kw) -> "KPLConfig":
        """The released computation (every default as in the authors' code)."""
        return cls(mode="reference", **kw)

    @classmethod
    def corrected(cls, **kw) -> "KPLConfig":
        """What the method intends: exact transport, rows summing to 1, proxy learning to a tolerance."""
        return cls(mode="corrected", **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MethodResult:
    """What a method computed. Stage results are kept as the stages returned them; fields a method lacks are None."""

    method: str
    class_names: list[str]
    config: Any  # the resolved KPLConfig (the mode's defaults filled in), or the baseline's own config
    predictions: Tensor  # (N,) int64
    logits: Tensor  # (N, C) final scores
    text: TextProxies | None = None  # stage 1 (or the class-name proxies of zero_shot / inmap)
    pseudo_labels: Tensor | None = None  # P0
    class_marginal: Tensor | None = None  # q
    transport: TransportResult | None = None
    targets: Tensor | None = None  # Y: transported, rescaled and hardened pseudo-labels
    hardened: Tensor | None = None  # (N,) rows made one-hot
    proxy_learning: ProxyLearningResult | None = None
    no_transport_predictions: Tensor | None = None
    details: Any = None  # a baseline's own result (TransCLIPResult, BaselineResult)
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # encoder, knowledge base, prompt (from TextEmbeddings.meta)

    @property
    def proxies(self) -> Tensor | None:
        """The class proxies that made the predictions: learned ones, else the text proxies."""
        if self.proxy_learning is not None:
            return self.proxy_learning.proxies
        return None if self.text is None else self.text.proxies


@contextmanager
def _timed(timings: dict, key: str):
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _names_proxies(x: Tensor, text: TextEmbeddings) -> TextProxies:
    """Zero-shot class proxies: the normalised mean of each class's normalised template embeddings."""
    names = text.name_embeddings if text.name_embeddings.ndim == 3 else text.name_embeddings.unsqueeze(1)
    names = names.to(x.dtype)
    w = unit(unit(check_embeddings(names.reshape(-1, x.shape[1]), "text.name_embeddings").reshape(names.shape))
             .mean(dim=1))
    return TextProxies(proxies=w, logits=x @ w.T, scores=[], selected=[])


def _descriptions(x: Tensor, text: TextEmbeddings, which: str | None = None) -> list[Tensor]:
    descs = text.description_embeddings if which is None else text.controls.get(which)
    if descs is None:
        raise KPLInputError(f"text.controls has no {which!r} description set: build the text side with "
                            "kplib.pipeline.embed_knowledge(..., controls=True) ('generic' also needs a modality with "
                            "generic descriptions)")
    if len(descs) != len(text.class_names):
        raise KPLInputError(f"the description embeddings hold {len(descs)} classes but text.class_names has "
                            f"{len(text.class_names)}; they must describe the same classes in the same order")
    return [d.to(x.dtype) for d in check_descriptions(descs, x.shape[1], text.class_names)]


def zero_shot(x: Tensor, text: TextEmbeddings, cfg: KPLConfig) -> MethodResult:
    """CLIP zero-shot: the nearest class-name proxy (template ensemble)."""
    names = _names_proxies(unit(x), text)
    return MethodResult("zero_shot", text.class_names, cfg, names.predictions, names.logits, text=names)


def descriptor_mean(x: Tensor, text: TextEmbeddings, cfg: KPLConfig, descriptions: str | None = None) -> MethodResult:
    """Each class's proxy is the normalised mean of all its descriptions (no retrieval, no learning). WaffleCLIP
    (inductive) is this on its random-word prompts, ``descriptions="random_words"`` of ``text.controls``."""
    w = torch.stack([unit(unit(d).mean(dim=0)) for d in _descriptions(x, text, descriptions)])
    tp = TextProxies(proxies=w, logits=unit(x) @ w.T, scores=[], selected=[])
    return MethodResult("descriptor_mean", text.class_names, cfg, tp.predictions, tp.logits, text=tp)


def _stage2(method: str, x: Tensor, stage1: TextProxies, cfg: KPLConfig, names: list[str], timings: dict):
    """Steps 4-10: pseudo-labels, class marginal, transport, rescaling, hardening, proxy learning, prediction."""
    with _timed(timings, "pseudo_labels"):
        p0 = pseudo_labels(stage1.logits, cfg.tau_t)
        q = class_marginal(p0, cfg.class_marginal, cfg.gamma)
    with _timed(timings, "transport"):
        tr = transport(stage1.logits, cfg.tau_t, q, cfg.transport, iters=cfg.iters_ot, tol=cfg.ot_tol,
                       max_iter=cfg.ot_max_iter)
        rows = tr.plan / tr.plan.sum(dim=1, keepdim=True) if cfg.normalize_rows else tr.plan
        y, mask = harden(rows, cfg.alpha)
    learn = dict(tau_i=cfg.tau_i, lr=cfg.lr, iters=cfg.iters_proxy, mode=cfg.mode, tol=cfg.proxy_tol)
    with _timed(timings, "proxy_learning"):
        learned = learn_proxies(x, y, stage1.proxies, record_every=cfg.record_every, **learn)
    no_transport = None
    if cfg.no_transport_baseline:  # the released code hardens P0 too before learning from it
        with _timed(timings, "proxy_learning_no_transport"):
            no_transport = predict(x, learn_proxies(x, harden(p0, cfg.alpha)[0], stage1.proxies, **learn).proxies)
    logits = x @ learned.proxies.T
    return MethodResult(method, names, cfg, logits.argmax(dim=1), logits, text=stage1, pseudo_labels=p0,
                        class_marginal=q, transport=tr, targets=y, hardened=mask, proxy_learning=learned,
                        no_transport_predictions=no_transport, timings=timings)


def inmap(x: Tensor, text: TextEmbeddings, cfg: KPLConfig) -> MethodResult:
    """InMaP: class-name proxies, balanced Sinkhorn (by default), hardening and the same proxy learning."""
    timings: dict[str, float] = {}
    x = unit(x, exact=cfg.mode == "reference")
    with _timed(timings, "text_proxies"):
        names = _names_proxies(x, text)
    return _stage2("inmap", x, names, cfg, text.class_names, timings)


def kpl(x: Tensor, text: TextEmbeddings, cfg: KPLConfig, descriptions: str | None = None) -> MethodResult:
    """Knowledge Proxy Learning, both stages; ``descriptions`` names a knowledge control of ``text.controls``."""
    timings: dict[str, float] = {}
    with _timed(timings, "text_proxies"):
        stage1 = build_text_proxies(x, _descriptions(x, text, descriptions), cfg.k, cfg.mode, cfg.k_rule,
                                    text.class_names)
        if cfg.retrieval == "per_image":  # extension; proxy learning still starts from the dataset-level proxies
            stage1.logits = per_image_text_logits(x, _descriptions(x, text, descriptions), cfg.k)
    return _stage2("kpl", unit(x, exact=cfg.mode == "reference"), stage1, cfg, text.class_names, timings)


def clip_dn(x: Tensor, text: TextEmbeddings, cfg: CLIPDNConfig) -> MethodResult:
    """CLIP-DN: zero-shot with the unlabelled image mean and the text mean partly subtracted (:mod:`.baselines`)."""
    names = _names_proxies(unit(x), text)
    res = _clip_dn(x, names.proxies, fraction=cfg.fraction, renormalize=cfg.renormalize)
    return MethodResult("clip_dn", text.class_names, cfg, res.predictions, res.logits, text=names, details=res)


def transclip(x: Tensor, text: TextEmbeddings, cfg: TransCLIPConfig) -> MethodResult:
    """TransCLIP (zero-shot transductive): a Gaussian mixture with kNN Laplacian and KL to the text predictions."""
    names = _names_proxies(unit(x), text)
    res = _transclip(x, names.proxies, config=cfg)
    return MethodResult("transclip", text.class_names, cfg, res.predictions, res.probabilities, text=names,
                        details=res)


@dataclass(frozen=True)
class MethodSpec:
    """One entry of :data:`METHODS`: the function, a one-line summary, and how ``mode`` applies."""

    run: Callable[[Tensor, TextEmbeddings, KPLConfig], MethodResult]
    summary: str
    modes: bool = True  # the method has a reference and a corrected mode
    fixed_mode: str | None = None  # the name fixes the mode (kpl_reference, kpl_corrected)
    transport: str | None = None  # default transport when the config leaves it open (else the mode's)
    config: type = KPLConfig  # the class of the method's switches
    controls: bool = False  # needs TextEmbeddings.controls (the knowledge controls)
    descriptions: bool = True  # needs a knowledge base's descriptions (else class names suffice)
    uses: frozenset[str] | None = None  # the config fields it reads (None: all)


_NO_RETRIEVAL = frozenset(f.name for f in dataclasses.fields(KPLConfig)) - {"k", "k_rule", "retrieval"}


METHODS: dict[str, MethodSpec] = {
    "zero_shot": MethodSpec(zero_shot, "CLIP zero-shot with class-name prompts", modes=False, uses=frozenset(),
                            descriptions=False),
    "descriptor_mean": MethodSpec(descriptor_mean, "all descriptions of a class averaged, no learning", modes=False,
                                  uses=frozenset()),
    "waffle": MethodSpec(partial(descriptor_mean, descriptions="random_words"),
                         "WaffleCLIP: random-word prompts averaged, no learning", modes=False, controls=True,
                         uses=frozenset({"seed"})),
    "clip_dn": MethodSpec(clip_dn, "CLIP-DN: zero-shot with distribution normalisation", modes=False,
                          config=CLIPDNConfig, descriptions=False),
    "transclip": MethodSpec(transclip, "TransCLIP: transductive Gaussian mixture + kNN Laplacian", modes=False,
                            config=TransCLIPConfig, descriptions=False),
    "inmap": MethodSpec(inmap, "InMaP: class names + balanced Sinkhorn + proxy learning", transport="inmap_sinkhorn",
                        uses=_NO_RETRIEVAL, descriptions=False),
    "kpl": MethodSpec(kpl, "KPL in the config's mode (reference by default)"),
    "kpl_reference": MethodSpec(kpl, "KPL as the authors' code computes it", fixed_mode="reference"),
    "kpl_corrected": MethodSpec(kpl, "KPL as the method intends", fixed_mode="corrected"),
    **{f"kpl_{c}": MethodSpec(partial(kpl, descriptions=c), f"KPL with the {c.replace('_', ' ')} knowledge control",
                              controls=True) for c in CONTROLS},
}


def _pick_config(method: str, spec: MethodSpec, config: Any):
    """The config of ``spec``'s class: ``config`` itself, the first of its class in a sequence, or the default."""
    if config is None:
        return spec.config()
    if isinstance(config, (list, tuple)):
        return next((c for c in config if isinstance(c, spec.config)), spec.config())
    if not isinstance(config, spec.config):
        raise KPLInputError(f"method {method!r} takes a {spec.config.__name__}, got {type(config).__name__}")
    return config


def resolve_config(method: str, config: Any = None, **overrides) -> Any:
    """The config ``method`` runs with: ``config`` (its class, or a sequence holding one) plus ``overrides``,
    validated, the mode's defaults filled in."""
    spec = METHODS[check("method", method, Options(*METHODS))]
    cfg = _pick_config(method, spec, config)
    cfg = replace(cfg, **overrides)
    if not isinstance(cfg, KPLConfig):
        return cfg
    if cfg.mode is not None and (not spec.modes or spec.fixed_mode not in (None, cfg.mode)):
        why = f"fixes mode={spec.fixed_mode!r}" if spec.modes else "has no modes"
        raise KPLInputError(f"method {method!r} {why}, so mode={cfg.mode!r} does not apply; drop it "
                            + fix(cli="without --mode", python="mode=None") + " or choose method 'kpl' with a mode")
    if not spec.modes:
        return cfg
    mode = spec.fixed_mode or cfg.mode or "reference"
    tr = cfg.transport or spec.transport or ("released_greenkhorn" if mode == "reference" else "semidual")
    if tr == "released_greenkhorn" and cfg.class_marginal == "gamma" and cfg.gamma > 0:
        raise KPLInputError(
            f"the released greedy transport fails for gamma > 0 (a shape mismatch in the authors' code), so it does "
            f"not run gamma={cfg.gamma}; use the released file's Sinkhorn, which handles it, "
            + fix(cli="--transport inmap_sinkhorn", python="transport='inmap_sinkhorn'") + ", or corrected mode")
    return dataclasses.replace(
        cfg, mode=mode, transport=tr, k_rule=cfg.k_rule or ("running_min" if mode == "reference" else "per_class"),
        normalize_rows=(mode == "corrected") if cfg.normalize_rows is None else cfg.normalize_rows)


def run_method(method: str, image_embeddings: Tensor, text: TextEmbeddings, config: Any = None,
               **overrides) -> MethodResult:
    """Run one of :data:`METHODS` on image embeddings (N, d) and encoded text; ``overrides`` replace config fields.

    ``config`` is the method's config (:class:`KPLConfig`, or ``TransCLIPConfig`` / ``CLIPDNConfig`` for those
    baselines), or a sequence of configs from which each method takes the one of its class (as :func:`compare` does).
    The images are L2-normalised once by each method, as the released code does after encoding (and KPL's
    retrieval normalises them once more, as released).
    """
    cfg = resolve_config(method, config, **overrides)
    if not isinstance(text, TextEmbeddings):
        raise KPLInputError(f"text must be a kplib TextEmbeddings, got {type(text).__name__}")
    if len(text.class_names) < 2:
        raise KPLInputError(f"text.class_names must list at least 2 classes, got {list(text.class_names)}")
    x = check_embeddings(image_embeddings, "image_embeddings")  # each method normalises once, as released
    names, c = text.name_embeddings, len(text.class_names)
    if names is not None and (names.ndim not in (2, 3) or names.shape[0] != c):
        raise KPLInputError(f"text.name_embeddings must have shape (C, T, d) = ({c}, T, {x.shape[1]}), one row "
                            f"of templates per class of text.class_names, got {tuple(names.shape)}")
    if names is not None and names.shape[-1] != x.shape[1]:
        raise KPLInputError(f"text.name_embeddings has {names.shape[-1]} columns, expected {x.shape[1]} (image and "
                            "text embedding dimensions must match: encode both with the same model)")
    start = time.perf_counter()
    result = METHODS[method].run(x, text, cfg)
    result.method = method
    result.timings["total"] = time.perf_counter() - start
    result.meta = dict(text.meta)
    return result
