"""Entropy-regularised optimal transport (Sinkhorn) with four backward modes."""

from ddn_layers.ot.function import OptimalTransport, sinkhorn

__all__ = ["OptimalTransport", "sinkhorn"]
