"""fp8norm.buffers: a read buffer is reused only once nothing else refers to its memory, and the pool
never holds more than was handed out at once."""

import torch

from fp8norm.buffers import BufferPool

MiB = 1 << 20


def test_a_buffer_still_viewed_is_not_reused():
    pool = BufferPool(100 * MiB)
    a, b = pool.take(8 * MiB), pool.take(8 * MiB)
    view = a[:10].view(torch.int16)  # e.g. an output that is the input tensor itself (repack)
    pool.give_back([a, b])
    assert pool.take(8 * MiB) is b
    c = pool.take(8 * MiB)
    assert c is not a  # still viewed: a fresh buffer instead
    del view
    pool.give_back([a])
    assert pool.take(8 * MiB) is a


def test_reuse_needs_a_close_fit_and_the_pool_stays_under_its_peak():
    pool = BufferPool(100 * MiB)
    a, b = pool.take(8 * MiB), pool.take(8 * MiB)
    pool.give_back([a, b])
    c = pool.take(5 * MiB)
    assert c is a or c is b  # 8 MiB serves 5 MiB (at most twice the size)
    d = pool.take(2 * MiB)
    assert d.numel() == 2 * MiB and d is not a and d is not b  # 8 MiB would waste more than half
    assert pool.held_bytes() == 10 * MiB  # the idle 8 MiB was dropped: never above the 16 MiB peak
    assert pool.take(1000).numel() == 1000 and pool.held_bytes() == 10 * MiB  # heap memory: not pooled


def test_forget_stops_tracking_buffers_still_in_use():
    pool = BufferPool(100 * MiB)
    a = pool.take(4 * MiB)
    keep = a[:1]
    pool.give_back([a])
    pool.forget([a])
    assert pool.held_bytes() == 0
    del keep
