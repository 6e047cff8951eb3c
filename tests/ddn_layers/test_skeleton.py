"""A third layer built on the skeleton alone: y = argmin_{||u|| <= radius} ||u - x||^2 / 2,
the projection onto a ball, with its four files' worth of code in one place. It passes the
same BaseTester checks as the library's layers, every mode dispatching through its table."""

from dataclasses import dataclass

import pytest
import torch

import ddn_layers as ddn
from ddn_layers.base import LayerOptions, LayerSpec, Solved, SolverInfo, Unrolled, option, run_layer
from ddn_layers.checks import check_positive, check_tensor
from tests.ddn_layers.testing import BaseTester


@dataclass(frozen=True)
class BallOptions(LayerOptions):  # options.py
    radius: float = option(1.0, check=check_positive)


def solve(opts: BallOptions, x):  # solver.py: closed form, so one "iteration" and no residual
    norm = x.norm(dim=-1, keepdim=True)
    y = x * (opts.radius / norm.clamp_min(opts.radius))
    B = x.shape[0]
    done = SolverInfo(x.new_ones(B, dtype=torch.long), x.new_zeros(B), x.new_ones(B, dtype=bool))
    return Solved(y, (x, y), done)


def implicit(ctx, v):  # backward.py: outside the ball dy/dx = (I - y y^T / r^2) r / ||x||
    (x, y), r = ctx.saved, ctx.opts.radius
    norm = x.norm(dim=-1, keepdim=True)
    tangential = v - y * (y * v).sum(-1, keepdim=True) / r**2
    return (torch.where(norm > r, tangential * r / norm, v),)


def full(ctx, v):  # the dense Jacobian per sample
    (x, y), r = ctx.saved, ctx.opts.radius
    norm = x.norm(dim=-1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    proj = (eye - y[:, :, None] * y[:, None, :] / r**2) * (r / norm)[:, None, None]
    J = torch.where((norm > r)[:, None, None], proj, eye)
    return (torch.einsum("bij,bi->bj", J, v),)


def approx(ctx, v):  # the scaling held fixed
    (x, _), r = ctx.saved, ctx.opts.radius
    return (v * (r / x.norm(dim=-1, keepdim=True).clamp_min(r)),)


BACKWARDS = {
    ddn.BackwardMode.IMPLICIT: implicit,
    ddn.BackwardMode.FULL: full,
    ddn.BackwardMode.APPROX: approx,
    ddn.BackwardMode.UNROLL: Unrolled(),
}
SPEC = LayerSpec("ball_projection", solve, BACKWARDS)


def ball_projection(x, *, radius=1.0, backward_mode="implicit"):  # function.py: x (B, n)
    mode = ddn.BackwardMode.parse(backward_mode)
    return run_layer(SPEC, mode, BallOptions(radius), check_tensor(x, "x", ndims=(2,)))[0]


class BallProjection(ddn.DeclarativeLayer):  # module.py
    def __init__(self, radius=1.0, backward_mode="implicit"):
        super().__init__(backward_mode)
        self.options = BallOptions(radius)

    def forward(self, x):
        y, self.last_info = run_layer(SPEC, self.backward_mode, self.options, x)
        return y


class TestBallProjection(BaseTester):
    functional = staticmethod(ball_projection)
    options = {"radius": 1.25}

    def module(self, mode, **options):
        return BallProjection(backward_mode=mode, **options)

    def inputs(self, dtype):  # norms 0.5 .. 3, away from the kink at the radius
        x = torch.randn(6, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
        return (x / x.norm(dim=-1, keepdim=True) * torch.linspace(0.5, 3, 6, dtype=dtype)[:, None],)


def test_bad_option_names_it():
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        BallProjection(radius=-1.0)


def test_missing_mode_names_layer_and_mode():
    spec = LayerSpec("ball_projection", solve, {ddn.BackwardMode.IMPLICIT: implicit})
    with pytest.raises(ValueError, match="ball_projection has no backward_mode='full'"):
        run_layer(spec, ddn.BackwardMode.FULL, BallOptions(), torch.randn(2, 3))


@pytest.mark.parametrize("mode", [m for m in ddn.BackwardMode if m in BACKWARDS], ids=str)
def test_each_mode_runs_its_table_entry(mode):
    entry, seen = BACKWARDS[mode], []
    logged = entry if isinstance(entry, Unrolled) else lambda c, v: seen.append(1) or entry(c, v)
    x = torch.randn(3, 4, requires_grad=True)
    run_layer(LayerSpec("ball", solve, {mode: logged}), mode, BallOptions(), x)[0].sum().backward()
    assert len(seen) == (0 if isinstance(entry, Unrolled) else 1) and x.grad is not None
