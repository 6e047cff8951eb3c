"""Forward Sinkhorn solver: scaling iterations kept stable by log-domain potentials.

The iterate is represented as ``P = diag(u) K diag(v)`` with ``K = exp(-gamma*M + f (+) g)``
(Schmitzer's stabilisation). The inner loop is the plain scaling iteration (two matrix-vector
products and two vector ops per iteration, see blocks.py). Every ``check_every`` iterations,
with one transfer to the host (errors and the range of the scalings, a few numbers per
sample), the solver measures the marginal error of each sample and

* absorbs large scalings into the log potentials ``f, g`` (one ``exp`` over the matrix, only
  when ``max|log u|`` or ``max|log v|`` exceeds ``tau``), which is what makes any gamma safe;
* falls back to exact log-domain (logsumexp) iterations for one block where the scaling domain
  over- or under-flowed (a kernel row that is all zeros at the first solve with a large gamma);
* adapts each sample's over-relaxation factor ``omega`` (u <- u + omega (r / K v - u))
  from its observed error decay (see schedule.py), which saves most iterations on slowly
  converging problems and costs nothing on fast ones;
* gives a sample whose error has stopped improving a Newton step on the dual (see drift.py):
  an outlying cost, or a large gamma, can otherwise make the potentials crawl;
* freezes converged samples (the active batch is compacted, so they cost nothing more), once
  the plan each returns meets tol by its own marginals: what is reported is the returned
  plan's error;
* stops a sample whose error has settled above tol at its precision floor (``STALL_CHECKS``),
  unconverged and flagged ``stalled``, instead of running it to max_iter.

It starts from zero potentials or from given ones (``start``: an annealing stage's, see
annealed.py, which runs this solver over a schedule of gamma where gamma is large).

Entries of ``K`` below ``exp(lo)`` are flushed to zero (no denormal numbers in the products).
A sample is only accepted as converged when its scalings are within ``exp(+-tau)``, so the
flushed mass is below ``m n exp(lo + 2 tau)``: 1e-8 in float32 for m = n = 1000, far below any
useful tolerance.

Zero entries of ``r`` or ``c`` are padding: those rows/columns of P are exactly zero, and they
take no part in anything else (the cost's reduction included), so that a padded sample solves
the problem it solves alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ddn_layers.base import SolverInfo
from ddn_layers.ot import blocks, drift
from ddn_layers.ot.blocks import kernel_times
from ddn_layers.ot.schedule import OmegaSchedule

LIMITS = {torch.float32: (-60.0, 15.0), torch.float64: (-600.0, 100.0)}
"""(flush threshold for log K, absorption threshold for |log u|, |log v|) per dtype."""

STALL_CHECKS = 20
"""Checks of the plain iteration without a 1% improvement on the best error (``STALL_FACTOR``),
below the precision floor, after which a sample stops unconverged instead of running to
max_iter (the unbalanced solver's rule, over a longer window: in float32 a slow but real
descent near the floor sets new bests only every few checks, through the rounding noise)."""

STALL_FACTOR = 0.99
"""The improvement on the best error that resets the stall count."""


@dataclass
class SinkhornSolution:
    """Everything the forward pass found, per sample (leading dimension B)."""

    P: Tensor  # (B, m, n) transport plan
    # log potentials, -inf on padding: P = exp(-gamma M' + f (+) g), where M' is M less its row
    # minima and then its column minima
    f: Tensor  # (B, m)
    g: Tensor  # (B, n)
    iterations: Tensor  # (B,) int64
    residual: Tensor  # (B,) L1 marginal error of P
    converged: Tensor  # (B,) bool
    omega: Tensor  # (B,) over-relaxation factor in use at the end
    # (B,) estimated rate of the plain iteration (error factor per iteration, 0 = not seen):
    # 1 / (1 - rate) approximates the condition number of the backward's Schur complement
    rate: Tensor
    stalled: Tensor  # (B,) bool: stopped unconverged at the precision floor (not at max_iter)
    newton: Tensor  # (B,) int64: Newton steps on the dual taken (drift.py)

    def info(self, stages: Tensor | None = None) -> SolverInfo:
        """The per-sample record, with ``omega``, ``rate``, ``stages`` (annealing stages run,
        (B,); one each when None), ``stalled`` and ``newton_steps`` as extras."""
        st = torch.ones_like(self.omega) if stages is None else stages
        extra = {"omega": self.omega, "rate": self.rate, "stages": st, "stalled": self.stalled}
        extra["newton_steps"] = self.newton
        return SolverInfo(self.iterations, self.residual, self.converged, extra)


@dataclass
class _Problem:
    """The cost and marginals of the active samples, compacted with them.

    Padded rows/columns get a unit "marginal" (``r_col``, ``c_row``) and a unit kernel sum
    (``pad_rows``, ``pad_cols``; None without padding) so that their scaling stays 1; their
    kernel entries are zero, so they never carry mass.
    """

    M: Tensor  # (B, m, n) cost less its row and column minima over the real entries
    r: Tensor  # (B, m) the marginals the returned plan is measured against
    c: Tensor  # (B, n)
    row_mask: Tensor  # (B, m) 1 on real rows, 0 on padding
    col_mask: Tensor  # (B, n)
    log_r: Tensor  # (B, m), -inf on padding
    log_c: Tensor  # (B, n)
    r_col: Tensor  # (B, m, 1)
    c_row: Tensor  # (B, 1, n)
    neg_r: Tensor  # -r_col
    neg_c: Tensor  # -c_row
    pad_rows: Tensor | None  # (B, m, 1) 1 on padded rows
    pad_cols: Tensor | None  # (B, 1, n)

    @classmethod
    def of(cls, M: Tensor, r: Tensor, c: Tensor) -> _Problem:
        # Entries below sqrt(smallest normal) are solved as padding: their rows/columns of the
        # plan are flushed to zero anyway (see _finished_plan), and a row of so little mass
        # would otherwise fall below the kernel's flush threshold as a whole once absorbed.
        floor = math.sqrt(torch.finfo(M.dtype).tiny)
        row_mask, col_mask = (r > floor).to(M.dtype), (c > floor).to(M.dtype)
        padded = bool((row_mask == 0).any()) or bool((col_mask == 0).any())
        M = _reduced_cost(M, row_mask, col_mask) if padded else _reduced_cost(M)
        r_col = (r + (1 - row_mask)).unsqueeze(-1)
        c_row = (c + (1 - col_mask)).unsqueeze(-2)
        return cls(
            M,
            r,
            c,
            row_mask,
            col_mask,
            torch.where(r > 0, r.log(), torch.full_like(r, -math.inf)),
            torch.where(c > 0, c.log(), torch.full_like(c, -math.inf)),
            r_col,
            c_row,
            -r_col,
            -c_row,
            (1 - row_mask).unsqueeze(-1) if padded else None,
            (1 - col_mask).unsqueeze(-2) if padded else None,
        )

    @property
    def padded(self) -> bool:
        return self.pad_rows is not None

    def plan_errors(self, P: Tensor, sel: Tensor | None) -> Tensor:
        """The L1 marginal error of the plans P of the samples at positions ``sel`` (all when
        None), measured on P itself: what the caller gets is what is reported."""
        r, c = (self.r, self.c) if sel is None else (self.r[sel], self.c[sel])
        return (P.sum(-1) - r).abs().sum(-1) + (P.sum(-2) - c).abs().sum(-1)

    def select(self, sel: Tensor) -> _Problem:
        """The samples at positions ``sel``."""
        picked = (getattr(self, f.name) for f in fields(self))
        return _Problem(*(x[sel] if x is not None else None for x in picked))


def _reduced_cost(M: Tensor, row_mask: Tensor | None = None, col_mask=None) -> Tensor:
    """M less its row minima, then less its column minima, over the real entries only.

    P is invariant to adding a row or a column constant to M; removing the minima keeps the
    potentials (and the cancellation in -gamma M + f + g) small. Padding must not take part:
    a padded row's low cost would otherwise raise a real column far above its minimum and
    flush it from the kernel at large gamma, so a padded sample would no longer solve the
    problem it solves alone. Padded entries are 0.
    """
    if row_mask is None:
        M = M - M.amin(-1, keepdim=True)
        return M - M.amin(-2, keepdim=True)
    rows, cols = row_mask.unsqueeze(-1) > 0, col_mask.unsqueeze(-2) > 0
    M = M - torch.where(cols, M, math.inf).amin(-1, keepdim=True)
    M = M - torch.where(rows, M, math.inf).amin(-2, keepdim=True)
    return torch.where(rows & cols, M, 0.0)


@dataclass
class _Iterate:
    """The scalings of the active samples: P = diag(u_scale u) K diag(v_scale v).

    ``u_scale``, ``v_scale`` are host scales (1 except in the representation of the
    shared-factor block, see blocks.shared_factor_block); K v and K^T u are stored scaled
    alike (by v_scale and u_scale). ``Ku`` is only current right after a block.
    """

    f: Tensor  # (B, m) log potentials
    g: Tensor  # (B, n)
    K: Tensor  # (B, m, n) exp(-gamma M + f (+) g)
    u: Tensor  # (B, m, 1)
    v: Tensor  # (B, 1, n)
    Kv: Tensor  # (B, m, 1)
    Ku: Tensor | None = None  # (B, 1, n)
    u_scale: float = 1.0
    v_scale: float = 1.0


@dataclass
class _Settings:
    gamma: float
    tol: float
    check_every: int
    overrelax: bool
    lo: float  # log K below this is flushed to 0
    small: float  # scalings outside [small, big] are absorbed into the potentials
    big: float
    zero: Tensor  # 0-d constants for blocks.times
    one: Tensor


@dataclass
class _Check:
    """The findings of one convergence check, per active sample (host lists)."""

    errors: list[float]  # L1 marginal error
    finite: list[bool]  # scalings finite and positive
    big: list[bool]  # scalings to absorb (or not finite)
    done: list[bool]  # converged
    overflow: list[bool]  # not finite at omega = 1: the scaling domain over/underflowed
    omega_before: list[float]  # the factors the block ran with
    stalled: list[bool]  # at the precision floor, no longer improving (STALL_CHECKS)


class _Results:
    """The per-sample outputs, written as samples finish (host lists, tensors at the end)."""

    def __init__(self, B: int, m: int, n: int, max_iter: int, like: Tensor) -> None:
        self.shape, self.dtype, self.device = (B, m, n), like.dtype, like.device
        self.plans: list[tuple[Tensor, Tensor]] = []  # (batch rows, their P)
        self.f = torch.zeros(B, m, dtype=like.dtype, device=like.device)
        self.g = torch.zeros(B, n, dtype=like.dtype, device=like.device)
        self.iterations = [max_iter] * B
        self.residual = [math.inf] * B
        self.converged = [False] * B
        self.stalled = [False] * B
        self.newton = [0] * B
        self.omega = [1.0] * B
        self.rate = [0.0] * B

    def record_potentials(self, rows: Tensor, problem: _Problem, cur: _Iterate, sel=None) -> None:
        """The final log potentials f + log u, g + log v of the active samples at positions
        ``sel`` (all when None), which are the samples at batch ``rows``."""

        def pick(x: Tensor) -> Tensor:  # indexed one at a time: fewer vectors alive at once
            return x if sel is None else x[sel]

        log_u = pick(cur.u).log()[..., 0]
        self.f[rows] = torch.where(pick(problem.row_mask) > 0, pick(cur.f) + log_u, -math.inf)
        log_v = pick(cur.v).log()[:, 0]
        self.g[rows] = torch.where(pick(problem.col_mask) > 0, pick(cur.g) + log_v, -math.inf)

    def solution(self) -> SinkhornSolution:
        """P assembled in batch order, and the record as tensors."""
        B, m, n = self.shape
        # samples are compacted in order, so a single plan of all B holds them in batch order
        if len(self.plans) == 1 and self.plans[0][1].shape[0] == B:
            P = self.plans[0][1]
        else:
            P = torch.empty(B, m, n, dtype=self.dtype, device=self.device)
            for rows, part in self.plans:
                P[rows] = part

        def tensor(values, dtype=self.dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        return SinkhornSolution(
            P,
            self.f,
            self.g,
            tensor(self.iterations, torch.long),
            tensor(self.residual),
            tensor(self.converged, torch.bool),
            tensor(self.omega),
            tensor(self.rate),
            tensor(self.stalled, torch.bool),
            tensor(self.newton, torch.long),
        )


class _Run:
    """Everything the solve loop updates: the active samples' problem, iterate and schedule."""

    def __init__(self, M, r, c, gamma, tol, max_iter, check_every, overrelax, start, eager):
        B, m, n = M.shape
        dtype, device = M.dtype, M.device
        lo, tau = LIMITS.get(dtype, LIMITS[torch.float32])
        self.settings = _Settings(
            gamma,
            tol,
            check_every,
            overrelax,
            lo,
            math.exp(-tau),
            math.exp(tau),
            torch.zeros((), dtype=dtype, device=device),
            torch.ones((), dtype=dtype, device=device),
        )
        self.problem = _Problem.of(M, r, c)
        self.padded = self.problem.padded
        self.rows = list(range(B))  # the active samples' positions in the batch
        self.results = _Results(B, m, n, max_iter, M)
        f, g = _start_potentials(self.problem, gamma, start)
        self.iterate = _fresh_iterate(self, f, g)
        self.schedule = OmegaSchedule(B, torch.finfo(dtype).eps)
        self.keep_w = self.schedule.keep_weight(self.iterate.u)  # 1 - omega, per sample
        self.buffers = blocks.BlockBuffers()
        self.drift = drift.DriftWatch(B, self.schedule.floor, eager)
        self.best = [math.inf] * B  # the best error seen
        self.flat = [0] * B  # checks in a row without improvement below the floor

    def floor_watch(self, errors: list[float]) -> list[bool]:
        """Record a check's errors; which samples have stalled at the precision floor: their
        best error below it (the potentials' rounding, at large gamma in float32, leaves an
        error there that no iteration removes) and no improvement for STALL_CHECKS checks of
        the plain iteration (an over-relaxed one at the floor swings with the rounding noise
        that omega amplifies, and the schedule then settles it on plain)."""
        for i, e in enumerate(errors):
            if e < STALL_FACTOR * self.best[i]:
                self.best[i], self.flat[i] = e, 0
            elif self.best[i] < self.schedule.floor and self.schedule.omega[i] == 1.0:
                self.flat[i] += 1
        return [k >= STALL_CHECKS for k in self.flat]

    def unscaled(self, x: Tensor, s: float) -> Tensor:
        return x if s == 1.0 else blocks.times(x, s, self.settings.zero, self.settings.one)

    def unscale(self) -> None:
        """Fold the host scales back into u, v and K v (K^T u is not needed after a check)."""
        cur = self.iterate
        cur.u, cur.v = self.unscaled(cur.u, cur.u_scale), self.unscaled(cur.v, cur.v_scale)
        cur.Kv = self.unscaled(cur.Kv, cur.v_scale)
        cur.u_scale = cur.v_scale = 1.0


def _start_potentials(problem: _Problem, gamma: float, start) -> tuple[Tensor, Tensor]:
    """The first potentials (0 on padding): zero, or ``start`` after one exact log-domain
    iteration, since the kernel of potentials carried over from another gamma can be out of
    range (a row flushed whole) where the scaling iteration would start."""
    B, m, n = problem.M.shape
    if start is None:
        like = problem.M
        return like.new_zeros(B, m), like.new_zeros(B, n)
    f, g = start
    g = torch.where(problem.col_mask > 0, g, -math.inf)  # no padded column counts
    f, g = blocks.log_domain_block(problem.M, gamma, f, g, problem.log_r, problem.log_c, 1)
    return torch.where(problem.row_mask > 0, f, 0.0), torch.where(problem.col_mask > 0, g, 0.0)


def _new_kernel(run: _Run, f: Tensor, g: Tensor) -> Tensor:
    problem, settings = run.problem, run.settings
    return blocks.kernel(
        problem.M, settings.gamma, f, g, problem.row_mask, problem.col_mask, settings.lo, run.padded
    )


def _fresh_iterate(run: _Run, f: Tensor, g: Tensor) -> _Iterate:
    """The iterate u = v = 1 on the kernel of the potentials f, g."""
    K = _new_kernel(run, f, g)
    B, m, n = K.shape
    u = torch.ones(B, m, 1, dtype=K.dtype, device=K.device)
    v = torch.ones(B, 1, n, dtype=K.dtype, device=K.device)
    return _Iterate(f, g, K, u, v, kernel_times(K, v, run.problem.pad_rows))


def _run_block(run: _Run, steps: int) -> tuple[Tensor, Tensor, float, float]:
    """Advance the active samples by ``steps`` iterations in the cheapest loop that fits.

    Returns the iterate the block started from (u, v and their scales), which the block
    leaves as it was: the check restores it where a scaling left the positive reals.
    """
    settings, problem, cur, omega = run.settings, run.problem, run.iterate, run.schedule.omega
    relaxed = settings.overrelax and any(w != 1.0 for w in omega)
    shared = relaxed and not run.padded and len(set(omega)) == 1
    if not shared:
        run.unscale()
    start = (cur.u, cur.v, cur.u_scale, cur.v_scale)
    # Over-relaxed: u <- w r / Kv + (1 - w) u. This is the linear form of the geometric update
    # u^(1-w) (r / Kv)^w (the same first-order behaviour at the fixed point, hence the same
    # rate) at one fused operation instead of four; an overshoot to u <= 0 is caught at the
    # check and undone.
    if shared:
        out = run.buffers.take(cur.u, cur.v)
        cur.u, cur.Ku, cur.v, cur.Kv, cur.u_scale, cur.v_scale = blocks.shared_factor_block(
            cur.K,
            cur.u,
            cur.v,
            cur.Kv,
            cur.u_scale,
            cur.v_scale,
            problem.r_col,
            problem.c_row,
            omega[0],
            steps,
            settings.zero,
            settings.one,
            out,
        )
    elif run.padded:
        keep_w = run.keep_w if relaxed else None
        cur.u, cur.Ku, cur.v, cur.Kv = blocks.padded_block(
            cur.K,
            cur.u,
            cur.v,
            cur.Kv,
            problem.r_col,
            problem.c_row,
            problem.pad_rows,
            problem.pad_cols,
            keep_w,
            steps,
        )
    elif relaxed:
        cur.u, cur.Ku, cur.v, cur.Kv = blocks.per_sample_factor_block(
            cur.K, cur.u, cur.v, cur.Kv, problem.r_col, problem.c_row, run.keep_w, steps
        )
    else:
        out = run.buffers.take(cur.u, cur.v)
        cur.u, cur.Ku, cur.v, cur.Kv = blocks.plain_block(
            cur.K, cur.Kv, problem.r_col, problem.c_row, steps, out
        )
    return start


def _scaling_ranges(u: Tensor, v: Tensor) -> list[Tensor]:
    """min u, max u, min v, max v per sample, each of shape (B,)."""
    if u.shape[0] == 1:
        # both extremes of a vector in one reduction over all of it: the four reductions along
        # a dim would dominate the check
        return [t.view(1) for t in (*torch.aminmax(u), *torch.aminmax(v))]
    # amin and amax: aminmax along a dim is slower on CPUs
    m, n = u.shape[-2], v.shape[-1]
    return [u.reshape(-1, m).amin(-1), u.reshape(-1, m).amax(-1)] + [
        v.reshape(-1, n).amin(-1),
        v.reshape(-1, n).amax(-1),
    ]


def _check(run: _Run, steps: int) -> _Check:
    """Errors and ranges of the scalings, brought to the host at once, and what they mean."""
    cur, problem, settings = run.iterate, run.problem, run.settings
    # u * Kv and v * Ku are the row and column sums of the current P (Ku is from this u),
    # through the scales: u_scale * u * v_scale * Kv; the ranges are scaled on the host below
    scale = cur.u_scale * cur.v_scale
    stats = [
        torch.linalg.vector_norm(
            torch.addcmul(problem.neg_r, cur.u, cur.Kv, value=scale), 1, dim=(-2, -1)
        ),
        torch.linalg.vector_norm(
            torch.addcmul(problem.neg_c, cur.v, cur.Ku, value=scale), 1, dim=(-2, -1)
        ),
        *_scaling_ranges(cur.u, cur.v),
    ]
    check = _Check([], [], [], [], [], list(run.schedule.omega), [])
    for e_r, e_c, u_lo, u_hi, v_lo, v_hi in zip(*torch.stack(stats).tolist(), strict=True):
        e = e_r + e_c
        u_lo, u_hi = (
            (cur.u_scale * u_lo, cur.u_scale * u_hi)
            if cur.u_scale > 0
            else (cur.u_scale * u_hi, cur.u_scale * u_lo)
        )
        v_lo, v_hi = (
            (cur.v_scale * v_lo, cur.v_scale * v_hi)
            if cur.v_scale > 0
            else (cur.v_scale * v_hi, cur.v_scale * v_lo)
        )
        # every comparison with a NaN is False, so NaN anywhere fails `ok`
        ok = u_lo > 0 and v_lo > 0 and u_hi < math.inf and v_hi < math.inf
        ok = ok and math.isfinite(e)
        big = not ok or max(u_hi, v_hi) > settings.big or min(u_lo, v_lo) < settings.small
        check.errors.append(e)
        check.finite.append(ok)
        check.big.append(big)
        check.done.append(ok and not big and e <= settings.tol)
    check.stalled = run.floor_watch(check.errors)
    if settings.overrelax:
        run.schedule.update(check.errors, check.finite, steps)
    # A non-finite or non-positive scaling: where it was over-relaxed the schedule has just
    # shrunk omega, which is the whole remedy; at omega = 1 it is an over/underflow of the
    # scaling domain, which an exact log-domain block resolves.
    check.overflow = [
        not ok and w == 1.0 for ok, w in zip(check.finite, check.omega_before, strict=True)
    ]
    return check


def _restore_failed(run: _Run, check: _Check, start: tuple[Tensor, Tensor, float, float]) -> None:
    """Samples whose scalings left the positive reals go back to the block's starting point
    (their scalings are then absorbed, as ``big`` holds for them)."""
    u0, v0, u0_scale, v0_scale = start
    u0, v0 = run.unscaled(u0, u0_scale), run.unscaled(v0, v0_scale)
    cur = run.iterate
    bad = torch.tensor([not ok for ok in check.finite], device=cur.u.device).view(-1, 1, 1)
    cur.u = torch.where(bad, u0, cur.u)
    cur.v = torch.where(bad, v0, cur.v)


def _plan(K: Tensor, u: Tensor, v: Tensor, sel: Tensor | None) -> Tensor:
    """diag(u) K diag(v) for the active samples at positions ``sel``, as it is returned; for
    all of them (sel None) in K's own memory.

    Entries below sqrt(smallest normal) are flushed to zero: their products (P^T P in the
    backward) would be slow denormal numbers; the mass removed is below m n 1e-19 in float32.
    NaN and inf (only where a sample failed outright) become 0.
    """
    P = K.mul_(u).mul_(v) if sel is None else K[sel].mul_(u[sel]).mul_(v[sel])
    torch.nan_to_num_(P, nan=0.0, posinf=0.0)
    return torch.nn.functional.threshold_(P, math.sqrt(torch.finfo(P.dtype).tiny), 0.0)


def _retire_converged(run: _Run, check: _Check, iterations: int) -> None:
    """Record the converged samples' plans and potentials, and drop them from the active batch.

    P = diag(u) K diag(v) with the K the iterations ran on: rebuilding it from the final
    potentials as exp(f' (+) g' - gamma M) would re-round the exponent at the scale of the
    potentials, which at large gamma moves the marginals past the tolerance. A sample retires
    only if the plan it returns meets tol: the check measures the marginals through the
    iterate's matrix-vector products, whose rounding (in float32) can differ from that of the
    plan's own sums by more than the margin left; such a sample keeps iterating.
    """
    cur = run.iterate
    done = [i for i, d in enumerate(check.done) if d]
    whole = len(done) == len(run.rows)
    sel = torch.tensor(done, device=cur.K.device)
    P = _plan(cur.K, cur.u, cur.v, None if whole else sel)
    errors = run.problem.plan_errors(P, None if whole else sel).tolist()
    passed = [e <= run.settings.tol for e in errors]
    if not all(passed):
        P = _keep_failed(run, check, done, passed, P, whole)
        errors = [e for e, ok in zip(errors, passed, strict=True) if ok]
        done = [i for i, ok in zip(done, passed, strict=True) if ok]
        sel = torch.tensor(done, device=cur.K.device)
    if done:
        _record_retired(run, done, sel, P, errors, iterations)
        _compact(run, check, [i for i, d in enumerate(check.done) if not d])


def _keep_failed(run: _Run, check: _Check, done, passed, P: Tensor, whole: bool) -> Tensor:
    """Return the retiring samples whose plans failed to the active batch (``check.done``
    cleared) and give the plans of those that passed. Where the plans were formed in K's
    memory, the kernel of a failed sample is recovered as P / (u v): exact up to rounding,
    unlike a kernel rebuilt from its potentials."""
    cur = run.iterate
    for i, ok in zip(done, passed, strict=True):
        check.done[i] = ok
    at = torch.tensor([k for k, ok in enumerate(passed) if ok], dtype=torch.long)
    good = P[at.to(P.device)]
    if whole:
        bad = [i for i, ok in zip(done, passed, strict=True) if not ok]
        bad = torch.tensor(bad, dtype=torch.long, device=P.device)
        P.index_copy_(0, bad, P[bad].div_(cur.u[bad]).div_(cur.v[bad]))
    return good


def _record_retired(run: _Run, done, sel: Tensor, P: Tensor, errors, iterations, stalled=False):
    """Store the retired samples' plans P, potentials and record (positions ``done``): all
    converged, or all ``stalled`` (converged where the plan still meets tol)."""
    cur, res, sched = run.iterate, run.results, run.schedule
    batch_rows = torch.tensor([run.rows[i] for i in done], device=cur.K.device)
    whole = len(done) == len(run.rows)
    res.record_potentials(batch_rows, run.problem, cur, None if whole else sel)
    res.plans.append((batch_rows, P))
    for i, e in zip(done, errors, strict=True):
        b = run.rows[i]
        res.iterations[b], res.residual[b] = iterations, e
        res.converged[b], res.stalled[b] = e <= run.settings.tol or not stalled, stalled
        res.omega[b], res.rate[b] = sched.omega[i], sched.mu2[i]


def _retire_stalled(run: _Run, check: _Check, iterations: int) -> None:
    """Record the samples stalled at their precision floor, unconverged (unless the plan
    returned meets tol after all), and drop them from the active batch."""
    cur = run.iterate
    at = [i for i, s in enumerate(check.stalled) if s]
    whole = len(at) == len(run.rows)
    sel = torch.tensor(at, device=cur.K.device)
    P = _plan(cur.K, cur.u, cur.v, None if whole else sel)
    errors = run.problem.plan_errors(P, None if whole else sel)
    errors = torch.nan_to_num(errors, nan=math.inf).tolist()
    _record_retired(run, at, sel, P, errors, iterations, stalled=True)
    _compact(run, check, [i for i, s in enumerate(check.stalled) if not s])


def _compact(run: _Run, check: _Check, keep: list[int]) -> None:
    """Restrict the active batch to the samples at positions ``keep``."""
    run.rows = [run.rows[i] for i in keep]
    if not run.rows:
        return
    run.schedule.keep(keep)
    run.drift.keep(keep)
    check.errors = [check.errors[i] for i in keep]
    check.big = [check.big[i] for i in keep]
    check.overflow = [check.overflow[i] for i in keep]
    check.stalled = [check.stalled[i] for i in keep]
    run.best, run.flat = [run.best[i] for i in keep], [run.flat[i] for i in keep]
    sel = torch.tensor(keep, device=run.iterate.K.device)
    run.problem = run.problem.select(sel)
    cur = run.iterate
    cur.f, cur.g, cur.u, cur.v, cur.Kv, cur.K = (
        x[sel] for x in (cur.f, cur.g, cur.u, cur.v, cur.Kv, cur.K)
    )


def _absorb(run: _Run, check: _Check) -> None:
    """Absorb the scalings into the log potentials (exact for every sample) and restart from
    u = v = 1 on the new kernel; where the scaling domain overflowed, run an exact log-domain
    block first. The iterate is replaced field by field, so that each old tensor is freed as
    soon as its successor exists."""
    cur, problem, settings = run.iterate, run.problem, run.settings
    cur.f = torch.where(problem.row_mask > 0, cur.f + cur.u.log()[..., 0], cur.f)
    cur.g = torch.where(problem.col_mask > 0, cur.g + cur.v.log()[:, 0], cur.g)
    if any(check.overflow):
        g = torch.where(problem.col_mask > 0, cur.g, -math.inf)  # no padded column counts
        cur.f, cur.g = blocks.log_domain_block(
            problem.M, settings.gamma, cur.f, g, problem.log_r, problem.log_c,
            min(settings.check_every, 10),
        )  # fmt: skip
        cur.f = torch.where(problem.row_mask > 0, cur.f, 0.0)
        cur.g = torch.where(problem.col_mask > 0, cur.g, 0.0)
        for i, overflowed in enumerate(check.overflow):
            if overflowed:
                run.schedule.reset(i)
    cur.K = _new_kernel(run, cur.f, cur.g)
    cur.u, cur.v = torch.ones_like(cur.u), torch.ones_like(cur.v)
    cur.Kv = kernel_times(cur.K, cur.v, problem.pad_rows)


def _potentials(run: _Run) -> tuple[Tensor, Tensor]:
    """The log potentials of the current iterate, f + log u and g + log v (0 on padding)."""
    run.unscale()
    cur = run.iterate
    return cur.f + cur.u.log()[..., 0], cur.g + cur.v.log()[:, 0]


def _watch_drift(run: _Run, check: _Check) -> None:
    """A Newton step for the samples whose error stopped improving (see drift.py)."""
    due = run.drift.observe(check.errors)
    if not due:
        return
    f, g = _potentials(run)
    cur, problem = run.iterate, run.problem
    sel = torch.tensor(due, device=f.device)
    f, g, r, c = f[sel], g[sel], problem.r[sel], problem.c[sel]
    df, dg = drift.newton_direction(cur.K[sel] * cur.u[sel] * cur.v[sel], r, c)
    df = torch.where(problem.row_mask[sel] > 0, df, 0.0)
    dg = torch.where(problem.col_mask[sel] > 0, dg, 0.0)
    steps = _step_lengths(run, sel, f, g, df, dg)
    jumped = [i for i, s in zip(due, steps, strict=True) if s > 0]
    run.drift.settle(due, jumped)
    if jumped:
        at = torch.tensor([k for k, s in enumerate(steps) if s > 0], device=f.device)
        s = torch.tensor([x for x in steps if x > 0], dtype=f.dtype, device=f.device)
        s = s.unsqueeze(-1)
        _jump(run, jumped, f[at] + s * df[at], g[at] + s * dg[at])


def _step_lengths(run: _Run, sel: Tensor, f, g, df, dg) -> list[float]:
    """The steps along (df, dg) towards the maximum of the dual (drift.step_lengths)."""
    problem, settings = run.problem, run.settings
    M, r, c = problem.M[sel], problem.r[sel], problem.c[sel]
    masks = (problem.row_mask[sel], problem.col_mask[sel])

    def slope_at(idx: list[int], steps: list[float]) -> list[float]:
        at = torch.tensor(idx, device=M.device)
        s = torch.tensor(steps, dtype=M.dtype, device=M.device)
        return drift.dual_slopes(
            M[at], settings.gamma, f[at], g[at], df[at], dg[at], r[at], c[at],
            (masks[0][at], masks[1][at]), settings.lo, run.padded, s,
        )  # fmt: skip

    return drift.step_lengths(slope_at, drift.first_steps(df, dg))


def _jump(run: _Run, rows: list[int], f: Tensor, g: Tensor) -> None:
    """Move the samples at positions ``rows`` to the potentials f, g: u = v = 1 on their new
    kernel, and a fresh over-relaxation schedule."""
    cur, problem, settings = run.iterate, run.problem, run.settings
    sel = torch.tensor(rows, device=f.device)
    K = blocks.kernel(
        problem.M[sel], settings.gamma, f, g, problem.row_mask[sel], problem.col_mask[sel],
        settings.lo, run.padded,
    )  # fmt: skip
    ones = torch.ones_like(cur.v[sel])
    pad_rows = None if problem.pad_rows is None else problem.pad_rows[sel]
    cur.f.index_copy_(0, sel, f)
    cur.g.index_copy_(0, sel, g)
    cur.K.index_copy_(0, sel, K)
    cur.Kv.index_copy_(0, sel, kernel_times(K, ones, pad_rows))
    cur.u.index_fill_(0, sel, 1.0)
    cur.v.index_fill_(0, sel, 1.0)
    for i in rows:
        run.schedule.reset(i)
        run.results.newton[run.rows[i]] += 1


def _refresh_keep_weight(run: _Run, check: _Check) -> None:
    """Rebuild the per-sample weight 1 - omega when the batch changed or a factor moved by
    more than 1e-3 (a smaller move keeps its tensor: one allocation fewer a check). Only the
    per-sample loops read it: padded problems, or batches whose factors differ."""
    if not (run.padded or len(run.rows) > 1):
        return
    if any(check.done) or any(
        abs(w - w0) > 1e-3 for w, w0 in zip(run.schedule.omega, check.omega_before, strict=True)
    ):
        run.keep_w = run.schedule.keep_weight(run.iterate.u)


def _after_block(run: _Run, start, steps: int, iterations: int) -> None:
    """The check after a block, and what follows from it: restore, retire, absorb."""
    check = _check(run, steps)
    if not all(check.finite) or any(check.done) or any(check.big) or any(check.stalled):
        run.unscale()  # what follows reads the true scalings
    if not all(check.finite):
        _restore_failed(run, check, start)
    if any(check.done):
        _retire_converged(run, check, iterations)
        if not run.rows:
            return
    if any(check.stalled):
        _retire_stalled(run, check, iterations)
        if not run.rows:
            return
    if any(check.big):
        _absorb(run, check)
    _watch_drift(run, check)
    _refresh_keep_weight(run, check)


def _record_unconverged(run: _Run) -> None:
    """The samples still active at max_iter: their plans, potentials and marginal errors (a
    sample whose plan meets tol counts as converged)."""
    run.unscale()
    cur, problem, res = run.iterate, run.problem, run.results
    rows = torch.tensor(run.rows, device=cur.K.device)
    res.record_potentials(rows, problem, cur)
    for i, w, mu2 in zip(run.rows, run.schedule.omega, run.schedule.mu2, strict=True):
        res.omega[i], res.rate[i] = w, mu2
    P = _plan(cur.K, cur.u, cur.v, None)
    errors = torch.nan_to_num(problem.plan_errors(P, None), nan=math.inf).tolist()
    for i, e in zip(run.rows, errors, strict=True):
        res.residual[i], res.converged[i] = e, e <= run.settings.tol
    res.plans.append((rows, P))


@torch.no_grad()
def solve_sinkhorn(
    M: Tensor,
    r: Tensor,
    c: Tensor,
    gamma: float,
    tol: float,
    max_iter: int,
    check_every: int = 10,
    overrelax: bool = True,
    start: tuple[Tensor, Tensor] | None = None,
    eager_newton: bool = False,
) -> SinkhornSolution:
    """Solve min <P, M> + KL(P || r c^T) / gamma  s.t.  P 1 = r, P^T 1 = c, per sample.

    The layer's forward, on inputs already checked and normalised (use :func:`ddn.sinkhorn`
    for anything else); public for benchmarks that time the solver alone.

    Args:
        M: (B, m, n) cost, float32 or float64.
        r: (B, m) and c: (B, n) non-negative marginals summing to 1 per sample (zeros = padding).
        tol: a sample has converged when ||P 1 - r||_1 + ||P^T 1 - c||_1 <= tol, measured on
            the P returned (``residual``).
        max_iter: at most this many iterations per sample (one = a row and a column update).
        check_every: iterations between convergence checks (each costs one host sync).
        overrelax: accelerate with an adaptively estimated over-relaxation factor (False: the
            plain scaling iteration, kept stable the same way).
        start: initial log potentials (f (B, m), g (B, n)) as a solution holds them (relative
            to the reduced cost, any value on padding), e.g. from an annealing stage at
            another gamma (:func:`solve_annealed`); None starts from zero.
        eager_newton: take a Newton step on the dual wherever the error has not halved in
            three checks (drift.EAGER), not only where it crawls: for warm starts.
    """
    run = _Run(M, r, c, gamma, tol, max_iter, check_every, overrelax, start, eager_newton)
    iterations = 0
    while iterations < max_iter and run.rows:
        steps = min(check_every, max_iter - iterations)
        start = _run_block(run, steps)
        iterations += steps
        _after_block(run, start, steps, iterations)
    if run.rows:  # not converged within max_iter: report where they stand
        _record_unconverged(run)
    results = run.results
    del run  # the iterate and its buffers, before P is assembled
    return results.solution()


def potentials_cost(M: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """The cost M' that a solution's potentials refer to, P = exp(f (+) g - gamma M'): M less
    its row and column minima over the real entries (:func:`_reduced_cost`); (B, m, n)."""
    return _Problem.of(M, r, c).M
