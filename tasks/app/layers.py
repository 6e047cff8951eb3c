"""Finding the declarative layers inside a model, and setting their backward mode in one place."""

from __future__ import annotations

from torch import nn

from ddn_layers import BackwardMode, DeclarativeLayer


def declarative_layers(model: nn.Module) -> list[tuple[str, DeclarativeLayer]]:
    """``(qualified name, layer)`` for every DeclarativeLayer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DeclarativeLayer)]


def set_backward_mode(model: nn.Module, mode: BackwardMode) -> int:
    """Set ``mode`` on every declarative layer of ``model``; returns how many there are.

    Tasks build their layers in the default mode and the runner calls this once: walking the
    module tree is what makes ``ddn.backward_mode`` the one switch, since it also reaches
    layers nested inside third-party blocks and layers restored from a checkpoint.
    """
    layers = declarative_layers(model)
    for _, layer in layers:
        layer.backward_mode = mode
    return len(layers)
