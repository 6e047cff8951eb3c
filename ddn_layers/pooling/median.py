"""The coordinate-wise median along the last dimension, fast for many short rows on a CPU.

``torch.median(dim=-1)`` selects row by row, with a fixed cost per row on a CPU that dominates
a robust pooling forward with many short rows (the ResNet case: 32 x 512 rows of 7 x 7 = 49
points). A selection network reaches the same value with a fixed sequence of elementwise minima
and maxima, each taken over all rows at once: Knuth's merge exchange sort (TAOCP 5.2.2,
Algorithm M, which takes any n) pruned to the operations that the median's output depends on,
578 of them for 49 points.

Which one runs is decided by a model of the cost of each (the ``*_US`` constants below, in
microseconds of one CPU thread, fitted to timings of both on shapes from (128, 16) to
(16384, 196); the timings are in docs/benchmarks/pool/README.md, "Design notes"). The network
is used only on a CPU (on a GPU one kernel per row beats hundreds of launches) and for n <= 256
(its program is built in Python once per n and cached). Its registers hold a block of
``NETWORK_BLOCK_ROWS`` rows at a time, in one buffer reused from block to block: registers for
every row of a large batch would be a fresh allocation, page-faulting on every call.

Long rows (n >= 2048, 8 rows and more) are selected by counting instead: there torch.median's
cost per point, whatever the values, is far above that of counting the points at or below a
threshold (one float comparison and a sum over all rows). Thresholds from a strided sample of
128 points per row bracket the median's rank; regula falsi on the counts narrows the bracket
until one end counts exactly k or k + 1 points, k = (n - 1) // 2; then the median is the
smallest point above the lower end, or the largest at or below the upper end. Every step keeps
count(x <= lo) <= k < count(x <= hi), so the value is exact whatever the thresholds were. A row
not settled after ``COUNTING_STEPS`` steps goes to torch.median.

All three return the lower median, the ((n - 1) // 2)-th smallest value, as torch.median does.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

MAX_NETWORK_POINTS = 256
NETWORK_BLOCK_ROWS = 16384
"""Rows whose registers are held at once: a block stays in the caches between operations, and
the ResNet case (32 x 512 rows) is one block."""
NETWORK_OP_BLOCK_US = 1.5
"""Cost model: dispatch of one elementwise minimum or maximum over a block of rows."""
NETWORK_OP_ROW_US = 0.00036
"""Cost model: one minimum or maximum of one row (a lane of that operation)."""
TORCH_MEDIAN_ROW_US = 0.2
"""Cost model: torch.median's fixed cost per row."""
TORCH_MEDIAN_POINT_US = 0.017
"""Cost model: torch.median's cost per point of a row."""
COUNTING_MIN_POINTS = 2048
COUNTING_MIN_ROWS = 8
"""Below these torch.median is faster: counting's fixed cost (several passes over the rows, a
few host syncs) outweighs what it saves per point."""
COUNTING_SAMPLE = 128
COUNTING_STEPS = 8


def _merge_exchange(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's merge exchange sort of n wires (ascending)."""
    pairs: list[tuple[int, int]] = []
    t = (n - 1).bit_length()
    p = 1 << (t - 1) if t else 0
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            pairs.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q // 2, p
        p //= 2
    return pairs


@cache
def median_program(n: int) -> tuple[tuple[tuple[bool, int, int, int], ...], int, int]:
    """The pruned network for the lower median of n values, as register operations.

    Returns (ops, registers, out): each op (is_min, a, b, o) writes min or max of registers
    a and b into register o; registers 0..n-1 start as the inputs; the median ends in
    register ``out``. Registers are reused once their value is dead, so ``registers`` is
    n plus a few.
    """
    # value ids: 0..n-1 the inputs, n + k the result of the k-th min/max
    wire = list(range(n))
    values: list[tuple[bool, int, int]] = []
    for i, j in _merge_exchange(n):
        a, b = wire[i], wire[j]
        values += [(True, a, b), (False, a, b)]
        wire[i], wire[j] = n + len(values) - 2, n + len(values) - 1
    target = wire[(n - 1) // 2]

    needed, kept = {target}, []
    for k in range(len(values) - 1, -1, -1):
        if n + k in needed:
            is_min, a, b = values[k]
            kept.append((n + k, is_min, a, b))
            needed.update((a, b))
    kept.reverse()

    last_use = {}
    for t, (_, _, a, b) in enumerate(kept):
        last_use[a] = last_use[b] = t
    reg = {v: v for v in range(n)}
    free: list[int] = []
    registers = n
    ops = []
    for t, (v, is_min, a, b) in enumerate(kept):
        ra, rb = reg[a], reg[b]
        for dead in {a, b}:
            if last_use[dead] == t:
                free.append(reg.pop(dead))
        if free:
            ro = free.pop()
        else:
            ro, registers = registers, registers + 1
        reg[v] = ro
        ops.append((is_min, ra, rb, ro))
    return tuple(ops), registers, reg[target]


def _network_pays(n: int, rows: int) -> bool:
    if n > MAX_NETWORK_POINTS:
        return False
    ops = len(median_program(n)[0])
    blocks = -(-rows // NETWORK_BLOCK_ROWS)
    network = ops * (NETWORK_OP_BLOCK_US * blocks + NETWORK_OP_ROW_US * rows)
    return network < rows * (TORCH_MEDIAN_ROW_US + TORCH_MEDIAN_POINT_US * n)


def _network_median(x: Tensor) -> Tensor:
    n = x.shape[-1]
    ops, registers, out = median_program(n)
    flat = x.reshape(-1, n)
    rows = flat.shape[0]
    # the registers hold one block of rows at a time, in one buffer reused block after block:
    # registers x all rows would be a fresh, page-faulting allocation at large batches, and a
    # block's registers stay in cache between operations
    block = min(rows, NETWORK_BLOCK_ROWS)
    buf = x.new_empty(registers, block)
    result = x.new_empty(rows)
    for r0 in range(0, rows, block):
        part = flat[r0 : r0 + block]
        k = part.shape[0]
        regs = buf[:, :k].unbind(0)
        buf[:n, :k].copy_(part.T)
        for is_min, a, b, o in ops:
            (torch.minimum if is_min else torch.maximum)(regs[a], regs[b], out=regs[o])
        result[r0 : r0 + k] = regs[out]
    return result.reshape(x.shape[:-1])


def _counting_pays(x: Tensor) -> bool:
    n = x.shape[-1]
    return (
        x.dtype in (torch.float32, torch.float64)
        and COUNTING_MIN_POINTS <= n < 1 << 24  # counts summed in float32 stay exact
        and x.numel() // n >= COUNTING_MIN_ROWS
    )


def _counting_median(x: Tensor, steps: int | None = None) -> Tensor:
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    k = (n - 1) // 2
    big = torch.finfo(x.dtype).max
    # amin and amax rather than torch.aminmax, which is much slower over the last dim on a CPU
    mn, mx = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    if bool(mn.min() < -big / 4) or bool(mx.max() > big / 4):
        # the masked extremes below add +-big to excluded points, which must then stay
        # beyond every kept one
        return x.median(-1).values
    buf = torch.empty_like(flat)

    def count_le(t: Tensor) -> Tensor:
        # a float mask: comparisons written to bool are slower on a CPU
        return torch.le(flat, t, out=buf).sum(-1, keepdim=True)

    def min_above(t: Tensor) -> Tensor:
        return torch.le(flat, t, out=buf).mul_(big).add_(flat).amin(-1, keepdim=True)

    def max_at_or_below(t: Tensor) -> Tensor:
        return torch.gt(flat, t, out=buf).mul_(-big).add_(flat).amax(-1, keepdim=True)

    # a bracket from the sample: about 2.5 standard deviations of the sample median's rank
    # either side; where the sample missed, that end moves to the row's extreme
    sample = flat[:, :: max(n // COUNTING_SAMPLE, 1)]
    m = sample.shape[-1]
    d = int(2.5 * (m / 4) ** 0.5) + 1
    lo = sample.kthvalue(max((m - 1) // 2 - d, 0) + 1, -1, keepdim=True).values
    hi = sample.kthvalue(min((m - 1) // 2 + d, m - 1) + 1, -1, keepdim=True).values
    clo, chi = count_le(lo), count_le(hi)
    missed_lo, missed_hi = clo > k, chi <= k
    if bool((missed_lo | missed_hi).any()):
        lo = torch.where(missed_lo, mn, lo)
        clo = torch.where(missed_lo, count_le(mn), clo)
        hi = torch.where(missed_hi, mx, hi)
        chi = torch.where(missed_hi, torch.full_like(chi, n), chi)
    # invariant from here on: clo = count(x <= lo) <= k < chi = count(x <= hi), except
    # clo > k where lo is the row's minimum and holds rank k itself
    for _ in range(COUNTING_STEPS if steps is None else steps):
        todo = (clo < k) & (chi > k + 1)
        if not bool(todo.any()):
            break
        t = torch.lerp(lo, hi, (k + 0.5 - clo) / (chi - clo))
        c = count_le(t)
        up, down = todo & (c > k), todo & (c <= k)
        hi, chi = torch.where(up, t, hi), torch.where(up, c, chi)
        lo, clo = torch.where(down, t, lo), torch.where(down, c, clo)
    above = min_above(lo)
    value = torch.where(clo > k, lo, above)  # clo == k: the smallest point above lo
    settled = clo >= k
    from_hi = (chi == k + 1) & ~settled
    if bool(from_hi.any()):
        value = torch.where(from_hi, max_at_or_below(hi), value)
        settled = settled | from_hi
    if not bool(settled.all()):
        # one value repeated across rank k leaves no threshold between its copies: it is
        # the smallest point above lo when that point already counts past k
        settled = settled | (count_le(above) > k)
        rows = (~settled[:, 0]).nonzero()[:, 0]
        if len(rows):
            value[rows] = flat[rows].median(-1, keepdim=True).values
    return value.reshape(x.shape[:-1])


def coordinate_median(x: Tensor) -> Tensor:
    """The lower median along the last dimension: x (..., n) -> (...), n >= 1, finite x.

    Differentiable as torch.median is (the gradient goes to one point holding the median).
    """
    n = x.shape[-1]
    if x.device.type != "cpu" or n < 3:
        return x.median(-1).values
    if _network_pays(n, x.numel() // n):
        select = _network_median
    elif _counting_pays(x):
        select = _counting_median
    else:
        return x.median(-1).values
    if not (torch.is_grad_enabled() and x.requires_grad):
        return select(x)
    with torch.no_grad():
        value = select(x)
        at = (x == value[..., None]).to(torch.uint8).argmax(-1, keepdim=True)
    return x.gather(-1, at)[..., 0]
