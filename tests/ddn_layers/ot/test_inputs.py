"""Bad input to ddn.sinkhorn gets a ValueError that names the argument."""

from __future__ import annotations

import math

import pytest
import torch

import ddn_layers as ddn

M = torch.rand(2, 4, 5)
r, c = torch.rand(2, 4) + 0.1, torch.rand(2, 5) + 0.1


def bad_M_nan():
    x = M.clone()
    x[0, 1, 2] = math.nan
    return x


def bad_M_inf():
    x = M.clone()
    x[1, 0, 0] = math.inf
    return x


CASES = [
    (dict(M=torch.rand(4)), "M must have 2 or 3 dimensions"),
    (dict(M=torch.rand(1, 2, 4, 5)), "M must have 2 or 3 dimensions"),
    (dict(M=bad_M_nan()), "M contains NaN"),
    (dict(M=bad_M_inf()), "M contains NaN or infinite"),
    (dict(M=M.long()), "M must be a floating-point tensor"),
    (dict(M=[[1.0]]), "M must be a torch.Tensor"),
    (dict(r=torch.rand(2, 5)), r"r must have 4 entries"),
    (dict(c=torch.rand(2, 4)), r"c must have 5 entries"),
    (dict(r=torch.rand(3, 4)), r"r must have shape \(4,\) or \(2, 4\)"),
    (dict(r=-r), "r must be non-negative"),
    (dict(c=c - 1), "c must be non-negative"),
    (dict(r=torch.zeros(2, 4)), "r must have a positive entry in every sample"),
    (
        dict(c=torch.tensor([1.0, 0, 0, 0, 0]).expand(2, 5).clone() * torch.tensor([[1.0], [0.0]])),
        "c must have a positive entry",
    ),
    (dict(r=torch.full((2, 4), math.nan)), "r contains NaN"),
    (dict(gamma=0.0), "gamma must be a finite number > 0"),
    (dict(gamma=-1.0), "gamma must be a finite number > 0"),
    (dict(gamma=math.inf), "gamma must be a finite number > 0"),
    (dict(tol=0.0), "tol must be a finite number > 0"),
    (dict(max_iter=0), "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
    # an unknown backward_mode: BaseTester (test_layer.py)
    (dict(implicit_solver="lu"), r"implicit_solver must be one of \['auto', 'cholesky', 'cg'\]"),
]


@pytest.mark.parametrize("override,message", CASES)
def test_bad_input_raises_value_error_naming_argument(override, message):
    kw = dict(M=M, r=r, c=c, gamma=10.0, tol=1e-6, max_iter=100, backward_mode="implicit")
    kw.update(override)
    args = (kw.pop("M"), kw.pop("r"), kw.pop("c"))
    with pytest.raises(ValueError, match=message):
        ddn.sinkhorn(*args, **kw)


def test_unbatched_M_rejects_batched_marginals():
    with pytest.raises(ValueError, match=r"r must have shape \(4,\) when M is 2-D"):
        ddn.sinkhorn(M[0], r, None)


def test_module_checks_its_options():
    with pytest.raises(ValueError, match="gamma"):
        ddn.OptimalTransport(gamma=0)
    with pytest.raises(ValueError, match="backward_mode must be one of"):
        ddn.OptimalTransport(backward_mode="exact")


@pytest.mark.parametrize("bad", [[0.5, 0.5, 0.0], "uniform", 1.0])
@pytest.mark.parametrize("name", ["r", "c"])
def test_marginal_that_is_not_a_tensor_is_named(name, bad):
    with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor"):
        ddn.sinkhorn(M, **{name: bad})
    with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor"):
        ddn.sinkhorn(M[0], **{name: bad})


def test_module_parses_a_reassigned_backward_mode():
    layer = ddn.OptimalTransport()
    layer.backward_mode = "UNROLL"
    assert layer.backward_mode is ddn.BackwardMode.UNROLL
    assert "backward_mode=unroll" in repr(layer)
    with pytest.raises(ValueError, match="backward_mode must be one of"):
        layer.backward_mode = "exact"


def test_module_warn_false_silences_the_convergence_warning(recwarn):
    layer = ddn.OptimalTransport(gamma=10.0, tol=1e-12, max_iter=1, warn=False)
    layer(M)
    assert not [w for w in recwarn if issubclass(w.category, ddn.ConvergenceWarning)]
    assert not bool(layer.last_info.converged.all())
    with pytest.warns(ddn.ConvergenceWarning):
        ddn.OptimalTransport(gamma=10.0, tol=1e-12, max_iter=1)(M)
    with pytest.raises(ValueError, match="warn must be True or False"):
        ddn.OptimalTransport(warn="no")


def test_gamma_that_requires_grad_is_a_value_error():
    """Issue 23: it was silently made a float (no gradient, no error). The message says how to
    learn it: P depends on gamma * M only."""
    learned = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"gamma must be a number or a tensor without grad"):
        ddn.sinkhorn(M, r, c, gamma=learned)
    with pytest.raises(ValueError, match=r"pass M \* gamma with gamma=1.0"):
        ddn.OptimalTransport(gamma=torch.nn.Parameter(torch.tensor(2.0)))
    P = ddn.sinkhorn(M * learned, r, c, gamma=1.0, tol=1e-6)
    torch.testing.assert_close(P, ddn.sinkhorn(M, r, c, gamma=2.0, tol=1e-6), atol=1e-5, rtol=0)
    (P * torch.randn_like(P)).sum().backward()
    assert learned.grad is not None and math.isfinite(float(learned.grad))
    ddn.sinkhorn(M, r, c, gamma=torch.tensor(2.0))  # a tensor without grad is a number


@pytest.mark.parametrize("name", ["r", "c"])
def test_marginal_on_another_device_is_a_value_error(name):
    """Issue 23: a RuntimeError from deep inside before."""
    kw = {"r": r, "c": c, name: (r if name == "r" else c).to("meta")}
    with pytest.raises(ValueError, match=rf"{name} must be on the device of M \(cpu\)"):
        ddn.sinkhorn(M, **kw)


def test_marginal_whose_sum_overflows_is_rescaled():
    """Issue 23: torch.full((20,), 3e38) gave P = 0 and a ConvergenceWarning."""
    M20 = torch.rand(20, 20)
    P, info = ddn.sinkhorn(M20, torch.full((20,), 3e38), return_info=True)
    assert bool(info.converged.all())
    torch.testing.assert_close(P, ddn.sinkhorn(M20), atol=1e-7, rtol=0)
