"""Overlapping host work with device work: `prefetch` runs the next item's preparation in one background thread
while the caller consumes the current one.

Why a thread is enough: while the consumer waits on a jitted computation (`np.asarray` of its result), JAX has
released the GIL, so the tokenisers (Rust, also GIL-free in `encode_batch`), numpy and the searcher's own device
calls of the next batch run beside it. One worker, one item ahead: items are produced in order, by one thread, from
one iterator, so anything stateful in the producer (a random-passage generator, a data stream's position) advances
exactly as it would without the overlap, and the consumer sees the same items in the same order.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
U = TypeVar("U")


def prefetch(items: Iterable[T], prepare: Callable[[T], U], enabled: bool = True) -> Iterator[U]:
    """`prepare(item)` for each item, in order; with `enabled`, item n+1's is computed in a background thread while
    the caller works on item n's result. An exception in `prepare` is raised to the caller at that item."""
    if not enabled:
        yield from map(prepare, items)
        return
    iterator = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = None
        for item in iterator:
            if pending is None:
                pending = pool.submit(prepare, item)
                continue
            following = pool.submit(prepare, item)
            yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()
