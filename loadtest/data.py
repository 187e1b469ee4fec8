"""What the load sends and how its results are read: sentences from a CSV, request bodies, the bodies file the
generators read, percentiles, and a service's /metrics.

(``locustfile.py`` keeps its own few lines of CSV reading: it must run alone in the compose ``loadtest`` image.)
"""

from __future__ import annotations

import csv
import json
import math
import random
import struct
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Body = tuple[int, bytes, int]  # (sentences in it, the body, the length of its JSON header: 0 for a JSON body)


def read_sentences(path: Path, column: str = "text") -> list[str]:
    """The non-empty values of ``column``; ``ValueError`` (one line) when the file or column is not there."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
            sentences = [row[column].strip() for row in reader if (row[column] or "").strip()]
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a UTF-8 CSV file ({error})") from None
    if not sentences:
        raise ValueError(f"{path}: no sentences in column {column!r}")
    return sentences


UNIQUE = "@@UNIQUE@@"  # the wrk script puts a number no request sent before in its place (workload "distinct")


def zipf_weights(count: int, exponent: float, seed: int = 0) -> list[float]:
    """Zipf weights over ``count`` items in a random order (rank r weighs 1 / r^exponent)."""
    ranks = list(range(1, count + 1))
    random.Random(seed).shuffle(ranks)
    return [rank ** -exponent for rank in ranks]


def request_bodies(sentences: Sequence[str], texts: int = 1, multi_percent: int = 0, multi_max: int = 8,
                   count: int = 4000, seed: int = 0, protocol: str = "classify", workload: str = "uniform",
                   zipf_s: float = 1.1) -> list[Body]:
    """``count`` request bodies of ``texts`` sentences each, or, with ``multi_percent``, that share of requests
    carrying 2 to ``multi_max`` texts and the rest one. ``protocol``: ``classify`` (``POST /classify`` JSON) or
    ``v2`` (an Open Inference Protocol request with the TEXT tensor in binary, as tritonclient sends by default,
    asking for every output in binary). ``workload``: the sentences drawn uniformly (``uniform``), by a Zipf law
    of exponent ``zipf_s`` over them (``zipf``: realistic repeats), or uniformly with ``UNIQUE`` appended to each
    (``distinct``: the wrk script makes every text one no request sent before; ``classify`` bodies only)."""
    rng, bodies = random.Random(seed), []
    weights = zipf_weights(len(sentences), zipf_s, seed) if workload == "zipf" else None
    for _ in range(count):
        k = rng.randint(2, multi_max) if multi_percent and rng.randrange(100) < multi_percent else texts
        chosen = rng.choices(sentences, weights, k=k)
        if workload == "distinct" and protocol == "classify":
            chosen = [f"{text} {UNIQUE}" for text in chosen]
        if protocol == "v2":
            bodies.append((len(chosen), *v2_binary(chosen)))
        else:
            body = {"text": chosen[0]} if len(chosen) == 1 else {"texts": chosen}
            bodies.append((len(chosen), json.dumps(body, ensure_ascii=False).encode(), 0))
    return bodies


def v2_binary(texts: Sequence[str]) -> tuple[bytes, int]:
    """A V2 infer body with the binary tensor data extension: (body, length of its JSON header)."""
    data = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts), 1],
                                     "parameters": {"binary_data_size": len(data)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + data, len(header)


def write_bodies(bodies: Sequence[Body], path: Path) -> float:
    """The generators' request file, ``<sentences>\t<JSON header length>\t<body in hex>`` per line; returns the
    mean sentences per body."""
    with path.open("w", encoding="ascii") as handle:
        for count, body, header in bodies:
            handle.write(f"{count}\t{header}\t{body.hex()}\n")
    return sum(body[0] for body in bodies) / len(bodies)


def read_bodies(path: Path) -> list[Body]:
    bodies = []
    for line in path.read_text(encoding="ascii").splitlines():
        count, header, body = line.split("\t")
        bodies.append((int(count), bytes.fromhex(body), int(header)))
    if not bodies:
        raise ValueError(f"{path}: no request bodies")
    return bodies


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..100) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share / 100 * len(ordered)) - 1))]


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (``/metrics``), parsed by ``prometheus_client``'s own parser:
    each with its full name (``scs_requests_total``, ``..._bucket``), its labels (unescaped) and its value."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape(url: str, headers: dict[str, str] | None = None) -> list[Sample]:
    """Every sample a service exports now (``url``/metrics, in the Prometheus text format)."""
    request = urllib.request.Request(f"{url}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return parse_metrics(response.read().decode())


def metric(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named exactly ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(sample.value for sample in samples
               if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()))
