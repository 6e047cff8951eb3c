"""Bad arguments fail with a ValueError naming them; low precision is solved in float32."""

from __future__ import annotations

import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.pooling.helpers import ITERATIVE, clustered
from tests.ddn_layers.testing import F64

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 3), r"x must have at least 3 dimensions"),
        (torch.randn(3), r"x must have at least 3 dimensions"),
        (torch.randn(2, 3, 0), r"x must not be empty"),
        (torch.randint(0, 3, (2, 3, 4)), r"x must be a floating-point tensor"),
        ([[[1.0]]], r"x must be a torch.Tensor"),
    ],
)
def test_bad_x(x, match):
    with pytest.raises(ValueError, match=match):
        ddn.robust_pool(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x(bad):
    x = X.clone()
    x[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values"):
        ddn.robust_pool(x)


def test_finite_x_whose_sum_overflows_is_accepted():
    """The fast finiteness check sums x; an overflowing sum must fall back, not reject."""
    x = torch.full((1, 2, 4), 3e38)
    assert torch.isinf(x.sum())
    assert torch.isfinite(ddn.robust_pool(x.double(), "huber", 1.0)).all()
    ddn.robust_pool(x, "quadratic")  # float32: y overflows nowhere, the input is valid


@pytest.mark.parametrize("penalty", ITERATIVE)
def test_squared_distances_beyond_the_dtype_are_named(penalty):
    """Points or alpha beyond what the solve's squared distances hold: a ValueError naming
    the argument and the way out (float64), where the weights would be 0/0 (NaN)."""
    with pytest.raises(ValueError, match=r"x: its points lie so far .* pass x in float64"):
        ddn.robust_pool(1e20 * X, penalty, 1.0)
    with pytest.raises(ValueError, match=r"x: .*e\+19 alpha\), beyond"):
        ddn.robust_pool(1e10 * X, penalty, 1e-9)
    with pytest.raises(ValueError, match=r"alpha must lie in \[.*float32"):
        ddn.robust_pool(1e-20 * X, penalty, 1e-20)
    # float64 holds all three, and y scales with x and alpha
    y = ddn.robust_pool(X.double(), penalty, 1.0)
    for s in (1e20, 1e-20):
        assert torch.allclose(ddn.robust_pool(s * X.double(), penalty, s) / s, y, rtol=1e-9)
    # the mean needs no squared distance: any scale
    assert torch.isfinite(ddn.robust_pool(1e20 * X, "quadratic", 1e-20)).all()
    # beyond float64 too: the way out is to scale, not a dtype the input already has
    for x, alpha in [(1e160 * X.double(), 1.0), (1e100 * X.double(), 1e-100), (X.double(), 1e-200)]:
        with pytest.raises(ValueError, match=r"float64.*: scale x and alpha together") as e:
            ddn.robust_pool(x, penalty, alpha)
        assert "pass x in float64" not in str(e.value)


def test_alpha_from_numpy_is_a_number():
    np = pytest.importorskip("numpy")
    y = ddn.robust_pool(X, "huber", 1.0)
    assert torch.equal(ddn.robust_pool(X, "huber", np.float32(1.0)), y)
    assert torch.equal(ddn.RobustPool2d("huber", np.float64(1.0))(X), y)


def test_module_refuses_an_alpha_it_would_not_train():
    a = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"alpha: .* nn.Parameter\(alpha\)"):
        ddn.RobustPool2d("huber", a)
    layer = ddn.RobustPool2d("huber", torch.nn.Parameter(a.detach().clone()))
    assert [p for p in layer.parameters()] == [layer.alpha]


@pytest.mark.parametrize(
    "alpha", [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 2.0]), "1", None]
)
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be"):
        ddn.robust_pool(X, "huber", alpha)
    with pytest.raises(ValueError, match=r"alpha must be"):
        ddn.RobustPool2d("huber", alpha)


def test_unknown_penalty_lists_the_choices():
    with pytest.raises(ValueError, match=r"penalty must be one of \['quadratic', 'pseudo-huber'"):
        ddn.robust_pool(X, "cauchy")
    with pytest.raises(ValueError, match=r"penalty must be one of"):
        ddn.RobustPool2d("cauchy")


def test_unknown_mode_lists_the_choices():
    with pytest.raises(ValueError, match=r"backward_mode must be one of \['implicit', 'full'"):
        ddn.robust_pool(X, backward_mode="exact")
    with pytest.raises(ValueError, match=r"backward_mode must be one of"):
        ddn.RobustPool2d(backward_mode="exact")
    pool = ddn.RobustPool2d()
    with pytest.raises(ValueError, match=r"backward_mode must be one of"):
        pool.backward_mode = "exact"


@pytest.mark.parametrize(
    "option, match",
    [
        ({"implicit_solver": "lu"}, r"implicit_solver must be one of \['auto', 'cholesky'"),
        ({"tol": 0.0}, r"tol must be a finite number > 0"),
        ({"max_iter": 0}, r"max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, r"max_iter must be an integer"),
        ({"restarts": -1}, r"restarts must be an integer >= 0"),
        ({"newton": "yes"}, r"newton must be True or False"),
        ({"check_every": 0}, r"check_every must be an integer >= 1"),
    ],
)
def test_bad_options(option, match):
    with pytest.raises(ValueError, match=match):
        ddn.robust_pool(X, **option)
    with pytest.raises(ValueError, match=match):
        ddn.RobustPool2d(**option)


def test_module_rejects_unknown_options_and_wrong_rank():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tolerance'\]; choices"):
        ddn.RobustPool2d(tolerance=1e-3)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \(B, C, H, W\)"):
        ddn.RobustPool2d()(torch.randn(2, 3, 5))


def test_the_penalty_names_are_case_insensitive_and_objects_accepted():
    y = ddn.robust_pool(X, "Huber")
    torch.testing.assert_close(y, ddn.robust_pool(X, ddn.PENALTIES["huber"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_half_precision_is_solved_in_float32(dtype, mode):
    x32 = clustered(2, 8, 9, seed=21, dtype=torch.float32).reshape(2, 8, 3, 3)
    x = x32.to(dtype).requires_grad_()
    y = ddn.robust_pool(x, "pseudo-huber", 1.0, backward_mode=mode)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert y.dtype == dtype and g.dtype == dtype
    x_ref = x.detach().float().requires_grad_()
    y_ref = ddn.robust_pool(x_ref, "pseudo-huber", 1.0, backward_mode=mode)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x_ref)
    # the float32 answer for the rounded input, rounded once
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref.to(dtype), rtol=0, atol=0)


def test_safe_under_autocast():
    x = clustered(2, 8, 9, seed=22, dtype=torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ddn.robust_pool(x, "welsch", 1.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert y.dtype == torch.float32
    y_ref = ddn.robust_pool(x, "welsch", 1.0)
    torch.testing.assert_close(y, y_ref)
    assert torch.isfinite(g).all()


def test_alpha_as_a_parameter_and_on_another_dtype():
    x = clustered(2, 4, 9, seed=23)
    alpha = torch.nn.Parameter(torch.tensor(0.7))  # float32 alpha, float64 x
    y = ddn.robust_pool(x, "huber", alpha)
    y.sum().backward()
    assert y.dtype == F64 and alpha.grad is not None and alpha.grad.dtype == torch.float32
    pool = ddn.RobustPool2d("huber", alpha)
    assert pool.alpha is alpha and list(pool.parameters()) == [alpha]


def test_points_near_the_largest_float_have_a_finite_mean():
    """Found by the property test: float32 points of about 1e38, whose sum overflows. The
    mean (average pooling) is still finite and right; the others need squared distances and
    say so."""
    x = 1e38 * torch.tensor([[[1.5, 2.5, 3.0, -0.5]]])
    y = ddn.robust_pool(x, "quadratic")
    torch.testing.assert_close(y, torch.tensor([[1.625e38]]))
    with pytest.raises(ValueError, match="x: its points lie"):
        ddn.robust_pool(x, "welsch")
