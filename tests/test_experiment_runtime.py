"""Process-level settings the agents apply (host allocator)."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: does a 20 MB tensor come from the heap (reused after free) or from its own
# mmap (handed back to the OS at free, page-faulted in again at the next allocation)?
BLOCK_IN_HEAP = textwrap.dedent("""
    import sys, torch
    from agents.harness.experiment import keep_freed_host_memory
    if sys.argv[1] == "keep":
        assert keep_freed_host_memory()
    block = torch.empty(5 << 20)  # 20 MB of float32
    address = block.data_ptr()
    with open("/proc/self/maps") as maps:
        heaps = [line.split()[0].split("-") for line in maps if line.rstrip().endswith("[heap]")]
    print(any(int(start, 16) <= address < int(end, 16) for start, end in heaps))
""")


def _block_in_heap(mode: str) -> bool:
    out = subprocess.run([sys.executable, "-c", BLOCK_IN_HEAP, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is a glibc setting; elsewhere keep_freed_host_memory is a no-op")
def test_multi_megabyte_blocks_come_from_the_reusable_heap():
    # glibc's default serves blocks this size with a fresh mmap each time: a CPU update, which
    # allocates and frees several, then takes hundreds of page faults (~1 ms measured on the dev VM).
    assert not _block_in_heap("default")
    assert _block_in_heap("keep")
