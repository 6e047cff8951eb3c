"""Keypoint matcher: shared attention encoder, cosine scores, Sinkhorn with a dustbin.

Both sets go through the same encoder: coordinates standardised per set, a point's own
position, the shape of its k nearest neighbours (an edge convolution) and its pixel patch (a
linear map or a small CNN) embedded, then
alternating self-attention (within a set) and cross-attention (to the other set), so every
embedding can depend on both sets. Scores are cosine similarities of the final embeddings.

The dustbin is one extra row and column of the score matrix holding a learnable score, and the
marginals say how much mass each row and column carries: 1 for every real point, ``n`` for the
dustbin row (every point of set 1 may be unmatched) and ``m`` for the dustbin column. Padding
entries are 0. ``ddn.OptimalTransport`` needs no special case for either: it solves an
ordinary balanced problem with non-uniform marginals, and zeros are its padding. It normalises
the marginals to unit mass, so ``assignment = P * (m + n)`` restores rows and columns that sum
to one for real points: ``assignment[i, j]`` is the probability that point i of set 0 matches
point j of set 1, ``assignment[i, n]`` that it has no match. The layer returns log P (exact
where P underflows), so the model's output and the loss are log-assignments.

``transport="unbalanced"`` replaces the dustbin with soft marginals (``ddn.sinkhorn``'s
``marginal_penalty``): the mass a point's row transports is its odds of having a match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ddn_layers as ddn
from tasks.matching.config import DESCRIPTORS, TRANSPORTS

Batch = Mapping[str, torch.Tensor]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)


def standardize(points: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Per-set standardisation of (B, K, 2) coordinates; padding rows are left at zero.

    ``center``: less the mean, over the RMS distance to it (removes translation and scale);
    ``whiten``: times the inverse square root of the covariance, so that two sets related by
    an affine map differ by a rotation only (outliers bias the estimate, the encoder copes).
    """
    if how == "none":
        return points
    w = mask.unsqueeze(-1).to(points.dtype)
    x = (points - _masked_mean(points, mask)) * w
    count = w.sum(1, keepdim=True).clamp_min(1)
    if how == "center":
        rms = ((x**2).sum(-1, keepdim=True).sum(1, keepdim=True) / count).sqrt()
        return x / rms.clamp_min(1e-6)
    cov = x.transpose(1, 2) @ x / count
    a, b, d = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    # C^(-1/2) = adj(C + sI) / (s t), s = sqrt(det C), t = sqrt(tr C + 2 s), is differentiable
    # where the eigenvalues coincide (an eigendecomposition's gradient is infinite there); the
    # floor on det C, relative to the trace, touches only sets on a line or at one point.
    trace = a + d
    det = (a * d - b * b).clamp_min((1e-6 * trace) ** 2 + torch.finfo(x.dtype).tiny)
    s = det.sqrt()
    t = (trace + 2 * s).sqrt()
    inv_sqrt = torch.stack([d + s, -b, -b, a + s], dim=-1).view(-1, 2, 2) / (s * t).view(-1, 1, 1)
    return x @ inv_sqrt / math.sqrt(2.0)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` (B, K, ...) zero-padded (False for masks) along dim 1 to ``length``."""
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad)


def _mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def _radial_frame(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, the unit vector from the centroid (the origin after standardisation) and
    its normal: coordinates in this frame do not change under rotations about the centroid."""
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return u, torch.stack([-u[..., 1], u[..., 0]], dim=-1)


class LocalShape(nn.Module):
    """Embedding of the offsets from a point to its ``k`` nearest neighbours in its own set:
    a shared MLP on each offset (with the point's own position), max over the neighbours.
    Padded points are never neighbours; a point with none gets zeros."""

    def __init__(self, k: int, dim: int, radial_frame: bool = False) -> None:
        super().__init__()
        self.k = k
        self.radial_frame = radial_frame
        # One linear map per edge and the MLP after the max: k times fewer rows than an MLP
        # per edge.
        self.edge = nn.Linear(3 if radial_frame else 4, dim)
        self.post = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, K, _ = x.shape
        k = min(self.k, K - 1)
        if k <= 0:
            return x.new_zeros(B, K, self.edge.out_features)
        dist = torch.cdist(x, x)
        eye = torch.eye(K, dtype=torch.bool, device=x.device)
        dist = dist.masked_fill(~mask.unsqueeze(1) | eye, math.inf)
        nd, idx = dist.topk(k, dim=-1, largest=False)  # (B, K, k)
        neighbours = x.gather(1, idx.reshape(B, K * k, 1).expand(-1, -1, 2)).view(B, K, k, 2)
        centre = x.unsqueeze(2).expand(-1, -1, k, -1)
        offsets = neighbours - centre
        if self.radial_frame:
            # Offsets in each point's radial frame (unit vector from the centroid, and its
            # normal), with the point's radius: unchanged by any rotation about the centroid.
            radius = x.norm(dim=-1, keepdim=True)
            u, v = _radial_frame(x)
            along = (offsets * u.unsqueeze(2)).sum(-1, keepdim=True)
            across = (offsets * v.unsqueeze(2)).sum(-1, keepdim=True)
            edge_in = torch.cat([radius.unsqueeze(2).expand(-1, -1, k, -1), along, across], -1)
        else:
            edge_in = torch.cat([centre, offsets], dim=-1)
        feats = self.edge(edge_in)
        valid = torch.isfinite(nd).unsqueeze(-1)
        pooled = feats.masked_fill(~valid, -math.inf).amax(2)
        return self.post(torch.where(valid.any(2), pooled, 0.0))


class PatchEncoder(nn.Module):
    """A small CNN on square pixel patches: (B, K, p * p) -> (B, K, dim), computed for the
    real points only (``mask`` (B, K)); padding rows stay zero. A 5 x 5 and a 3 x 3
    convolution, both of stride 2 (the first at full resolution dominates a CPU's time, so it
    strides at once), keep the patch's layout, which a linear map of the flattened output
    reads, so where a feature lies in the patch counts."""

    def __init__(self, patch: int, dim: int, channels: int = 16) -> None:
        super().__init__()
        self.patch = patch
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        side = (patch + 3) // 4
        self.out = nn.Linear(2 * c * side * side, dim)

    def forward(self, desc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = self.patch
        # Unit-norm patches have pixels of about 1/p: scaled back to unit variance.
        real = desc[mask].view(-1, 1, p, p) * p
        out = desc.new_zeros(*mask.shape, self.out.out_features)
        out[mask] = self.out(self.conv(real))
        return out


class Attention(nn.Module):
    """Pre-norm multi-head attention from ``x`` to ``context`` plus an MLP, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), _mlp(dim, 2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` (B, L): the real points of ``context`` (B, L, dim)."""
        B, K, D = x.shape
        h = self.heads
        q = self.q(self.norm(x)).view(B, K, h, D // h).transpose(1, 2)
        k, v = self.kv(self.norm_ctx(context)).view(B, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)
        # Padded keys are masked out; every set has a real point, so no row is all masked.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out(attended.transpose(1, 2).reshape(B, K, D))
        return x + self.mlp(x)


class MatchingNet(nn.Module):
    """``net(batch) -> log_assignment`` (B, M+1, N+1), where ``batch`` holds ``kpts0``,
    ``kpts1``, ``mask0``, ``mask1`` and optionally ``desc0``, ``desc1`` (see ``collate_pairs``).

    ``log_assignment[b, :m, :n]`` holds log match probabilities, column N the dustbin of set 0
    and row M the dustbin of set 1 (rows and columns of real points sum to 1 in probability;
    padding is -inf). ``descriptor``: ``linear`` or ``cnn`` (:class:`PatchEncoder`, ``channels``
    wide) on the patches; ``transport``: ``dustbin`` or ``unbalanced`` (KL price ``rho``).
    The OT layer is ``self.ot``, a ``ddn.OptimalTransport`` in its default backward mode until
    the run's ``ddn.backward_mode`` is set on the whole model.
    """

    def __init__(
        self,
        dim: int = 64,
        layers: int = 3,
        heads: int = 4,
        knn: int = 8,
        normalize: str = "center",
        radial_frame: bool = False,
        descriptor_dim: int = 0,
        descriptor: str = "linear",
        channels: int = 16,
        transport: str = "dustbin",
        rho: float = 1.0,
        gamma: float = 10.0,
        ot_tol: float = 1e-4,
        ot_max_iter: int = 500,
        ot_kwargs: dict[str, Any] | None = None,
        dustbin_init: float = 0.0,
    ) -> None:
        super().__init__()
        if normalize not in ("none", "center", "whiten"):
            raise ValueError(
                f"normalize must be one of ['none', 'center', 'whiten'], got {normalize!r}"
            )
        if descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {list(DESCRIPTORS)}, got {descriptor!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {transport!r}")
        if descriptor == "cnn" and math.isqrt(descriptor_dim) ** 2 != descriptor_dim:
            raise ValueError(
                f"descriptor='cnn' needs square patches: descriptor_dim={descriptor_dim}"
            )
        self.normalize = normalize
        self.radial_frame = radial_frame
        self.transport = transport
        self.position = _mlp(3 if radial_frame else 2, dim, dim)
        self.local = LocalShape(knn, dim, radial_frame) if knn > 0 else None
        self.descriptor: nn.Module | None = None
        if descriptor_dim and descriptor == "cnn":
            self.descriptor = PatchEncoder(math.isqrt(descriptor_dim), dim, channels)
        elif descriptor_dim:
            self.descriptor = nn.Linear(descriptor_dim, dim)
        self.self_attn = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.cross_attn = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.dustbin = nn.Parameter(torch.tensor(float(dustbin_init)))
        self.ot = ddn.OptimalTransport(
            gamma=gamma,
            tol=ot_tol,
            max_iter=ot_max_iter,
            marginal_penalty=rho if transport == "unbalanced" else None,
            log_plan=True,
            **(ot_kwargs or {}),
        )

    def embed(self, x: torch.Tensor, mask: torch.Tensor, desc: torch.Tensor | None) -> torch.Tensor:
        """Initial embeddings (B, K, dim) of standardised points ``x``."""
        if self.radial_frame:
            # The radius is the part of the position no rotation about the centroid changes.
            h = self.position(torch.cat([x, x.norm(dim=-1, keepdim=True)], dim=-1))
        else:
            h = self.position(x)
        if self.local is not None:
            h = h + self.local(x, mask)
        if self.descriptor is not None and desc is not None:
            h = h + self._describe(desc, mask)
        return h

    def _describe(self, desc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.descriptor, PatchEncoder):
            return self.descriptor(desc, mask)
        return self.descriptor(desc)

    def descriptors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned descriptors before any attention, unit-normalised: (B, M, dim) and
        (B, N, dim) (zero on padding). What mutual nearest neighbours on the model's own
        descriptors match, without the encoder's context or the OT layer."""
        if self.descriptor is None or "desc0" not in batch:
            raise ValueError("descriptors: the model has no descriptor or the batch no desc0")
        out = [
            F.normalize(self._describe(batch[f"desc{s}"], batch[f"mask{s}"]), dim=-1) for s in "01"
        ]
        return out[0], out[1]

    def scores(self, batch: Batch) -> torch.Tensor:
        """Cosine similarities (B, M, N) of the final embeddings, in [-1, 1]."""
        kpts0, kpts1, mask0, mask1 = (batch[k] for k in ("kpts0", "kpts1", "mask0", "mask1"))
        B, M, N = kpts0.shape[0], kpts0.shape[1], kpts1.shape[1]
        # Both sets go through every layer as one batch of 2B sets padded to a common length:
        # half the operations, whose overhead is what these small tensors cost.
        length = max(M, N)
        points = torch.cat([_pad(kpts0, length), _pad(kpts1, length)])
        mask = torch.cat([_pad(mask0, length), _pad(mask1, length)])
        desc = None
        if "desc0" in batch and "desc1" in batch:
            desc = torch.cat([_pad(batch["desc0"], length), _pad(batch["desc1"], length)])
        h = self.embed(standardize(points, mask, self.normalize), mask, desc)
        # Each set's context in cross-attention is the other set of its pair.
        other = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(points.device)
        for self_attn, cross_attn in zip(self.self_attn, self.cross_attn, strict=True):
            h = self_attn(h, h, mask)
            h = cross_attn(h, h[other], mask[other])
        f = F.normalize(self.head(h), dim=-1)
        return f[:B, :M] @ f[B:, :N].transpose(1, 2)

    def forward(self, batch: Batch) -> torch.Tensor:
        """The log-assignment (B, M+1, N+1) of a batch as ``collate_pairs`` makes it: log
        match probabilities, column N and row M the log probabilities of no match (-inf on
        padding)."""
        S = self.scores(batch)
        if self.transport == "unbalanced":
            return self._unbalanced(S, batch["mask0"], batch["mask1"])
        return self._dustbin(S, batch["mask0"], batch["mask1"])

    def _dustbin(self, S: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor) -> torch.Tensor:
        B, M, N = S.shape
        bin_col = self.dustbin.expand(B, M, 1)
        bin_row = self.dustbin.expand(B, 1, N + 1)
        S = torch.cat([torch.cat([S, bin_col], dim=2), bin_row], dim=1)
        m = mask0.sum(1, keepdim=True).to(S.dtype)
        n = mask1.sum(1, keepdim=True).to(S.dtype)
        r = torch.cat([mask0.to(S.dtype), n], dim=1)
        c = torch.cat([mask1.to(S.dtype), m], dim=1)
        # log P is exact where P underflows, -inf on padding: the loss needs no floor.
        return self.ot(-S, r, c) + (m + n).log().unsqueeze(-1)

    def _unbalanced(
        self, S: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor
    ) -> torch.Tensor:
        """Soft marginals instead of a dustbin: a unit of mass per real point, which the plan
        may exceed or leave untransported at a KL price (``rho``). The mass q a point's row
        (column) transports is its odds of having a match: no match has probability
        1 / (1 + q), and the pair (i, j) the plan's entry over the geometric mean of its row's
        and column's 1 + q. All of it is log P and log1p(q): exact, no floor. The learnable
        ``dustbin`` score is the similarity that breaks even: costs are ``dustbin - S``."""
        log_p = self.ot(self.dustbin - S, mask0.to(S.dtype), mask1.to(S.dtype))
        # Padding rows (columns) are all -inf, whose logsumexp has a NaN gradient: zeros there.
        alone0 = -F.softplus(log_p.masked_fill(~mask0.unsqueeze(2), 0.0).logsumexp(2))
        alone1 = -F.softplus(log_p.masked_fill(~mask1.unsqueeze(1), 0.0).logsumexp(1))
        core = log_p + (alone0.unsqueeze(2) + alone1.unsqueeze(1)) / 2
        alone0 = alone0.masked_fill(~mask0, -math.inf)
        alone1 = alone1.masked_fill(~mask1, -math.inf)
        corner = S.new_full((S.shape[0], 1, 1), -math.inf)
        core = torch.cat([core, alone0.unsqueeze(2)], dim=2)
        return torch.cat([core, torch.cat([alone1.unsqueeze(1), corner], dim=2)], dim=1)


def matching_nll(
    log_assignment: torch.Tensor,
    matches0: torch.Tensor,
    matches1: torch.Tensor,
    mask0: torch.Tensor,
    mask1: torch.Tensor,
    unmatched_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample loss (B,) of a log-assignment (B, M+1, N+1): mean -log probability of the
    ground-truth matches, plus ``unmatched_weight`` times the mean -log probability of no
    match of the unmatched points of both sets. Each mean is over that sample's own terms (a
    sample without unmatched points contributes no dustbin term), so a sample's loss does
    not depend on what it is batched with or how much it is padded."""
    M, N = log_assignment.shape[1] - 1, log_assignment.shape[2] - 1
    matched = matches0 >= 0
    to = matches0.clamp_min(0).unsqueeze(-1)
    match_logp = log_assignment[:, :M].gather(2, to).squeeze(-1)
    # where, not a product: padding and unmatched entries may be -inf.
    zero = log_assignment.new_zeros(())
    match_nll = -torch.where(matched, match_logp, zero).sum(1) / matched.sum(1).clamp_min(1)
    alone0 = mask0 & (matches0 < 0)
    alone1 = mask1 & (matches1 < 0)
    bin_logp = torch.where(alone0, log_assignment[:, :M, N], zero).sum(1)
    bin_logp = bin_logp + torch.where(alone1, log_assignment[:, M, :N], zero).sum(1)
    bin_nll = -bin_logp / (alone0.sum(1) + alone1.sum(1)).clamp_min(1)
    return match_nll + unmatched_weight * bin_nll


def mutual_matches(
    assignment: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Predicted ``matches0`` (B, M): j for the pairs that are each other's argmax over the
    real (non-dustbin) part and have assignment probability above ``threshold``; -1 else."""
    core = assignment[:, :-1, :-1].masked_fill(~(mask0.unsqueeze(2) & mask1.unsqueeze(1)), -1.0)
    best1 = core.argmax(2)  # (B, M)
    best0 = core.argmax(1)  # (B, N)
    rows = torch.arange(core.shape[1], device=core.device)
    mutual = best0.gather(1, best1) == rows
    prob = core.gather(2, best1.unsqueeze(-1)).squeeze(-1)
    return torch.where(mutual & (prob > threshold) & mask0, best1, -1)
