"""The adaptive over-relaxation factor shared by the forward and the unrolled Sinkhorn solvers."""

from __future__ import annotations

import math

import torch

OMEGA_MAX = 1.95
"""The largest over-relaxation factor used (2 would not converge)."""


def backed_off(w: float, mu2: float) -> tuple[float, float]:
    """An over-relaxation factor and rate estimate after a setback: omega - 1 and mu^2 halved
    (a factor below 1.02 becomes the plain iteration's 1)."""
    w = 1.0 + (w - 1.0) / 2
    return (1.0 if w < 1.02 else w), mu2 / 2


class OmegaSchedule:
    """Each sample's over-relaxation factor, adapted from its observed error decay.

    For a linearly convergent iteration whose plain rate is mu^2, over-relaxation by omega
    (below the optimum) converges at the rate lam solving (lam + omega - 1)^2 = lam omega^2 mu^2,
    so an observed lam at a known omega gives mu^2; the optimum is then
    omega* = 2 / (1 + sqrt(1 - mu^2)). Sinkhorn's error decays sublinearly before it reaches its
    asymptotic rate, so the estimate only ever grows; an error that does not improve on the best
    seen (or a scaling that left the positive reals) halves omega - 1 and the estimate instead.
    Such a setback near the precision floor (error below 300 eps) means the error is rounding
    noise that omega amplifies: the sample then finishes with the plain iteration. Higher up,
    the rule must not catch slowly converging problems that merely improve by less than 10% a
    check (docs/benchmarks/ot/README.md, "Design notes").

    The state is a handful of scalars per sample, kept on the host as Python floats: the solver
    already brings each check's errors to the host for its decisions, and a few float
    operations per sample cost far less than the tiny tensor operations (one dispatch each)
    that the same logic takes on the device.
    """

    def __init__(self, batch: int, eps: float):
        self.omega = [1.0] * batch
        self.mu2 = [0.0] * batch
        self.best = [math.inf] * batch
        self.prev = [math.inf] * batch
        self.plain = [False] * batch  # settled at the precision floor: no more over-relaxation
        self.floor = 300 * eps

    def keep(self, rows: list[int]) -> None:
        """Restrict the state to the samples at positions ``rows`` (the ones still active)."""
        for name in ("omega", "mu2", "best", "prev", "plain"):
            old = getattr(self, name)
            setattr(self, name, [old[i] for i in rows])

    def reset(self, i: int) -> None:
        """Forget sample i's history (its iterate was replaced)."""
        self.omega[i], self.mu2[i], self.best[i], self.prev[i] = 1.0, 0.0, math.inf, math.inf
        self.plain[i] = False

    def update(self, errs: list[float], finite: list[bool], steps: int) -> None:
        """Adapt every sample's factor to its error ``errs[i]`` after ``steps`` iterations
        (``finite[i]``: its scalings stayed finite and positive)."""
        for i, (err, ok) in enumerate(zip(errs, finite, strict=True)):
            w, mu2, prev = self.omega[i], self.mu2[i], self.prev[i]
            if ok and 0 < err < prev < math.inf:
                lam = min(max((err / prev) ** (1.0 / steps), 1e-12), 1.0)
                mu2 = max(mu2, min((lam + w - 1) ** 2 / (lam * w * w), 1.0))
            # Over-relaxation also amplifies rounding noise: near the precision floor an error
            # that stops falling is treated like one that grows (elsewhere SOR may oscillate).
            limit = (0.9 if err < self.floor else 2.0) * self.best[i]
            blowup = w > 1 and not (ok and err <= limit)
            if blowup and ok and err < self.floor:
                # At the floor the over-relaxed error only swings with the rounding noise that
                # omega amplifies; the plain iteration, whose column sums are exact after each
                # half-step, finishes from here.
                self.plain[i] = True
            if self.plain[i]:
                self.best[i] = min(self.best[i], err) if ok else self.best[i]
                w = 1.0
            elif blowup:
                self.best[i] = err if ok else self.best[i]
                w, mu2 = backed_off(w, mu2)
            else:
                self.best[i] = min(self.best[i], err) if ok else self.best[i]
                w = 2.0 / (1.0 + math.sqrt(1.0 - mu2)) if mu2 > 0.05 else 1.0
                w = min(w, OMEGA_MAX)
            self.omega[i], self.mu2[i] = w, mu2
            self.prev[i] = err if ok else math.inf

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        """omega as a (B, 1, 1) tensor."""
        return torch.tensor(self.omega, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def keep_weight(self, like: torch.Tensor) -> torch.Tensor:
        """1 - omega as a (B, 1, 1) tensor: the weight of the previous iterate."""
        keep = [1.0 - w for w in self.omega]
        return torch.tensor(keep, dtype=like.dtype, device=like.device).view(-1, 1, 1)
