"""Unbalanced optimal transport benchmark (issue 21): sizes x modes, the targets, iterations.

    python scripts/bench_uot.py                             # writes docs/benchmarks/ot/unbalanced/
    python scripts/bench_uot.py --quick --out /tmp/uot      # a smoke run in seconds
    python scripts/bench_uot.py --plot-only                 # redraw the PNGs from the CSVs

Problems: M = randn(B, m, m), uniform masses 1/m, gamma = 10, marginal_penalty = 1 on both
sides, float32, tol = 1e-6 (the balanced benchmark's, scripts/bench_ot.py, with the marginals
relaxed). For every backward mode (each implicit solver forced beside "auto") and POT's
``ot.unbalanced.sinkhorn_unbalanced`` (reg_type "kl", its torch backend, differentiated by
autograd) as the outside peer:

* ``uot.csv``: forward and backward time (median of repeats; on CPU the CPU time of the one
  benchmark thread, see benchutil) and peak memory of forward + backward (benchutil: the
  profiler's allocation records on CPU) for m = n in ``--sizes`` at batch 1;
* ``targets.md`` / ``targets.csv``: the targets of issue 21, measured in this run;
* ``iterations.csv``: iterations to tol = 1e-6 (float64, 50 x 60, batch 2) against gamma for
  ours (annealing and translation on, each off) and POT's three unbalanced methods.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch
from benchutil import (
    MIB,
    machine_info,
    paired_ratio,
    peak_memory_bytes,
    read_csv,
    time_within,
    use_clock,
    write_csv,
)

import ddn_layers as ddn
from ddn_layers.ot.unbalanced.solver import Problem, Sides, solve_annealed

GAMMA, RHO, TOL, MAX_ITER = 10.0, 1.0, 1e-6, 20_000
VARIANTS = [
    ("implicit", "auto"),
    ("implicit", "cholesky"),
    ("implicit", "cg"),
    ("full", "auto"),
    ("approx", "auto"),
    ("unroll", "auto"),
    ("pot", "sinkhorn"),
]


def make_problem(B, m, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, m, n, generator=g, dtype=dtype), torch.randn(
        B, m, n, generator=g, dtype=dtype
    )


def pot_unbalanced(M, gamma, rho, tol, max_iter, method="sinkhorn"):
    """POT's plan of each sample (torch backend: autograd records its iterations)."""
    import ot

    B, m, n = M.shape
    a = torch.full((m,), 1.0 / m, dtype=M.dtype)
    b = torch.full((n,), 1.0 / n, dtype=M.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.stack(
            [
                ot.unbalanced.sinkhorn_unbalanced(
                    a,
                    b,
                    M[i],
                    1.0 / gamma,
                    rho,
                    method=method,
                    reg_type="kl",
                    numItermax=max_iter,
                    stopThr=tol,
                )
                for i in range(B)
            ]
        )


def forward_fn(mode, solver, gamma=None, tol=TOL, max_iter=MAX_ITER):
    gamma = GAMMA if gamma is None else gamma
    if mode == "pot":
        return lambda M: pot_unbalanced(M, gamma, RHO, tol, max_iter)
    return lambda M: ddn.sinkhorn(
        M,
        gamma=gamma,
        tol=tol,
        max_iter=max_iter,
        backward_mode=mode,
        implicit_solver=solver,
        marginal_penalty=RHO,
        warn=False,
    )


def iterations_of(M, **kw) -> int:
    _, info = ddn.sinkhorn(
        M,
        gamma=kw.get("gamma", GAMMA),
        tol=kw.get("tol", TOL),
        max_iter=kw.get("max_iter", MAX_ITER),
        marginal_penalty=RHO,
        return_info=True,
        warn=False,
        backward_mode=kw.get("mode", "implicit"),
    )
    return int(info.iterations.max())


def measure(mode, solver, M, V, budget_s, **kw):
    """Forward ms, backward ms, forward + backward peak MiB, iterations of one variant."""
    fwd = forward_fn(mode, solver, **kw)
    Mg = M.clone().requires_grad_()

    def setup():
        Mg.grad = None
        return fwd(Mg)

    t_f = time_within(lambda: fwd(Mg), budget_s=budget_s).median
    t_b = time_within(lambda P: P.backward(V), setup=setup, budget_s=budget_s).median

    def both():
        fwd(Mg).backward(V)
        return Mg.grad

    # the gradient of the previous call is freed outside the profiled region: freed inside,
    # it would be subtracted from the peak
    Mg.grad = None
    peak = peak_memory_bytes(both)
    its = "" if mode == "pot" else iterations_of(M, mode=mode, **kw)
    return t_f * 1e3, t_b * 1e3, peak / MIB, its


def size_sweep(sizes, budget_s, log) -> list[dict]:
    rows = []
    for m in sizes:
        M, V = make_problem(1, m, m, seed=m)
        for mode, solver in VARIANTS:
            f, b, p, its = measure(mode, solver, M, V, budget_s)
            rows.append(
                dict(
                    m=m,
                    n=m,
                    batch=1,
                    mode=mode,
                    solver=solver,
                    iterations=its,
                    fwd_ms=round(f, 4),
                    bwd_ms=round(b, 4),
                    peak_mib=round(p, 4),
                )
            )
            log(f"m={m} {mode}/{solver}: fwd {f:.2f} ms bwd {b:.2f} ms peak {p:.2f} MiB its {its}")
    return rows


def pot_agreement(log, quick=False) -> tuple[float, str]:
    """The largest relative difference between our float64 plans and POT's, over the cases of
    the tests (both sides relaxed, different penalties per side, each side hard in turn)."""
    import ot

    worst, cases = 0.0, 0
    for m, n, gamma in [(5, 7, 1.0)] + ([] if quick else [(20, 12, 10.0), (100, 80, 10.0)]):
        for rho in [(0.5, 0.5), (1.0, 5.0), (math.inf, 2.0), (0.3, math.inf)]:
            g = torch.Generator().manual_seed(m * n)
            M = torch.randn(2, m, n, generator=g, dtype=torch.float64)
            r = torch.rand(2, m, generator=g, dtype=torch.float64) + 0.2
            c = 2 * torch.rand(2, n, generator=g, dtype=torch.float64) + 0.4
            P = ddn.sinkhorn(
                M, r, c, gamma=gamma, marginal_penalty=rho, tol=1e-13, max_iter=100_000
            )
            for b in range(2):
                ref = ot.unbalanced.sinkhorn_unbalanced(
                    r[b].numpy(),
                    c[b].numpy(),
                    M[b].numpy(),
                    1.0 / gamma,
                    rho,
                    reg_type="kl",
                    numItermax=20_000 if quick else 200_000,
                    stopThr=1e-15,
                )
                ref = torch.from_numpy(ref)
                worst = max(worst, float((P[b] - ref).abs().max() / ref.abs().max()))
                cases += 1
    log(f"POT agreement: {worst:.2e} over {cases} plans")
    return (
        worst,
        f"{cases} plans: 5 x 7 (gamma 1), 20 x 12 and 100 x 80 (gamma 10); "
        "rho (0.5, 0.5), (1, 5), (inf, 2), (0.3, inf)",
    )


def finite_difference_error(log) -> tuple[float, str]:
    """The largest |analytic - central finite difference| entry of the Jacobian of P in M, r
    and c, over implicit, full and unroll (float64, 2 x 5 x 4, gamma 5, rho (0.5, 2))."""
    g = torch.Generator().manual_seed(18)
    M = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    r = torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.2
    c = torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.2
    x0 = torch.cat([M.reshape(-1), r.reshape(-1), c.reshape(-1)])

    def plan(x, mode):
        Mx, rx, cx = x[:40].view(2, 5, 4), x[40:50].view(2, 5), x[50:].view(2, 4)
        return ddn.sinkhorn(
            Mx,
            rx,
            cx,
            gamma=5.0,
            marginal_penalty=(0.5, 2.0),
            tol=1e-14,
            max_iter=100_000,
            backward_mode=mode,
        ).reshape(-1)

    h = 1e-6
    cols = [
        (plan(x0 + h * e, "implicit") - plan(x0 - h * e, "implicit")) / (2 * h)
        for e in torch.eye(x0.numel(), dtype=x0.dtype)
    ]
    numeric = torch.stack(cols, 1)
    worst = {}
    for mode in ("implicit", "full", "unroll"):
        J = torch.autograd.functional.jacobian(lambda x, mode=mode: plan(x, mode), x0)
        worst[mode] = float((J - numeric).abs().max())
    log(f"finite differences: {worst}")
    detail = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    return (
        max(worst.values()),
        f"max over the Jacobian (40 + 10 + 8 inputs, 40 outputs): {detail}; "
        f"|J| up to {float(numeric.abs().max()):.2f}",
    )


def balanced_limit_and_padding(log) -> tuple[float, float]:
    """(1 if marginal_penalty=inf gives the balanced layer's P and gradients bit for bit in
    every mode, else 0; the largest difference between a padded and an unpadded problem's P
    and gradients, every mode)."""
    g = torch.Generator().manual_seed(4)
    M = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    r = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.2
    c = torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.2
    W = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)

    def grads(M, r, c, W, mode, **kw):
        xs = [t.detach().clone().requires_grad_() for t in (M, r, c)]
        P = ddn.sinkhorn(*xs, gamma=10.0, backward_mode=mode, tol=1e-13, max_iter=100_000, **kw)
        (P * W).sum().backward()
        return [P.detach()] + [x.grad for x in xs]

    same, pad_err = True, 0.0
    Mp = torch.cat(
        [
            torch.cat([M, torch.full((2, 6, 2), -3.0, dtype=M.dtype)], 2),
            torch.full((2, 3, 7), -3.0, dtype=M.dtype),
        ],
        1,
    )
    rp, cp = (
        torch.cat([r, torch.zeros(2, 3, dtype=r.dtype)], 1),
        torch.cat([c, torch.zeros(2, 2, dtype=c.dtype)], 1),
    )
    Wp = torch.zeros(2, 9, 7, dtype=W.dtype)
    Wp[:, :6, :5] = W
    for mode in ddn.BackwardMode.choices():
        a, b = grads(M, r, c, W, mode), grads(M, r, c, W, mode, marginal_penalty=math.inf)
        same = same and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        u = grads(M, r, c, W, mode, marginal_penalty=(0.7, 2.0))
        p = grads(Mp, rp, cp, Wp, mode, marginal_penalty=(0.7, 2.0))
        cut = [p[0][:, :6, :5], p[1][:, :6, :5], p[2][:, :6], p[3][:, :5]]
        rest = [p[0][:, 6:], p[0][:, :, 5:], p[1][:, 6:], p[1][:, :, 5:], p[2][:, 6:], p[3][:, 5:]]
        pad_err = max(
            pad_err,
            *(float((x - y).abs().max()) for x, y in zip(cut, u, strict=True)),
            *(float(x.abs().max()) for x in rest),
        )
    log(f"inf = balanced bit for bit: {same}; padding vs unpadded: {pad_err:.1e}")
    return float(same), pad_err


def memory_and_time_targets(m, budget_s, log) -> list[tuple]:
    """The 500 x 500 targets: implicit backward against one matrix product (back to back),
    and fwd + bwd peak memory against unroll's."""
    M, V = make_problem(1, m, m, seed=m)
    _, b_imp, p_imp, its = measure("implicit", "auto", M, V, budget_s)
    b_chol = measure("implicit", "cholesky", M, V, budget_s)[1]
    b_cg = measure("implicit", "cg", M, V, budget_s)[1]
    Mg = M.clone().requires_grad_()

    def graph():
        Mg.grad = None
        return forward_fn("implicit", "auto")(Mg)

    ratio, t_b, t_mm = paired_ratio(
        lambda P: P.backward(V), lambda: torch.bmm(M.mT, M), setup_a=graph
    )
    out = [
        (
            "implicit backward / one (m x n)(n x m) matmul",
            ratio,
            "<= 1.5",
            f"median of 21 back-to-back pairs: implicit {t_b * 1e3:.2f} ms, "
            f"matmul {t_mm * 1e3:.2f} ms (separately timed backward: auto {b_imp:.2f}, "
            f"cholesky {b_chol:.2f}, cg {b_cg:.2f} ms)",
        )
    ]
    # unroll as the layer runs it (its own stopping rule), and at exactly the forward's count
    p_unr, its_unr = measure("unroll", "auto", M, V, 0.0)[2:]
    p_same = measure("unroll", "auto", M, V, 0.0, tol=1e-30, max_iter=its)[2]
    out.append(
        (
            "peak memory implicit / unroll (fwd+bwd, unroll as the layer runs it)",
            p_imp / p_unr,
            "<= 0.02",
            f"implicit {p_imp:.2f} MiB ({its} it), unroll {p_unr:.1f} MiB ({its_unr} it)",
        )
    )
    out.append(
        (
            "peak memory implicit / unroll at the forward's iteration count",
            p_imp / p_same,
            "(<= 0.02)",
            f"unroll {p_same:.1f} MiB at {its} it: P and dJ/dM are two m x n "
            "matrices, unroll keeps about two an iteration, so the ratio is about 1 / iterations",
        )
    )
    log(f"targets at {m}: ratio {ratio:.3f}, memory {p_imp:.2f} / {p_unr:.1f} / {p_same:.1f} MiB")
    return out


def targets(m, budget_s, log, quick=False) -> list[tuple]:
    out = memory_and_time_targets(m, budget_s, log)
    worst, detail = pot_agreement(log, quick)
    out.append(
        (
            "float64 plans vs POT sinkhorn_unbalanced, max relative difference",
            worst,
            "<= 1e-6",
            detail,
        )
    )
    fd, detail = finite_difference_error(log)
    out.append(
        (
            "float64 gradients vs central finite differences (h = 1e-6), max abs",
            fd,
            "<= 1e-5",
            detail,
        )
    )
    same, pad = balanced_limit_and_padding(log)
    out.append(
        (
            "marginal_penalty=inf equals the balanced layer (P and gradients, every mode)",
            same,
            "1 (bit for bit)",
            "torch.equal on P, dJ/dM, dJ/dr, dJ/dc for implicit, full, approx, unroll",
        )
    )
    out.append(
        (
            "zero entries of r, c: padded vs unpadded P and gradients, max abs",
            pad,
            "exact (~1e-15)",
            "3 padded rows, 2 padded columns of cost -3, every mode; padded entries exactly 0",
        )
    )
    return out


def pot_iterations_to_tol(M, gamma, method, tol, cap):
    """Iterations POT's method needs until our residual of its plan meets tol (the first of a
    grid of counts, 1.5x apart), or None where it never does (or fails)."""
    import ot

    B, m, n = M.shape
    a, b = torch.full((m,), 1.0 / m, dtype=M.dtype), torch.full((n,), 1.0 / n, dtype=M.dtype)
    problem = Problem.of(M, a.expand(B, m), b.expand(B, n))
    k = 10
    while k <= cap:
        res = []
        for i in range(B):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                P, lg = ot.unbalanced.sinkhorn_unbalanced(
                    a.numpy(),
                    b.numpy(),
                    M[i].numpy(),
                    1.0 / gamma,
                    RHO,
                    method=method,
                    reg_type="kl",
                    numItermax=k,
                    stopThr=1e-300,
                    log=True,
                )
            f, g = torch.from_numpy(lg["logu"])[None], torch.from_numpy(lg["logv"])[None]
            res.append(
                float(
                    problem.select(torch.tensor([i])).residual(
                        Sides.of(gamma, (RHO, RHO)), torch.from_numpy(P)[None], f, g
                    )
                )
            )
        if all(math.isfinite(x) and x <= tol for x in res):
            return k
        k = int(k * 1.5)
    return None


def iterations_vs_gamma(gammas, log, tol=1e-6, cap=50_000) -> list[dict]:
    rows = []
    for scale in (1.0, 10.0):
        g = torch.Generator().manual_seed(0)
        M = scale * torch.randn(2, 50, 60, generator=g, dtype=torch.float64)
        r, c = (
            torch.full((2, 50), 1 / 50, dtype=M.dtype),
            torch.full((2, 60), 1 / 60, dtype=M.dtype),
        )
        for gamma in gammas:
            row = dict(scale=scale, gamma=gamma)
            for name, kw in [
                ("ours", {}),
                ("ours_no_anneal", dict(anneal=False)),
                ("ours_no_anneal_no_translate", dict(anneal=False, translate=False)),
            ]:
                sol, _ = solve_annealed(M, r, c, gamma, (RHO, RHO), tol, 50_000, **kw)
                row[name] = int(sol.iterations.max()) if bool(sol.converged.all()) else ""
            for method in ("sinkhorn", "sinkhorn_stabilized", "sinkhorn_translation_invariant"):
                its = pot_iterations_to_tol(M, gamma, method, tol, cap)
                row[f"pot_{method}"] = "" if its is None else its
            rows.append(row)
            log(f"iterations scale {scale} gamma {gamma}: {row}")
    return rows


def write_targets(out: Path, tg, meta, size: int) -> None:
    rows = [dict(target=n, value=v, goal=g, detail=d) for n, v, g, d in tg]
    write_csv(out / "targets.csv", rows, meta)
    with open(out / "targets.md", "w", encoding="utf-8") as f:
        f.write(
            f"# Unbalanced optimal transport targets (m = n = {size}, batch 1, gamma = {GAMMA}, "
            f"marginal_penalty = {RHO}, float32, cpu; accuracy rows float64)\n\n"
        )
        f.write(
            f"Command: `{meta['command']}`  \nMachine: {meta['cpu']}, {meta['torch_threads']} "
            f"threads, torch {meta['torch']}, clock: {meta['clock']}\n\n"
        )
        f.write("| target | measured | goal | detail |\n|---|---|---|---|\n")
        for n, v, g, d in tg:
            f.write(f"| {n} | {v:.4g} | {g} | {d} |\n")


def plot(out: Path) -> None:
    """uot_size.png (time and memory per mode against m) and uot_iterations.png (iterations
    to tol against gamma), from the CSVs alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(out / "uot.csv")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, solver in dict.fromkeys((r["mode"], r["solver"]) for r in rows):
        sel = [r for r in rows if r["mode"] == mode and r["solver"] == solver]
        label = mode if solver in ("auto", "sinkhorn") else f"{mode} ({solver})"
        label = "POT sinkhorn_unbalanced (autograd)" if mode == "pot" else label
        ms = [int(r["m"]) for r in sel]
        for ax, key in zip(axes, ("fwd_ms", "bwd_ms", "peak_mib"), strict=True):
            ax.plot(ms, [float(r[key]) for r in sel], marker="o", label=label)
    for ax, title in zip(
        axes, ("forward (ms)", "backward (ms)", "peak memory fwd+bwd (MiB)"), strict=True
    ):
        ax.set(xscale="log", yscale="log", xlabel="m = n", title=title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Unbalanced OT, float32, gamma {GAMMA}, marginal_penalty {RHO}, batch 1")
    fig.tight_layout()
    fig.savefig(out / "uot_size.png", dpi=110)
    rows = read_csv(out / "iterations.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, scale in zip(axes, ("1.0", "10.0"), strict=True):
        sel = [r for r in rows if r["scale"] == scale]
        for key in [k for k in rows[0] if k not in ("scale", "gamma")]:
            pts = [(float(r["gamma"]), float(r[key])) for r in sel if r[key]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="gamma",
            ylabel="iterations to tol 1e-6",
            title=f"costs randn x {scale}, 50 x 60, float64",
        )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "uot_iterations.png", dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/benchmarks/ot/unbalanced")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500, 1000])
    ap.add_argument("--target-size", type=int, default=500)
    ap.add_argument("--gammas", type=float, nargs="+", default=[10, 30, 100, 300, 1000, 3000])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per timing")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNGs from the CSVs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        plot(out)
        return
    use_clock("cpu")
    if args.quick:
        args.sizes, args.target_size, args.budget, args.gammas = [12, 24], 24, 0.0, [10]
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_info()

    def log(msg):
        print(msg, flush=True)

    tg = targets(args.target_size, args.budget, log, args.quick)
    write_targets(out, tg, meta, args.target_size)
    write_csv(out / "uot.csv", size_sweep(args.sizes, args.budget, log), meta)
    cap = 2000 if args.quick else 50_000
    write_csv(out / "iterations.csv", iterations_vs_gamma(args.gammas, log, cap=cap), meta)
    plot(out)
    print(f"wrote {out}/: uot.csv, iterations.csv, targets.csv, targets.md and the PNGs")


if __name__ == "__main__":
    main()
