"""What the process's heap holds, and handing freed heap pages back to the system (glibc; RSS elsewhere).

A version's memory is what its load allocated and still holds: the heap in use after the load minus before it.
The resident size cannot say it: a load reuses pages an unloaded version freed, and RSS does not move.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None


_LIBC = _glibc()


def heap_in_use() -> int:
    """Bytes allocated and not freed, over every heap arena and every mmapped block; the RSS without glibc."""
    if _LIBC is None:
        return rss_bytes()
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def trim() -> None:
    """Give the free pages at the heaps' tops and in their holes back to the system (after a version is released)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident memory, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
