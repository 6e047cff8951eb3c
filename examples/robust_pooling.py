"""Robust vector pooling written as a generic declarative node, checked against ddn.robust_pool.

    .venv/bin/python examples/robust_pooling.py

The whole node is the objective (pseudo-Huber penalty of Table 1 in Gould et al.), a starting
point for the default Newton-CG solver, and, for ``approx``, the isotropic part of the
Hessian. Every backward mode comes from those.
"""

import torch

import ddn_layers as ddn


def objective(x, alpha, y):  # x (B, C, n) points, alpha (B,) scale, y (B, C) -> (B,)
    a = alpha.unsqueeze(-1)
    z2 = ((y.unsqueeze(-1) - x) ** 2).sum(1)  # squared distance of y to each point
    return (a**2 * (torch.sqrt(1 + z2 / a**2) - 1)).sum(-1)


def hessian_approx(x, alpha, y):  # (sum_i kappa1_i) I, with kappa1 = phi'(z) / z
    z2 = ((y.unsqueeze(-1) - x) ** 2).sum(1)
    return torch.rsqrt(1 + z2 / alpha.unsqueeze(-1) ** 2).sum(-1)


pool = ddn.DeclarativeNode(
    objective, init=lambda x, alpha: x.mean(-1), hessian_approx=hessian_approx
)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, 49, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 16, dtype=torch.float64)  # an incoming gradient dJ/dy
    for mode in ddn.BackwardMode:
        pool.backward_mode = mode
        y = pool(x, alpha.expand(4))
        g = torch.autograd.grad((v * y).sum(), (x, alpha))
        y_ref = ddn.robust_pool(x, "pseudo-huber", alpha, backward_mode=mode, tol=1e-13)
        r = torch.autograd.grad((v * y_ref).sum(), (x, alpha))
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(g, r, strict=True))
        note = "  (both approximate, differently)" if mode == "approx" else ""
        print(f"{mode.value:8s} |y - y_ref| {float((y - y_ref).detach().abs().max()):.1e}   "
              f"gradient vs ddn.robust_pool {err:.1e}{note}")  # fmt: skip


if __name__ == "__main__":
    main()
