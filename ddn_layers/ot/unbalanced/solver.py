"""Forward solver of unbalanced entropic optimal transport: generalised Sinkhorn scaling.

Per sample it solves (Chizat et al. 2018; POT's ``sinkhorn_unbalanced``, reg_type "kl")

    min_P <P, M> + KL(P || r c^T) / gamma + rho_r KL(P 1 || r) + rho_c KL(P^T 1 || c),

KL(x || y) = sum x log(x / y) - x + y. The plan is P = diag(U) K0 diag(V), K0 = r c^T o
exp(-gamma M), and the iteration is U <- (r / K0 V)^phi_r, V <- (c / K0^T U)^phi_c with
phi = gamma rho / (1 + gamma rho) (1 on a hard side, rho = inf: plain Sinkhorn there).

Stability at any gamma as in the balanced solver: the log potentials f = log U, g = log V are
absorbed into the kernel K = exp(log r (+) log c + f (+) g - gamma M) now and then, and the
inner loop runs on the scalings u, v on top of it (U = e^f u), so that
u <- (r~ / K v)^phi_r with r~ = r exp(-f / (gamma rho_r)), the targets refreshed only when f
is. Where the scaling domain over- or under-flows, an exact log-domain block takes over.

Convergence is measured on the optimality conditions of the relaxed problem: stationarity in
P gives P 1 = r exp(-F / (gamma rho_r)) with F = f + log u the row potential (P 1 = r on a
hard side), likewise for the columns, so the residual is

    (||P 1 - r exp(-F / (gamma rho_r))||_1 + ||P^T 1 - c exp(-G / (gamma rho_c))||_1) / mass,

mass = the mean of the two targets' totals: the balanced layer's marginal error where both
sides are hard (r and c normalised there).
It is checked every ``check_every`` iterations (one host transfer); converged samples leave
the active batch, and so do samples stalled at the precision floor (``STALL_CHECKS``),
unconverged. Two accelerations, both per sample: over-relaxation by the balanced
solver's adaptive schedule, in the geometric form U <- U_new^omega U^(1 - omega), and, at
every check, a translation of the potentials (f + t, g - t) to the maximum of the dual along
that line, in closed form: the direction in which the plain iteration is slowest. At large
gamma the solve is annealed (annealing.py). Zeros in r or c are padding: those rows/columns
of P are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ddn_layers.base import Solved, SolverInfo
from ddn_layers.ot import annealing, logplan
from ddn_layers.ot.schedule import OmegaSchedule

LIMITS = {torch.float32: (-60.0, 15.0), torch.float64: (-600.0, 100.0)}
"""(flush threshold for log K, absorption threshold for |log u|, |log v|) per dtype."""

FLOOR_EPS = 300.0
"""Residuals below this many machine epsilons are at the precision floor (the balanced
solver's over-relaxation schedule uses the same bound)."""

STALL_CHECKS = 5
"""Checks in a row without any improvement on the best residual, below the floor, after which
a sample stops unconverged instead of running to max_iter (one that converges, however
slowly, improves on its best at every check)."""


@dataclass(frozen=True)
class Sides:
    """The relaxation of each side: ``phi`` the exponent of the scaling update and ``lam`` =
    1 / (gamma rho), with phi = 1, lam = 0 on a hard side (rho = inf)."""

    phi_r: float
    phi_c: float
    lam_r: float
    lam_c: float

    @classmethod
    def of(cls, gamma: float, rho: tuple[float, float]) -> Sides:
        lam = [0.0 if math.isinf(x) else 1.0 / (gamma * x) for x in rho]
        return cls(1.0 / (1.0 + lam[0]), 1.0 / (1.0 + lam[1]), lam[0], lam[1])


@dataclass
class UnbalancedSolution:
    """What the forward found, per sample (leading dimension B)."""

    P: Tensor  # (B, m, n) transport plan
    f: Tensor  # (B, m) log potentials log U, -inf on padding
    g: Tensor  # (B, n)
    iterations: Tensor  # (B,) int64, over all annealing stages
    residual: Tensor  # (B,) optimality residual of P (module docstring)
    converged: Tensor  # (B,) bool
    omega: Tensor  # (B,) over-relaxation factor in use at the end

    def info(self, stages: int = 1) -> SolverInfo:
        """The per-sample record; extras: ``omega`` and ``stages`` (annealing stages run)."""
        st = torch.full_like(self.omega, float(stages))
        return SolverInfo(
            self.iterations, self.residual, self.converged, {"omega": self.omega, "stages": st}
        )


@dataclass
class Problem:
    """The cost and the masses of the active samples, compacted with them."""

    M: Tensor  # (B, m, n)
    log_r: Tensor  # (B, m), -inf on padding
    log_c: Tensor  # (B, n)
    row_mask: Tensor  # (B, m) 1 on real rows, 0 on padding
    col_mask: Tensor  # (B, n)

    @classmethod
    def of(cls, M: Tensor, r: Tensor, c: Tensor) -> Problem:
        # masses below sqrt(smallest normal) are padding: their kernel rows would be flushed
        floor = math.sqrt(torch.finfo(M.dtype).tiny)
        row_mask, col_mask = (r > floor).to(M.dtype), (c > floor).to(M.dtype)
        log_r = torch.where(row_mask > 0, r.log(), -math.inf)
        log_c = torch.where(col_mask > 0, c.log(), -math.inf)
        return cls(M, log_r, log_c, row_mask, col_mask)

    @property
    def padded(self) -> bool:
        return bool((self.row_mask == 0).any()) or bool((self.col_mask == 0).any())

    def select(self, sel: Tensor) -> Problem:
        return Problem(*(getattr(self, f.name)[sel] for f in fields(self)))

    def targets(self, sides: Sides, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The marginals the optimality conditions ask of P given potentials f, g: r
        exp(-lam_r f) as a column (B, m, 1), c exp(-lam_c g) as a row (B, 1, n); 0 on padding."""
        rt = torch.exp(torch.sub(self.log_r, f, alpha=sides.lam_r))
        ct = torch.exp(torch.sub(self.log_c, g, alpha=sides.lam_c))
        return rt.unsqueeze(-1), ct.unsqueeze(-2)

    def residual(self, sides: Sides, P: Tensor, f: Tensor, g: Tensor) -> Tensor:
        """The optimality residual (module docstring) of plans P with potentials f, g."""
        rt, ct = self.targets(sides, f, g)
        rt, ct = rt.squeeze(-1), ct.squeeze(-2)
        e_r = (P.sum(-1) - rt).abs().sum(-1)
        e_c = (P.sum(-2) - ct).abs().sum(-1)
        return (e_r + e_c) * 2 / (rt.sum(-1) + ct.sum(-1))

    def start(self, gamma: float) -> tuple[Tensor, Tensor]:
        """Potentials that put the largest kernel entry of every row and column at r_i c_j:
        gamma times the row minima of M, then the column minima of what is left (real
        entries only), so that no kernel over- or underflows at the first iteration."""
        M = self.M.detach()
        if not self.padded:
            a = M.amin(-1, keepdim=True)
            return a.squeeze(-1) * gamma, (M - a).amin(-2) * gamma
        rows, cols = self.row_mask.unsqueeze(-1) > 0, self.col_mask.unsqueeze(-2) > 0
        a = torch.where(cols, M, math.inf).amin(-1, keepdim=True)
        b = torch.where(rows, M - a, math.inf).amin(-2, keepdim=True)
        f = torch.where(rows, a, 0.0).squeeze(-1) * gamma
        g = torch.where(cols, b, 0.0).squeeze(-2) * gamma
        return f, g


def kernel(problem: Problem, gamma: float, f: Tensor, g: Tensor, lo: float) -> Tensor:
    """exp(log r (+) log c + f (+) g - gamma M), entries below exp(lo) flushed to 0 (denormal
    numbers are slow in the matrix-vector products); 0 on padding."""
    K = torch.add((problem.log_r + f).unsqueeze(-1), (problem.log_c + g).unsqueeze(-2))
    K.add_(problem.M, alpha=-gamma).exp_()
    return torch.nn.functional.threshold_(K, math.exp(lo), 0.0)


def log_domain_block(problem: Problem, gamma: float, sides: Sides, f, g, iters: int):
    """Exact (logsumexp) iterations on the potentials: slow, never over- or underflows.
    f = -phi_r logsumexp_j(log c_j + g_j - gamma M_ij), likewise g; padding takes no part."""
    logK = problem.M * (-gamma)
    for _ in range(iters):
        f = torch.logsumexp(logK + (problem.log_c + g).unsqueeze(-2), dim=-1) * -sides.phi_r
        g = torch.logsumexp(logK + (problem.log_r + f).unsqueeze(-1), dim=-2) * -sides.phi_c
    return f, g


@dataclass
class _Iterate:
    """The active samples' iterate: P = diag(u) K diag(v), U = e^f u, V = e^g v.

    ``rt``, ``ct``: the targets r~, c~ of the inner loop (1 on padding, where K v and K^T u
    are 1 as well, so that the padded scalings stay 1); ``Ku`` is current after a block."""

    f: Tensor  # (B, m)
    g: Tensor  # (B, n)
    K: Tensor  # (B, m, n)
    u: Tensor  # (B, m, 1)
    v: Tensor  # (B, 1, n)
    Kv: Tensor  # (B, m, 1)
    Ku: Tensor  # (B, 1, n)
    rt: Tensor  # (B, m, 1)
    ct: Tensor  # (B, 1, n)


@dataclass
class _Settings:
    gamma: float
    sides: Sides
    tol: float
    overrelax: bool
    translate: bool  # apply _translate at every check
    lo: float  # log K below this is flushed to 0
    small: float  # scalings outside [small, big] are absorbed into the potentials
    big: float


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
        self.omega = [1.0] * B

    def solution(self) -> UnbalancedSolution:
        """P assembled in batch order, and the record as tensors."""
        B, m, n = self.shape
        if len(self.plans) == 1 and self.plans[0][1].shape[0] == B:
            P = self.plans[0][1]  # samples are compacted in order: already in batch order
        else:
            P = torch.empty(B, m, n, dtype=self.dtype, device=self.device)
            for rows, part in self.plans:
                P[rows] = part

        def tensor(values, dtype=self.dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        return UnbalancedSolution(
            P,
            self.f,
            self.g,
            tensor(self.iterations, torch.long),
            tensor(self.residual),
            tensor(self.converged, torch.bool),
            tensor(self.omega),
        )


class _Run:
    """Everything the solve loop updates: the active samples' problem, iterate and schedule."""

    def __init__(self, problem: Problem, settings: _Settings, f, g, max_iter: int) -> None:
        B, m, n = problem.M.shape
        self.problem, self.settings = problem, settings
        self.rows = list(range(B))  # the active samples' positions in the batch
        self.results = _Results(B, m, n, max_iter, problem.M)
        # K v and K^T u are floored at the flush threshold (1 on padding): a row or column
        # whose kernel is flushed whole (mass below it) then gets a large, finite scaling,
        # which the next absorption moves into the kernel, instead of an infinite one
        floor = math.exp(settings.lo)
        self.floor_rows = (1 - problem.row_mask).unsqueeze(-1) + floor
        self.floor_cols = (1 - problem.col_mask).unsqueeze(-2) + floor
        self.iterate = self.fresh(f, g)
        self.schedule = OmegaSchedule(B, torch.finfo(problem.M.dtype).eps)
        self.keep_w: Tensor | None = None  # 1 - omega per sample, None while all are plain
        self.block_start = (self.iterate.u, self.iterate.v)  # u, v before the latest block
        self.floor = FLOOR_EPS * torch.finfo(problem.M.dtype).eps
        self.best = [math.inf] * B  # the best residual seen
        self.flat = [0] * B  # checks in a row without improvement below the floor

    def floor_watch(self, errors: list[float]) -> list[bool]:
        """Record a check's residuals; which samples have stalled at the precision floor. Only
        the plain iteration counts (omega = 1): an over-relaxed one at the floor swings with
        the rounding noise that omega amplifies, and the schedule then settles it on plain."""
        for i, e in enumerate(errors):
            if e < self.best[i]:
                self.best[i], self.flat[i] = e, 0
            elif self.best[i] < self.floor and self.schedule.omega[i] == 1.0:
                self.flat[i] += 1
        return [k >= STALL_CHECKS for k in self.flat]

    def kernel_times(self, K: Tensor, v: Tensor) -> Tensor:
        return torch.baddbmm(self.floor_rows, K, v.mT)

    def kernel_t_times(self, K: Tensor, u: Tensor) -> Tensor:
        return torch.baddbmm(self.floor_cols, u.mT, K)

    def fresh(self, f: Tensor, g: Tensor) -> _Iterate:
        """The iterate u = v = 1 on the kernel of the potentials f, g."""
        problem, settings = self.problem, self.settings
        K = kernel(problem, settings.gamma, f, g, settings.lo)
        rt, ct = problem.targets(settings.sides, f, g)
        rt, ct = (
            rt + (1 - problem.row_mask).unsqueeze(-1),
            ct + (1 - problem.col_mask).unsqueeze(-2),
        )
        B, m, n = K.shape
        u = torch.ones(B, m, 1, dtype=K.dtype, device=K.device)
        v = torch.ones(B, 1, n, dtype=K.dtype, device=K.device)
        return _Iterate(f, g, K, u, v, self.kernel_times(K, v), self.kernel_t_times(K, u), rt, ct)

    def potentials(self) -> tuple[Tensor, Tensor]:
        cur = self.iterate
        return cur.f + cur.u.log()[..., 0], cur.g + cur.v.log()[:, 0]

    def select(self, keep: list[int]) -> None:
        """Restrict the active batch to the samples at positions ``keep``."""
        self.rows = [self.rows[i] for i in keep]
        self.schedule.keep(keep)
        self.best, self.flat = [self.best[i] for i in keep], [self.flat[i] for i in keep]
        sel = torch.tensor(keep, device=self.problem.M.device)
        self.problem = self.problem.select(sel)
        self.floor_rows, self.floor_cols = self.floor_rows[sel], self.floor_cols[sel]
        cur = self.iterate
        for name in ("f", "g", "K", "u", "v", "Kv", "Ku", "rt", "ct"):
            setattr(cur, name, getattr(cur, name)[sel])
        self.block_start = tuple(x[sel] for x in self.block_start)
        self.keep_w = None if self.keep_w is None else relax_factors(self.schedule, cur.u)


def relax_factors(schedule: OmegaSchedule, like: Tensor) -> tuple[Tensor, Tensor]:
    """omega and 1 - omega per sample, each (B, 1, 1)."""
    return schedule.tensor(like), schedule.keep_weight(like)


def _update(target: Tensor, product: Tensor, phi: float, prev: Tensor, relax) -> Tensor:
    """One half-step: (target / product)^phi, over-relaxed geometrically from ``prev``,
    x^omega prev^(1 - omega), by the per-sample factors ``relax`` = (phi omega, 1 - omega)
    (None: not over-relaxed). The geometric form keeps the scalings positive: the linear one
    overshoots to negative scalings, which the soft sides' power turns into NaN."""
    x = torch.div(target, product)
    if relax is None:
        return x if phi == 1.0 else x.pow_(phi)
    phi_w, keep_w = relax
    return x.pow_(phi_w if phi == 1.0 else phi_w * phi).mul_(prev.pow(keep_w))


def _run_block(run: _Run, steps: int) -> None:
    """Advance the active samples by ``steps`` iterations (``run.block_start`` keeps the u, v
    the block started from)."""
    cur, sides, keep_w = run.iterate, run.settings.sides, run.keep_w
    run.block_start = (cur.u, cur.v)
    for _ in range(steps):
        cur.u = _update(cur.rt, cur.Kv, sides.phi_r, cur.u, keep_w)
        cur.Ku = run.kernel_t_times(cur.K, cur.u)
        cur.v = _update(cur.ct, cur.Ku, sides.phi_c, cur.v, keep_w)
        cur.Kv = run.kernel_times(cur.K, cur.v)


@dataclass
class _Check:
    """The findings of one convergence check, per active sample (host lists)."""

    errors: list[float]
    finite: list[bool]  # scalings finite and positive
    big: list[bool]  # scalings to absorb (or not finite)
    done: list[bool]  # converged, or stalled at the precision floor: to retire
    omega_before: list[float]  # the factors the block ran with
    stalled: list[bool]  # no improvement for STALL_CHECKS checks below the floor


def _ranges(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.reshape(x.shape[0], -1)
    return flat.amin(-1), flat.amax(-1)


def _check(run: _Run, steps: int) -> _Check:
    """Residuals and ranges of the scalings, brought to the host at once, and what they mean."""
    cur, problem, settings = run.iterate, run.problem, run.settings
    sides = settings.sides
    p_hat = cur.rt if sides.lam_r == 0 else cur.rt * cur.u.pow(-sides.lam_r)
    q_hat = cur.ct if sides.lam_c == 0 else cur.ct * cur.v.pow(-sides.lam_c)
    e_r = torch.addcmul(-p_hat, cur.u, cur.Kv).abs().sum((-2, -1))
    e_c = torch.addcmul(-q_hat, cur.v, cur.Ku).abs().sum((-2, -1))
    # the targets' total mass (padding, where they are 1, left out)
    scale = (p_hat.squeeze(-1) * problem.row_mask).sum(-1)
    scale += (q_hat[:, 0] * problem.col_mask).sum(-1)
    stats = torch.stack([(e_r + e_c) * 2 / scale, *_ranges(cur.u), *_ranges(cur.v)]).tolist()
    check = _Check([], [], [], [], list(run.schedule.omega), run.floor_watch(stats[0]))
    for e, u_lo, u_hi, v_lo, v_hi in zip(*stats, strict=True):
        # every comparison with a NaN is False, so NaN anywhere fails `ok`
        ok = u_lo > 0 and v_lo > 0 and u_hi < math.inf and v_hi < math.inf and math.isfinite(e)
        big = not ok or max(u_hi, v_hi) > settings.big or min(u_lo, v_lo) < settings.small
        check.errors.append(e)
        check.finite.append(ok)
        check.big.append(big)
        check.done.append(ok and (e <= settings.tol or check.stalled[len(check.done)]))
    if settings.overrelax:
        run.schedule.update(check.errors, check.finite, steps)
        relaxed = any(w != 1.0 for w in run.schedule.omega)
        run.keep_w = relax_factors(run.schedule, cur.u) if relaxed else None
    return check


def _plan(run: _Run, sel: Tensor | None) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """The plans diag(u) K diag(v) of the active samples at positions ``sel`` (all when None:
    formed in K's own memory), their potentials and their residuals. Entries below
    sqrt(smallest normal) are flushed: the backward's products of P would be slow denormal
    numbers."""
    cur = run.iterate
    f, g = run.potentials()
    if sel is None:
        P, problem = cur.K.mul_(cur.u).mul_(cur.v), run.problem
    else:
        P, problem = cur.K[sel].mul_(cur.u[sel]).mul_(cur.v[sel]), run.problem.select(sel)
        f, g = f[sel], g[sel]
    torch.nan_to_num_(P, nan=0.0, posinf=0.0)
    torch.nn.functional.threshold_(P, math.sqrt(torch.finfo(P.dtype).tiny), 0.0)
    errors = problem.residual(run.settings.sides, P, f, g)
    return P, f, g, torch.nan_to_num(errors, nan=math.inf).tolist()


def _record(run: _Run, at: list[int], P: Tensor, f: Tensor, g: Tensor, errors, its) -> None:
    """Store the plans P and records of the active samples at positions ``at`` (f, g, errors
    given for them alone)."""
    res, rows = run.results, [run.rows[i] for i in at]
    batch_rows = torch.tensor(rows, device=P.device)
    res.plans.append((batch_rows, P))
    pick = torch.tensor(at, device=P.device)
    res.f[batch_rows] = torch.where(run.problem.row_mask[pick] > 0, f, -math.inf)
    res.g[batch_rows] = torch.where(run.problem.col_mask[pick] > 0, g, -math.inf)
    for i, b, e in zip(at, rows, errors, strict=True):
        res.iterations[b], res.residual[b], res.converged[b] = its, e, e <= run.settings.tol
        res.omega[b] = run.schedule.omega[i]


def _retire(run: _Run, check: _Check, iterations: int) -> None:
    """Record the samples whose plans meet tol (measured on the plan returned) and drop them
    from the active batch; a sample whose plan misses tol keeps iterating. When every active
    sample retires, the plans are formed in the kernel's memory; one that then misses tol
    restarts from its potentials (an absorption)."""
    done = [i for i, d in enumerate(check.done) if d]
    whole = len(done) == len(run.rows)
    P, f, g, errors = _plan(run, None if whole else torch.tensor(done, device=run.problem.M.device))
    # a stalled sample retires with the residual it reached (unconverged: the caller warns)
    passed = [k for k, e in enumerate(errors) if e <= run.settings.tol or check.stalled[done[k]]]
    if passed:
        sel = torch.tensor(passed, device=P.device)
        at = [done[k] for k in passed]
        part = P if len(passed) == len(done) else P[sel]
        _record(run, at, part, f[sel], g[sel], [errors[k] for k in passed], iterations)
    for k in range(len(done)):
        check.done[done[k]] = k in passed
    keep = [i for i, d in enumerate(check.done) if not d]
    if len(keep) == len(run.rows):
        if whole:
            run.iterate = run.fresh(*run.potentials())
        return
    for name in ("errors", "finite", "big", "omega_before"):
        setattr(check, name, [getattr(check, name)[i] for i in keep])
    if not keep:
        run.rows = []
        return
    run.select(keep)
    if whole:
        run.iterate = run.fresh(*run.potentials())


def _absorb(run: _Run, check: _Check) -> None:
    """Absorb the scalings into the potentials and restart from u = v = 1 on the new kernel.
    Samples whose scalings left the positive reals first go back to the block's start; where
    that happened without over-relaxation (the scaling domain over- or underflowed), an exact
    log-domain block runs first."""
    cur, problem, settings = run.iterate, run.problem, run.settings
    bad = [not ok for ok in check.finite]
    if any(bad):
        at = torch.tensor(bad, device=cur.u.device).view(-1, 1, 1)
        u0, v0 = run.block_start
        cur.u, cur.v = torch.where(at, u0, cur.u), torch.where(at, v0, cur.v)
    f, g = run.potentials()
    over = [i for i, (b, w) in enumerate(zip(bad, check.omega_before, strict=True)) if b and w == 1]
    if over:
        at = torch.tensor(over, device=f.device)
        fo, go = log_domain_block(
            problem.select(at), settings.gamma, settings.sides, f[at], g[at], 10
        )
        f, g = f.index_copy(0, at, fo), g.index_copy(0, at, go)
        for i in over:
            run.schedule.reset(i)
    run.iterate = run.fresh(f, g)


def _translate(run: _Run) -> None:
    """Move every active sample along (f + t, g - t), which leaves P as it is, to the t at
    which the targets' total masses agree: the maximum of the dual along that line, the
    direction in which the scaling iteration converges at its slowest rate, 1 / (1 + lam)
    a half-step (Sejourne et al. 2022, translation invariant Sinkhorn). A closed form:
    sum r~ exp(-lam_r t) = sum c~ exp(lam_c t)."""
    cur, problem, sides = run.iterate, run.problem, run.settings.sides
    p_hat = cur.rt if sides.lam_r == 0 else cur.rt * cur.u.pow(-sides.lam_r)
    q_hat = cur.ct if sides.lam_c == 0 else cur.ct * cur.v.pow(-sides.lam_c)
    a = (p_hat.squeeze(-1) * problem.row_mask).sum(-1)
    c = (q_hat.squeeze(-2) * problem.col_mask).sum(-1)
    t = torch.log(a / c) / (sides.lam_r + sides.lam_c)
    t = torch.where(torch.isfinite(t), t, 0.0).unsqueeze(-1)
    cur.f, cur.g = cur.f + t, cur.g - t
    if sides.lam_r:
        cur.rt = (
            cur.rt * torch.where(problem.row_mask > 0, torch.exp(-sides.lam_r * t), 1.0)[..., None]
        )
    if sides.lam_c:
        cur.ct = (
            cur.ct * torch.where(problem.col_mask > 0, torch.exp(sides.lam_c * t), 1.0)[:, None]
        )


def _record_unconverged(run: _Run) -> None:
    """The samples still active at max_iter: their plans, potentials and residuals (a sample
    whose plan meets tol counts as converged)."""
    P, f, g, errors = _plan(run, None)
    at = list(range(len(run.rows)))
    _record(run, at, P, f, g, errors, run.results.iterations[run.rows[0]])


def settings_for(M: Tensor, gamma, rho, tol, overrelax=True, translate=True) -> _Settings:
    lo, tau = LIMITS.get(M.dtype, LIMITS[torch.float32])
    sides = Sides.of(gamma, rho)
    return _Settings(gamma, sides, tol, overrelax, translate, lo, math.exp(-tau), math.exp(tau))


@torch.no_grad()
def solve_unbalanced(
    M: Tensor,
    r: Tensor,
    c: Tensor,
    gamma: float,
    rho: tuple[float, float],
    tol: float,
    max_iter: int,
    check_every: int = 10,
    overrelax: bool = True,
    translate: bool = True,
    start: tuple[Tensor, Tensor] | None = None,
) -> UnbalancedSolution:
    """Solve the unbalanced problem (module docstring) per sample, on checked inputs.

    Args:
        M: (B, m, n) cost, float32 or float64.
        r: (B, m) and c: (B, n) non-negative masses, not normalised (zeros = padding).
        rho: (rho_r, rho_c), each > 0 or inf, at least one finite.
        tol: a sample has converged when its optimality residual is at most tol.
        max_iter: at most this many iterations per sample.
        check_every: iterations between convergence checks (each costs one host sync).
        overrelax: accelerate with the adaptive over-relaxation factor.
        translate: at every check, move the potentials along their slowest direction to the
            maximum of the dual there (:func:`_translate`).
        start: initial log potentials (f, g), e.g. from a previous annealing stage; None
            starts from the reduced cost (:meth:`Problem.start`).
    """
    problem = Problem.of(M, r, c)
    settings = settings_for(M, gamma, rho, tol, overrelax, translate)
    f, g = problem.start(gamma) if start is None else start
    if (
        start is not None
        or gamma * annealing.cost_spread(M, problem.row_mask, problem.col_mask) > 1e3
    ):
        # one exact iteration first where the kernel of the start may be out of range
        # (potentials carried over from another gamma, or gamma times the spread of the costs
        # large): it brings the kernel's row and column sums to their targets
        f, g = log_domain_block(problem, gamma, settings.sides, f, g, 1)
    run = _Run(problem, settings, f, g, max_iter)
    iterations = 0
    while iterations < max_iter and run.rows:
        steps = min(check_every, max_iter - iterations)
        _run_block(run, steps)
        iterations += steps
        check = _check(run, steps)
        if any(check.done):
            _retire(run, check, iterations)
            if not run.rows:
                break
        if run.settings.translate:
            _translate(run)
        if any(check.big):
            _absorb(run, check)
    if run.rows:
        _record_unconverged(run)
    return run.results.solution()


def solve_annealed(M, r, c, gamma, rho, tol, max_iter, check_every=10, anneal=True, **kw):
    """:func:`solve_unbalanced` over the annealing schedule of gamma (annealing.py; a single
    stage where it does not pay, or when ``anneal`` is False); returns the solution, with
    the iterations of all stages, and the number of stages. ``kw``: ``overrelax`` and
    ``translate`` of :func:`solve_unbalanced`."""
    problem = Problem.of(M, r, c)
    spread = annealing.cost_spread(M, problem.row_mask, problem.col_mask)
    gammas = annealing.schedule(gamma, spread) if anneal else [gamma]

    def stage(gamma_k, tol_k, budget, start):
        sol = solve_unbalanced(M, r, c, gamma_k, rho, tol_k, budget, check_every, start=start, **kw)
        return annealing.Stage(sol.f, sol.g, sol.iterations, sol)

    last, iterations = annealing.run_stages(stage, gammas, tol, max_iter)
    sol = last.result
    sol.iterations = iterations
    return sol, len(gammas)


def log_plan_of(sol: UnbalancedSolution, M: Tensor, r: Tensor, c: Tensor, gamma) -> Tensor:
    """log P of a solution (ot/logplan.py): log of the plan where it is positive, else
    log r (+) log c + f (+) g - gamma M, -inf on padding."""
    problem = Problem.of(M, r, c)
    rows, cols = problem.log_r + sol.f, problem.log_c + sol.g
    exponent = torch.add(rows.unsqueeze(-1), cols.unsqueeze(-2)).sub_(M, alpha=gamma)
    return logplan.log_plan(sol.P, exponent)


def solve(opts, M: Tensor, r: Tensor, c: Tensor) -> Solved:
    """The layer's solver (``LayerSpec.solve``): P (or log P), saved for the backward with
    the masses, and its record."""
    sol, stages = solve_annealed(
        M, r, c, opts.gamma, opts.marginal_penalty, opts.tol, opts.max_iter,
        opts.check_every, opts.anneal,
    )  # fmt: skip
    y = log_plan_of(sol, M, r, c, opts.gamma) if opts.log_plan else sol.P
    return Solved(y, (y, r, c), sol.info(stages))
