"""Proxy learning against a plain transcription of the released descent (kpl-method.md 2(d)), gradient check
against autograd, corrected-mode L-BFGS, the exactness of the reference loop's cycle fill-in, hardening,
prediction and validation."""
from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kplib.errors import KPLInputError
from kplib.method.proxy import ProxyLearningResult, _Objective, harden, learn_proxies, predict, pseudo_labels


def _problem(n=60, c=3, d=10, seed=0, dtype=torch.float64, rows_one_over_n=False):
    g = torch.Generator().manual_seed(seed)
    cent = F.normalize(torch.randn(c, d, generator=g, dtype=dtype), dim=1)
    y = torch.arange(n) % c
    x = F.normalize(cent[y] + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    w0 = F.normalize(cent + 0.7 * torch.randn(c, d, generator=g, dtype=dtype), dim=1)
    targets = torch.softmax(x @ w0.T / 0.05, dim=1)
    if rows_one_over_n:
        targets = targets / n
    return x, targets, w0


def _oracle_released_descent(x, y, w, tau, lr, iters):
    """The method doc's loop verbatim, with the doc's (d, C) column layout."""
    n = x.shape[0]
    W = w.T.clone()
    base = x.T @ y
    pre = math.inf
    lrs, norms = [], []
    for _ in range(iters):
        G = x.T @ torch.softmax(x @ W / tau, dim=1) - base
        g = torch.linalg.norm(G).item()
        if g > pre:
            lr = lr / 2
        pre = g
        W = W - lr / (n * tau) * G
        W = W / W.norm(dim=0, keepdim=True)
        lrs.append(lr)
        norms.append(g)
    return W.T, lrs, norms


@pytest.mark.parametrize(
    "rows_one_over_n, chunk_size, c", [(True, 13, 2), (False, 4096, 2), (True, 4096, 3), (False, 13, 3)]
)
def test_reference_matches_plain_transcription(rows_one_over_n, chunk_size, c):
    x, y, w0 = _problem(c=c, rows_one_over_n=rows_one_over_n)
    want, want_lrs, want_norms = _oracle_released_descent(x, y, w0, 0.04, 10.0, 40)
    res = learn_proxies(x, y, w0, tau_i=0.04, lr=10.0, iters=40, mode="reference", chunk_size=chunk_size)
    assert isinstance(res, ProxyLearningResult) and res.mode == "reference"
    assert res.iterations == 40 and res.converged is None
    assert res.lr_history == want_lrs  # identical halving sequence
    assert torch.allclose(torch.tensor(res.grad_norms), torch.tensor(want_norms), rtol=1e-9)
    assert torch.allclose(res.proxies, want, atol=1e-10)


def test_lr_halving_is_permanent_and_happens():
    x, y, w0 = _problem(seed=1)
    res = learn_proxies(x, y, w0, iters=100, mode="reference")
    lrs = res.lr_history
    assert len(lrs) == len(res.grad_norms) == len(res.losses) == 100
    assert lrs[0] in (10.0, 5.0)
    assert lrs[-1] < 10.0  # at least one halving with lr=10
    assert all(b <= a for a, b in pairwise(lrs))  # never increases again
    assert all(b in (a, a / 2) for a, b in pairwise(lrs))  # only halvings
    # halving happens exactly where ||G|| grew
    for t in range(1, len(lrs)):
        assert (lrs[t] < lrs[t - 1]) == (res.grad_norms[t] > res.grad_norms[t - 1])


@pytest.mark.parametrize("c", [2, 3, 5])
@pytest.mark.parametrize("scale_rows", [False, True])
def test_objective_gradient_and_loss_match_autograd(c, scale_rows):
    """The weighted pass is the exact gradient of the mean cross-entropy for any Y (rows summing to 1 or not);
    the unweighted pass (the released direction) equals it when rows sum to 1."""
    x, y, w0 = _problem(c=c, seed=2)
    if scale_rows:
        y = y * torch.linspace(0.01, 2.0, y.shape[0], dtype=y.dtype)[:, None]
    n, tau = x.shape[0], 0.04
    w = w0.clone().requires_grad_(True)
    loss = -(y * torch.log_softmax(x @ w.T / tau, dim=1)).sum(dim=1).mean()
    loss.backward()
    for weighted in (True, False):
        obj = _Objective(x, y, tau, chunk_size=9, weighted=weighted)
        assert torch.allclose(obj.base, y.T @ x, atol=1e-12)
        ptx, f = obj(w0)
        assert math.isclose(f, loss.item(), rel_tol=1e-12)
        g = (ptx - obj.base) / (n * tau)  # G / (N tau_i)
        if weighted or not scale_rows:
            assert torch.allclose(g, w.grad, atol=1e-12)
        else:
            assert not torch.allclose(g, w.grad, atol=1e-6)


def _mean_ce(x, y, w, tau=0.04):
    return -(y * torch.log_softmax(x @ w.T / tau, dim=1)).sum(dim=1).mean().item()


def test_corrected_mode_converges_and_loss_never_increases():
    x, y, w0 = _problem(n=150, seed=3)
    res = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-7, record_every=1)
    assert res.mode == "corrected" and res.converged
    assert res.iterations < 300
    assert res.lr_history == []  # a line search, no step size schedule
    assert res.evaluations == len(res.losses) == len(res.grad_norms) >= res.iterations
    assert torch.allclose(res.proxies.norm(dim=1), torch.ones(3, dtype=torch.float64))
    losses = [_mean_ce(x, y, w) for w in res.trajectory]  # accepted iterates, recomputed independently
    assert len(res.trajectory) == 1 + res.iterations
    assert all(b <= a + 1e-10 for a, b in pairwise(losses))
    assert losses[-1] < losses[0] - 1e-3
    # the tangent gradient is small at the end: a stationary point on the sphere
    assert min(res.grad_norms) < 1e-3 * res.grad_norms[0]
    # and it does at least as well as the released descent run for 300 steps on the same targets
    ref = learn_proxies(x, y, w0, mode="reference", iters=300)
    assert _mean_ce(x, y, res.proxies) <= _mean_ce(x, y, ref.proxies) + 1e-6


def test_corrected_mode_reaches_the_autograd_stationary_point_for_rows_not_summing_to_one():
    """Corrected mode weights the softmax by Y's row sums, so 1/N-scaled targets give the same minimiser."""
    x, y, w0 = _problem(n=120, seed=6)
    a = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-9)
    b = learn_proxies(x, y / 120, w0, mode="corrected", iters=300, tol=1e-12)
    assert a.converged
    assert torch.allclose(a.proxies, b.proxies, atol=1e-4)


def test_corrected_mode_without_recording_matches_recorded():
    x, y, w0 = _problem(n=120, seed=4)
    a = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-8)
    b = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-8, record_every=5)
    assert a.converged and b.converged and a.trajectory is None
    assert abs(_mean_ce(x, y, a.proxies) - _mean_ce(x, y, b.proxies)) < 1e-6
    assert b.trajectory[0].equal(F.normalize(w0, dim=-1))  # the initial proxies, as normalised


def test_zero_iterations_return_the_initial_proxies():
    x, y, w0 = _problem(seed=7)
    for mode in ("reference", "corrected"):
        res = learn_proxies(x, y, w0, iters=0, mode=mode)
        assert torch.equal(res.proxies, F.normalize(w0, dim=-1)) and res.evaluations == 0


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(3, 40),
    c=st.integers(2, 4),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["reference", "corrected"]),
)
def test_learned_proxies_unit_norm_and_finite(n, c, seed, mode):
    x, y, w0 = _problem(n=n, c=c, d=6, seed=seed, dtype=torch.float32)
    res = learn_proxies(x, y, w0, iters=30, mode=mode)
    assert torch.isfinite(res.proxies).all() and res.proxies.dtype == torch.float32
    assert torch.allclose(res.proxies.norm(dim=1), torch.ones(c), atol=1e-5)
    assert all(math.isfinite(v) for v in res.grad_norms)


def test_pseudo_labels_and_harden():
    logits = torch.tensor([[0.30, 0.29], [0.30, 0.20]], dtype=torch.float64)
    p = pseudo_labels(logits, 0.01)
    assert torch.allclose(p, torch.softmax(logits / 0.01, dim=1))
    y, mask = harden(p, 0.6)
    assert mask.tolist() == [True, True]
    assert y.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    y2, mask2 = harden(p / 2, 0.6)  # rows scaled like the released routine: nothing fires
    assert not mask2.any() and torch.equal(y2, p / 2)
    y3, mask3 = harden(torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=torch.float64), 0.6)  # strictly above alpha
    assert mask3.tolist() == [False, True] and y3.tolist() == [[0.6, 0.4], [0.0, 1.0]]


def test_predict_is_argmax():
    x, _, w0 = _problem(seed=5)
    pred = predict(x, w0)
    assert pred.dtype == torch.int64
    assert torch.equal(pred, (x @ w0.T).argmax(dim=1))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"tau_i": 0.0}, "tau_i must be a finite number > 0"),
        ({"tau_i": -0.04}, "tau_i must be a finite number > 0"),
        ({"lr": 0}, "lr must be a finite number > 0"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"iters": -1}, "iters"),
        ({"record_every": 0}, "record_every"),
        ({"tol": 0.0}, "tol"),
    ],
)
def test_learn_proxies_parameter_validation(kwargs, fragment):
    x, y, w0 = _problem()
    with pytest.raises(KPLInputError) as info:
        learn_proxies(x, y, w0, **{"iters": 5, **kwargs})
    assert fragment in str(info.value)


def test_learn_proxies_shape_validation():
    x, y, w0 = _problem()
    with pytest.raises(KPLInputError, match=r"\(60, 3\).*got shape \(59, 3\)"):
        learn_proxies(x, y[:-1], w0)
    with pytest.raises(KPLInputError, match="targets has 2 columns, expected 3"):
        learn_proxies(x, y[:, :2], w0)
    with pytest.raises(KPLInputError, match="init_proxies has 4 columns, expected 10"):
        learn_proxies(x, y, w0[:, :4])
    with pytest.raises(KPLInputError, match="non-negative"):
        learn_proxies(x, -y, w0)
    with pytest.raises(KPLInputError, match="init_proxies has 1 all-zero row"):
        learn_proxies(x, y, w0 * torch.tensor([[1.0], [0.0], [1.0]], dtype=w0.dtype))


@pytest.mark.parametrize("tau", [0.0, -0.01, math.nan])
def test_pseudo_labels_reject_a_non_positive_temperature(tau):
    x, _, w0 = _problem()
    with pytest.raises(KPLInputError, match="tau"):
        pseudo_labels(x @ w0.T, tau)


def test_init_proxies_are_normalised_not_rejected():
    """Issue 17 item 4: the method layer L2-normalises instead of rejecting non-unit rows."""
    x, y, w0 = _problem()
    a = learn_proxies(x, y, w0, iters=20)
    b = learn_proxies(x, y, w0 * torch.tensor([[2.0], [0.5], [3.0]], dtype=w0.dtype), iters=20)
    assert torch.allclose(a.proxies, b.proxies, atol=1e-12) and a.lr_history == b.lr_history


def _plain_released_loop(x, y, w0, tau, lr, iters, record_every, chunk_size):
    """The released loop step by step with no cycle detection, on the library's own pass over X (so the two can
    be compared bit for bit): every step computed, lr halved when ||G|| grows, rows renormalised."""
    obj = _Objective(x, y, tau, chunk_size, weighted=False)
    scale = 1.0 / (x.shape[0] * tau)
    w, pre = F.normalize(w0, dim=-1), math.inf
    lrs, norms, losses, traj = [], [], [], [w.clone()]
    for step in range(1, iters + 1):
        ptx, loss = obj(w)
        g = (ptx - obj.base).to(w.dtype)
        g_norm = float(torch.linalg.vector_norm(g))
        if g_norm > pre:
            lr = lr / 2
        pre = g_norm
        w = F.normalize(w - (lr * scale) * g, dim=-1)
        lrs.append(lr)
        norms.append(g_norm)
        losses.append(loss)
        if step % record_every == 0:
            traj.append(w.clone())
    return w, lrs, norms, losses, traj


@pytest.mark.parametrize("iters", [1999, 2000])
@pytest.mark.parametrize(
    "c, seed, dtype",
    [(2, 1, torch.float32), (4, 0, torch.float32), (3, 0, torch.float64), (4, 1, torch.float64)],
)
def test_reference_cycle_fill_in_is_exact(c, seed, dtype, iters):
    """Skipping the steps of a bit-for-bit repeating state gives what computing all of them gives."""
    x, y, w0 = _problem(n=200, c=c, d=16, seed=seed, dtype=dtype, rows_one_over_n=True)
    fast = learn_proxies(x, y, w0, iters=iters, record_every=7)
    w, lrs, norms, losses, traj = _plain_released_loop(x, y, w0, 0.04, 10.0, iters, 7, 32768)
    # the state did repeat well before the end, so the filled-in part is not trivial; when it repeats depends on
    # the CPU's rounding (measured: 99-210 passes on an Intel Xeon, up to 717 on an AMD EPYC)
    assert fast.evaluations < 0.9 * iters, f"{fast.evaluations} of {iters} steps computed: no early repeat"
    assert fast.iterations == iters
    assert torch.equal(fast.proxies, w)
    assert fast.lr_history == lrs
    assert fast.grad_norms == norms
    assert fast.losses == losses
    assert len(fast.trajectory) == len(traj) == 1 + iters // 7
    assert all(torch.equal(a, b) for a, b in zip(fast.trajectory, traj))
