"""The health check sees a runtime that leaves tasks unfinished (the watchdog then stops pinging)."""

import time
from types import SimpleNamespace

import torch

from farworker.petals.compat import import_petals
from farworker.petals.server_host import PetalsHost


def test_age_of_the_oldest_unfinished_task_in_a_real_petals_pool():
    import_petals()
    from petals.server.task_pool import PrioritizedTaskPool

    pool = PrioritizedTaskPool(lambda x: (x,), max_batch_size=16, name="probe", start=True)
    container = SimpleNamespace(runtime=SimpleNamespace(pools=[pool]))
    try:
        assert PetalsHost._oldest_task_age(container) == 0.0  # idle
        pool.submit_task(torch.zeros(1, 2, 4))  # nobody runs it: a stuck runtime
        deadline = time.monotonic() + 5
        while not pool._ordered_tasks.queue and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert PetalsHost._oldest_task_age(container) >= 0.3

        pool.load_batch_to_runtime(timeout=1)  # the runtime takes it and never answers
        assert not pool._ordered_tasks.queue
        assert PetalsHost._oldest_task_age(container) >= 0.3
    finally:
        pool.shutdown()
