"""The response cache of one served model version: a sentence's answer by its text, bounded in bytes.

An entry is what the model gave for a text: its probability vector, its classes ranked, whether the text was cut to
the model's length and its drift bins (length, unknown-token share, top score), packed in one ``bytes`` object
(float32 probabilities, then the ranking as uint8 or uint16, then four bytes). The probabilities come from the
model as float32 and the service hands them on as the Python floats of those float32 values, so the packed form
loses nothing: a cached answer is, byte for byte, the answer the model gave for that text when it was cached.
``top_k`` and thresholds are applied on the way out, so one entry serves every request shape.

Keys: the text itself, or, where the contract's encoder provably gives the same ids (``Encoder.cache_key``: its
plain-ASCII shortcut lower-cases the text before tokenizing), the lower-cased text.

Bounded by ``max_bytes``: an entry is charged the memory it holds (its key and its bytes, each as the allocator
rounds it, plus ``CONTAINER_BYTES`` for its place in the ordered dict, measured: README, "Response cache"); the least
recently used entries are evicted to make room. Used on the event loop only (no lock). The entries are packed on
the model thread (``pack``), where the batch's probabilities are still one array.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from .runtime import Scores

# Per entry, the ordered dict's share: its hash table slot and index (the table is 1.5x to 3x the entries) and the
# node of its linked list. Measured with tracemalloc at 10,000 to 200,000 entries: 66-92 bytes at rest, 98 while
# the table grows (both tables alive). The process's RSS grows more than the charge under a long flood of distinct
# texts (BENCHMARKS.md, "Response cache and priorities": the allocator's pools fragment as entries churn).
CONTAINER_BYTES = 100
TRUNCATED = 1  # the flag byte's bit: the text was cut to the model's max_length


def allocated(size: int) -> int:
    """The bytes the allocator hands out for an object of ``size``: pymalloc's 16-byte classes up to 512 bytes,
    malloc's chunk (16 bytes of header, 16-byte aligned) beyond."""
    return (size + 15) & ~15 if size <= 512 else (size + 31) & ~15


class ResponseCache:
    def __init__(self, max_bytes: int, num_classes: int, key: Callable[[str], str], metrics=None) -> None:
        self.max_bytes = max_bytes
        self.num_classes = num_classes
        self.key = key  # text -> cache key
        self.metrics = metrics  # ModelMetrics, or None
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self._rank = np.uint8 if num_classes <= 256 else np.uint16
        self._ranked_at = 4 * num_classes  # where the ranking starts in an entry
        self._flags_at = self._ranked_at + num_classes * np.dtype(self._rank).itemsize

    def __len__(self) -> int:
        return len(self.entries)

    # --- on the model thread ----------------------------------------------------------------------------------------

    def pack(self, probabilities: np.ndarray, ranked: np.ndarray, bins: Sequence[Sequence[int]] | None) -> list[bytes]:
        """One batch's entries: ``probabilities`` float32 [n, classes], ``ranked`` [n, classes], ``bins`` each
        sentence's drift bins (length, unknown tokens, class, top score) or None (no drift reference)."""
        count = len(probabilities)
        rows = np.empty((count, self._flags_at + 4), np.uint8)
        rows[:, :self._ranked_at] = np.ascontiguousarray(probabilities, np.float32).view(np.uint8)
        rows[:, self._ranked_at:self._flags_at] = ranked.astype(self._rank).view(np.uint8)
        rows[:, self._flags_at] = 0
        if bins is None:
            rows[:, self._flags_at + 1:] = 0
        else:
            rows[:, self._flags_at + 1:] = [(length, unknown, score) for length, unknown, _, score in bins]
        blob, size = rows.tobytes(), rows.shape[1]
        return [blob[start:start + size] for start in range(0, len(blob), size)]

    # --- on the event loop ------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: bytes, truncated: bool) -> None:
        """Keep ``entry`` for ``key`` (a key already held keeps its first answer), evicting the least recently used
        entries to stay within ``max_bytes``."""
        entries = self.entries
        if key in entries:
            return
        if truncated:
            entry = entry[:self._flags_at] + bytes((TRUNCATED,)) + entry[self._flags_at + 1:]
        size = self.charge(key, entry)
        if size > self.max_bytes:
            return
        self.bytes += size
        entries[key] = entry
        if self.bytes > self.max_bytes:
            evicted = 0
            while self.bytes > self.max_bytes:
                old_key, old = entries.popitem(last=False)
                self.bytes -= self.charge(old_key, old)
                evicted += 1
            if self.metrics is not None:
                self.metrics.cache_evicted(evicted)

    @staticmethod
    def charge(key: str, entry: bytes) -> int:
        return allocated(sys.getsizeof(key)) + allocated(sys.getsizeof(entry)) + CONTAINER_BYTES

    def scores(self, entry: bytes) -> Scores:
        """The answer an entry holds, as the model thread made it."""
        count = self.num_classes
        probabilities = np.frombuffer(entry, np.float32, count).tolist()
        if self._rank is np.uint8:
            ranked = list(entry[self._ranked_at:self._flags_at])
        else:
            ranked = np.frombuffer(entry, np.uint16, count, self._ranked_at).tolist()
        return Scores(probabilities, ranked)

    def truncated(self, entry: bytes) -> bool:
        return bool(entry[self._flags_at] & TRUNCATED)

    def bins(self, entry: bytes, top: int) -> tuple[int, int, int, int]:
        """The drift bins of the sentence an entry holds (``top``: its most likely class)."""
        flags = self._flags_at
        return entry[flags + 1], entry[flags + 2], top, entry[flags + 3]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
