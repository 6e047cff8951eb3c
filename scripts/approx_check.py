"""How far the OT layer's ``approx`` backward is from the exact gradient, and why training the
matching task with it collapses.

    python scripts/approx_check.py                  # gradient tables (about 15 s, float64)
    python scripts/approx_check.py --train-steps 600  # and a training trace per mode (~2.5 min)

``approx`` ignores the constraints (DESIGN.md): it is the exact derivative of the plan with the
Sinkhorn scalings held fixed, P = diag(r o u) exp(-gamma M) diag(c o v) with u, v constant, so
dJ/dM = -gamma P o V, dJ/dr = (P o V) 1 / r, dJ/dc = (P o V)^T 1 / c (then the normalisation of
r and c). The exact modes add the constraints' term gamma P o (a (+) b) to dJ/dM and give
dJ/dr = a, dJ/dc = b instead.

Part 1 compares approx with implicit (and implicit with unroll, as a yardstick of agreement)
on random problems and a random upstream gradient V, for M, r and c, over gamma.

Part 2 does the same for the matching task's loss: the model's NLL of the ground-truth
assignment (tasks/matching/model.py) on a plan with a dustbin row and column (non-uniform
marginals: 1 per point, n and m for the dustbins). There V = -w / P on the ground-truth
entries (w the loss weights) and 0 elsewhere, so approx's dJ/dM = gamma w on those entries and
0 everywhere else: a constant, the same for every score matrix. It is the gradient of the
linear function gamma <w, M>, which has no minimum, and nothing in it pulls a wrong pair's
score down. Training pushes every ground-truth score and the dustbin score up without end; the
dustbin score is unbounded while cosine scores stop at 1, so all the mass goes to the dustbins
(F1 = 0) and the ever larger score range makes Sinkhorn run out of iterations.

Part 3 (``--train-steps N``) shows it happen: the matching task's default model and data,
trained N steps per mode (AdamW at the task's learning rate, no warm-up, gradients clipped at
norm 1, one thread), printing every 50 steps the loss, the dustbin score, the mean cosine score
of ground-truth pairs and of the other real pairs, the share of real rows' mass in the dustbin
column and the Sinkhorn iterations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ddn_layers as ddn  # noqa: E402
from tasks.matching.model import matching_nll  # noqa: E402

F64 = torch.float64
TIGHT = dict(tol=1e-12, max_iter=200_000)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm())


def random_grads(mode, M, r, c, V, gamma):
    M, r, c = (t.detach().clone().requires_grad_() for t in (M, r, c))
    P, info = ddn.sinkhorn(M, r, c, gamma=gamma, backward_mode=mode, return_info=True, **TIGHT)
    (P * V).sum().backward()
    return M.grad, r.grad, c.grad, float(info.iterations.float().mean())


def part_random(m: int, n: int, gammas, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(1, m, n, generator=g, dtype=F64)
    r = torch.rand(1, m, generator=g, dtype=F64) + 0.2
    c = torch.rand(1, n, generator=g, dtype=F64) + 0.2
    V = torch.randn(1, m, n, generator=g, dtype=F64)
    lines = [
        f"Random problem: M ~ U(0, 1) ({m} x {n}), r, c ~ U(0.2, 1.2), V ~ N(0, 1), float64, "
        "tol 1e-12. cos: cosine similarity with implicit's gradient; |a|/|i|: norm ratio "
        "approx / implicit; unroll's cosine with implicit as the yardstick.",
        "",
        "| gamma | Sinkhorn iters | cos dM | \\|a\\|/\\|i\\| dM | cos dr | \\|a\\|/\\|i\\| dr "
        "| cos dc | \\|a\\|/\\|i\\| dc | unroll cos dM, dr, dc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sums = {}
    for gamma in gammas:
        ex = random_grads("implicit", M, r, c, V, gamma)
        ap = random_grads("approx", M, r, c, V, gamma)
        un = random_grads("unroll", M, r, c, V, gamma)
        cells = [f"{gamma:g}", f"{ex[3]:.0f}"]
        for k in range(3):
            cells += [f"{_cos(ap[k], ex[k]):.3f}", f"{_ratio(ap[k], ex[k]):.3f}"]
        cells.append(", ".join(f"{_cos(un[k], ex[k]):.6f}" for k in range(3)))
        lines.append("| " + " | ".join(cells) + " |")
        sums[gamma] = (_line_sums(ex[0]), _line_sums(ap[0]), float(ap[0].abs().max()))
    lines += [
        "",
        "Row and column sums of dM (largest absolute value; P does not change when a constant is "
        "added to a row or a column of M, so the exact gradient has none): "
        + "; ".join(
            f"gamma {g:g}: implicit {e:.1e}, approx {a:.1e} (largest |dM| entry {big:.1e})"
            for g, (e, a, big) in sums.items()
        )
        + ".",
    ]
    return lines


def _line_sums(dM: torch.Tensor) -> float:
    return max(float(dM.sum(-1).abs().max()), float(dM.sum(-2).abs().max()))


def matching_problem(m: int, n: int, matched: int, dim: int, seed: int):
    """Cosine scores of a pair of point sets, ``matched`` ground-truth pairs, the rest outliers."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.nn.functional.normalize(torch.randn(1, m, dim, generator=g, dtype=F64), dim=-1)
    f1 = torch.nn.functional.normalize(torch.randn(1, n, dim, generator=g, dtype=F64), dim=-1)
    perm = torch.randperm(n, generator=g)[:matched]
    noisy = f0[:, :matched] + 0.7 * torch.randn(1, matched, dim, generator=g, dtype=F64)
    f1[:, perm] = torch.nn.functional.normalize(noisy, dim=-1)
    S = f0 @ f1.mT
    matches0 = torch.full((1, m), -1)
    matches0[0, :matched] = perm
    matches1 = torch.full((1, n), -1)
    matches1[0, perm] = torch.arange(matched)
    return S, matches0, matches1


def matching_grads(mode, S, dustbin, matches0, matches1, gamma):
    """The model's forward from the scores on (tasks/matching/model.py), and its NLL."""
    S = S.detach().clone().requires_grad_()
    d = torch.tensor(float(dustbin), dtype=F64, requires_grad=True)
    B, m, n = S.shape
    full = torch.cat([torch.cat([S, d.expand(B, m, 1)], 2), d.expand(B, 1, n + 1)], 1)
    mask0 = torch.ones(B, m, dtype=torch.bool)
    mask1 = torch.ones(B, n, dtype=torch.bool)
    r = torch.cat([torch.ones(B, m, dtype=F64), torch.full((B, 1), float(n), dtype=F64)], 1)
    c = torch.cat([torch.ones(B, n, dtype=F64), torch.full((B, 1), float(m), dtype=F64)], 1)
    P = ddn.sinkhorn(-full, r, c, gamma=gamma, backward_mode=mode, **TIGHT)
    loss = matching_nll((P * (m + n)).log(), matches0, matches1, mask0, mask1).sum()
    loss.backward()
    return S.grad, d.grad, float(loss.detach())


def part_matching(m: int, n: int, matched: int, gamma: float, seed: int) -> list[str]:
    S, matches0, matches1 = matching_problem(m, n, matched, 16, seed)
    lines = [
        f"Matching loss: {m} x {n} cosine scores of random 16-d embeddings ({matched} "
        "ground-truth pairs, the rest outliers), dustbin score d, the task's marginals and NLL "
        f"(tasks/matching/model.py), gamma {gamma:g}, float64. dS, dd: gradients of the loss "
        "with respect to the scores and the dustbin score (gradient descent moves them by "
        "minus these).",
        "",
        "| d | loss | cos dS (approx, implicit) | \\|a\\|/\\|i\\| dS | dd implicit | dd approx "
        "| approx dS on non-ground-truth pairs | implicit dS on non-ground-truth pairs "
        "(min, max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gt = torch.zeros_like(S, dtype=torch.bool)
    rows = torch.arange(matched)
    gt[0, rows, matches0[0, :matched]] = True
    approx_grads = []
    for dustbin in (0.0, 1.0, 3.0):
        ex_S, ex_d, loss = matching_grads("implicit", S, dustbin, matches0, matches1, gamma)
        ap_S, ap_d, _ = matching_grads("approx", S, dustbin, matches0, matches1, gamma)
        approx_grads.append((ap_S, ap_d))
        off_ap = ap_S[~gt]
        off_ex = ex_S[~gt]
        lines.append(
            f"| {dustbin:g} | {loss:.3f} | {_cos(ap_S, ex_S):.3f} | {_ratio(ap_S, ex_S):.3f} "
            f"| {float(ex_d):+.3f} | {float(ap_d):+.3f} | max abs {float(off_ap.abs().max()):.1e} "
            f"| {float(off_ex.min()):+.3f}, {float(off_ex.max()):+.3f} |"
        )
    # approx's gradient does not depend on the scores at all: the same at other scores.
    other = torch.rand_like(S) * 2 - 1
    ap_o, ap_do, _ = matching_grads("approx", other, -2.0, matches0, matches1, gamma)
    same = max(float((ap_o - a).abs().max()) + abs(float(ap_do - b)) for a, b in approx_grads)
    lines += [
        "",
        f"approx's gradient is constant: at three dustbin scores and at random scores in "
        f"[-1, 1] with d = -2 it differs by at most {same:.1e} (dS = -gamma w on the "
        f"ground-truth pairs: {float(approx_grads[0][0][gt].max()):+.4f}, dd = "
        f"{float(approx_grads[0][1]):+.4f}).",
    ]
    return lines


def train_trace(mode: str, steps: int, seed: int) -> list[str]:
    from omegaconf import OmegaConf

    from tasks.app.runner import build_task_module
    from tasks.matching.config import MatchingRun
    from tasks.matching.data import MatchingData

    torch.manual_seed(seed)
    cfg = OmegaConf.structured(MatchingRun)
    cfg.ddn.backward_mode = mode
    data = MatchingData(cfg.data)
    data.setup()
    net = build_task_module(cfg, data).net  # the task's own network, as train.py builds it
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)
    lines = [
        f"`{mode}`:",
        "",
        "| step | loss | dustbin score | cos ground truth | cos other pairs | mass in dustbin "
        "| Sinkhorn iters |",
        "|---|---|---|---|---|---|---|",
    ]
    batches = iter(data.train_dataloader())
    for step in range(steps + 1):
        try:
            b = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            b = next(batches)
        A = net(b)
        loss = matching_nll(A, b["matches0"], b["matches1"], b["mask0"], b["mask1"]).mean()
        if step % 50 == 0:
            with torch.no_grad():
                S = net.scores(b)
                real = b["mask0"].unsqueeze(2) & b["mask1"].unsqueeze(1)
                gt = torch.zeros_like(real)
                bi, ii = (b["matches0"] >= 0).nonzero(as_tuple=True)
                gt[bi, ii, b["matches0"][bi, ii]] = True
                binned = (A[:, :-1, -1].exp() * b["mask0"]).sum() / b["mask0"].sum()
                iters = net.ot.last_info.iterations.float().mean()
            lines.append(
                f"| {step} | {float(loss.detach()):.3f} | {float(net.dustbin.detach()):+.3f} "
                f"| {float(S[gt].mean()):.3f} | {float(S[real & ~gt].mean()):.3f} "
                f"| {float(binned):.3f} | {float(iters):.0f} |"
            )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--train-steps", type=int, default=0, help="also train the matching task this long"
    )
    ap.add_argument("--modes", nargs="+", default=["approx", "implicit"], help="for --train-steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = part_random(12, 9, [0.1, 1.0, 10.0, 100.0], args.seed)
    out += [""] + part_matching(10, 12, 8, 10.0, args.seed)
    print("\n".join(out), flush=True)
    if args.train_steps > 0:
        import warnings

        from ddn_layers.checks import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)
        for mode in args.modes:
            print("\n" + "\n".join(train_trace(mode, args.train_steps, args.seed)), flush=True)


if __name__ == "__main__":
    main()
