"""glibc's heap as `immich_ml.memory` sets it: freed model buffers go back while sessions are built, and a
capped number of malloc arenas. Each case runs in a fresh interpreter: the settings hold for the whole process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Frees one 8 MiB array (glibc's own threshold then rises to 8 MiB), fills 41 arrays of 2 MiB, frees every other
# one (20, each between two kept ones, so none borders the heap's top) and prints how much anonymous memory that
# gave back.
_FREED = """
import contextlib, json, sys
import numpy as np
from immich_ml.memory import large_blocks_mapped

def anonymous_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

def churn():
    np.ones(8 << 20, np.uint8)
    blocks = [np.ones(2 << 20, np.uint8) for _ in range(41)]
    filled = anonymous_mib()
    del blocks[0:40:2]
    return filled - anonymous_mib()

if sys.argv[1] == "loading":
    with large_blocks_mapped():
        print(json.dumps(churn()))
else:
    with large_blocks_mapped() if sys.argv[1] == "after" else contextlib.nullcontext():
        pass
    print(json.dumps(churn()))
"""

# Eight threads each allocate outside Python's small-object allocator, all at once; prints glibc's arena count.
_ARENAS = """
import ctypes, json, sys, threading
from immich_ml.memory import cap_heap_arenas

if sys.argv[1] != "default":
    assert cap_heap_arenas(int(sys.argv[1]))
start = threading.Barrier(8)

def allocate():
    kept = bytearray(4096)
    start.wait()

threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.open_memstream.restype = ctypes.c_void_p
text, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(json.dumps(text.value.decode().count("<heap nr=")))
"""


def run(program: str, argument: str) -> float:
    done = subprocess.run([sys.executable, "-c", program, argument], capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout))


def test_while_sessions_are_built_freed_large_blocks_go_back_to_the_os() -> None:
    assert run(_FREED, "loading") >= 36


@pytest.mark.parametrize("when", ["after", "never"])
def test_otherwise_the_heap_keeps_them_for_the_next_request(when: str) -> None:
    """What serving wants (no fresh mapping per request), and the case that shows the test above can fail."""
    assert run(_FREED, when) < 8


def test_the_arena_cap_holds_however_many_threads_allocate() -> None:
    assert run(_ARENAS, "2") <= 2


def test_without_the_cap_each_thread_gets_an_arena() -> None:
    assert run(_ARENAS, "default") >= 8
