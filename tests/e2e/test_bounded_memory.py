"""A batch of phone photos fits the submit function as deployed: ten records, each decoded, turned and written."""

from __future__ import annotations

import pytest

from benchmarks.batch_memory import peak_of_one_batch, stack_for_one_batch

pytestmark = pytest.mark.e2e

#: The bound the submit function's 512 MB must keep, with room for the rest of an invocation.
PEAK_BOUND_MB = 400


def test_ten_sideways_25_mp_photos_in_one_batch_stay_well_inside_the_functions_memory_size() -> None:
    # Measured in the function's own process (python3.13, the built artifact, the template's environment). Before the
    # decoding turn covered the read and the write, and before MALLOC_ARENA_MAX, this batch peaked at 1,815 MB: Lambda
    # ends such an invocation, and the batch's innocent records with it.
    with stack_for_one_batch() as stack:
        result = peak_of_one_batch(stack, count=10, width=6124, height=4082, prefix="bounded")
    assert result["failed_records"] == 0 and result["prepared"] == 10, result
    assert result["peak_rss_mb"] is not None and result["peak_rss_mb"] < PEAK_BOUND_MB < result["memory_size_mb"], result
