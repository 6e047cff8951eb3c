"""Forward Sinkhorn solver: scaling iterations kept stable by log-domain potentials.

The iterate is represented as ``P = diag(u) K diag(v)`` with ``K = exp(-gamma*M + f (+) g)``
(Schmitzer's stabilisation). The inner loop is the plain scaling iteration (two matrix-vector
products and two vector ops per iteration). Every ``check_every`` iterations, with one transfer
to the host (errors and the range of the scalings, a few numbers per sample), the solver
measures the marginal error of each sample and

* absorbs large scalings into the log potentials ``f, g`` (one ``exp`` over the matrix, only
  when ``max|log u|`` or ``max|log v|`` exceeds ``tau``), which is what makes any gamma safe;
* falls back to exact log-domain (logsumexp) iterations for one block where the scaling domain
  over- or under-flowed (a kernel row that is all zeros at the first solve with a large gamma);
* adapts each sample's over-relaxation factor ``omega`` (u <- u + omega (r / K v - u))
  from its observed error decay (see ``OmegaSchedule``): five to ten times fewer iterations
  than the plain iteration on slowly converging problems, the same on fast ones;
* freezes converged samples (the active batch is compacted, so they cost nothing more).

Entries of ``K`` below ``exp(lo)`` are flushed to zero so that no denormal numbers reach the
matrix-vector products (they are 100x slower on x86). A sample is only accepted as converged
when its scalings are within ``exp(+-tau)``, so the flushed mass is below
``m n exp(lo + 2 tau)``: 1e-8 in float32 for m = n = 1000, far below any useful tolerance.

Zero entries of ``r`` or ``c`` are padding: those rows/columns of P are exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (flush threshold for log K, absorption threshold for |log u|, |log v|) per dtype.
_LIMITS = {torch.float32: (-60.0, 15.0), torch.float64: (-600.0, 100.0)}
_OMEGA_MAX = 1.95


def backed_off(w: float, mu2: float) -> tuple[float, float]:
    """An over-relaxation factor and rate estimate after a setback: omega - 1 and mu^2 halved
    (a factor below 1.02 becomes the plain iteration's 1)."""
    w = 1.0 + (w - 1.0) / 2
    return (1.0 if w < 1.02 else w), mu2 / 2


class OmegaSchedule:
    """Each sample's over-relaxation factor, adapted from its observed error decay.

    For a linearly convergent iteration whose plain rate is mu^2, over-relaxation by omega
    (below the optimum) converges at the rate lam solving (lam + omega - 1)^2 = lam omega^2 mu^2,
    so an observed lam at a known omega gives mu^2; the optimum is then
    omega* = 2 / (1 + sqrt(1 - mu^2)). Sinkhorn's error decays sublinearly before it reaches its
    asymptotic rate, so the estimate only ever grows; an error that does not improve on the best
    seen (or a scaling that left the positive reals) halves omega - 1 and the estimate instead.
    Such a setback near the precision floor (error below 300 eps) means the error is rounding
    noise that omega amplifies: the sample then finishes with the plain iteration (in float32
    at 500 x 500, gamma 10, this takes tol = 1e-6 in 210 iterations instead of 1150). Higher,
    the rule catches slowly converging problems that merely improve by less than 10% a check:
    at 1000 eps float32 50 x 50 took 6430 iterations instead of 540, batch 16 at 100 x 100
    4350 instead of 350, and gamma 50 problems did not converge in 20000.

    The state is a handful of scalars per sample, kept on the host as Python floats: the solver
    already brings each check's errors to the host for its decisions, and a few float
    operations per sample cost far less than the dozens of tiny tensor operations (one
    dispatch each) that the same logic takes on the device.
    """

    def __init__(self, batch: int, eps: float):
        self.omega = [1.0] * batch
        self.mu2 = [0.0] * batch
        self.best = [math.inf] * batch
        self.prev = [math.inf] * batch
        self.plain = [False] * batch  # settled at the precision floor: no more over-relaxation
        self.floor = 300 * eps

    def keep(self, rows: list[int]) -> None:
        """Restrict the state to the samples at positions ``rows`` (the ones still active)."""
        for name in ("omega", "mu2", "best", "prev", "plain"):
            old = getattr(self, name)
            setattr(self, name, [old[i] for i in rows])

    def reset(self, i: int) -> None:
        """Forget sample i's history (its iterate was replaced)."""
        self.omega[i], self.mu2[i], self.best[i], self.prev[i] = 1.0, 0.0, math.inf, math.inf
        self.plain[i] = False

    def update(self, errs: list[float], finite: list[bool], steps: int) -> None:
        for i, (err, ok) in enumerate(zip(errs, finite, strict=True)):
            w, mu2, prev = self.omega[i], self.mu2[i], self.prev[i]
            if ok and 0 < err < prev < math.inf:
                lam = min(max((err / prev) ** (1.0 / steps), 1e-12), 1.0)
                mu2 = max(mu2, min((lam + w - 1) ** 2 / (lam * w * w), 1.0))
            # Over-relaxation also amplifies rounding noise: near the precision floor an error
            # that stops falling is treated like one that grows (elsewhere SOR may oscillate).
            limit = (0.9 if err < self.floor else 2.0) * self.best[i]
            blowup = w > 1 and not (ok and err <= limit)
            if blowup and ok and err < self.floor:
                # At the floor the over-relaxed error only swings with the rounding noise that
                # omega amplifies; the plain iteration, whose column sums are exact after each
                # half-step, finishes from here.
                self.plain[i] = True
            if self.plain[i]:
                self.best[i] = min(self.best[i], err) if ok else self.best[i]
                w = 1.0
            elif blowup:
                self.best[i] = err if ok else self.best[i]
                w, mu2 = backed_off(w, mu2)
            else:
                self.best[i] = min(self.best[i], err) if ok else self.best[i]
                w = 2.0 / (1.0 + math.sqrt(1.0 - mu2)) if mu2 > 0.05 else 1.0
                w = min(w, _OMEGA_MAX)
            self.omega[i], self.mu2[i] = w, mu2
            self.prev[i] = err if ok else math.inf

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        """omega as a (B, 1, 1) tensor."""
        return torch.tensor(self.omega, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def keep_weight(self, like: torch.Tensor) -> torch.Tensor:
        """1 - omega as a (B, 1, 1) tensor: the weight of the previous iterate."""
        keep = [1.0 - w for w in self.omega]
        return torch.tensor(keep, dtype=like.dtype, device=like.device).view(-1, 1, 1)


@dataclass
class SinkhornSolution:
    """Everything the forward pass found, per sample (leading dimension B)."""

    P: torch.Tensor  # (B, m, n) transport plan
    # log potentials, -inf on padding: P = exp(-gamma M' + f (+) g), where M' is M less its row
    # minima and then its column minima
    f: torch.Tensor  # (B, m)
    g: torch.Tensor  # (B, n)
    iterations: torch.Tensor  # (B,) int64
    residual: torch.Tensor  # (B,) L1 marginal error of P
    converged: torch.Tensor  # (B,) bool
    omega: torch.Tensor  # (B,) over-relaxation factor in use at the end
    # (B,) estimated rate of the plain iteration (error factor per iteration, 0 = not seen):
    # 1 / (1 - rate) approximates the condition number of the backward's Schur complement
    rate: torch.Tensor


def _kernel(
    M: torch.Tensor,
    gamma: float,
    f: torch.Tensor,
    g: torch.Tensor,
    rmask: torch.Tensor,
    cmask: torch.Tensor,
    lo: float,
    padded: bool,
) -> torch.Tensor:
    """exp(-gamma M + f (+) g) with entries below exp(lo) and padded rows/columns set to 0."""
    K = torch.add(f.unsqueeze(-1), g.unsqueeze(-2))
    K.add_(M, alpha=-gamma).exp_()
    torch.nn.functional.threshold_(K, math.exp(lo), 0.0)
    if padded:
        K.mul_(rmask.unsqueeze(-1)).mul_(cmask.unsqueeze(-2))
    return K


def _plan(K, u, v, sel):
    """diag(u) K diag(v) for the active samples at positions ``sel``; for all of them (sel
    None) in K's own memory, which is not needed afterwards."""
    if sel is None:
        return K.mul_(u).mul_(v)
    return K[sel].mul_(u[sel]).mul_(v[sel])


def _masked_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that returns -inf (not NaN) for an all -inf slice."""
    mx = x.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return (x - mx).exp().sum(dim=dim).log() + mx.squeeze(dim)


def _log_domain_block(
    M: torch.Tensor,
    gamma: float,
    f: torch.Tensor,
    g: torch.Tensor,
    log_r: torch.Tensor,
    log_c: torch.Tensor,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (logsumexp) Sinkhorn iterations on the potentials: slow, never over/underflows.

    Padded rows/columns have log r = -inf and stay at f = -inf (g = -inf).
    """
    logK = M * (-gamma)
    for _ in range(iters):
        f = log_r - _masked_lse(logK + g.unsqueeze(-2), dim=-1)
        f = torch.where(torch.isfinite(log_r), f, log_r)
        g = log_c - _masked_lse(logK + f.unsqueeze(-1), dim=-2)
        g = torch.where(torch.isfinite(log_c), g, log_c)
    return f, g


# |a| and |b| below which _relaxed_block folds a scale back into its vector: the scaled
# vectors then stay within a factor 1e4 * 50 of the true scalings (|1 - omega| >= 0.02)
_RESCALE_BELOW = 1e-4


def _times(x: torch.Tensor, s: float, zero: torch.Tensor, one: torch.Tensor, out=None):
    """s * x for a host float s (into ``out`` if given), as ``addcmul``'s scalar ``value``:
    ``x * s`` would first wrap s in a tensor and convert it (three dispatches, ~4x the time of
    the product itself)."""
    return torch.addcmul(zero, x, one, value=s, out=out)


def _relaxed_block(K, u, v, Kv, a, b, r_col, c_row, w, steps, zero, one, out):
    """``steps`` over-relaxed iterations at one factor ``w`` shared by the batch, each at the
    cost of a plain one: two matrix-vector products and two fused vector operations, all in
    place in the buffers ``out`` = (u~, v~, K v~, K^T u~), which are returned with the scales.

    The scalings are kept as scaled vectors with host scales, u = a u~ and v = b v~ (and
    K v = b K v~, K^T u = a K^T u~). The update u <- w r / K v + (1 - w) u is then
    u~ <- u~ + (w / (a' b)) r / K v~ with a' = (1 - w) a: a single ``addcdiv`` (likewise for
    v). A scale is folded back into its vector once it falls below 1e-4 (the scaled vector
    grows as 1 / |1 - w| a step). In place, an iteration allocates nothing: 3-5 us less than
    the out-of-place form at m = n = 500 on a CPU (10% of an iteration). The block starts from
    copies of u, v, K v, which stay as they were.
    """
    uu, vv, kv, ku = out
    uu.copy_(u)
    vv.copy_(v)
    kv.copy_(Kv)
    ut, vt = uu.mT, vv.mT
    kw = 1.0 - w
    for _ in range(steps):
        if abs(a) < _RESCALE_BELOW:
            _times(uu, a, zero, one, out=uu)
            a = 1.0
        if abs(b) < _RESCALE_BELOW:
            _times(vv, b, zero, one, out=vv)
            _times(kv, b, zero, one, out=kv)
            b = 1.0
        a *= kw
        uu.addcdiv_(r_col, kv, value=w / (a * b))
        torch.bmm(ut, K, out=ku)
        b *= kw
        vv.addcdiv_(c_row, ku, value=w / (a * b))
        torch.bmm(K, vt, out=kv)
    return uu, ku, vv, kv, a, b


def _plain_block(K, Kv, r_col, c_row, steps, out):
    """``steps`` plain scaling iterations from K v, in place in the buffers ``out`` (as in
    ``_relaxed_block``); returns u, K^T u, v, K v."""
    uu, vv, kv, ku = out
    kv.copy_(Kv)
    ut, vt = uu.mT, vv.mT
    for _ in range(steps):
        torch.div(r_col, kv, out=uu)
        torch.bmm(ut, K, out=ku)
        torch.div(c_row, ku, out=vv)
        torch.bmm(K, vt, out=kv)
    return uu, ku, vv, kv


class _BlockBuffers:
    """Two sets of (u~, v~, K v~, K^T u~) buffers for the in-place blocks, used in turn: a
    block writes into the set the previous block did not, so the iterate a block started from
    (kept to restore at the check) is never overwritten by it. Reallocated when the active
    batch shrinks."""

    def __init__(self) -> None:
        self.sets: list[tuple[torch.Tensor, ...]] = []
        self.turn = 0

    def take(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.sets or self.sets[0][0].shape != u.shape:
            self.sets = [
                tuple(
                    torch.empty_like(x, memory_format=torch.contiguous_format) for x in (u, v, u, v)
                )
                for _ in range(2)
            ]
        self.turn ^= 1
        return self.sets[self.turn]


@torch.no_grad()
def solve_sinkhorn(
    M: torch.Tensor,
    r: torch.Tensor,
    c: torch.Tensor,
    gamma: float,
    tol: float,
    max_iter: int,
    check_every: int = 10,
    overrelax: bool = True,
) -> SinkhornSolution:
    """Solve min <P, M> + KL(P || r c^T) / gamma  s.t.  P 1 = r, P^T 1 = c, per sample.

    Args:
        M: (B, m, n) cost, float32 or float64.
        r: (B, m) and c: (B, n) non-negative marginals summing to 1 per sample (zeros = padding).
        tol: a sample has converged when ||P 1 - r||_1 + ||P^T 1 - c||_1 <= tol.
        max_iter: at most this many iterations per sample (one = a row and a column update).
        check_every: iterations between convergence checks (each costs one host sync).
        overrelax: accelerate with an adaptively estimated over-relaxation factor.
    """
    B, m, n = M.shape
    dtype, device = M.dtype, M.device
    # P is invariant to adding a row or a column constant to M; removing the row and column
    # minima keeps the potentials (and the cancellation in -gamma M + f + g) small.
    M = M - M.amin(-1, keepdim=True)
    M = M - M.amin(-2, keepdim=True)
    lo, tau = _LIMITS.get(dtype, _LIMITS[torch.float32])
    rmask, cmask = (r > 0).to(dtype), (c > 0).to(dtype)
    padded = bool((rmask == 0).any()) or bool((cmask == 0).any())
    log_r = torch.where(r > 0, r.log(), torch.full_like(r, -math.inf))
    log_c = torch.where(c > 0, c.log(), torch.full_like(c, -math.inf))

    # Outputs, written as samples finish; host-side lists, turned into tensors at the end.
    plans: list[tuple[torch.Tensor, torch.Tensor]] = []  # (batch rows, their P)
    f_out = torch.zeros(B, m, dtype=dtype, device=device)
    g_out = torch.zeros(B, n, dtype=dtype, device=device)
    iters_out = [max_iter] * B
    res_out = [math.inf] * B
    conv_out = [False] * B
    omega_out = [1.0] * B
    rate_out = [0.0] * B

    # State of the active (unconverged) samples; `idx` maps them back to the batch.
    # u is a column (B, m, 1) and v a row (B, 1, n): the two matrix-vector products are then
    # K @ v^T and u^T @ K, the layouts that batched GEMV handles fast for any batch size.
    # Padded rows/columns get a unit "marginal" and a unit kernel sum so that their scaling
    # stays 1; their kernel entries are zero, so they never carry mass.
    idx = list(range(B))
    Ma, rm, cm, lra, lca = M, rmask, cmask, log_r, log_c
    r_col = (r + (1 - rmask)).unsqueeze(-1)
    c_row = (c + (1 - cmask)).unsqueeze(-2)
    neg_r, neg_c = -r_col, -c_row
    pr_col, pc_row = (1 - rmask).unsqueeze(-1), (1 - cmask).unsqueeze(-2)
    f = torch.zeros(B, m, dtype=dtype, device=device)
    g = torch.zeros(B, n, dtype=dtype, device=device)
    K = _kernel(Ma, gamma, f, g, rm, cm, lo, padded)
    u = torch.ones(B, m, 1, dtype=dtype, device=device)
    v = torch.ones(B, 1, n, dtype=dtype, device=device)
    sched = OmegaSchedule(B, torch.finfo(dtype).eps)
    keep_w = sched.keep_weight(u)  # 1 - omega, the weight of the previous iterate
    big_s = math.exp(tau)

    def k_v(K, v, pr_col):
        Kv = torch.bmm(K, v.mT)
        return Kv.add_(pr_col) if padded else Kv

    def kt_u(K, u, pc_row):
        Ku = torch.bmm(u.mT, K)
        return Ku.add_(pc_row) if padded else Ku

    small_s, big_s = math.exp(-tau), math.exp(tau)
    Kv = k_v(K, v, pr_col)
    it = 0
    # In the over-relaxed iteration at one factor for the batch, u, v, Kv and Ku are scaled:
    # the true ones are su * u, sv * v, sv * Kv and su * Ku (see _relaxed_block); the check
    # reads them through the scales, and they are unscaled only where a true value is needed.
    su = sv = 1.0
    buffers = _BlockBuffers()
    zero = torch.zeros((), dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)

    def unscaled(x, s):
        return x if s == 1.0 else _times(x, s, zero, one)

    while it < max_iter and idx:
        relaxed = overrelax and any(w != 1.0 for w in sched.omega)
        uniform = relaxed and not padded and len(set(sched.omega)) == 1
        if not uniform:
            u, v, Kv, su, sv = unscaled(u, su), unscaled(v, sv), unscaled(Kv, sv), 1.0, 1.0
        u_safe, v_safe, su_safe, sv_safe = u, v, su, sv  # every update is out of place
        steps = min(check_every, max_iter - it)
        # Over-relaxed: u <- w r / Kv + (1 - w) u, per-sample w. This is the linear form of
        # the geometric update u^(1-w) (r / Kv)^w (the same first-order behaviour at the fixed
        # point, hence the same rate) at one fused operation instead of four; an overshoot to
        # u <= 0 is caught at the check and undone. The loop is written out per case: at
        # m = n = 500 on a CPU each Python-level call costs a tenth of a matrix-vector product.
        if uniform:
            out = buffers.take(u, v)
            u, Ku, v, Kv, su, sv = _relaxed_block(
                K, u, v, Kv, su, sv, r_col, c_row, sched.omega[0], steps, zero, one, out
            )
        elif relaxed and not padded:
            for _ in range(steps):
                u = torch.div(r_col, Kv).lerp_(u, keep_w)
                Ku = torch.bmm(u.mT, K)
                v = torch.div(c_row, Ku).lerp_(v, keep_w)
                Kv = torch.bmm(K, v.mT)  # for the check, then for the next row update
        elif not padded:
            u, Ku, v, Kv = _plain_block(K, Kv, r_col, c_row, steps, buffers.take(u, v))
        else:
            for _ in range(steps):
                u = torch.div(r_col, Kv).lerp_(u, keep_w) if relaxed else torch.div(r_col, Kv)
                Ku = kt_u(K, u, pc_row)
                v = torch.div(c_row, Ku).lerp_(v, keep_w) if relaxed else torch.div(c_row, Ku)
                Kv = k_v(K, v, pr_col)
        it += steps

        # --- check: two errors and the range of the scalings, brought to the host at once ---
        # u * Kv and v * Ku are the row and column sums of the current P (Ku is from this u).
        # (through the scales: su * u * sv * Kv; the ranges are scaled on the host below)
        stats = [
            torch.linalg.vector_norm(torch.addcmul(neg_r, u, Kv, value=su * sv), 1, dim=(-2, -1)),
            torch.linalg.vector_norm(torch.addcmul(neg_c, v, Ku, value=su * sv), 1, dim=(-2, -1)),
        ]
        if len(idx) == 1:
            # one sample: both extremes of a vector in one reduction over all of it (the
            # four reductions along a dim cost half of a check at m = n = 500)
            stats += [t.view(1) for t in (*torch.aminmax(u), *torch.aminmax(v))]
        else:
            # (amin and amax: aminmax along a dim is up to 4x slower on CPU in torch 2.14)
            stats += [u.reshape(-1, m).amin(-1), u.reshape(-1, m).amax(-1)]
            stats += [v.reshape(-1, n).amin(-1), v.reshape(-1, n).amax(-1)]
        errs, finite, big, done = [], [], [], []
        for e_r, e_c, u_lo, u_hi, v_lo, v_hi in zip(*torch.stack(stats).tolist(), strict=True):
            e = e_r + e_c
            u_lo, u_hi = (su * u_lo, su * u_hi) if su > 0 else (su * u_hi, su * u_lo)
            v_lo, v_hi = (sv * v_lo, sv * v_hi) if sv > 0 else (sv * v_hi, sv * v_lo)
            # every comparison with a NaN is False, so NaN anywhere fails `ok`
            ok = u_lo > 0 and v_lo > 0 and u_hi < math.inf and v_hi < math.inf
            ok = ok and math.isfinite(e)
            bg = not ok or max(u_hi, v_hi) > big_s or min(u_lo, v_lo) < small_s
            errs.append(e)
            finite.append(ok)
            big.append(bg)
            done.append(ok and not bg and e <= tol)
        w_before = list(sched.omega)
        if overrelax:
            sched.update(errs, finite, steps)

        # A non-finite or non-positive scaling: restore the last good state. Where it was
        # over-relaxed the schedule has just shrunk omega, which is the whole remedy; at
        # omega = 1 it is an over/underflow of the scaling domain, which an exact log-domain
        # block resolves.
        overflow = [not ok and w == 1.0 for ok, w in zip(finite, w_before, strict=True)]
        if not all(finite) or any(done) or any(big):  # these read the true scalings
            u, v, Kv, su, sv = unscaled(u, su), unscaled(v, sv), unscaled(Kv, sv), 1.0, 1.0
        if not all(finite):
            u_safe, v_safe = unscaled(u_safe, su_safe), unscaled(v_safe, sv_safe)
            bad_t = torch.tensor([not ok for ok in finite], device=device).view(-1, 1, 1)
            u = torch.where(bad_t, u_safe, u)
            v = torch.where(bad_t, v_safe, v)  # `big` holds for these: absorbed below

        if any(done):
            rows = [i for i, d in enumerate(done) if d]
            sel = torch.tensor(rows, device=device)
            out_rows = torch.tensor([idx[i] for i in rows], device=device)
            lu, lv = u[sel].log(), v[sel].log()
            f_out[out_rows] = torch.where(rm[sel] > 0, f[sel] + lu[..., 0], -math.inf)
            g_out[out_rows] = torch.where(cm[sel] > 0, g[sel] + lv[:, 0], -math.inf)
            plans.append((out_rows, _plan(K, u, v, sel if len(rows) < len(idx) else None)))
            for i in rows:
                iters_out[idx[i]], res_out[idx[i]] = it, errs[i]
                conv_out[idx[i]], omega_out[idx[i]] = True, sched.omega[i]
                rate_out[idx[i]] = sched.mu2[i]
            keep = [i for i, d in enumerate(done) if not d]
            idx = [idx[i] for i in keep]
            if not idx:
                break
            sched.keep(keep)
            big = [big[i] for i in keep]
            overflow = [overflow[i] for i in keep]
            sel = torch.tensor(keep, device=device)
            Ma, rm, cm, lra, lca = Ma[sel], rm[sel], cm[sel], lra[sel], lca[sel]
            r_col, c_row, neg_r, neg_c = r_col[sel], c_row[sel], neg_r[sel], neg_c[sel]
            pr_col, pc_row = pr_col[sel], pc_row[sel]
            f, g, u, v, Kv, K = f[sel], g[sel], u[sel], v[sel], Kv[sel], K[sel]

        if any(big):
            # Absorb the scalings into the log potentials (exact for every sample).
            f = torch.where(rm > 0, f + u.log()[..., 0], f)
            g = torch.where(cm > 0, g + v.log()[:, 0], g)
            if any(overflow):
                f, g = _log_domain_block(Ma, gamma, f, g, lra, lca, min(check_every, 10))
                f = torch.where(rm > 0, f, 0.0)
                g = torch.where(cm > 0, g, 0.0)
                for i, o in enumerate(overflow):
                    if o:
                        sched.reset(i)
            K = _kernel(Ma, gamma, f, g, rm, cm, lo, padded)
            u, v = torch.ones_like(u), torch.ones_like(v)
            Kv = k_v(K, v, pr_col)
        # a factor that moved by less than 1e-3 keeps its tensor: one allocation fewer a check
        # (after a compaction the batch changed: always rebuild)
        moved = (abs(w - w0) > 1e-3 for w, w0 in zip(sched.omega, w_before, strict=True))
        # (only the per-sample update reads it: padded, or factors that differ in a batch)
        if (padded or len(idx) > 1) and (any(done) or any(moved)):
            keep_w = sched.keep_weight(u)

    if idx:  # not converged within max_iter: report where they stand
        u, v, Kv = unscaled(u, su), unscaled(v, sv), unscaled(Kv, sv)
        Ku = kt_u(K, u, pc_row)  # the loop's may predate an absorption or a compaction
        err = torch.linalg.vector_norm(torch.addcmul(neg_r, u, Kv), 1, dim=(-2, -1))
        err += torch.linalg.vector_norm(torch.addcmul(neg_c, v, Ku), 1, dim=(-2, -1))
        rows = torch.tensor(idx, device=device)
        f_out[rows] = torch.where(rm > 0, f + u.log()[..., 0], -math.inf)
        g_out[rows] = torch.where(cm > 0, g + v.log()[:, 0], -math.inf)
        for i, e in zip(idx, torch.nan_to_num(err, nan=math.inf).tolist(), strict=True):
            res_out[i] = e
        for i, w, mu2 in zip(idx, sched.omega, sched.mu2, strict=True):
            omega_out[i], rate_out[i] = w, mu2
        plans.append((rows, _plan(K, u, v, None)))
    del K, Ku, Kv, u, v

    # P = diag(u) K diag(v) with the K the iterations ran on: the marginals just measured are
    # P's own. Recomputing it as exp(f' (+) g' - gamma M) from the final potentials re-rounds
    # the exponent at the scale of the potentials: at gamma 1000 in float32 that moved the
    # marginals of a sample measured at 5e-8 by 2e-4, past its tolerance.
    # (samples are compacted in order, so a single plan of all B holds them in batch order)
    if len(plans) == 1 and plans[0][1].shape[0] == B:
        P = plans[0][1]
    else:
        P = torch.empty(B, m, n, dtype=dtype, device=device)
        for rows, part in plans:
            P[rows] = part
    P = torch.nan_to_num_(P, nan=0.0, posinf=0.0)  # only where a sample failed outright
    # Entries below sqrt(smallest normal) are flushed to zero: their products (P^T P in the
    # backward) would be denormal numbers, which make the matrix products there 2-3x slower
    # on x86. The mass removed is below m n 1e-19 in float32, far under any tolerance.
    torch.nn.functional.threshold_(P, math.sqrt(torch.finfo(dtype).tiny), 0.0)
    return SinkhornSolution(
        P,
        f_out,
        g_out,
        torch.tensor(iters_out, dtype=torch.long, device=device),
        torch.tensor(res_out, dtype=dtype, device=device),
        torch.tensor(conv_out, dtype=torch.bool, device=device),
        torch.tensor(omega_out, dtype=dtype, device=device),
        torch.tensor(rate_out, dtype=dtype, device=device),
    )
