"""Differentiable log-domain Sinkhorn for ``backward_mode="unroll"``.

Autograd records every iteration: each stores O(m n) intermediates (the logsumexp inputs),
which is the memory cost that implicit differentiation avoids. The potentials are updated in
the log domain so the unrolled graph is stable at any gamma. Convergence is checked, without
gradient, every ``check_every`` iterations; converged samples are frozen with ``torch.where``.
The over-relaxation factor is adapted exactly as in the forward solver (it is a constant for
autograd), so both modes run about the same number of iterations.
"""

from __future__ import annotations

import math

import torch

from ddn_layers.ot.solver import OmegaSchedule, SinkhornSolution, backed_off


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x on positive entries, -inf (with zero gradient) on padding."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).log(), -math.inf)


def unrolled_sinkhorn(
    M: torch.Tensor,
    r: torch.Tensor,
    c: torch.Tensor,
    gamma: float,
    tol: float,
    max_iter: int,
    check_every: int = 10,
    overrelax: bool = True,
) -> SinkhornSolution:
    B, m, n = M.shape
    rmask, cmask = r > 0, c > 0
    # Padded rows/columns of the log-kernel are 0 (finite) so that logsumexp never sees an
    # all -inf slice; the potentials there are -inf, which zeroes those rows/columns of P.
    logK = torch.where(rmask.unsqueeze(-1) & cmask.unsqueeze(-2), M * (-gamma), 0.0)
    log_r, log_c = _safe_log(r), _safe_log(c)
    f = torch.zeros_like(r)
    g = torch.where(cmask, torch.zeros_like(c), -math.inf)
    active = torch.ones(B, dtype=torch.bool, device=M.device)
    iters = torch.full((B,), max_iter, dtype=torch.long, device=M.device)
    err = torch.full((B,), math.inf, dtype=M.dtype, device=M.device)
    sched = OmegaSchedule(B, torch.finfo(M.dtype).eps)
    omega = sched.tensor(M)
    last_check = 0
    stall = [0] * B  # checks in a row without improvement at the precision floor
    stuck = [0] * B  # checks in a row without improvement, over-relaxed
    for it in range(1, max_iter + 1):
        w = omega.view(B, 1)
        f_new = log_r - torch.logsumexp(logK + g.unsqueeze(-2), dim=-1)
        f_new = torch.where(rmask, f_new if it == 1 else (1 - w) * f + w * f_new, -math.inf)
        g_new = log_c - torch.logsumexp(logK + f_new.unsqueeze(-1), dim=-2)
        g_new = torch.where(cmask, g_new if it == 1 else (1 - w) * g + w * g_new, -math.inf)
        f = torch.where(active.unsqueeze(-1), f_new, f)
        g = torch.where(active.unsqueeze(-1), g_new, g)
        if it % check_every == 0 or it == max_iter:
            with torch.no_grad():
                logP = logK + f.unsqueeze(-1) + g.unsqueeze(-2)
                row = torch.where(rmask, torch.logsumexp(logP, dim=-1).exp(), 0.0)
                col = torch.where(cmask, torch.logsumexp(logP, dim=-2).exp(), 0.0)
                e = (row - r).abs().sum(-1) + (col - c).abs().sum(-1)
                stalled = None
                if overrelax:
                    errs, on = e.tolist(), active.tolist()
                    w_frozen, best = list(sched.omega), list(sched.best)
                    sched.update(errs, [math.isfinite(x) for x in errs], it - last_check)
                    # frozen samples keep the factor they converged with
                    sched.omega = [
                        w if a else w0 for w, w0, a in zip(sched.omega, w_frozen, on, strict=True)
                    ]
                    # A sample settled at its precision floor (see OmegaSchedule) whose error
                    # no longer improves cannot reach tol: in float32 the log-domain iteration
                    # stalls at ~1e-6 on 100 x 100 to 500 x 500 problems, and every further
                    # iteration would only grow the recorded graph (3.3 MiB an iteration at
                    # 500 x 500). After three such checks it stops, unconverged (the caller
                    # warns), instead of running to max_iter.
                    for i, (x, b) in enumerate(zip(errs, best, strict=True)):
                        flat = sched.plain[i] and on[i] and not x < 0.99 * b
                        stall[i] = stall[i] + 1 if flat else 0
                        # An over-relaxed error that has not improved on its best for two
                        # checks in a row backs off as a blow-up does. Without it, gamma 1000
                        # with a marginal entry of 3e-5 kept omega at 1.95 while the error
                        # swung between 1.3 and 1.7 for 300 iterations, and the gradient
                        # through them overflowed (NaN); plain iterations reached 0.83. The
                        # rule is not in OmegaSchedule: there it would also catch the scaling
                        # iteration's float32 errors that hover just above the precision floor
                        # (500 x 500 at gamma 10 then took 2300 iterations instead of 200).
                        stuck[i] = stuck[i] + 1 if on[i] and not x < b else 0
                        if stuck[i] >= 2 and sched.omega[i] > 1.0:
                            sched.omega[i], sched.mu2[i] = backed_off(sched.omega[i], sched.mu2[i])
                            stuck[i] = 0
                    omega = sched.tensor(M)
                    stalled = torch.tensor([k >= 3 for k in stall], device=M.device)
                last_check = it
                err = torch.where(active, e, err)
                if stalled is not None:
                    iters = torch.where(active & stalled & (e > tol), it, iters)
                    active = active & ~(stalled & (e > tol))
                newly = active & (e <= tol)
                iters = torch.where(newly, it, iters)
                active = active & ~newly
                if not bool(active.any()):
                    break
    if bool(active.any()):
        # An unconverged sample may end inside an over-relaxed overshoot, where f + g is large
        # enough for exp to overflow (gamma 1000, costs of 1e3: P = inf). One plain column
        # update makes every column of P sum to its marginal (P finite); its error is
        # measured again below.
        g_plain = log_c - torch.logsumexp(logK + f.unsqueeze(-1), dim=-2)
        g = torch.where(active.unsqueeze(-1) & cmask, g_plain, g)
    P = torch.exp(logK + f.unsqueeze(-1) + g.unsqueeze(-2))
    if bool(active.any()):
        with torch.no_grad():
            e = (P.sum(-1) - r).abs().sum(-1) + (P.sum(-2) - c).abs().sum(-1)
            err = torch.where(active, e, err)
    rate = torch.tensor(sched.mu2, dtype=M.dtype, device=M.device)
    converged = ~active & (err <= tol)  # a stalled sample stopped unconverged
    return SinkhornSolution(P, f.detach(), g.detach(), iters, err, converged, omega.view(B), rate)
