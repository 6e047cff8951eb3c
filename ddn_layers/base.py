"""The skeleton every declarative layer fills in, and what every layer does the same way.

A layer package has four files:

- ``solver.py``: the forward. ``solve(opts, *inputs) -> Solved`` (the output, the tensors the
  backward needs, the per-sample :class:`SolverInfo`); it runs under ``no_grad`` except for
  ``unroll``, where autograd records it.
- ``backward.py``: one function per backward mode, ``grad(ctx, v) -> grads`` (one entry per
  input, None where not needed), in a table ``BACKWARDS`` keyed by :class:`BackwardMode`;
  ``unroll``'s entry is :class:`Unrolled`.
- ``function.py``: a :class:`LayerSpec` naming the two, and the functional form, which checks
  its arguments, builds the layer's options and calls :func:`run_layer`.
- ``module.py``: the ``nn.Module``, a :class:`DeclarativeLayer` that holds the options
  (validated once, at construction) and calls the functional form.

Options are a frozen dataclass deriving from :class:`LayerOptions`: each field names its own
check, so every layer validates its options the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from ddn_layers.modes import BackwardMode, first_derivatives_only


@dataclass
class SolverInfo:
    """Per-sample record of the last forward solve (tensors of shape (B,), on the input device).

    ``iterations``: iterations each sample took; ``residual``: its final optimality or
    marginal error; ``converged``: whether it met the tolerance. ``extra`` holds
    layer-specific entries (for example which start won for non-convex pooling).
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Scalars for logging: mean/max iterations, max residual, fraction converged (syncs)."""
        it = self.iterations.float()
        return {
            "iters_mean": float(it.mean()),
            "iters_max": float(it.max()),
            "residual_max": float(self.residual.float().max()),
            "converged_frac": float(self.converged.float().mean()),
        }

    def tensors(self, extra_keys: tuple[str, ...]) -> tuple[Tensor | None, ...]:
        """The record as a flat tuple (``extra`` in the order of ``extra_keys``)."""
        core = (self.iterations, self.residual, self.converged)
        return core + tuple(self.extra.get(k) for k in extra_keys)

    @classmethod
    def from_tensors(cls, extra_keys: tuple[str, ...], values) -> SolverInfo:
        iterations, residual, converged, *rest = values
        extra = {k: v for k, v in zip(extra_keys, rest, strict=True) if v is not None}
        return cls(iterations, residual, converged, extra)


# ---------------------------------------------------------------------------------------------
# Options


def option(default: Any = MISSING, *, check: Callable[[Any, str], Any] | None = None) -> Any:
    """A field of a :class:`LayerOptions`: ``check(value, name)`` returns the validated value
    or raises a ValueError naming ``name``."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class LayerOptions:
    """Base of every layer's options: each field is checked (by its ``option(check=...)``)
    when the options are built, so a bad value fails at construction, naming the option."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name), f.name))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's name and default: the public list of a layer's options."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LayerOptions:
        """The options from keyword arguments; an unknown name is a ValueError listing the
        choices."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; choices: {sorted(names)}")
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Dispatch


@dataclass(frozen=True)
class Solved:
    """What a layer's solver returns: the output, what its backward needs, and the record."""

    y: Tensor
    saved: tuple[Tensor, ...]
    info: SolverInfo


@dataclass(frozen=True)
class BackwardContext:
    """What a backward function receives besides the incoming gradient."""

    saved: tuple[Tensor, ...]
    opts: Any
    needs_input_grad: tuple[bool, ...]


BackwardFn = Callable[[BackwardContext, Tensor], tuple[Tensor | None, ...]]


@dataclass(frozen=True)
class Unrolled:
    """The table entry of ``BackwardMode.UNROLL``: autograd differentiates through ``solve``
    (the layer's own solver when None), run with grad enabled instead of as a Function."""

    solve: Callable[..., Solved] | None = None


@dataclass(frozen=True)
class LayerSpec:
    """A layer as the dispatcher sees it.

    ``backwards`` maps each mode the layer implements to its backward function (``Unrolled``
    for ``unroll``); ``extra_keys`` are the ``SolverInfo.extra`` entries the solver fills, or
    None for whichever entries each solve returns (a layer whose solver the user supplies);
    ``twice`` are the modes whose gradient may itself be differentiated (create_graph=True).
    """

    name: str
    solve: Callable[..., Solved]
    backwards: Mapping[BackwardMode, BackwardFn | Unrolled]
    extra_keys: tuple[str, ...] | None = ()
    twice: frozenset[BackwardMode] = frozenset({BackwardMode.UNROLL})

    def backward_for(self, mode: BackwardMode) -> BackwardFn | Unrolled:
        """The table entry of ``mode``; a mode the layer lacks is a ValueError naming both."""
        entry = self.backwards.get(mode)
        if entry is None:
            have = [m.value for m in BackwardMode if m in self.backwards]
            raise ValueError(
                f"{self.name} has no backward_mode={mode.value!r}; it implements {have}"
            )
        return entry

    def check_first_order(self, mode: BackwardMode) -> None:
        if mode not in self.twice:
            names = " or ".join(repr(m.value) for m in BackwardMode if m in self.twice)
            first_derivatives_only(self.name, mode, f"backward_mode={names} differentiates twice")


class _DeclarativeFunction(torch.autograd.Function):
    """y = the layer's solution; the backward is the table entry chosen by the caller."""

    @staticmethod
    def forward(ctx, spec: LayerSpec, mode: BackwardMode, opts, *inputs: Tensor):
        solved = spec.solve(opts, *inputs)
        ctx.save_for_backward(*solved.saved)
        ctx.spec, ctx.mode, ctx.opts = spec, mode, opts
        keys = tuple(solved.info.extra) if spec.extra_keys is None else spec.extra_keys
        record = solved.info.tensors(keys)
        ctx.mark_non_differentiable(*(t for t in record if t is not None))
        # the keys are a plain (non-tensor) output: autograd hands them back untouched
        return solved.y, keys, *record

    @staticmethod
    def backward(ctx, v: Tensor, _keys, *_record_grads):
        spec: LayerSpec = ctx.spec
        spec.check_first_order(ctx.mode)
        bctx = BackwardContext(ctx.saved_tensors, ctx.opts, ctx.needs_input_grad[3:])
        grads = spec.backward_for(ctx.mode)(bctx, v)
        return None, None, None, *grads


def run_layer(
    spec: LayerSpec, mode: BackwardMode, opts, *inputs: Tensor
) -> tuple[Tensor, SolverInfo]:
    """Solve the layer on ``inputs`` with the backward of ``mode``: y and its SolverInfo."""
    entry = spec.backward_for(mode)
    if isinstance(entry, Unrolled):
        with torch.enable_grad():
            solved = (entry.solve or spec.solve)(opts, *inputs)
        return solved.y, solved.info
    y, keys, *record = _DeclarativeFunction.apply(spec, mode, opts, *inputs)
    return y, SolverInfo.from_tensors(keys, record)


# ---------------------------------------------------------------------------------------------
# Module


class DeclarativeLayer(nn.Module):
    """Base of the layer modules: a backward mode and the record of the last forward solve.

    Profiling callbacks find layers by ``isinstance(m, DeclarativeLayer)``; ``last_info`` is the
    :class:`SolverInfo` of the most recent forward call (None before the first).
    """

    def __init__(self, backward_mode: BackwardMode | str = BackwardMode.IMPLICIT) -> None:
        super().__init__()
        self.backward_mode = backward_mode
        self.last_info: SolverInfo | None = None

    @property
    def backward_mode(self) -> BackwardMode:
        return self._backward_mode

    @backward_mode.setter
    def backward_mode(self, mode: BackwardMode | str) -> None:
        # a run-wide switch may assign a plain string: parse (and reject) it here, at once,
        # rather than at the next forward
        self._backward_mode = BackwardMode.parse(mode)

    def extra_repr(self) -> str:
        return f"backward_mode={self.backward_mode.value}"
