"""Which threads of a process run torch's CPU operations on several cores.

On the CPU torch runs an operation on an OpenMP team owned by the calling thread, and the team
lives as long as that thread. GNU OpenMP spins between operations only while the process holds
no more team threads than cores; past that it puts idle workers to sleep, and every operation
then waits for its workers to wake: one live helper thread that once ran a two-threaded gate
query was enough to double the engine's decode step on a 2-core machine
(docs/results/serving.md). So in a server one thread, the engine's, runs on
several cores; the threads that prepare requests and load packs run single-threaded, and a
training job runs on a thread of its own that ends with the job.

torch keeps one process-wide count that a thread reads on its first operation, and
`torch.set_num_threads` sets it as well as the calling thread's own; `pin_torch_threads` puts
the process-wide count back, so a thread that never pins still gets the full count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def pin_torch_threads(count: int, *, default: int) -> None:
    """Run this thread's torch operations on `count` threads from now on; threads that never
    pin keep `default` (the process-wide count)."""
    torch.get_num_threads()  # this thread's first query: it reads the process-wide count once
    torch.set_num_threads(count)
    if count != default:  # set_num_threads also set the process-wide count: put it back
        restore = threading.Thread(target=torch.set_num_threads, args=(default,))
        restore.start()
        restore.join()


def run_on_new_thread(function: Callable[[], T], name: str) -> T:
    """`function()` on a thread that ends when it returns (its OpenMP team ends with it); its
    result or exception, here."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
