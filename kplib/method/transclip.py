r"""TransCLIP (Zanella, Gérin & Ben Ayed, "Boosting Vision-Language Models with Transduction", NeurIPS 2024), zero-shot.

Every unlabelled image :math:`x_i` (unit row, :math:`i = 1..N`) gets a soft assignment :math:`z_i` on the simplex of
the :math:`C` classes of the class list. The text side enters only through the zero-shot predictions
:math:`\hat y_i = \operatorname{softmax}(x_i^\top t_c / T)_{c=1..C}`, with :math:`t_c` the unit text class embeddings
and :math:`T` CLIP's temperature. TransCLIP minimises, over the assignments :math:`z`, class means :math:`\mu_c` and
one **shared diagonal** covariance :math:`\Sigma = \operatorname{diag}(\sigma^2)`,

.. math::
    \mathcal L(z, \mu, \sigma^2) =
    \underbrace{-\beta \sum_i \sum_c z_{ic} \log p_{ic}}_{\text{Gaussian mixture}}
    \; \underbrace{- \frac{\eta}{k} \sum_i \sum_{j \in \mathcal N_k(i)} w_{ij}\, z_i^\top z_j}_{\text{Laplacian}}
    \; + \underbrace{\sum_i \big(z_i^\top \log z_i - \lambda\, z_i^\top \log \hat y_i\big)}
        _{\mathrm{KL}_\lambda(z_i\,\|\,\hat y_i)},

    \log p_{ic} = -\tfrac12 \sum_{e=1}^{d} \Big(\frac{(x_{ie} - \mu_{ce})^2}{\sigma^2_e} + \log \sigma^2_e\Big)
    \quad (\text{the constant } -\tfrac d2 \log 2\pi \text{ dropped}),

where :math:`\mathcal N_k(i)` are the :math:`k` nearest neighbours of image :math:`i` (cosine, itself excluded) and
:math:`w_{ij} = x_i^\top x_j`, kept as an :math:`(N, k)` index/weight pair (:class:`KNNGraph`), never a dense
:math:`N \times N` matrix.

**Block majorize-minimize.** With :math:`S = (W + W^\top)/2` the Laplacian term is
:math:`-\frac{\eta}{k}\sum_c z_{\cdot c}^\top S\, z_{\cdot c}`; linearising it at the current :math:`z^{(l)}`, the
entropy kept exact, decouples the images, and the minimiser of the bound is a softmax (the paper's multiplicative
update):

.. math::
    z_i^{(l+1)} \propto \hat y_i^{\,\lambda} \odot
    \exp\Big(\beta \log p_i + \frac{\eta}{k}\big((W + W^\top) z^{(l)}\big)_i\Big).

Given :math:`z`, the means and the shared diagonal variance have closed forms (exact block minimisers):

.. math::
    \mu_c = \frac{\sum_i z_{ic} x_i}{\sum_i z_{ic}}, \qquad
    \sigma^2_e = \frac1N \sum_i \sum_c z_{ic} (x_{ie} - \mu_{ce})^2 .

Each outer iteration runs ``n_inner`` z-updates, then these two, so :math:`\mathcal L` never increases while the
linearised term majorizes: always when :math:`S` is positive semi-definite (the full cosine Gram is), and for the kNN
truncation whenever :math:`\frac{\eta}{k}\max(0, -\lambda_{\min}(S)) \le \frac12` (negative entropy is 1-strongly
convex in :math:`\ell_1` on the simplex).

**Defaults** (:class:`TransCLIPConfig`). The authors' public zero-shot release fixes what the paper's equations leave
open: :math:`\lambda = 1`, :math:`k = 3`, 10 outer iterations, :math:`T = 0.01` (logit scale 100), initial means
the :math:`\hat y`-weighted means of the 8 most confident images per class, and the z-update scales
:math:`\beta = 1/50`, :math:`\eta = 1/2` (i.e. :math:`\frac{1}{2k}(W + W^\top)z`); 5 inner z-updates is our choice,
the initial variance :math:`1/d` per dimension. Unlike the release we do not rescale the means to unit norm after each
update: that step does not minimise :math:`\mathcal L`, and without it the solution satisfies the fixed-point
equations above (tested). Where the image clusters are weak relative to the margins of the text logits (as in the
simulator's worlds) the KL term dominates and TransCLIP stays close to zero-shot unless :math:`\beta` is raised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import KPLInputError, fix
from ..params import Interval, check_embeddings, check_matrix, param, replace, unit, validate

__all__ = ["KNNGraph", "TransCLIPConfig", "TransCLIPResult", "gaussian_log_likelihood", "knn_graph", "transclip",
           "transclip_m_step", "transclip_objective", "transclip_z_update"]

_VAR_FLOOR = 1e-10  # a fixed floor keeps the variance update an exact (constrained) minimiser


@dataclass(frozen=True)
class TransCLIPConfig:
    """TransCLIP's switches (zero-shot transductive setting); defaults and their sources in the module docstring."""

    lam: float = param(1.0, Interval(float, 0.0), "λ: weight of the text predictions ŷ in the KL term")
    gmm_weight: float = param(0.02, Interval(float, 0.0, closed="neither"),
                              "β: weight of the Gaussian-mixture log-likelihood")
    laplacian_weight: float = param(0.5, Interval(float, 0.0), "η: weight of the kNN Laplacian term (divided by k)")
    n_neighbors: int = param(3, Interval(int, 1), "k: neighbours of each image in the affinity graph")
    n_iter: int = param(10, Interval(int, 1), "outer block-MM iterations (z-updates, then means and variance)")
    n_inner: int = param(5, Interval(int, 1), "z-updates per outer iteration")
    temperature: float = param(0.01, Interval(float, 0.0, closed="neither"),
                               "T: temperature of the text predictions ŷ = softmax(X tᵀ / T)")
    init_top: int = param(8, Interval(int, 1), "most confident images per class averaged for the initial means")
    seed: int = param(0, Interval(int, 0), "recorded with the result; TransCLIP itself draws no random numbers")

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class KNNGraph:
    """Sparse kNN affinity in (N, k) form: image i's neighbours ``indices[i]`` with weights ``weights[i]``."""

    indices: Tensor  # (N, k) int64, never i itself
    weights: Tensor  # (N, k) w_ij = <x_i, x_j>

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def matvec(self, z: Tensor) -> Tensor:
        """``W z``: row i is ``sum_j w_ij z_j`` over i's neighbours."""
        return torch.einsum("nk,nkc->nc", self.weights.to(z.dtype), z[self.indices])

    def rmatvec(self, z: Tensor) -> Tensor:
        """``W^T z``: every image j receives ``w_ij z_i`` from each image i that lists it as a neighbour."""
        contrib = self.weights.to(z.dtype)[:, :, None] * z[:, None, :]
        return torch.zeros_like(z).index_add_(0, self.indices.reshape(-1), contrib.reshape(-1, z.shape[1]))

    def to_sparse(self) -> Tensor:
        """The (N, N) sparse COO matrix W (for inspection and tests)."""
        n, k = self.indices.shape
        rows = torch.arange(n).repeat_interleave(k)
        return torch.sparse_coo_tensor(torch.stack([rows, self.indices.reshape(-1)]), self.weights.reshape(-1), (n, n),
                                       check_invariants=True)


def knn_graph(x: Tensor, k: int = 3, block_elements: int = 1 << 24) -> KNNGraph:
    """The k nearest neighbours of every row of ``x`` by inner product (cosine for unit rows), itself excluded.

    Exact search over square blocks of at most ``block_elements`` similarities: each block ``X_a X_b^T`` with
    ``b >= a`` is computed once and serves both its rows (top-k along rows) and, by symmetry, its columns (top-k
    along columns), so the N² d products are done once, not twice; a running top-k per image merges the blocks.
    Memory stays O(N k + block) whatever N. With N <= k, every other image is a neighbour (k becomes N - 1).
    """
    x = check_embeddings(x, "image embeddings")
    n = x.shape[0]
    k = max(min(int(k), n - 1), 0)
    best_v = torch.full((n, k), -float("inf"), dtype=x.dtype)
    best_i = torch.zeros((n, k), dtype=torch.long)
    b = max(1, min(n, int(block_elements**0.5)))
    for a0 in range(0, n, b):
        a1 = min(n, a0 + b)
        for c0 in range(a0, n, b):
            c1 = min(n, c0 + b)
            sim = x[a0:a1] @ x[c0:c1].T
            if c0 == a0:
                sim.fill_diagonal_(-float("inf"))
            _merge_topk(best_v, best_i, a0, a1, sim, c0, k)
            if c0 != a0:
                _merge_topk(best_v, best_i, c0, c1, sim.T, a0, k)
    return KNNGraph(best_i, best_v)


def _merge_topk(best_v: Tensor, best_i: Tensor, r0: int, r1: int, sim: Tensor, col0: int, k: int) -> None:
    """Merge the top-k of ``sim`` (rows r0:r1, columns offset by col0) into the running top-k of those rows."""
    v, i = sim.topk(min(k, sim.shape[1]), dim=1)
    cand_v = torch.cat([best_v[r0:r1], v], dim=1)
    cand_i = torch.cat([best_i[r0:r1], i + col0], dim=1)
    top_v, pos = cand_v.topk(k, dim=1)
    best_v[r0:r1], best_i[r0:r1] = top_v, cand_i.gather(1, pos)


def gaussian_log_likelihood(x: Tensor, means: Tensor, variances: Tensor, x_sq: Tensor | None = None) -> Tensor:
    r"""``log p_ic`` (N, C) of the shared-diagonal Gaussian mixture, without the constant ``-d/2 log 2π``.

    :math:`-\frac12\sum_e (x_{ie}-\mu_{ce})^2/\sigma^2_e - \frac12\sum_e \log\sigma^2_e`, expanded as
    ``x² / σ² - 2 x μ / σ² + μ² / σ²`` so no (N, C, d) tensor is formed; ``x_sq`` may pass ``x * x``.
    """
    variances, means = variances.to(x.dtype), means.to(x.dtype)
    inv = 1.0 / variances
    x_sq = x * x if x_sq is None else x_sq
    maha = (x_sq @ inv)[:, None] - 2.0 * (x @ (means * inv).T) + (means**2 * inv).sum(1)[None, :]
    return -0.5 * maha - 0.5 * torch.log(variances).sum()


def transclip_objective(x: Tensor, z: Tensor, means: Tensor, variances: Tensor, log_text: Tensor, graph: KNNGraph,
                        config: TransCLIPConfig | None = None, log_likelihood: Tensor | None = None) -> float:
    r"""The value of :math:`\mathcal L(z, \mu, \sigma^2)` (module docstring), accumulated in float64.

    ``log_text`` is :math:`\log \hat y` (N, C); ``log_likelihood`` may pass a precomputed
    :func:`gaussian_log_likelihood`.
    """
    cfg = config or TransCLIPConfig()
    ll = gaussian_log_likelihood(x, means, variances) if log_likelihood is None else log_likelihood
    z64 = z.double()
    gmm = -cfg.gmm_weight * (z64 * ll.double()).sum()
    lap = -(cfg.laplacian_weight / max(graph.k, 1)) * (z64 * graph.matvec(z64)).sum() if graph.k else 0.0
    kl = torch.special.xlogy(z64, z64).sum() - cfg.lam * (z64 * log_text.double()).sum()
    return float(gmm + lap + kl)


def _z_step(z: Tensor, base: Tensor, graph: KNNGraph, eta_k: float) -> Tensor:
    """One decoupled z-update: ``softmax(base + eta/k (W + W^T) z)``, base = λ log ŷ + β log p."""
    return torch.softmax(base + eta_k * (graph.matvec(z) + graph.rmatvec(z)), dim=1)


def transclip_z_update(x: Tensor, z: Tensor, means: Tensor, variances: Tensor, log_text: Tensor, graph: KNNGraph,
                       config: TransCLIPConfig | None = None) -> Tensor:
    r"""One z-update of the block MM (module docstring) at fixed :math:`\mu, \sigma^2`: the map whose fixed point
    TransCLIP's assignments satisfy at convergence."""
    cfg = config or TransCLIPConfig()
    base = cfg.lam * log_text + cfg.gmm_weight * gaussian_log_likelihood(x, means, variances)
    return _z_step(z, base, graph, cfg.laplacian_weight / max(graph.k, 1))


def transclip_m_step(x: Tensor, z: Tensor, previous_means: Tensor | None = None,
                     x_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Closed-form :math:`\mu_c = \sum_i z_{ic}x_i / \sum_i z_{ic}` and shared diagonal
    :math:`\sigma^2 = \frac1N\sum_{i,c} z_{ic}(x_i-\mu_c)^2`.

    Uses :math:`\sum_{i,c} z_{ic}(x_i-\mu_c)^2 = \sum_i (\sum_c z_{ic}) x_i^2 - 2\sum_c \mu_c S_c
    + \sum_c n_c\mu_c^2` with :math:`S_c = \sum_i z_{ic}x_i`, :math:`n_c = \sum_i z_{ic}` (two products, combined in
    float64; ``x_sq`` may pass ``x * x``). A class with no mass at all (every ``z_ic`` = 0) does not enter
    :math:`\mathcal L`; it keeps its ``previous_means`` row (zeros when none is given).
    """
    x_sq = x * x if x_sq is None else x_sq
    s1 = (z.T @ x).double()
    s2 = (z.sum(1) @ x_sq).double()
    mass = z.double().sum(0)
    has = mass > 0
    means = torch.zeros_like(s1) if previous_means is None else previous_means.double().clone()
    means[has] = s1[has] / mass[has, None]
    spread = (s2 - (2.0 * means * s1 - mass[:, None] * means**2).sum(0)) / z.shape[0]
    return means.to(x.dtype), spread.clamp_min(_VAR_FLOOR).to(x.dtype)


@dataclass
class TransCLIPResult:
    """TransCLIP's solution: assignments, Gaussian mixture, objective trace (``objective[0]`` = at initialisation)."""

    probabilities: Tensor  # (N, C) assignments z
    means: Tensor  # (C, d) class means mu_c
    variances: Tensor  # (d,) shared diagonal covariance sigma^2
    objective: list[float]  # L after initialisation, then after every outer iteration (n_iter + 1 values)
    iterations: int
    text_probabilities: Tensor  # (N, C) zero-shot predictions ŷ
    graph: KNNGraph
    config: TransCLIPConfig

    @property
    def predictions(self) -> Tensor:
        """``argmax_c z_ic``."""
        return self.probabilities.argmax(dim=1)


def _resolve(config: TransCLIPConfig | None, overrides: dict) -> TransCLIPConfig:
    cfg = config or TransCLIPConfig()
    if not isinstance(cfg, TransCLIPConfig):
        raise KPLInputError(f"config must be a TransCLIPConfig, got {type(cfg).__name__}")
    return replace(cfg, **overrides)


def _text_log_probs(x: Tensor, text: Tensor | None, logits: Tensor | None, temperature: float) -> Tensor:
    if (text is None) == (logits is None):
        raise KPLInputError("TransCLIP needs the zero-shot text side: pass text class embeddings (C, d) or their "
                            "logits (N, C), exactly one of the two")
    if text is not None:
        logits = x @ unit(check_embeddings(text, "text class embeddings", dim=x.shape[1]).to(x.dtype)).T
    else:
        logits = check_matrix(logits, "logits").to(x.dtype)
        if logits.shape[0] != x.shape[0]:
            raise KPLInputError(f"logits have {logits.shape[0]} rows but there are {x.shape[0]} images; pass the "
                                "image-by-class similarities X @ W.T of these images")
    return torch.log_softmax(logits / temperature, dim=1)


def _initial_means(x: Tensor, y_hat: Tensor, top: int) -> Tensor:
    """Per class, the ŷ-weighted mean of its ``top`` most confident images (the paper's zero-shot initialisation)."""
    top = min(top, x.shape[0])
    conf, idx = y_hat.topk(top, dim=0)  # (top, C)
    weights = conf / conf.sum(0).clamp_min(torch.finfo(conf.dtype).tiny)
    return torch.einsum("tc,tcd->cd", weights, x[idx])


def transclip(x: Tensor, text: Tensor | None = None, *, logits: Tensor | None = None,
              config: TransCLIPConfig | None = None, graph: KNNGraph | None = None, **overrides) -> TransCLIPResult:
    """Run zero-shot TransCLIP on image embeddings ``x`` (N, d) and the class list's text side.

    Parameters
    ----------
    x : (N, d) image embeddings (normalised to unit rows here).
    text : (C, d) text class embeddings, one row per class of the class list; or
    logits : (N, C) image-class similarities ``X @ W.T`` instead (divided by ``temperature`` like cosines).
    config, overrides : :class:`TransCLIPConfig` and field overrides (``transclip(x, t, lam=0.5)``).
    graph : a precomputed :func:`knn_graph` of ``x`` (else built with ``config.n_neighbors``).

    The number of classes is the number of text rows (or logit columns), never inferred from the images: a class
    with no image keeps its column. Returns a :class:`TransCLIPResult`.
    """
    cfg = _resolve(config, overrides)
    x = unit(check_embeddings(x, "image embeddings"))
    log_text = _text_log_probs(x, text, logits, cfg.temperature)
    if graph is None:
        graph = knn_graph(x, cfg.n_neighbors)
    elif graph.indices.shape[0] != x.shape[0]:
        raise KPLInputError(f"the kNN graph has {graph.indices.shape[0]} rows but there are {x.shape[0]} images; "
                            "build it from these images " + fix(python="graph=knn_graph(x, k)"))
    eta_k = cfg.laplacian_weight / max(graph.k, 1)
    z = log_text.exp()
    means = _initial_means(x, z, cfg.init_top)
    variances = torch.full((x.shape[1],), 1.0 / x.shape[1], dtype=x.dtype)
    x_sq = x * x
    ll = gaussian_log_likelihood(x, means, variances, x_sq)
    objective = [transclip_objective(x, z, means, variances, log_text, graph, cfg, ll)]
    for _ in range(cfg.n_iter):
        base = cfg.lam * log_text + cfg.gmm_weight * ll
        for _ in range(cfg.n_inner):
            z = _z_step(z, base, graph, eta_k)
        means, variances = transclip_m_step(x, z, means, x_sq)
        ll = gaussian_log_likelihood(x, means, variances, x_sq)
        objective.append(transclip_objective(x, z, means, variances, log_text, graph, cfg, ll))
    return TransCLIPResult(probabilities=z, means=means, variances=variances, objective=objective,
                           iterations=cfg.n_iter, text_probabilities=log_text.exp(), graph=graph, config=cfg)
