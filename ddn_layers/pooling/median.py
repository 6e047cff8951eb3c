"""The coordinate-wise median along the last dimension, fast for many short rows on a CPU.

``torch.median(dim=-1)`` selects row by row, with a fixed cost of about a microsecond per row
on a CPU: at the ResNet case (32 x 512 rows of 7 x 7 = 49 points) that is 17 ms, three
times the rest of a robust pooling forward. A selection network reaches the same value with
a fixed sequence of elementwise minima and maxima, each taken over all rows at once: Knuth's
merge exchange sort (TAOCP 5.2.2, Algorithm M, which takes any n) pruned to the operations
that the median's output depends on, 578 of them for 49 points, 4.3 ms there.

Which one runs is a cost estimate, in microseconds, of this project's 2-core Xeon VM (torch
2.14.1, one thread): the network costs ``ops * (1.5 * blocks + 0.00036 * rows)`` (dispatch per
block of 16384 rows, then lanes), ``torch.median`` ``rows * (0.2 + 0.017 * n)``. Both were
measured on shapes from (128, 16) to (16384, 196) and the estimate picked the faster one on
each. The network is used only on a CPU (on a GPU one kernel per row beats hundreds of
launches) and for n <= 256 (its program is built in Python once per n and cached). The
network's registers hold a block of 16384 rows at a time, in one buffer reused from block to
block: at 128 x 2048 rows of 49 (ResNet-50 features, batch 128) a buffer for all rows (54 MB)
page-faulted on every call, 116 ms against 67-74 ms in blocks.

Both return the lower median, the ((n - 1) // 2)-th smallest value, as torch.median does.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

MAX_NETWORK_POINTS = 256
NETWORK_BLOCK_ROWS = 16384
"""Rows whose registers are held at once (3.3 MB for 49 points): the ResNet case in one."""


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
    return ops * (1.5 * blocks + 0.00036 * rows) < rows * (0.2 + 0.017 * n)


def _network_median(x: Tensor) -> Tensor:
    n = x.shape[-1]
    ops, registers, out = median_program(n)
    flat = x.reshape(-1, n)
    rows = flat.shape[0]
    # the registers hold one block of rows at a time, in one buffer reused block after block:
    # registers x all rows would be a fresh, page-faulting allocation at large batches (54 MB
    # at 128 x 2048 rows of 49), and a block's registers stay in cache between operations
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


def coordinate_median(x: Tensor) -> Tensor:
    """The lower median along the last dimension: x (..., n) -> (...), n >= 1, finite x.

    Differentiable as torch.median is (the gradient goes to one point holding the median).
    """
    n = x.shape[-1]
    if x.device.type != "cpu" or n < 3 or not _network_pays(n, x.numel() // n):
        return x.median(-1).values
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _network_median(x)
    with torch.no_grad():
        value = _network_median(x)
        at = (x == value[..., None]).to(torch.uint8).argmax(-1, keepdim=True)
    return x.gather(-1, at)[..., 0]
