"""Backward passes of entropic optimal transport: the algebra of each backward mode.

Notation (per sample): P (m, n) the plan, r = P 1 and c = P^T 1 its marginals (the caller
passes the marginals P has, not the targets: they agree within tol, and with them K below is
PSD even for a truncated solve), zeros = padding, V = dJ/dP.
The KKT conditions give P = exp(gamma (alpha (+) beta - M)); differentiating them and the
constraints (Eq. 3 with H^-1 = diag(gamma P), B = I, Eqs. 16-27) reduces every exact mode to
the symmetric system

    K [a; b] = [s_r; s_c],   K = [[diag(r), P], [P^T, diag(c)]],
    s_r = (P o V) 1,  s_c = (P o V)^T 1,

after which  dJ/dM = gamma P o (a (+) b - V),  dJ/dr = a,  dJ/dc = b.  K is A H^-1 A^T / gamma
(Eq. 18) with the redundant constraint kept: it is PSD with the null vector (1, -1), the
"gauge" (a + t, b - t) that the normalisation of r and c (done by the caller) projects out.

* ``implicit`` eliminates the larger side and solves the Schur complement of the smaller one
  (footnote 3): on the column side  S = diag(c) - P^T diag(1/r) P  (n x n), PSD with null vector
  1, made SPD by adding  delta q q^T  (q = the non-padded columns); any solution of the
  consistent singular system gives the same gradient. S is solved by a Cholesky factorisation
  of its lower triangle (built from lower-triangle blocks only) or matrix-free by
  Jacobi-preconditioned conjugate gradients (two matrix-vector products an iteration);
  ``auto`` runs CG within the iteration budget that costs what the direct solve would
  (``cg_budget``), gives up early when its observed rate predicts a miss, and then solves
  directly. Only vectors are solved for: never the (m x n) right-hand sides of the paper's
  Fig. 4.
* ``full`` forms K (m + n square) densely, drops the first non-padded row constraint as the
  paper does (Eq. 16) and solves it by Cholesky: the unstructured baseline.
* ``approx`` ignores the constraints: P = r c^T o exp(-gamma M) up to scaling, so
  dJ/dM = -gamma P o V, dJ/dr = s_r / r, dJ/dc = s_c / c (Fig. 4, line 6).

Every linear system is symmetric positive (semi)definite, so only Cholesky routines are used
(batched LU solves are unreliable on some MKL builds). A failed factorisation is detected per
sample from ``cholesky_ex``'s info and re-solved with a small ridge (the near-minimum-norm
solution) with an IllConditionedWarning; it is never ignored.
"""

from __future__ import annotations

import math
import warnings

import torch

from ddn_layers.checks import IllConditionedWarning

IMPLICIT_SOLVERS = ("auto", "cholesky", "cg")


def _rowvec_mat(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """x^T P for x (B, m), P (B, m, n) -> (B, n)."""
    if P.stride(-1) != 1 and P.stride(-2) == 1:  # P = Q^T of a contiguous Q: (Q x)^T
        return torch.bmm(P.mT, x.unsqueeze(-1)).squeeze(-1)
    return torch.bmm(x.unsqueeze(-2), P).squeeze(-2)


def _mat_vec(P: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """P y for P (B, m, n), y (B, n) -> (B, m).

    Both helpers pick the operand layout for which batched GEMV is fast: a row vector times a
    transposed matrix hits a path about 10x slower for batch 1 in torch 2.14 on CPU.
    """
    if P.stride(-1) != 1 and P.stride(-2) == 1:  # P = Q^T: (y^T Q)^T
        return torch.bmm(y.unsqueeze(-2), P.mT).squeeze(-2)
    return torch.bmm(P, y.unsqueeze(-1)).squeeze(-1)


def _inv_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def _schur_lower(Q: torch.Tensor, block: int = 160) -> torch.Tensor:
    """-Q^T Q (n x n) with only its lower-triangular blocks written (the rest is garbage).

    Cholesky and its solves read the lower triangle only, so this saves up to ~40% of the
    product when n is large.
    """
    B, _, n = Q.shape
    if n <= 2 * block:
        return torch.bmm(Q.mT, Q).neg_()
    S = Q.new_empty(B, n, n)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        # one product for the block row left of (and including) the diagonal block
        torch.bmm(Q[:, :, i0:i1].mT, Q[:, :, :i1], out=S[:, i0:i1, :i1])
        S[:, i0:i1, :i1].neg_()
    return S


def _schur_rhs(P, r, s_r, s_c):
    """rinv = 1/r (0 on padding) and the right-hand side of the column-side system S b = rhs."""
    rinv = _inv_or_zero(r)
    return rinv, s_c - _rowvec_mat(rinv * s_r, P)


def _solve_cholesky(P, c, rhs, rinv, scratch, ridge=0.0):
    """Direct solve of S b = rhs; ``ridge`` (relative to mean(c)) regularises singular S."""
    q = (c > 0).to(P.dtype)
    torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch)  # Q = diag(r)^-1/2 P
    S = _schur_lower(scratch)
    diag = c + (1 - q)  # padded columns: identity rows
    if ridge:
        diag = diag + ridge * q * (c.sum(-1, keepdim=True) / q.sum(-1, keepdim=True).clamp_min(1))
    S.diagonal(dim1=-2, dim2=-1).add_(diag)
    # Gauge: S has the null vector q; adding delta q q^T with delta * n_valid = mean(c) makes it
    # SPD with an eigenvalue like the others there, and leaves the solution of S b = rhs (rhs
    # is orthogonal to q) unchanged.
    n_valid = q.sum(-1, keepdim=True).clamp_min(1)
    w = (c.sum(-1, keepdim=True).sqrt() / n_valid) * q
    S.baddbmm_(w.unsqueeze(-1), w.unsqueeze(-2))
    L, info = torch.linalg.cholesky_ex(S)
    ok = info == 0
    if not bool(ok.all()):
        L = torch.where(ok.view(-1, 1, 1), L, torch.eye(L.shape[-1], dtype=L.dtype))
    # two triangular solves: a third of the time cholesky_solve takes here for one vector
    y = torch.linalg.solve_triangular(L, rhs.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1), ok


def _solve_cg(P, c, rhs, rinv, scratch, rtol, max_iter, check_every=5, give_up=False):
    """Jacobi-preconditioned CG on the Schur complement, batched and matrix-free.

    S is singular (null vector: the non-padded columns) but the system is consistent, so CG
    needs no gauge: the residual stays in the range of S, and the null-space part of b does
    not change the gradient. The Jacobi preconditioner is applied as a change of variables,
    S' = D^-1/2 S D^-1/2 with D = diag(S), folded into Q' = diag(r)^-1/2 P D^-1/2 once, so
    that an iteration is plain CG on S' x = D^-1/2 rhs (b = D^-1/2 x): S' p = c' o p -
    Q'^T Q' p, two matrix-vector products and seven small operations.

    At m = n = 500 on a CPU the interpreter's cost per operation is as large as a product, so
    the loop is written for the fewest operations: vectors are rows (B, 1, n) that every
    product takes without reshaping; x and the residual share one buffer, as do p and -S'p,
    so one fused update advances both; dot products add a tiny floor in the same call (keeps
    0 / 0 out of a frozen sample's step sizes); no per-iteration bookkeeping. A sample whose
    residual met the tolerance is frozen at a check: its residual and direction are zeroed,
    after which every step it takes is exactly zero.

    ``give_up``: stop early, unconverged, once the residual's observed rate of decrease
    predicts that some sample would need more than ``max_iter`` iterations (the caller then
    solves directly, having spent little). The tolerance applies to the residual of the
    scaled system, relative to its right-hand side.
    """
    B, n = c.shape
    tiny = torch.finfo(P.dtype).tiny
    q = c > 0
    # diag(S) = c - diag(P^T diag(1/r) P), floored: a near-permutation plan makes it tiny
    # relative to c
    diag = c - _rowvec_mat(rinv, torch.mul(P, P, out=scratch))
    dis = torch.where(q, torch.maximum(diag, 1e-3 * c), 1.0).rsqrt_()  # D^-1/2
    Q = torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch).mul_(dis.unsqueeze(-2))
    neg_c = (c * dis * dis).neg_().unsqueeze(1)  # -c' (B, 1, n)
    floor = torch.full((B, 1, 1), tiny, dtype=P.dtype, device=P.device)
    # Every iterate lives in a buffer allocated once and updated in place (out=), and each
    # transposed view is made once: views and allocations cost as much as the small
    # operations themselves at this size.
    # (pairs stacked in front, so that each is a contiguous (B, 1, n) batch for bmm)
    xr = torch.zeros(2, B, 1, n, dtype=P.dtype, device=P.device)  # [x; residual]
    x, res = xr
    res.copy_((dis * rhs).unsqueeze(1))
    pq = torch.empty_like(xr)  # [p; -S'p]
    p, neg_sp = pq
    p.copy_(res)
    p_t, neg_sp_t, res_t = p.mT, neg_sp.mT, res.mT
    qp = P.new_empty(B, Q.shape[1], 1)
    qp_t = qp.mT
    cp = torch.empty_like(p)
    rr, rr_new, psp, alpha, beta = (torch.empty_like(floor) for _ in range(5))
    torch.baddbmm(floor, res, res_t, out=rr)  # (B, 1, 1)
    norms = _norms(rr, tiny)
    limit = [rtol * nrm for nrm in norms]
    prev = norms
    it, last_check, next_check = 0, 0, check_every
    for it in range(1, max_iter + 1):
        torch.mul(neg_c, p, out=cp)
        torch.bmm(Q, p_t, out=qp)
        torch.baddbmm(cp, qp_t, Q, out=neg_sp)
        torch.baddbmm(floor, p, neg_sp_t, alpha=-1, out=psp)
        torch.div(rr, psp, out=alpha)
        xr.addcmul_(alpha, pq)  # x += alpha p, res -= alpha S'p
        torch.baddbmm(floor, res, res_t, out=rr_new)
        torch.div(rr_new, rr, out=beta)
        torch.addcmul(res, beta, p, out=p)
        rr, rr_new = rr_new, rr
        if it == next_check:
            norms = _norms(rr, tiny)
            going = [nrm > lim for nrm, lim in zip(norms, limit, strict=True)]
            if not any(going):
                break
            if not all(going):
                keep = torch.tensor(going, device=P.device).view(-1, 1, 1)
                res.mul_(keep)
                p.mul_(keep)
                torch.where(keep, rr, floor, out=rr)
            more = _predicted_iterations(norms, prev, limit, it - last_check)
            # the rate over the first iterations understates CG's (it accelerates): a give-up
            # needs two checks' worth of evidence
            if give_up and it >= 2 * check_every and it + more > max_iter:
                break
            # check again when the slowest sample should be done, and at least as often
            next_check = it + (max(1, math.ceil(more)) if more < check_every else check_every)
            last_check, prev = it, norms
    limit_t = torch.tensor(limit, dtype=P.dtype, device=P.device)
    converged = res.squeeze(1).norm(dim=-1) <= limit_t
    return x.squeeze(1) * dis, converged, it


def _norms(rr: torch.Tensor, tiny: float) -> list[float]:
    """Residual norms from the floored squared norms rr = tiny + res.res (host floats)."""
    return [math.sqrt(max(v - tiny, 0.0)) for v in rr.view(-1).tolist()]


def _predicted_iterations(norms, prev_norms, limit, steps) -> float:
    """Iterations still needed by the slowest sample at its residual's recent rate (lists)."""
    worst = 0.0
    for now, before, lim in zip(norms, prev_norms, limit, strict=True):
        if now <= lim:
            continue
        if not 0 < now < before:
            return math.inf
        rate = math.log(now / before) / steps
        worst = max(worst, math.log(lim / now) / rate)
    return worst


def _cg_tol(dtype: torch.dtype) -> float:
    """Relative residual at which CG stops. In float32 the gradient then agrees with the
    direct solve's to within the error that float32 and the forward's tolerance already put
    in both (measured: 1.4e-5 either way against float64 at m = n = 500, gamma = 10)."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def cg_budget(n_small: int, m_large: int) -> int:
    """CG iterations that cost as much as the direct solve (``implicit_solver="auto"``).

    Costs in multiply-adds at the rate of a large matrix product, fitted on a CPU: the direct
    solve forms the lower triangle of S (m n^2, ~1.7x as slow per flop as a full product in
    blocks) and factorises it (n^3 / 3, about 3x slower per flop), plus call overheads; a CG
    iteration is two matrix-vector products (memory bound, ~24x slower per flop than a matrix
    product) plus its vector operations (~8e6 of overhead each on a CPU). On a GPU both kinds
    of overhead shrink alike. Auto runs CG with this budget and gives up early when its rate
    predicts a miss, so a wrong guess costs a fraction of one direct solve.
    """
    direct = 1.66 * m_large * n_small**2 + n_small**3 + 1e7
    per_iteration = 48.0 * m_large * n_small + 8e6
    return int(direct / per_iteration)


def implicit_backward(P, r, c, V, gamma, solver="auto"):
    """(dJ/dM, dJ/dr, dJ/dc) by the Schur complement on the smaller side of P."""
    m, n = P.shape[-2:]
    transpose = m < n  # solve on the smaller side: the rows
    if transpose:
        P, r, c, V = P.mT, c, r, V.mT
        m, n = n, m
    X = torch.mul(P, V)  # P o V, reused below as scratch and as the output buffer
    s_r, s_c = X.sum(-1), X.sum(-2)
    rinv, rhs = _schur_rhs(P, r, s_r, s_c)
    budget, give_up = 4 * n + 50, False
    if solver == "auto":
        budget, give_up = cg_budget(n, m), True
        solver = "cg" if budget >= 10 else "cholesky"
    if solver == "cg":
        b, ok, _ = _solve_cg(P, c, rhs, rinv, X, _cg_tol(P.dtype), budget, give_up=give_up)
        if not bool(ok.all()):  # CG stalled or gave up: the direct solve is the fallback
            b2, ok2 = _solve_cholesky(P, c, rhs, rinv, X)
            b = torch.where(ok.unsqueeze(-1), b, b2)
            ok = ok | ok2
    else:
        b, ok = _solve_cholesky(P, c, rhs, rinv, X)
    if not bool(ok.all()):
        # S is singular beyond the gauge (P numerically block-diagonal): a small ridge picks
        # the near-minimum-norm solution, exact for dJ/dM, a choice for dJ/dr and dJ/dc.
        ridge = math.sqrt(torch.finfo(P.dtype).eps)
        b2, ok2 = _solve_cholesky(P, c, rhs, rinv, X, ridge=ridge)
        b = torch.where(ok.unsqueeze(-1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), int((~ok2).sum()))
    a = (s_r - _mat_vec(P, b)) * rinv
    # dJ/dM = gamma P o (a (+) b - V), written into X in three passes (gamma on the vectors)
    torch.sub((gamma * a).unsqueeze(-1), V, alpha=gamma, out=X)
    X.add_((gamma * b).unsqueeze(-2)).mul_(P)
    if transpose:
        return X.mT, b, a
    return X, a, b


def _warn_ill_conditioned(n_bad: int, n_unresolved: int, what: str = "implicit") -> None:
    if what == "implicit":
        msg = (
            f"sinkhorn backward: the Schur complement was singular for {n_bad} sample(s) (P is "
            "numerically block-diagonal, e.g. gamma * M so large that P is a near-permutation); "
            "solved with a small ridge: the gradient with respect to M is unaffected, those "
            "with respect to r and c are the near-minimum-norm choice."
        )
    else:
        msg = (
            f"sinkhorn backward (full): the dense KKT system was singular for {n_bad} "
            "sample(s) (P is numerically block-diagonal); those were solved by the implicit "
            "path instead."
        )
    if n_unresolved:
        msg += f" The regularised system still failed for {n_unresolved} of them."
    warnings.warn(msg, IllConditionedWarning, stacklevel=4)


def full_backward(P, r, c, V, gamma):
    """(dJ/dM, dJ/dr, dJ/dc) by a dense Cholesky solve of the (m + n)-square system K."""
    B, m, n = P.shape
    G = P * V
    s = torch.cat([G.sum(-1), G.sum(-2)], dim=-1)
    K = P.new_zeros(B, m + n, m + n)
    K[:, :m, m:] = P
    K[:, m:, :m] = P.mT
    mask = torch.cat([r > 0, c > 0], dim=-1)
    # Drop the first non-padded row constraint (Eq. 16): it is implied by the others.
    first_row = (r > 0).to(torch.int8).argmax(-1)
    mask[torch.arange(B, device=P.device), first_row] = False
    fm = mask.to(P.dtype)
    K.mul_(fm.unsqueeze(-1)).mul_(fm.unsqueeze(-2))
    K.diagonal(dim1=-2, dim2=-1).copy_(torch.where(mask, torch.cat([r, c], -1), 1.0))
    s = s * fm
    L, info = torch.linalg.cholesky_ex(K)
    ok = info == 0
    ab = torch.cholesky_solve(s.unsqueeze(-1), torch.where(ok.view(-1, 1, 1), L, 1.0))
    a, b = ab[:, :m, 0], ab[:, m:, 0]
    if not bool(ok.all()):
        # Dropping a constraint leaves a numerically singular system when P is (nearly)
        # block-diagonal; the implicit path handles those samples (and warns).
        _, a2, b2 = implicit_backward(P, r, c, V, gamma, "cholesky")
        a = torch.where(ok.view(-1, 1), a, a2)
        b = torch.where(ok.view(-1, 1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), 0, "full")
    dM = gamma * P * (a.unsqueeze(-1) + b.unsqueeze(-2) - V)
    return dM, a, b


def approx_backward(P, r, c, V, gamma):
    """Constraints ignored (see module docstring)."""
    G = P * V
    return -gamma * G, G.sum(-1) * _inv_or_zero(r), G.sum(-2) * _inv_or_zero(c)
