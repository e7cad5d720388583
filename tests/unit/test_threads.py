"""Which threads run torch on several cores: only the one that pins itself to them."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.model.threads import pin_torch_threads, run_on_new_thread


def _threads_of_a_new_thread() -> int:
    return run_on_new_thread(torch.get_num_threads, "probe")


def test_a_pinned_thread_keeps_its_count_and_the_others_keep_theirs() -> None:
    full = torch.get_num_threads()
    single = 1 if full != 1 else 2
    with ThreadPoolExecutor(
        max_workers=1, initializer=lambda: pin_torch_threads(single, default=full)
    ) as executor:
        x = torch.randn(64, 64)
        assert (
            executor.submit(lambda: ((x @ x).sum(), torch.get_num_threads())[1]).result() == single
        )
        assert _threads_of_a_new_thread() == full  # a thread that never pins gets the full count
        assert torch.get_num_threads() == full  # and so does this one
        assert executor.submit(torch.get_num_threads).result() == single  # it stays pinned


def test_work_on_a_new_thread_returns_its_result_or_raises_its_error() -> None:
    names: list[str] = []

    def work() -> int:
        names.append(threading.current_thread().name)
        return 7

    assert run_on_new_thread(work, "lks-job-test") == 7
    assert names == ["lks-job-test"]

    def fail() -> int:
        raise LookupError("no job")

    with pytest.raises(LookupError, match="no job"):
        run_on_new_thread(fail, "lks-job-test")
