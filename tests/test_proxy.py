"""Proxy learning against a plain transcription of the released descent (kpl-method.md 2(d)), gradient check
against autograd, corrected-mode descent, hardening, prediction and validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kplib.errors import KPLInputError
from kplib.proxy import _fused_pass, _prepare_targets, harden, learn_proxies, predict, pseudo_labels


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
    assert res.iterations == 40 and res.converged is None
    assert res.lr_history == want_lrs  # identical halving sequence
    assert torch.allclose(torch.tensor(res.grad_norms), torch.tensor(want_norms), rtol=1e-9)
    assert torch.allclose(res.proxies, want, atol=1e-10)


def test_lr_halving_is_permanent_and_happens():
    x, y, w0 = _problem(seed=1)
    res = learn_proxies(x, y, w0, iters=100, mode="reference")
    lrs = res.lr_history
    assert lrs[0] in (10.0, 5.0)
    assert lrs[-1] < 10.0  # at least one halving with lr=10
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # never increases again
    assert all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:]))  # only halvings
    # halving happens exactly where ||G|| grew
    for t in range(1, len(lrs)):
        assert (lrs[t] < lrs[t - 1]) == (res.grad_norms[t] > res.grad_norms[t - 1])


@pytest.mark.parametrize("c", [2, 3, 5])
def test_fused_pass_gradient_matches_autograd(c):
    x, y, w0 = _problem(c=c, seed=2)
    n, tau = x.shape[0], 0.04
    ptx, loss_sum = _fused_pass(list(x.split(9)), _prepare_targets(y, 9), x.sum(dim=0), w0, tau)
    g = (ptx - y.T @ x) / (n * tau)  # G / (N tau_i)
    w = w0.clone().requires_grad_(True)
    loss = -(y * torch.log_softmax(x @ w.T / tau, dim=1)).sum(dim=1).mean()
    loss.backward()
    assert torch.allclose(g, w.grad, atol=1e-12)
    assert math.isclose(loss_sum / n, loss.item(), rel_tol=1e-12)


def _mean_ce(x, y, w, tau=0.04):
    return -(y * torch.log_softmax(x @ w.T / tau, dim=1)).sum(dim=1).mean().item()


def test_corrected_mode_converges_and_loss_never_increases():
    x, y, w0 = _problem(n=150, seed=3)
    res = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-7, record_every=1)
    assert res.converged
    assert res.iterations < 300
    assert torch.allclose(res.proxies.norm(dim=1), torch.ones(3, dtype=torch.float64))
    losses = [_mean_ce(x, y, w) for w in res.trajectory]  # accepted iterates, recomputed independently
    assert all(b <= a + 1e-10 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1e-3
    # the tangent gradient is small at the end: a stationary point on the sphere
    assert res.grad_norms[-1] < 1e-3 * res.grad_norms[0]
    # and it does at least as well as the released descent run for 300 steps on the same targets
    ref = learn_proxies(x, y, w0, mode="reference", iters=300)
    assert _mean_ce(x, y, res.proxies) <= _mean_ce(x, y, ref.proxies) + 1e-6


def test_corrected_mode_without_recording_matches_recorded():
    x, y, w0 = _problem(n=120, seed=4)
    a = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-8)
    b = learn_proxies(x, y, w0, mode="corrected", iters=300, tol=1e-8, record_every=5)
    assert a.converged and b.converged
    assert abs(_mean_ce(x, y, a.proxies) - _mean_ce(x, y, b.proxies)) < 1e-6
    assert b.trajectory[0].equal(w0)


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
    assert torch.isfinite(res.proxies).all()
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


def test_predict_is_argmax():
    x, _, w0 = _problem(seed=5)
    pred = predict(x, w0)
    assert pred.dtype == torch.int64
    assert torch.equal(pred, (x @ w0.T).argmax(dim=1))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"tau_i": 0.0}, "tau_i must be a positive"),
        ({"tau_i": -0.04}, "tau_i must be a positive"),
        ({"lr": 0}, "lr must be a positive"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"iters": -1}, "iters must be an integer"),
        ({"record_every": 0}, "record_every must be an integer"),
    ],
)
def test_learn_proxies_parameter_validation(kwargs, fragment):
    x, y, w0 = _problem()
    with pytest.raises(KPLInputError) as info:
        learn_proxies(x, y, w0, **kwargs)
    assert fragment in str(info.value)


def test_learn_proxies_shape_validation():
    x, y, w0 = _problem()
    with pytest.raises(KPLInputError, match="targets has 59 rows but image_embeddings has 60"):
        learn_proxies(x, y[:-1], w0)
    with pytest.raises(KPLInputError, match="init_proxies rows must be L2-normalised"):
        learn_proxies(x, y, w0 * 2)
    with pytest.raises(KPLInputError, match="targets has 2 columns, expected 3"):
        learn_proxies(x, y[:, :2], w0)
    with pytest.raises(KPLInputError, match="init_proxies has 4 columns, expected 10"):
        learn_proxies(x, y, w0[:, :4])
    with pytest.raises(KPLInputError, match="targets must be non-negative"):
        learn_proxies(x, -y, w0)
    with pytest.raises(KPLInputError, match="tau must be a positive"):
        pseudo_labels(x @ w0.T, 0)


@pytest.mark.parametrize("iters", [1999, 2000])
@pytest.mark.parametrize(
    "c, seed, dtype",
    [(2, 1, torch.float32), (4, 0, torch.float32), (3, 0, torch.float64), (4, 1, torch.float64)],
)
def test_reference_cycle_exit_is_exact(c, seed, dtype, iters):
    """Skipping the steps of a bit-for-bit repeating state gives what computing all of them gives."""
    x, y, w0 = _problem(n=200, c=c, d=16, seed=seed, dtype=dtype, rows_one_over_n=True)
    fast = learn_proxies(x, y, w0, iters=iters, record_every=7)
    full = learn_proxies(x, y, w0, iters=iters, record_every=7, detect_cycles=False)
    # the state did repeat well before the end, so the filled-in part is not trivial; when it repeats depends on
    # the CPU's rounding (measured: 99-210 passes on an Intel Xeon, up to 717 on an AMD EPYC)
    assert fast.evaluations < 0.9 * iters, f"{fast.evaluations} of {iters} steps computed: no early repeat"
    assert full.evaluations == iters and fast.iterations == full.iterations == iters
    assert torch.equal(fast.proxies, full.proxies)
    assert fast.lr_history == full.lr_history
    assert fast.grad_norms == full.grad_norms
    assert fast.losses == full.losses
    assert len(fast.trajectory) == len(full.trajectory) == 1 + iters // 7
    assert all(torch.equal(a, b) for a, b in zip(fast.trajectory, full.trajectory))

