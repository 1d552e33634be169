"""Count the source tensors the output engine holds at once (weak references: no effect on lifetimes)."""

import weakref

import fp8norm.engine

# The engine's shard buffers hold the largest job's bytes each: source bytes alive at once stay within
# this many of them (read queue, compute, write queue, writer; outputs are often views of sources).
JOBS_IN_FLIGHT = 4


def track_reads(monkeypatch) -> dict:
    """Patch the engine's reader; the returned dict's 'peak' is the most source bytes alive at once."""
    real, alive, stats = fp8norm.engine.read_tensor, [], {"peak": 0, "reads": 0}

    def tracking(info, *args, **kwargs):
        t = real(info, *args, **kwargs)
        alive[:] = [(r, n) for r, n in alive if r() is not None]
        alive.append((weakref.ref(t), t.nbytes))
        stats["reads"] += 1
        stats["peak"] = max(stats["peak"], sum(n for _, n in alive))
        return t

    monkeypatch.setattr(fp8norm.engine, "read_tensor", tracking)
    return stats
