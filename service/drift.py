"""Input drift: does the traffic still look like the training data?

Each engine keeps the last ``window`` served sentences' bins in four signals (``contract.drift_bins``: length,
share of unknown tokens, predicted class, top probability) and compares each signal's distribution with the
reference its manifest recorded at export, by the population stability index
PSI = sum((p - q) * ln(p / q)) over the bins (both shares floored at ``FLOOR`` so an empty bin stays finite).
A signal alerts above ``alert_psi`` (0.25 by default, the usual "significant shift" rule) once the window holds
at least ``MIN_SENTENCES`` (or is full, when smaller); until then ``scs_drift_psi`` shows 0. It is fed on the model
thread after each batch (one append and four counter updates per sentence) and, for answers from the response
cache, on the event loop, under one lock; it is read on the event loop, and a PSI or report is computed under the
lock too, so it never sees a sentence half counted.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence

import contract

FLOOR = 1e-4
MIN_SENTENCES = 100


class DriftMonitor:
    def __init__(self, manifest: contract.Manifest, window: int, alert_psi: float) -> None:
        sizes = contract.drift_sizes(manifest.num_classes)
        self.names = list(sizes)
        self.reference = []
        for name, size in sizes.items():
            try:
                shares = [float(share) for share in manifest.drift["reference"][name]]
            except (KeyError, TypeError, ValueError):
                raise contract.ArtifactError(f"manifest.json: drift.reference.{name} is missing or not a list of "
                                             "numbers") from None
            if len(shares) != size or not all(math.isfinite(q) and 0 <= q <= 1 for q in shares):
                raise contract.ArtifactError(f"manifest.json: drift.reference.{name} must hold {size} shares in "
                                             f"[0, 1], one per bin (has {len(shares)})")
            self.reference.append([max(share, FLOOR) for share in shares])
        self.unk_id = manifest.unk_id
        self.window, self.alert_psi = window, alert_psi
        self.recent: deque[tuple[int, int, int, int]] = deque()
        self.counts = [[0] * size for size in sizes.values()]
        self.lock = threading.Lock()

    def bins(self, ids: Sequence[Sequence[int]], classes: Sequence[int],
             scores: Sequence[float]) -> list[tuple[int, int, int, int]]:
        """Each sentence's bin in every signal (``contract.drift_bins``)."""
        bins, unk = contract.drift_bins, self.unk_id
        return [bins(sentence, unk, top, score) for sentence, top, score in zip(ids, classes, scores)]

    def observe(self, rows: Sequence[tuple[int, int, int, int]]) -> None:
        """Served sentences' bins into the window: from the model thread after a batch, and from the event loop for
        cache hits, so under the lock (an uncontended lock costs about 0.1 us; counts updated from two threads
        without it could lose increments)."""
        recent, counts, window = self.recent, self.counts, self.window
        with self.lock:
            for row in rows:
                recent.append(row)
                for signal, b in enumerate(row):
                    counts[signal][b] += 1
                if len(recent) > window:
                    for signal, b in enumerate(recent.popleft()):
                        counts[signal][b] -= 1

    @property
    def enough(self) -> bool:
        """The window holds enough sentences for its shares to mean something (or is full, if it is smaller)."""
        return len(self.recent) >= min(MIN_SENTENCES, self.window)

    def gauge(self, signal: int) -> float:
        """What ``scs_drift_psi`` shows: the PSI once the window holds enough sentences, 0 before."""
        return self.psi(signal) if self.enough else 0.0

    def psi(self, signal: int) -> float:
        with self.lock:
            return self._psi(signal)

    def _psi(self, signal: int) -> float:
        total = len(self.recent)
        if not total:
            return 0.0
        value = 0.0
        for count, q in zip(self.counts[signal], self.reference[signal]):
            p = max(count / total, FLOOR)
            value += (p - q) * math.log(p / q)
        return value

    def report(self) -> dict:
        with self.lock:
            return self._report()

    def _report(self) -> dict:
        sentences, enough = len(self.recent), self.enough
        signals = {}
        for index, name in enumerate(self.names):
            psi = self._psi(index)
            signals[name] = {"psi": round(psi, 4), "alert": enough and psi > self.alert_psi,
                             "window": [round(c / sentences, 4) if sentences else 0.0 for c in self.counts[index]],
                             "reference": [round(q, 4) for q in self.reference[index]]}
        return {"sentences": sentences, "window": self.window, "measure": "population stability index",
                "alert_psi": self.alert_psi, "min_sentences": MIN_SENTENCES, "enough": enough,
                "alert": any(s["alert"] for s in signals.values()), "signals": signals}
