"""The response cache's resident memory under a flood of distinct texts (``python -m loadtest.bench --cache-rss``).

    python -m loadtest.cache_rss [--texts 1000000] [--max-bytes 33554432]

One process: the artifact's real answers to the test sentences (the model run once per sentence, in batches of
64), then ``--texts`` distinct texts (each a test sentence and its number) put into a ``ResponseCache`` of
``--max-bytes`` the way the engine puts them (keys by the encoder's ``cache_key``, entries packed 64 at a time from
the real answers). The process's RSS is read before the flood and every 10,000 texts; the figure is the peak
growth over the empty cache's RSS, against ``--max-bytes`` (the bar: at most 10% over). Prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import psutil

import contract

from .data import read_sentences
from .processes import Parser

ROOT = Path(__file__).resolve().parent.parent


def flood(version_dir: Path, data: Path, texts: int, max_bytes: int) -> dict:
    from service.cache import ResponseCache

    artifact = contract.check(version_dir, intra_op_threads=1)
    manifest, sentences = artifact.manifest, read_sentences(data)
    ids = artifact.encoder.encode(sentences)[0]
    probabilities = np.concatenate([artifact.session.run(None, contract.inputs(ids[i:i + 64], manifest.pad_id,
                                                                                manifest.input_names))[0]
                                    for i in range(0, len(ids), 64)])
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    bins = [(len(s) % 256, 0, 0, 0) for s in ids]
    cache = ResponseCache(max_bytes, manifest.num_classes, artifact.encoder.cache_key)
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    peak, count = before, len(sentences)
    for start in range(0, texts, 64):
        rows = [i % count for i in range(start, min(texts, start + 64))]
        entries = cache.pack(probabilities[rows], ranked[rows], [bins[r] for r in rows])
        for offset, (row, entry) in enumerate(zip(rows, entries)):
            cache.put(cache.key(f"{sentences[row]} {start + offset}"), entry, False)
        if start % 10_000 < 64:
            peak = max(peak, process.memory_info().rss)
    peak = max(peak, process.memory_info().rss)
    growth = peak - before
    return {"texts": texts, "max_bytes": max_bytes, "entries": len(cache), "charged_bytes": cache.bytes,
            "rss_before": before, "rss_peak": peak, "rss_growth": growth, "growth_over_max": growth / max_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.cache_rss", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv")
    parser.add_argument("--texts", type=int, default=1_000_000)
    parser.add_argument("--max-bytes", type=int, default=32 * 2**20)
    args = parser.parse_args(argv)
    if args.texts < 1 or args.max_bytes < 1:
        parser.error("--texts and --max-bytes must be >= 1")
    print(json.dumps(flood(contract.version_folder(args.model_dir), args.data, args.texts, args.max_bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
