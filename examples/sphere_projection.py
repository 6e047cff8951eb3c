"""Projection onto the unit sphere: a constrained declarative node with your own solver.

    .venv/bin/python examples/sphere_projection.py

y = argmin_u 1/2 ||u - x||^2 subject to ||u||^2 = 1. The solver is the closed form x / ||x||;
the node differentiates the problem, and the result is checked against the known Jacobian
(I - y y^T) / ||x||.
"""

import torch

import ddn_layers as ddn


def objective(x, y):  # x, y (B, d) -> (B,)
    return 0.5 * ((y - x) ** 2).sum(-1)


def constraints(x, y):  # one constraint per sample: (B,)
    return (y**2).sum(-1) - 1


def solve(x):
    return x / x.norm(dim=-1, keepdim=True)


def hessian(x, y):  # exact here: the Lagrangian's Hessian is ||x|| I at the solution
    return x.norm(dim=-1)


project = ddn.DeclarativeNode(objective, constraints, solver=solve, hessian_approx=hessian)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 3, dtype=torch.float64)  # an incoming gradient dJ/dy
    y = solve(x.detach())
    eye = torch.eye(3, dtype=torch.float64)
    jac = (eye - y.unsqueeze(-1) * y.unsqueeze(-2)) / x.detach().norm(dim=-1)[:, None, None]
    expected = torch.einsum("bi,bij->bj", v, jac)
    for mode in ddn.BackwardMode:
        project.backward_mode = mode
        (g,) = torch.autograd.grad((v * project(x)).sum(), x)
        err = float((g - expected).abs().max())
        print(f"{mode.value:8s} max |dJ/dx - v^T (I - y y^T) / ||x|| | = {err:.1e}")


if __name__ == "__main__":
    main()
