"""The penalty functions of Table 1 and the curvature terms kappa1, kappa2 of Eq. 8.

For a penalty phi(z; alpha) of the distance z = ||y - x_i|| >= 0,

    kappa1(z) = phi'(z) / z,        kappa2(z) = (phi''(z) - kappa1(z)) / z^2,

so that the Hessian of phi(||y - x_i||) in y is kappa1 I + kappa2 (y - x_i)(y - x_i)^T. Both
definitions divide by z, but every penalty below is written in a closed form that is finite at
z = 0 (a point exactly at the solution): there kappa1 is phi''(0) and the kappa2 term vanishes
because it multiplies (y - x_i) = 0.

Two facts every penalty here satisfies, and the solvers rely on (a user-defined penalty must
too):

- rho(s) = phi(sqrt(s)) is concave in s = z^2. Then the quadratic with weight kappa1 at the
  current point majorises phi, so the half-quadratic (IRLS) step y <- sum k1 x / sum k1 never
  increases the objective, and kappa1 >= 0.
- kappa2 <= 0. This is the same concavity (kappa2 = 4 rho''(s)), and it is what lets the
  Woodbury solve write H = s I - U^T U with a real U = sqrt(-kappa2) D and factor the small
  symmetric positive definite matrix s I - U U^T by Cholesky.

All methods take ``z`` of shape (..., n) with the points on the last axis, and ``alpha`` as a
tensor broadcastable to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from types import MappingProxyType

import torch
from torch import Tensor


class Penalty(ABC):
    """A robust penalty phi(z; alpha) and its curvature terms (see the module docstring).

    Attributes:
        name: the key in :data:`PENALTIES`.
        is_convex: phi(||.||) convex, so that any stationary point is a global minimum and a
            single start suffices.
        kappa2_zero: kappa2 vanishes wherever phi is twice differentiable, so the Hessian is
            exactly (sum kappa1) I and no linear solve is needed.
        closed_form: phi = z^2 / 2, whose minimiser is the mean: no iterations at all.
        weights_vanish: every kappa1 can be 0 at once (a flat objective, where IRLS must
            stay put rather than divide 0 by 0). Only a penalty that can never do so (kappa1
            > 0 at every finite z, or scaled so) may set it False.
        scale_equivariant: phi(s z; s alpha) = c(s) phi(z; alpha) for every s > 0 (phi is a
            function of z / alpha up to a factor), so that the minimiser scales with x and
            alpha and a Newton step may be computed in any units. Every penalty of Table 1
            is; a user-defined one is assumed not to be unless it says so.
    """

    name: str = ""
    is_convex: bool = True
    kappa2_zero: bool = False
    closed_form: bool = False
    weights_vanish: bool = True
    scale_equivariant: bool = False

    @abstractmethod
    def phi(self, z: Tensor, alpha: Tensor) -> Tensor: ...

    @abstractmethod
    def kappa1(self, z: Tensor, alpha: Tensor) -> Tensor: ...

    @abstractmethod
    def kappa2(self, z: Tensor, alpha: Tensor) -> Tensor: ...

    @abstractmethod
    def kappa1_dalpha(self, z: Tensor, alpha: Tensor) -> Tensor:
        """d kappa1 / d alpha at fixed z: the mixed derivative d^2 f / (d alpha dy) is
        sum_i kappa1_dalpha(z_i) (y - x_i), the right-hand side for the gradient in alpha."""

    def scaled_kappas(self, z: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """kappa1, kappa2 and kappa1_dalpha, all times one positive factor per sample.

        Every use of them (the IRLS weights, a Newton step, the implicit gradient at a
        stationary point) is invariant to such a factor, and a penalty whose kappas can all
        underflow together (Welsch, far from every point) uses it to stay representable.
        The factor is constant along the last axis (the points of one sample).
        """
        return self.kappa1(z, alpha), self.kappa2(z, alpha), self.kappa1_dalpha(z, alpha)

    def irls_weights_sq(self, sq: Tensor, alpha: Tensor) -> Tensor:
        """kappa1 times any positive factor per sample, from the squared distances sq = z^2:
        all that one IRLS step needs. sq may carry rounding below zero; no square root is
        taken where the penalty does not need one (and none is differentiated at z = 0)."""
        return self.kappa1(sq.clamp_min(0.0).sqrt(), alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Quadratic(Penalty):
    """phi = z^2 / 2: the mean (average pooling); alpha is unused."""

    name = "quadratic"
    scale_equivariant = True
    kappa2_zero = True
    closed_form = True

    def phi(self, z, alpha):
        return 0.5 * z * z

    def kappa1(self, z, alpha):
        return torch.ones_like(z)

    def kappa2(self, z, alpha):
        return torch.zeros_like(z)

    def kappa1_dalpha(self, z, alpha):
        return torch.zeros_like(z)


class PseudoHuber(Penalty):
    """phi = alpha^2 (sqrt(1 + (z/alpha)^2) - 1): smooth, quadratic near 0, linear far out."""

    name = "pseudo-huber"
    scale_equivariant = True

    def phi(self, z, alpha):
        sq = z * z
        # alpha^2 (sqrt(1+u) - 1) rewritten without the cancellation at small z
        return sq / (torch.sqrt(1.0 + sq / (alpha * alpha)) + 1.0)

    weights_vanish = False

    # In terms of t = 1 / sqrt(alpha^2 + z^2): kappa1 = alpha t, kappa2 = -alpha t^3 and
    # d kappa1 / d alpha = z^2 t^3, each a product of factors <= 1 and t. The same values as
    # (1 + (z/alpha)^2)^(-1/2) and its -(...)^3 / alpha^2, which for a point far beyond
    # alpha divide a tiny cube by alpha^2: differentiated again (unroll through a Newton step,
    # points 1e12 alpha away in float32) that 1 / alpha^2 overflows, and inf * 0 is NaN

    @staticmethod
    def _t(z, alpha):
        return torch.rsqrt(alpha * alpha + z * z)

    def kappa1(self, z, alpha):
        return alpha * self._t(z, alpha)

    def kappa2(self, z, alpha):
        t = self._t(z, alpha)
        return -(alpha * t) * t * t

    def irls_weights_sq(self, sq, alpha):
        return torch.rsqrt(sq / (alpha * alpha) + 1.0)

    def kappa1_dalpha(self, z, alpha):
        t = self._t(z, alpha)
        zt = z * t
        return zt * zt * t


class Huber(Penalty):
    """phi = z^2/2 for z <= alpha, alpha (z - alpha/2) beyond."""

    name = "huber"
    scale_equivariant = True

    def phi(self, z, alpha):
        return torch.where(z <= alpha, 0.5 * z * z, alpha * (z - 0.5 * alpha))

    weights_vanish = False

    def kappa1(self, z, alpha):
        # alpha / max(z, alpha) is 1 inside the radius and alpha/z beyond, never 1/0
        return alpha / torch.maximum(z, alpha)

    def irls_weights_sq(self, sq, alpha):
        # alpha / max(z, alpha), from z^2 / alpha^2: rsqrt(max(z^2, alpha^2)), the same up to
        # the factor alpha, has the derivative alpha^-3 / 2 inside the radius, which
        # overflows (unroll differentiates it) once alpha^2 nears the smallest normal
        return torch.rsqrt((sq / (alpha * alpha)).clamp_min(1.0))

    def kappa2(self, z, alpha):
        zc = torch.maximum(z, alpha)
        # not alpha / zc^3: the cube underflows to 0 (and the quotient to -inf) at zc below
        # 2e-13 in float32, 1e-103 in float64, where alpha / zc <= 1 and zc^2 do not
        return torch.where(z > alpha, -(alpha / zc) / (zc * zc), torch.zeros_like(zc))

    def kappa1_dalpha(self, z, alpha):
        zc = torch.maximum(z, alpha)
        return torch.where(z > alpha, 1.0 / zc, torch.zeros_like(zc))


class Welsch(Penalty):
    """phi = 1 - exp(-z^2 / (2 alpha^2)): redescending, non-convex, bounded."""

    name = "welsch"
    scale_equivariant = True
    is_convex = False
    weights_vanish = False  # the nearest point's weight is scaled to exp(0)

    def phi(self, z, alpha):
        return -torch.expm1(-(z * z) / (2.0 * alpha * alpha))

    def _kappas(self, z, alpha):
        a2 = alpha * alpha
        sq = z * z
        e = torch.exp(-sq / (2 * a2))
        return e / a2, -e / (a2 * a2), e / alpha**3 * (sq / a2 - 2.0)

    @staticmethod
    def _scaled_exp(sq, shift, a2):
        # exp(-(z^2 - shift) / 2 alpha^2) <= 1, floored at sqrt(tiny): the floor is 1e-19 of
        # the largest term in float32 (1e-154 in float64), far below rounding, and keeps the
        # GEMMs that use these weights off denormal numbers, which CPUs handle slowly
        floor = 0.5 * math.log(torch.finfo(sq.dtype).tiny)
        return torch.exp(((shift - sq) / (2.0 * a2)).clamp_min(floor))

    def kappa1(self, z, alpha):
        return self._kappas(z, alpha)[0]

    def kappa2(self, z, alpha):
        return self._kappas(z, alpha)[1]

    def kappa1_dalpha(self, z, alpha):
        return self._kappas(z, alpha)[2]

    @staticmethod
    def _shift(sq):
        # exp(-z^2 / 2 alpha^2) underflows for every point once all lie a few alpha away (at
        # C=512 in float32 for standard normal inputs), which would make the weights 0/0.
        # Measuring z^2 from the nearest point's keeps the largest weight at exp(0).
        return sq.amin(dim=-1, keepdim=True).detach()

    def scaled_kappas(self, z, alpha):
        # times alpha^2 as well: unscaled, kappa2 = -e / alpha^4, whose derivative in alpha
        # (unroll differentiates the Newton step) is ~e / alpha^5 and overflows float32 at
        # alpha = 1e-5 (inf * 0 = NaN in the gradient of a learnable alpha)
        a2, sq = alpha * alpha, z * z
        e = self._scaled_exp(sq, self._shift(sq), a2)
        return e, -e / a2, e / alpha * (sq / a2 - 2.0)

    def irls_weights_sq(self, sq, alpha):
        return self._scaled_exp(sq, self._shift(sq), alpha * alpha)


class TruncatedQuadratic(Penalty):
    """phi = z^2/2 for z <= alpha, alpha^2/2 beyond: the mean of the points within alpha."""

    name = "truncated-quadratic"
    scale_equivariant = True
    is_convex = False
    kappa2_zero = True

    def phi(self, z, alpha):
        return 0.5 * torch.minimum(z * z, alpha * alpha)

    def kappa1(self, z, alpha):
        return (z <= alpha).to(z.dtype)

    def irls_weights_sq(self, sq, alpha):
        return (sq <= alpha * alpha).to(sq.dtype)

    def kappa2(self, z, alpha):
        return torch.zeros_like(z)

    def kappa1_dalpha(self, z, alpha):
        # kappa1 is a step in alpha: zero almost everywhere (the solution is piecewise
        # constant in alpha, jumping when a point crosses the radius)
        return torch.zeros_like(z)


PENALTIES: MappingProxyType[str, Penalty] = MappingProxyType(
    {p.name: p for p in (Quadratic(), PseudoHuber(), Huber(), Welsch(), TruncatedQuadratic())}
)
"""Name -> penalty object (read-only). ``robust_pool`` also takes a :class:`Penalty` instance."""


def get_penalty(penalty: str | Penalty) -> Penalty:
    """The penalty named ``penalty`` (or the instance itself); ValueError listing the names."""
    if isinstance(penalty, Penalty):
        return penalty
    if isinstance(penalty, str) and penalty.lower() in PENALTIES:
        return PENALTIES[penalty.lower()]
    raise ValueError(f"penalty must be one of {list(PENALTIES)}, got {penalty!r}")
