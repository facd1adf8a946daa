"""Transport, through its one front door, against oracles written independently from kpl-method.md Stage 2(b)."""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kplib.errors import KPLInputError
from kplib.method.proxy import harden
from kplib.method.transport import TRANSPORT_METHODS, TransportResult, class_marginal, transport


def _logits(n=30, c=4, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    return 0.25 + spread * torch.randn(n, c, generator=g, dtype=torch.float64)


def test_the_front_door_lists_every_solver():
    assert set(TRANSPORT_METHODS) == {"released_greenkhorn", "inmap_sinkhorn", "semidual", "sinkhorn_log",
                                      "greenkhorn", "none"}
    L = _logits()
    for method in TRANSPORT_METHODS:
        res = transport(L, 0.05, method=method)
        assert isinstance(res, TransportResult) and res.method == method
        assert res.plan.shape == L.shape and res.plan.dtype == L.dtype
    assert transport(L).method == "semidual"  # the corrected default


# ------------------------------------------------------------------ oracle: naive loop transcription of the doc


def _oracle_greenkhorn(L, tau, q, iters):
    """StableGreenkhorn as the method doc words it, with Python lists and math only."""
    n, c = len(L), len(L[0])
    logp = []
    for i in range(n):
        z = [L[i][j] / tau for j in range(c)]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        logp.append([v - lse for v in z])
    updates = []
    for _ in range(iters):
        col = [abs(sum(math.exp(logp[i][j]) for i in range(n)) - q[j]) for j in range(c)]
        row = [abs(sum(math.exp(logp[i][j]) for j in range(c)) - 1 / n) for i in range(n)]
        jm = max(range(c), key=lambda j: (col[j], -j))
        im = max(range(n), key=lambda i: (row[i], -i))
        if col[jm] > row[im]:
            colv = [logp[i][jm] for i in range(n)]
            m = max(colv)
            lse = m + math.log(sum(math.exp(v - m) for v in colv))
            for i in range(n):
                logp[i][jm] += math.log(q[jm]) - lse
            updates.append(("col", jm))
        else:
            m = max(logp[im])
            lse = m + math.log(sum(math.exp(v - m) for v in logp[im]))
            logp[im] = [v + math.log(1 / n) - lse for v in logp[im]]
            updates.append(("row", im))
    return [[math.exp(v) for v in r] for r in logp], updates


@pytest.mark.parametrize("seed, q", [(0, None), (1, [0.5, 0.2, 0.2, 0.1])])
def test_released_greenkhorn_matches_naive_oracle(seed, q):
    L = _logits(seed=seed)
    qq = [0.25] * 4 if q is None else q
    want, want_updates = _oracle_greenkhorn(L.tolist(), 0.01, qq, 20)
    res = transport(L, tau_t=0.01, class_marginal=None if q is None else torch.tensor(q, dtype=torch.float64),
                    method="released_greenkhorn", iters=20)
    assert res.updates == want_updates
    assert torch.allclose(res.plan, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert res.iterations == 20 and res.converged is None and res.method == "released_greenkhorn"


def test_released_greenkhorn_first_updates_are_columns_and_rows_end_near_one_over_n():
    # P0 rows sum to 1, so every column is ~N/C - q_c off while rows are only 1 - 1/N off: columns go first
    n, c = 200, 4
    res = transport(_logits(n=n, c=c, seed=3), tau_t=0.01, method="released_greenkhorn", iters=20)
    first = res.updates[:c]
    assert [kind for kind, _ in first] == ["col"] * c
    assert sorted(j for _, j in first) == list(range(c))  # each column once
    # each iteration touches a single row or column: at most 20 - C rows were touched afterwards
    assert sum(kind == "row" for kind, _ in res.updates) <= 20 - c
    rows = res.plan.sum(dim=1) * n
    assert abs(rows.mean().item() - 1) < 0.05  # rows sum to about 1/N, NOT 1
    assert rows.max().item() < 1.5
    # marginal errors are reported on the coupling scale (rows 1/N)
    assert res.row_error == pytest.approx(float((res.plan.sum(dim=1) - 1 / n).abs().max()))
    # consequence the reference mode must keep: hardening at alpha=0.6 never fires on 1/N-scaled rows
    _, mask = harden(res.plan, 0.6)
    assert not mask.any()


# ----------------------------------------------------------------------------------------- InMaP Sinkhorn


def _oracle_inmap(p0, q, iters):
    n, c = p0.shape
    p = [[p0[i, j].item() / n for j in range(c)] for i in range(n)]
    for _ in range(iters):
        for j in range(c):
            s = sum(p[i][j] for i in range(n))
            for i in range(n):
                p[i][j] *= q[j] / s
        for i in range(n):
            s = sum(p[i])
            p[i] = [v / (n * s) for v in p[i]]
    return torch.tensor([[v * n for v in r] for r in p], dtype=torch.float64)


def test_inmap_sinkhorn_matches_oracle_and_rows_sum_to_one():
    L = _logits(seed=4)
    p0 = torch.softmax(L / 0.01, dim=1)
    q = [0.4, 0.3, 0.2, 0.1]
    res = transport(L, 0.01, torch.tensor(q, dtype=torch.float64), method="inmap_sinkhorn", iters=20)
    assert torch.allclose(res.plan, _oracle_inmap(p0, q, 20), rtol=1e-10)
    assert torch.allclose(res.plan.sum(dim=1), torch.ones(30, dtype=torch.float64))
    assert res.row_error < 1e-12 and res.iterations == 20 and res.converged is None


# ------------------------------------------------------------------------------------- corrected solvers


def _naive_sinkhorn64(L, tau, q, tol=1e-13, max_iter=200000):
    """Independent float64 log-domain Sinkhorn on the coupling, run far past the library's tolerance."""
    n = L.shape[0]
    k = (L / tau).numpy().astype(np.float64)
    u = np.zeros(n)
    v = np.zeros(L.shape[1])
    la, lb = -math.log(n), np.log(q)
    for _ in range(max_iter):
        z = k + u[:, None]
        v = lb - (z.max(0) + np.log(np.exp(z - z.max(0)).sum(0)))
        z = k + v[None, :]
        u = la - (z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)))
        p = np.exp(k + u[:, None] + v[None, :])
        if np.abs(p.sum(0) - q).max() < tol:
            break
    return torch.from_numpy(p)


@pytest.mark.parametrize("tau", [0.05, 0.01])
@pytest.mark.parametrize("method", ["sinkhorn_log", "greenkhorn", "semidual"])
def test_corrected_solvers_agree_with_naive_float64_solver(tau, method):
    L = _logits(n=25, c=3, seed=5)
    q = np.array([0.5, 0.3, 0.2])
    res = transport(L, tau_t=tau, class_marginal=torch.tensor(q), method=method, tol=1e-9, max_iter=20000)
    want = _naive_sinkhorn64(L, tau, q)
    assert res.converged and res.method == method
    assert res.row_error <= 1e-9 and res.col_error <= 1e-9
    assert torch.allclose(res.plan, want * 25, atol=1e-6)  # rows rescaled to sum to 1
    assert torch.allclose(res.plan.sum(dim=1), torch.ones(25, dtype=torch.float64))


@pytest.mark.parametrize("method", ["sinkhorn_log", "semidual"])
def test_small_tau_approaches_exact_ot(method):
    L = _logits(n=12, c=3, seed=6)
    q = np.array([1 / 3] * 3)
    exact = ot.emd(np.full(12, 1 / 12), q, -L.numpy())
    res = transport(L, tau_t=1e-3, class_marginal=torch.tensor(q), method=method, tol=1e-9, max_iter=50000)
    assert np.abs(res.plan.numpy() / 12 - exact).max() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_log_is_stable_at_tau_1e_minus_4(dtype):
    L = _logits(n=300, c=5, seed=7, spread=0.3).to(dtype)
    res = transport(L, tau_t=1e-4, method="sinkhorn_log", max_iter=300)
    assert torch.isfinite(res.plan).all() and res.plan.dtype == dtype
    assert torch.allclose(res.plan.sum(dim=1), torch.ones(300, dtype=dtype), atol=1e-5)
    assert math.isfinite(res.col_error) and math.isfinite(res.row_error)
    # Sinkhorn needs O(1/tau) sweeps: at tau=1e-4 it is honest about not having converged in 300 sweeps
    assert res.converged == (max(res.row_error, res.col_error) <= 1e-6)


def test_semidual_converges_at_tau_1e_minus_4_and_matches_float64_sinkhorn():
    L = _logits(n=300, c=5, seed=7, spread=0.3)
    q = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
    res = transport(L.float(), tau_t=1e-4, class_marginal=q, tol=1e-7, method="semidual")
    assert res.converged and res.method == "semidual" and res.iterations < 1000
    assert torch.isfinite(res.plan).all() and res.plan.dtype == torch.float32
    assert res.col_error <= 1e-7 and res.row_error <= 1e-12
    # same problem at a tau where the naive float64 Sinkhorn converges quickly: same plan
    res2 = transport(L, tau_t=0.02, class_marginal=q, tol=1e-11, method="semidual")
    assert torch.allclose(res2.plan, _naive_sinkhorn64(L, 0.02, q.numpy()) * 300, atol=1e-7)


@pytest.mark.parametrize("c, tau", [(2, 0.01), (5, 0.01), (3, 1e-3)])
def test_pot_semidual_cross_checks_pot_log_sinkhorn(c, tau):
    """Issue 13 item 4: the corrected default (POT's semi-dual) against POT's log-domain Sinkhorn on a few thousand
    CLIP-like rows: plans close, argmax identical on >= 99.999 % of the rows (here: every row)."""
    n, d = 4000, 32
    g = torch.Generator().manual_seed(c)
    means = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.arange(n) % c
    x = torch.nn.functional.normalize(means[y] + 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    w = torch.nn.functional.normalize(means + 0.5 * torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    L = x @ w.T
    q = torch.softmax(torch.randn(c, generator=g, dtype=torch.float64), dim=0) * 0.5 + 0.5 / c
    semi = transport(L, tau, q, method="semidual", tol=1e-8, max_iter=5000)
    sink = transport(L, tau, q, method="sinkhorn_log", tol=1e-10, max_iter=200000)
    assert semi.converged and sink.converged
    assert (semi.plan - sink.plan).abs().max() < 1e-4
    same = (semi.plan.argmax(dim=1) == sink.plan.argmax(dim=1)).double().mean().item()
    assert same >= 0.99999
    assert semi.plan.argmax(dim=1).unique().numel() == c  # a non-trivial assignment


def test_greenkhorn_refuses_underflowing_kernel():
    L = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.0]], dtype=torch.float64)
    with pytest.raises(KPLInputError, match="too small for transport 'greenkhorn'.*sinkhorn_log"):
        transport(L, tau_t=1e-4, method="greenkhorn")


# ------------------------------------------------------------------------------------------ property tests


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 20),
    c=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    tau=st.sampled_from([0.01, 0.05, 0.2]),
    method=st.sampled_from(["sinkhorn_log", "semidual"]),
)
def test_corrected_transport_properties(n, c, seed, tau, method):
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(n, c, generator=g, dtype=torch.float64) * 0.5
    q = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    q = q / q.sum()
    res = transport(L, tau_t=tau, class_marginal=q, tol=1e-8, max_iter=20000, method=method)
    assert (res.plan >= 0).all() and torch.isfinite(res.plan).all()
    assert torch.allclose(res.plan.sum(dim=1), torch.ones(n, dtype=torch.float64))
    if res.converged:
        assert torch.allclose(res.plan.sum(dim=0) / n, q, atol=1e-7)
    perm = torch.randperm(n, generator=g)
    res_p = transport(L[perm], tau_t=tau, class_marginal=q, tol=1e-8, max_iter=20000, method=method)
    assert torch.allclose(res_p.plan, res.plan[perm], atol=1e-6)  # permutation equivariance over images


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 20), c=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_inmap_properties(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, c, generator=g, dtype=torch.float64)
    res = transport(L, 1.0, method="inmap_sinkhorn", iters=20)
    assert (res.plan >= 0).all()
    assert torch.allclose(res.plan.sum(dim=1), torch.ones(n, dtype=torch.float64))
    perm = torch.randperm(n, generator=g)
    assert torch.allclose(transport(L[perm], 1.0, method="inmap_sinkhorn", iters=20).plan, res.plan[perm],
                          atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 20), c=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_released_routine_properties(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(n, c, generator=g, dtype=torch.float64) * 0.5
    res = transport(L, method="released_greenkhorn", iters=20)
    assert (res.plan >= 0).all() and torch.isfinite(res.plan).all()
    assert len(res.updates) == 20


# -------------------------------------------------------------------------------------------- marginals


def test_class_marginal_gamma():
    p0 = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]], dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(class_marginal(p0, "uniform"), half)
    assert torch.allclose(class_marginal(p0, "gamma", 0.0), half)
    mass = torch.tensor([2.4, 0.6], dtype=torch.float64)
    assert torch.allclose(class_marginal(p0, "gamma", 1.0), mass / 3)
    assert torch.allclose(class_marginal(p0, "gamma", 0.5), mass.sqrt() / mass.sqrt().sum())
    with pytest.raises(KPLInputError, match="gamma must be"):
        class_marginal(p0, "gamma", -1.0)
    with pytest.raises(KPLInputError, match="class_marginal must be one of"):
        class_marginal(p0, "auto")


def test_em_class_prior_recovers_true_priors():
    # calibrated-for-uniform posteriors of a 1-D Gaussian model; true test priors are imbalanced
    g = torch.Generator().manual_seed(0)
    prior = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    means = torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64)
    y = torch.multinomial(prior, 20000, replacement=True, generator=g)
    x = means[y] + torch.randn(20000, generator=g, dtype=torch.float64)
    post = torch.softmax(-0.5 * (x[:, None] - means[None, :]) ** 2, dim=1)  # uniform-prior posteriors
    est = class_marginal(post, "em", max_iter=1000, tol=1e-9)
    assert (est - prior).abs().max() < 0.02
    # the plain average of the posteriors is biased towards uniform, EM removes that bias
    assert (post.mean(0) - prior).abs().max() > 0.05
    # rows summing to 1/N (the released transport's scale) give the same estimate
    assert torch.allclose(class_marginal(post / 20000, "em", max_iter=1000, tol=1e-9), est, atol=1e-9)


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda L: transport(L, tau_t=0.0, method="released_greenkhorn"), "tau_t must be a finite number > 0"),
        (lambda L: transport(L, tau_t=-1.0, method="released_greenkhorn"), "tau_t must be a finite number > 0"),
        (lambda L: transport(L, tau_t=0.01, class_marginal=torch.ones(3)), "must have 4 entries"),
        (lambda L: transport(L, class_marginal=torch.tensor([1.0, 0, 1, 1])), "class index(es) [1]"),
        (lambda L: transport(L, method="exact"), "transport method must be one of"),
        (lambda L: transport(L[0], method="released_greenkhorn"), "must be a non-empty 2-D"),
        (lambda L: transport(L * math.nan, method="released_greenkhorn"), "NaN/Inf"),
        (lambda L: transport(L, tol=0), "ot_tol must be a finite number > 0"),
        (lambda L: transport(L, method="inmap_sinkhorn", iters=-1), "iters_ot must be an integer >= 0"),
        (lambda L: transport(L, max_iter=0), "ot_max_iter must be an integer >= 1"),
    ],
)
def test_transport_validation(call, fragment):
    with pytest.raises(KPLInputError) as info:
        call(_logits())
    assert fragment in str(info.value)


def test_inmap_sinkhorn_names_empty_class_columns_and_the_fix():
    """A class no image gives any probability (softmax underflow at tiny tau_t) is named, with what to do."""
    L = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    with pytest.raises(KPLInputError, match=r"class column\(s\) \[2\].*raise tau_t"):
        transport(L, 1e-4, method="inmap_sinkhorn")
