"""A batch of phone photos fits the submit function as deployed: ten records, each decoded, turned and written."""

from __future__ import annotations

import pytest

from benchmarks.batch_memory import peak_of_one_batch, stack_for_one_batch

pytestmark = pytest.mark.e2e


def test_ten_sideways_12_mp_photos_in_one_batch_stay_inside_the_functions_memory_size() -> None:
    # Measured in the function's own process (python3.13, the built artifact, the template's environment): before
    # the decoding turn covered the read and the write, and before MALLOC_ARENA_MAX, this batch peaked at 1,083 MB.
    with stack_for_one_batch() as stack:
        result = peak_of_one_batch(stack, count=10, width=4000, height=3000, prefix="bounded")
    assert result["failed_records"] == 0 and result["prepared"] == 10, result
    # Lambda ends an invocation that passes its memory size, and the batch's innocent records with it.
    assert result["peak_rss_mb"] is not None and result["peak_rss_mb"] < result["memory_size_mb"], result
