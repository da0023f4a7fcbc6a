"""Process plumbing: returning free heap memory to the system."""

from __future__ import annotations

import sys

import pytest

from obanpro.process import release_free_memory
from obanpro.runtime import resident_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_memory_shrinks_resident_size() -> None:
    # Blocks over 512 bytes come from malloc, not from Python's small-object
    # allocator. Keeping every 64th one pins the heap, so free() alone gives
    # back almost nothing of the rest.
    blocks = [bytes(4_000) for _ in range(20_000)]
    pinned = blocks[::64]
    del blocks
    before = resident_bytes()

    assert release_free_memory()

    after = resident_bytes()
    assert len(pinned) == 313
    assert before - after > 40 * 1024 * 1024, f"resident size went from {before} to {after} bytes"
