"""Forward Sinkhorn solver: scaling iterations kept stable by log-domain potentials.

The iterate is represented as ``P = diag(u) K diag(v)`` with ``K = exp(-gamma*M + f (+) g)``
(Schmitzer's stabilisation). The inner loop is the plain scaling iteration (two matrix-vector
products and a few vector ops per iteration). Every ``check_every`` iterations, with one host
sync, the solver measures the marginal error of each sample and

* absorbs large scalings into the log potentials ``f, g`` (one ``exp`` over the matrix, only
  when ``max|log u|`` or ``max|log v|`` exceeds ``tau``), which is what makes any gamma safe;
* falls back to exact log-domain (logsumexp) iterations for one block where the scaling domain
  over- or under-flowed (a kernel row that is all zeros at the first solve with a large gamma);
* adapts each sample's over-relaxation factor ``omega`` (u <- u^(1-omega) (r / K v)^omega)
  from its observed error decay (see ``update_omega``): ten times fewer iterations than the
  plain iteration on slowly converging problems, the same on fast ones;
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


def update_omega(omega, mu2, best, err, prev_err, finite, steps):
    """Adapt each sample's over-relaxation factor from its observed error decay.

    For a linearly convergent iteration whose plain rate is mu^2, over-relaxation by omega
    (below the optimum) converges at the rate lam solving (lam + omega - 1)^2 = lam omega^2 mu^2,
    so an observed lam at a known omega gives mu^2; the optimum is then
    omega* = 2 / (1 + sqrt(1 - mu^2)). Sinkhorn's error decays sublinearly before it reaches its
    asymptotic rate, so the estimate only ever grows; an error that does not improve on the best
    seen halves omega - 1 (and the estimate) instead.
    """
    w = omega.view(-1)
    probe = finite & (err > 0) & (err < prev_err) & torch.isfinite(prev_err)
    lam = (err / torch.where(probe, prev_err, 1.0)).clamp(1e-12, 1.0) ** (1.0 / steps)
    est = ((lam + w - 1) ** 2 / (lam * w * w)).clamp(max=1.0)
    mu2 = torch.where(probe, torch.maximum(mu2, est), mu2)
    # Over-relaxation also amplifies rounding noise: near the precision floor an error that
    # stops falling is treated like one that grows (elsewhere SOR's error may oscillate).
    near_floor = err < 1e3 * torch.finfo(err.dtype).eps
    blowup = (w > 1) & ~(err <= torch.where(near_floor, 0.9, 2.0) * best)
    best = torch.where(blowup, err, torch.minimum(best, err))
    mu2 = torch.where(blowup, mu2 / 2, mu2)
    target = (2.0 / (1.0 + torch.sqrt((1.0 - mu2).clamp_min(0)))).clamp(1.0, _OMEGA_MAX)
    target = torch.where(mu2 > 0.05, target, 1.0)
    w = torch.where(blowup, 1.0 + (w - 1.0) / 2, target)
    return w.view(-1, 1, 1), mu2, best


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


def _kernel(
    M: torch.Tensor,
    gamma: float,
    f: torch.Tensor,
    g: torch.Tensor,
    rmask: torch.Tensor,
    cmask: torch.Tensor,
    lo: float,
) -> torch.Tensor:
    """exp(-gamma M + f (+) g) with entries below exp(lo) and padded rows/columns set to 0."""
    K = torch.add(f.unsqueeze(-1), g.unsqueeze(-2))
    K.add_(M, alpha=-gamma)
    K.masked_fill_(K < lo, -math.inf)
    K.exp_()
    K.mul_(rmask.unsqueeze(-1)).mul_(cmask.unsqueeze(-2))
    return K


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

    # Outputs, written as samples finish.
    f_out = torch.zeros(B, m, dtype=dtype, device=device)
    g_out = torch.zeros(B, n, dtype=dtype, device=device)
    iters_out = torch.full((B,), max_iter, dtype=torch.long, device=device)
    res_out = torch.full((B,), math.inf, dtype=dtype, device=device)
    conv_out = torch.zeros(B, dtype=torch.bool, device=device)
    omega_out = torch.ones(B, dtype=dtype, device=device)

    # State of the active (unconverged) samples; `idx` maps them back to the batch.
    # u is a column (B, m, 1) and v a row (B, 1, n): the two matrix-vector products are then
    # K @ v^T and u^T @ K, the layouts that batched GEMV handles fast for any batch size.
    # Padded rows/columns get a unit "marginal" and a unit kernel sum so that their scaling
    # stays 1; their kernel entries are zero, so they never carry mass.
    idx = torch.arange(B, device=device)
    Ma, rm, cm, lra, lca = M, rmask, cmask, log_r, log_c
    r_col = (r + (1 - rmask)).unsqueeze(-1)
    c_row = (c + (1 - cmask)).unsqueeze(-2)
    pr_col, pc_row = (1 - rmask).unsqueeze(-1), (1 - cmask).unsqueeze(-2)
    f = torch.zeros(B, m, dtype=dtype, device=device)
    g = torch.zeros(B, n, dtype=dtype, device=device)
    K = _kernel(Ma, gamma, f, g, rm, cm, lo)
    u = torch.ones(B, m, 1, dtype=dtype, device=device)
    v = torch.ones(B, 1, n, dtype=dtype, device=device)
    Ku = torch.ones_like(v)
    omega = torch.ones(B, 1, 1, dtype=dtype, device=device)
    prev_err = torch.full((B,), math.inf, dtype=dtype, device=device)
    best = torch.full((B,), math.inf, dtype=dtype, device=device)
    mu2 = torch.zeros(B, dtype=dtype, device=device)  # estimated rate of the plain iteration

    def k_v(K, v, pr_col):
        Kv = torch.bmm(K, v.mT)
        return Kv.add_(pr_col) if padded else Kv

    def kt_u(K, u, pc_row):
        Ku = torch.bmm(u.mT, K)
        return Ku.add_(pc_row) if padded else Ku

    it = 0
    while it < max_iter and idx.numel() > 0:
        u_safe, v_safe = u.clone(), v.clone()
        steps = min(check_every, max_iter - it)
        relaxed = overrelax and bool((omega != 1).any())
        for _ in range(steps):
            Kv = k_v(K, v, pr_col)
            if relaxed:  # u <- u^(1-w) (r / Kv)^w, per-sample w
                u = u.pow_(1 - omega).mul_(torch.div(r_col, Kv).pow_(omega))
            else:
                u = torch.div(r_col, Kv)
            Ku = kt_u(K, u, pc_row)
            if relaxed:
                v = v.pow_(1 - omega).mul_(torch.div(c_row, Ku).pow_(omega))
            else:
                v = torch.div(c_row, Ku)
        it += steps

        # --- check (one host sync) ---
        # Ku was computed from the current u, so v * Ku are the column sums of the current P.
        Kv = k_v(K, v, pr_col)
        err = (u * Kv - r_col).abs_().sum((-2, -1)) + (v * Ku - c_row).abs_().sum((-2, -1))
        lu, lv = u.log(), v.log()
        finite = torch.isfinite(err) & torch.isfinite(lu).all(-1).all(-1)
        finite &= torch.isfinite(lv).all(-1).all(-1)
        big = (lu.abs().amax((-2, -1)) > tau) | (lv.abs().amax((-2, -1)) > tau)
        done = finite & ~big & (err <= tol)
        if overrelax:
            omega, mu2, best = update_omega(omega, mu2, best, err, prev_err, finite, steps)
        prev_err = err

        bad = ~finite
        if bool(bad.any()):
            # Restore the last finite state; an exact log-domain block continues from it.
            u = torch.where(bad.view(-1, 1, 1), u_safe, u)
            v = torch.where(bad.view(-1, 1, 1), v_safe, v)
            lu, lv = u.log(), v.log()
            big = big | bad

        if bool(done.any()):
            sel = idx[done]
            f_out[sel] = torch.where(rm[done] > 0, f[done] + lu[done, :, 0], -math.inf)
            g_out[sel] = torch.where(cm[done] > 0, g[done] + lv[done, 0], -math.inf)
            iters_out[sel] = it
            res_out[sel] = err[done]
            conv_out[sel] = True
            omega_out[sel] = omega.view(-1)[done]
            keep = ~done
            idx = idx[keep]
            if idx.numel() == 0:
                break
            Ma, rm, cm, lra, lca = Ma[keep], rm[keep], cm[keep], lra[keep], lca[keep]
            r_col, c_row, pr_col, pc_row = r_col[keep], c_row[keep], pr_col[keep], pc_row[keep]
            f, g, u, v, Ku, K = f[keep], g[keep], u[keep], v[keep], Ku[keep], K[keep]
            lu, lv, big, bad = lu[keep], lv[keep], big[keep], bad[keep]
            omega, prev_err, best, mu2 = omega[keep], prev_err[keep], best[keep], mu2[keep]

        if bool(big.any()):
            f = torch.where(rm > 0, f + lu[..., 0], f)
            g = torch.where(cm > 0, g + lv[:, 0], g)
            if bool(bad.any()):
                f, g = _log_domain_block(Ma, gamma, f, g, lra, lca, min(check_every, 10))
                f = torch.where(rm > 0, f, 0.0)
                g = torch.where(cm > 0, g, 0.0)
                omega = torch.where(bad.view(-1, 1, 1), 1.0, omega)
                mu2 = torch.where(bad, 0.0, mu2)
                prev_err = torch.where(bad, math.inf, prev_err)
            K = _kernel(Ma, gamma, f, g, rm, cm, lo)
            u, v = torch.ones_like(u), torch.ones_like(v)
            Ku = kt_u(K, u, pc_row)

    if idx.numel() > 0:  # not converged within max_iter: report where they stand
        Kv = k_v(K, v, pr_col)
        err = (u * Kv - r_col).abs_().sum((-2, -1)) + (v * Ku - c_row).abs_().sum((-2, -1))
        f_out[idx] = torch.where(rm > 0, f + u.log()[..., 0], -math.inf)
        g_out[idx] = torch.where(cm > 0, g + v.log()[:, 0], -math.inf)
        res_out[idx] = torch.nan_to_num(err, nan=math.inf)
        omega_out[idx] = omega.view(-1)
    del K, Ku, u, v

    P = torch.add(f_out.unsqueeze(-1), g_out.unsqueeze(-2))
    P.add_(M, alpha=-gamma).exp_()
    P = torch.nan_to_num_(P, nan=0.0, posinf=0.0)  # only where a sample failed outright
    return SinkhornSolution(P, f_out, g_out, iters_out, res_out, conv_out, omega_out)
