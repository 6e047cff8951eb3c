"""Randomized checks of the optimal transport layer against POT (issue 23).

Each problem is drawn from its seed, of a kind the fixed tests do not reach, and checked
against POT's log-domain Sinkhorn (``ot.bregman.sinkhorn_log``, float64, in whichever
orientation converges: from its start one of the two crawls on an outlier) or, for gradients,
POT run through autograd (its torch backend), never against the library itself:

- CG gradients with one to nine real entries on the smaller side after padding;
- padding at gamma 0.1-3000: a padded sample gives the plan it gives alone, its residual is
  its returned plan's own marginal error, and ``converged`` says whether that meets tol;
- one to three outlying costs (-1e2 to -1e4): the forward (and unroll's, in float64)
  converges, to POT's plan wherever POT converges;
- marginal entries down to the smallest subnormal: converged, at POT's plan;
- marginals of any magnitude, up to sums that overflow: POT's plan of the normalised ones;
- half precision: the returned plan's marginal error within the documented bound of
  ``info.residual``.

CI runs ``CASES`` seeds per test. ``DDN_OT_RANDOM_CASES=N DDN_OT_RANDOM_SEED0=S`` runs the N
seeds from S instead (a longer sweep outside CI).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.testing import F64

ot = pytest.importorskip("ot")

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = 12
SEED0 = int(os.environ.get("DDN_OT_RANDOM_SEED0", "0"))
SEEDS = range(SEED0, SEED0 + int(os.environ.get("DDN_OT_RANDOM_CASES", str(CASES))))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=F64))


def _integer(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _marginal_error(P: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())


def _pot_log(a, b, M, gamma, max_iter, warmstart=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns where it does not converge
        P, log = ot.bregman.sinkhorn_log(
            a,
            b,
            M,
            reg=1 / gamma,
            stopThr=1e-14,
            numItermax=max_iter,
            log=True,
            warmstart=warmstart,
        )
    return P, (log["log_u"], log["log_v"])  # fmt: skip


def pot_plan(M, a, b, gamma: float, max_iter: int = 5000) -> np.ndarray | None:
    """POT's log-domain plan of cost M and marginals a, b (float64, normalised, positive) that
    meets 1e-10, in the orientation that gets there (from POT's start one of the two may crawl
    on an outlying cost: both run 200 iterations, the better one continues first); None if
    neither does."""
    M, a, b = (np.asarray(x, dtype=np.float64) for x in (M, a, b))
    runs = []
    for transpose in (False, True):
        Mx, ax, bx = (M.T, b, a) if transpose else (M, a, b)
        P, start = _pot_log(ax, bx, Mx, gamma, 200)
        P = P.T if transpose else P
        runs.append((_marginal_error(P, a, b), transpose, P, start))
    for err, transpose, P, start in sorted(runs, key=lambda run: run[0]):
        if err > 1e-10:
            Mx, ax, bx = (M.T, b, a) if transpose else (M, a, b)
            P = _pot_log(ax, bx, Mx, gamma, max_iter, warmstart=start)[0]
            P = P.T if transpose else P
        if _marginal_error(P, a, b) <= 1e-10:
            return P
    return None


def pot_gradient(M: torch.Tensor, a, b, W, gamma: float) -> torch.Tensor:
    """d<W, P>/dM through POT's log-domain iterations (torch backend, float64), run until
    the plan meets 1e-12: the unrolled derivative converges to the implicit one."""
    M = M.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = ot.bregman.sinkhorn_log(a, b, M, reg=1 / gamma, stopThr=1e-15, numItermax=20_000)
    assert _marginal_error(P.detach().numpy(), a.numpy(), b.numpy()) <= 1e-12
    return torch.autograd.grad((W * P).sum(), M)[0]


def normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.to(F64)
    return x / x.sum()


# ---------------------------------------------------------------------------------------------
# Item 1: CG on systems with few real unknowns


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_gradient_with_few_real_entries_matches_pot(seed):
    """The smaller side has 1-9 real entries and 1-3 padded ones; every implicit solver's
    gradient in M is POT's on the real block and zero on padding (``cg`` returned up to
    1e198 with one or two real entries)."""
    g = torch.Generator().manual_seed(seed)
    k = (1, 1, 2, 2, 3, 4, 6, 9)[seed % 8]
    # the issue's kind (40 uniform columns, rows padded) where CG broke down, or any other
    like_issue = k <= 2 and seed % 16 < 8
    m, n = k + _integer(g, 1, 3), 40 if like_issue else _integer(g, 20, 60)
    gamma = 10 ** _uniform(g, -0.5, 1.0)
    M = torch.randn(m, n, generator=g, dtype=F64)
    r = torch.rand(m, generator=g, dtype=F64) + 0.05
    r[torch.randperm(m, generator=g)[: m - k]] = 0
    c = torch.rand(n, generator=g, dtype=F64) + 0.05
    c = torch.ones_like(c) if like_issue else c
    W = torch.randn(m, n, generator=g, dtype=F64)
    if seed % 2 and not like_issue:  # padding on the columns, the smaller side
        M, r, c, W = M.T.contiguous(), c, r, W.T.contiguous()
    real = (r > 0).unsqueeze(-1) & (c > 0)
    rows, cols = r > 0, c > 0
    want = torch.zeros_like(M)
    want[real] = pot_gradient(
        M[rows][:, cols], normalised(r[rows]), normalised(c[cols]), W[rows][:, cols], gamma
    ).reshape(-1)
    scale = float(want.abs().max()) + 1e-3
    for solver in ("cg", "auto", "cholesky"):
        Mg = M.clone().requires_grad_()
        P = ddn.sinkhorn(Mg, r, c, gamma=gamma, tol=1e-13, max_iter=100_000,
                         implicit_solver=solver)  # fmt: skip
        (got,) = torch.autograd.grad((W * P).sum(), Mg)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7 * scale, msg=solver)


# ---------------------------------------------------------------------------------------------
# Item 2: padding exact at every gamma; the residual is the returned plan's


def _padded_problem(g: torch.Generator, dtype):
    """A 2-10 point problem, and a copy with 1-4 padded rows/columns interleaved, whose costs
    are low enough to be every real column's minimum."""
    m, n = _integer(g, 2, 10), _integer(g, 2, 10)
    M = torch.randn(m, n, generator=g, dtype=F64)
    r = torch.rand(m, generator=g, dtype=F64) + 0.05
    c = torch.rand(n, generator=g, dtype=F64) + 0.05
    pm, pn = _integer(g, 0, 2), _integer(g, 0, 2)
    pm, pn = (pm, pn) if pm + pn else (1, 0)
    rows = torch.randperm(m + pm, generator=g)[:m].sort().values
    cols = torch.randperm(n + pn, generator=g)[:n].sort().values
    Mp = torch.randn(m + pm, n + pn, generator=g, dtype=F64) * 3 - 5
    Mp[rows.unsqueeze(-1), cols] = M
    rp, cp = torch.zeros(m + pm, dtype=F64), torch.zeros(n + pn, dtype=F64)
    rp[rows], cp[cols] = r, c
    return [x.to(dtype) for x in (M, r, c, Mp, rp, cp)], (rows, cols)


def _own_error(P: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> float:
    P, r, c = P.to(F64), normalised(r), normalised(c)
    return float((P.sum(-1) - r).abs().sum() + (P.sum(-2) - c).abs().sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_padding_is_exact_and_the_residual_is_the_plans(seed):
    """gamma 0.1-3000: the padded sample converges where it converges alone, to the same
    plan (within what two plans meeting tol may differ by) and to POT's; each residual is the
    returned plan's own marginal error, and ``converged`` is whether it meets tol (padded
    samples reported inf and ran to max_iter, their plans up to 0.03 from the sample's alone)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if seed % 3 == 2 else F64
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    gamma = 10 ** _uniform(g, -1, 3.5)
    (M, r, c, Mp, rp, cp), (rows, cols) = _padded_problem(g, dtype)
    kw = dict(gamma=gamma, tol=tol, max_iter=20_000, warn=False, return_info=True)
    alone, info_a = ddn.sinkhorn(M, r, c, **kw)
    padded, info_p = ddn.sinkhorn(Mp, rp, cp, **kw)
    eps = torch.finfo(dtype).eps
    for P, info, rr, cc in ((alone, info_a, r, c), (padded, info_p, rp, cp)):
        own = _own_error(P, rr, cc)
        assert math.isclose(float(info.residual), own, rel_tol=0, abs_tol=8 * P.numel() * eps)
        assert bool(info.converged) == (float(info.residual) <= tol)
    assert bool(info_p.converged) == bool(info_a.converged), (info_a, info_p)
    real = padded[rows.unsqueeze(-1), cols]
    on_padding = torch.ones_like(padded, dtype=torch.bool)
    on_padding[rows.unsqueeze(-1), cols] = False
    assert bool((padded[on_padding] == 0).all())
    if bool(info_a.converged):
        torch.testing.assert_close(real, alone, rtol=0, atol=4 * tol)
        # beyond gamma 300, POT needs more iterations than a test affords
        want = pot_plan(M.to(F64), normalised(r), normalised(c), gamma) if gamma < 300 else None
        if want is not None:
            torch.testing.assert_close(real.to(F64), torch.from_numpy(want), rtol=0,
                                       atol=4 * tol)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Item 3: outlying costs


@pytest.mark.parametrize("seed", SEEDS)
def test_outlying_costs_converge_where_pot_does(seed):
    """One to three costs of -1e2 to -1e4 in a 2-30 point problem at gamma 0.1-30: converged
    within 2000 iterations, at POT's plan wherever POT converges (the potentials crawled by
    log(r_i / c_j) an iteration: thousands of iterations at an error stuck at 0.2)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if seed % 3 == 2 else F64
    m, n = _integer(g, 2, 30), _integer(g, 2, 30)
    gamma = 10 ** _uniform(g, -1, 1.5)
    M = torch.randn(m, n, generator=g, dtype=F64)
    for _ in range(_integer(g, 1, 3)):
        M[_integer(g, 0, m - 1), _integer(g, 0, n - 1)] = -(10 ** _uniform(g, 2, 4))
    r = torch.rand(m, generator=g, dtype=F64) + 0.01
    c = torch.rand(n, generator=g, dtype=F64) + 0.01
    M, r, c = (x.to(dtype) for x in (M, r, c))
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    P, info = ddn.sinkhorn(M, r, c, gamma=gamma, tol=tol, max_iter=2000, return_info=True)
    assert bool(info.converged), info
    if dtype == F64:  # unroll's own log-domain forward (in float32 its potentials, of size
        # gamma |M| as it does not reduce M, hold P only to about eps gamma |M|)
        unrolled, info_u = ddn.sinkhorn(M, r, c, gamma=gamma, tol=tol, max_iter=2000,
                                        backward_mode="unroll", return_info=True)  # fmt: skip
        assert bool(info_u.converged), info_u
        torch.testing.assert_close(unrolled.detach(), P, rtol=0, atol=8 * tol)
    want = pot_plan(M.to(F64), normalised(r), normalised(c), gamma)
    if want is None:
        return  # POT converges in neither orientation (its start crawls either way)
    # float32 holds the potentials, of size gamma |M|, to their eps: P to that, relative
    slack = 0.0 if dtype == F64 else 8 * gamma * float(M.abs().max()) * 1.2e-7
    torch.testing.assert_close(P.to(F64), torch.from_numpy(want), rtol=0,
                               atol=4 * tol + slack * float(want.max()))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Item 6: tiny marginal entries


@pytest.mark.parametrize("seed", SEEDS)
def test_tiny_marginal_entries_converge(seed):
    """One to three entries of r and c between the smallest subnormal and 1e-15: the solve
    converges within the default 1000 iterations, at POT's plan (below 1e-26 in float32 a
    sample never counted as converged)."""
    g = torch.Generator().manual_seed(seed)
    dtype = F64 if seed % 2 else torch.float32
    tiny = math.log10(torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps)
    m, n = _integer(g, 2, 20), _integer(g, 2, 20)
    gamma = 10 ** _uniform(g, -1, 2)
    M = torch.randn(m, n, generator=g, dtype=F64)
    r = torch.rand(m, generator=g, dtype=F64) + 0.05
    c = torch.rand(n, generator=g, dtype=F64) + 0.05
    for x in (r, c):
        for _ in range(_integer(g, 1, min(3, len(x) - 1))):
            x[_integer(g, 0, len(x) - 1)] = 10 ** _uniform(g, tiny + 1, -15)
    M, r, c = (x.to(dtype) for x in (M, r, c))
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    P, info = ddn.sinkhorn(M, r, c, gamma=gamma, tol=tol, return_info=True)
    assert bool(info.converged) and float(info.residual) <= tol, info
    want = pot_plan(M.to(F64), normalised(r), normalised(c), gamma)
    if want is not None:
        torch.testing.assert_close(P.to(F64), torch.from_numpy(want), rtol=0, atol=4 * tol)


# ---------------------------------------------------------------------------------------------
# Item 7: marginals of any magnitude


@pytest.mark.parametrize("seed", SEEDS)
def test_marginals_of_any_magnitude(seed):
    """float32 marginals scaled by 1e-30 to 3e38 (their sums overflow): the plan of the
    normalised marginals, with a finite gradient (an overflowing sum gave P = 0)."""
    g = torch.Generator().manual_seed(seed)
    m, n = _integer(g, 2, 25), _integer(g, 5, 25)
    M = torch.randn(m, n, generator=g)
    r, c = torch.rand(m, generator=g) + 0.05, torch.rand(n, generator=g) / 2 + 0.5
    r = r / r.max() * 10 ** _uniform(g, -30, math.log10(3e38))
    c = c / c.max() * 10 ** _uniform(g, math.log10(1.5e38), math.log10(3.4e38))
    assert not math.isfinite(float(c.sum()))  # five entries of at least half the largest
    Mg = M.clone().requires_grad_()
    P, info = ddn.sinkhorn(Mg, r, c, gamma=3.0, tol=1e-5, return_info=True)
    assert bool(info.converged)
    want = pot_plan(M.to(F64), normalised(r.double()), normalised(c.double()), 3.0)
    torch.testing.assert_close(P.to(F64), torch.from_numpy(want), rtol=0, atol=4e-5)
    (P * torch.randn(m, n, generator=g)).sum().backward()
    assert torch.isfinite(Mg.grad).all()


# ---------------------------------------------------------------------------------------------
# Item 8: half precision


@pytest.mark.parametrize("seed", SEEDS)
def test_half_precision_plan_within_the_documented_bound(seed):
    """float16/bfloat16 are solved in float32: ``info.residual`` is the float32 plan's, and the
    returned plan's own marginal error is at most info.residual + 2 u + m n d (u the unit
    roundoff, d the spacing of the subnormals), as the docstring says."""
    g = torch.Generator().manual_seed(seed)
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    m, n = _integer(g, 2, 300), _integer(g, 2, 300)
    M = (torch.randn(m, n, generator=g) * 2).to(dtype)
    r = (torch.rand(m, generator=g) + 0.05).to(dtype)
    c = (torch.rand(n, generator=g) + 0.05).to(dtype)
    P, info = ddn.sinkhorn(M, r, c, gamma=_uniform(g, 0.1, 30), tol=1e-6, max_iter=5000,
                           warn=False, return_info=True)  # fmt: skip
    assert P.dtype == dtype
    fi = torch.finfo(dtype)
    unit_roundoff, spacing = fi.eps / 2, fi.smallest_normal * fi.eps
    bound = float(info.residual) + 2 * unit_roundoff + m * n * spacing
    assert _own_error(P, r.float(), c.float()) <= bound
