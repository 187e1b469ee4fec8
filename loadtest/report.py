"""Turn one harness run into its bars, tables (Markdown), a plot (PNG) and the BENCHMARKS.md section.

    python -m loadtest.report loadtest/results/bench.json      # redraw the tables and plot of a run, no measuring
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- bench:begin (written by python -m loadtest.bench) -->", "<!-- bench:end -->"


def closed(points: list[dict], config: str) -> list[dict]:
    return sorted((p for p in points if p["config"] == config and p["mode"] == "closed"), key=lambda p: p["load"])


def at(points: list[dict], config: str, level: int) -> dict | None:
    return next((p for p in closed(points, config) if p["load"] == level), None)


def peak(points: list[dict], config: str) -> dict | None:
    """The closed-loop point with the most requests/s for ``config``."""
    mine = closed(points, config)
    return max(mine, key=lambda p: p["rps"]) if mine else None


def ceilings(run: dict) -> dict[str, float]:
    """M and M_tok (sentences/s in process), H_fastapi, H_raw and G_const (requests/s at the highest level <= 64
    measured), and the composite ceilings one request at a time cannot beat: 1 / (1/M_tok + 1/H)."""
    found: dict[str, float] = {}
    ceiling = run.get("ceiling") or {}
    for key in ("M", "M_tok"):
        if key in ceiling:
            found[key] = ceiling[key]["sentences_per_s"]
    levels = [level for level in _levels(run["points"]) if level <= 64]
    for config, key in (("fastapi", "H_fastapi"), ("raw", "H_raw"), ("grpc-const", "G_const")):
        point = at(run["points"], config, max(levels)) if levels else None
        if point:
            found[key] = point["rps"]
    for key, name in (("H_fastapi", "fastapi"), ("H_raw", "raw"), ("G_const", "grpc")):
        if "M_tok" in found and key in found:
            found[f"ceiling_{name}"] = 1 / (1 / found["M_tok"] + 1 / found[key])
    return found


def batching_gain(run: dict) -> float | None:
    """The model's own gain from batching in process: its best length-grouped batch over batch 1, sentences/s,
    tokenization included (what a server's batching can at most win over one run per request)."""
    rows = [r for r in (run.get("ceiling") or {}).get("rows", []) if r["tokenize"]]
    one = next((r["sentences_per_s"] for r in rows if r["batch"] == 1), None)
    return max(r["sentences_per_s"] for r in rows) / one if rows and one else None


def bars(run: dict) -> list[dict]:
    """The performance bars this run can judge: each with its value and passed True/False, or None when the run
    did not measure what it needs."""
    points, rows = run["points"], []

    def bar(name: str, value: str, passed: bool | None) -> None:
        rows.append({"bar": name, "value": value, "passed": passed})

    known = ceilings(run)
    on64, levels = at(points, "on", 64), _levels(points)
    if on64 and "ceiling_raw" in known:
        share = on64["rps"] / known["ceiling_raw"]
        bar("c=64: on >= 80% of the raw ceiling 1/(1/M_tok + 1/H_raw)",
            f"{share:.0%} ({on64['rps']:,.0f} / {known['ceiling_raw']:,.0f} req/s)", share >= 0.80)
    pairs = [(level, at(points, "off", level), at(points, "naive", level)) for level in levels]
    pairs = [(level, off, naive) for level, off, naive in pairs if off and naive]
    if pairs:
        worst = min(pairs, key=lambda p: p[1]["rps"] / p[2]["rps"])
        bar("batching off >= naive at every concurrency",
            "off/naive " + ", ".join(f"c={level}: {off['rps'] / naive['rps']:.2f}" for level, off, naive in pairs),
            worst[1]["rps"] >= worst[2]["rps"])
    on1, naive1 = at(points, "on", 1), at(points, "naive", 1)
    if on1 and naive1:
        bar("c=1: on's p99 within 10% of naive's", f"{on1['p99_ms']:.2f} vs {naive1['p99_ms']:.2f} ms",
            on1["p99_ms"] <= 1.10 * naive1["p99_ms"])
    top = max((p for p in closed(points, "on") if "padding_ratio" in p), key=lambda p: p["load"], default=None)
    if top and top["load"] >= 32:
        bar(f"padded/real tokens at saturation (c={top['load']}) <= 1.2", f"{top['padding_ratio']:.3f}",
            top["padding_ratio"] <= 1.2)
    v2, on = at(points, "v2", 64), at(points, "on", 64)
    if v2 and on:
        share = v2["rps"] / on["rps"]
        bar("c=64: V2 (binary) within 15% of /classify", f"{share:.2f}x ({v2['rps']:,.0f} / {on['rps']:,.0f} req/s)",
            share >= 0.85)
    grpc64 = at(points, "grpc", 64)
    if grpc64 and "ceiling_grpc" in known:
        share = grpc64["rps"] / known["ceiling_grpc"]
        v2_ratio = f"; gRPC / V2 REST {grpc64['rps'] / v2['rps']:.2f}x" if v2 else ""
        bar("c=64: gRPC >= 75% of its ceiling 1/(1/M_tok + 1/G_const)",
            f"{share:.0%} ({grpc64['rps']:,.0f} / {known['ceiling_grpc']:,.0f} req/s{v2_ratio})", share >= 0.75)
    for name, title, floor in (("traced", "tracing on (every request, a live collector)", 0.90),
                               ("traced-dead", "tracing on, collector down (closed port)", 0.95)):
        traced = at(points, name, 64)
        if traced and on:
            share = traced["rps"] / on["rps"]
            bar(f"c=64: {title} >= {floor:.0%} of tracing off", f"{share:.3f}x ({traced['rps']:,.0f} / "
                f"{on['rps']:,.0f} req/s)", share >= floor)
    gain = batching_gain(run)
    on64, naive64 = at(points, "on", 64), at(points, "naive", 64)
    if gain and on64 and naive64 and run["meta"].get("model_kind") == "encoder":
        share = on64["rps"] / naive64["rps"] / gain
        bar("encoder, c=64: on / naive >= 0.9x the model's in-process batching gain (best length-grouped batch "
            "over batch 1, with tokenization)", f"{share:.2f}x (on / naive {on64['rps'] / naive64['rps']:.2f}, "
            f"gain {gain:.2f})", share >= 0.9)
        ons = [(level, at(points, "on", level), at(points, "naive", level)) for level in levels]
        ons = [(level, a, b) for level, a, b in ons if a and b]
        bar("encoder: on >= naive at every concurrency",
            ", ".join(f"c={level}: {a['rps'] / b['rps']:.2f}" for level, a, b in ons),
            all(a["rps"] >= b["rps"] for _, a, b in ons))
    peers = [name for name in run.get("peers", []) if closed(points, name)]
    if peers:
        ratios = []
        for level in levels:
            mine, theirs = at(points, "on", level), [at(points, name, level) for name in peers]
            theirs = [p for p in theirs if p]
            if mine and theirs:
                best = max(theirs, key=lambda p: p["rps"])
                ratios.append((level, mine["rps"] / best["rps"], best["config"]))
        if ratios:
            bar("on >= 3x the best peer at every c >= 8, >= 1.5x at c=1",
                ", ".join(f"c={level}: {ratio:.2f}x {name}" for level, ratio, name in ratios),
                all(ratio >= (1.5 if level < 8 else 3.0) for level, ratio, _ in ratios))
    one, every = peak(points, "on"), peak(points, "cores")
    if one and every:
        scale = every["sentences_per_s"] / one["sentences_per_s"]
        bar("one worker per core >= 1.8x one worker on one core (sentences/s at peak; meant for 64-text requests)",
            f"{scale:.2f}x ({every['sentences_per_s']:,.0f} / {one['sentences_per_s']:,.0f}; "
            f"{run['meta'].get('mix', '')})", scale >= 1.8)
    cache_bars(run, bar)
    # Open-loop rates above a configuration's closed-loop peak overload it on purpose: its unanswered requests
    # there are the finding the open-loop table shows, not errors of the run.
    peaks = {config: peak(points, config)["rps"] for config in {p["config"] for p in points} if peak(points, config)}
    counted = [p for p in points if p["mode"] == "closed" or p["load"] < peaks.get(p["config"], 0)]
    errors = sum(p["errors"] for p in counted)
    bar("no errors in any closed-loop point, nor at open-loop rates below a configuration's peak",
        f"{errors} errors", errors == 0)
    return rows


def cache_bars(run: dict, bar) -> None:
    """Issue 26's bars: the response cache against no cache at c=64 (by the run's workload), cached answers bit for
    bit, priorities at 3x overload, the cache's RSS under a flood of distinct texts."""
    points, meta = run["points"], run.get("meta", {})
    cached, plain = at(points, "cached", 64), at(points, "on", 64)
    workload = meta.get("workload", "uniform")
    if cached and plain and workload in ("zipf", "distinct"):
        floor = 2.0 if workload == "zipf" else 0.97
        share = cached["rps"] / plain["rps"]
        name = f"Zipf (s={meta.get('zipf_s', 1.1):g})" if workload == "zipf" else "all-distinct"
        bar(f"c=64, {name} workload: cache on >= {floor:g}x cache off (req/s)",
            f"{share:.2f}x ({cached['rps']:,.0f} / {plain['rps']:,.0f} req/s; hit ratio "
            f"{cached.get('cache_hit_ratio', 0):.1%})", share >= floor)
    equality = run.get("cache_equality")
    if equality:
        bar(f"cached answers equal uncached ones bit for bit ({equality['sentences']:,} test sentences)",
            f"{equality['bit_equal']:,} / {equality['sentences']:,} equal, all from the cache: {equality['all_hits']}",
            equality["bit_equal"] == equality["sentences"] and equality["all_hits"])
    priorities = run.get("priorities")
    if priorities:
        on, off = priorities["runs"]["on"], priorities["runs"]["off"]
        high, low = on["levels"]["high"], on["levels"]["low"]
        bar("3x overload, 10% high: high level 0 rejections", f"{high['rejected']} (low: {low['rejected']:,})",
            high["rejected"] == 0)
        bar("3x overload, 10% high: high p99 <= 1/4 of low's", f"{high['p99_ms']:,.0f} vs {low['p99_ms']:,.0f} ms",
            high["p99_ms"] <= low["p99_ms"] / 4)
        drop = 1 - on["answered_rps"] / off["answered_rps"] if off["answered_rps"] else 1.0
        bar("3x overload: total throughput with priorities >= 95% of without",
            f"{on['answered_rps']:,.0f} vs {off['answered_rps']:,.0f} req/s ({-drop:+.1%})", drop <= 0.05)
    rss = run.get("cache_rss")
    if rss:
        bar(f"cache RSS under {rss['texts']:,} distinct texts <= 1.1x its setting",
            f"{rss['rss_growth'] / 2**20:,.1f} MiB peak growth for {rss['max_bytes'] / 2**20:,.0f} MiB "
            f"({rss['growth_over_max']:.2f}x; {rss['entries']:,} entries)", rss["growth_over_max"] <= 1.10)


def _levels(points: list[dict]) -> list[int]:
    return sorted({p["load"] for p in points if p["mode"] == "closed"})


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(run: dict, plot_name: str | None = "bench.png") -> str:
    """Bars, ceilings, ratios by level, requests/s and p99 by level, open loop, every point, setup."""
    points, names, meta = run["points"], run["names"], run["meta"]
    configs = [c for c in run["configs"] if closed(points, c)]
    levels = _levels(points)
    out = [f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), {meta['pinning']}; "
           f"1-minute load average {meta.get('load_average', 'n/a')}; {meta.get('seconds', '?')} s in all.", ""]
    if run.get("bars"):
        out += ["| bar | value | passed |", "|---|---|---|"]
        out += [f"| {b['bar']} | {b['value']} | {_verdict(b['passed'])} |" for b in run["bars"]]
        out.append("")
    known = ceilings(run)
    if known:
        out += ["| ceiling | value | what |", "|---|---|---|"]
        about = {"M": "sentences/s, model in process (1 thread, best grouped batch), ids given",
                 "M_tok": "sentences/s, the same with tokenization in each run",
                 "H_fastapi": "req/s, constant-answer FastAPI app", "H_raw": "req/s, constant-answer raw ASGI app",
                 "G_const": "calls/s, constant-answer grpcio asyncio server (gRPC)",
                 "ceiling_fastapi": "req/s, 1/(1/M_tok + 1/H_fastapi)", "ceiling_raw": "req/s, 1/(1/M_tok + 1/H_raw)",
                 "ceiling_grpc": "calls/s, 1/(1/M_tok + 1/G_const)"}
        out += [f"| {key} | {value:,.0f} | {about[key]} |" for key, value in known.items()]
        out.append("")
    out += ["Ratios at each concurrency (requests/s of the first over the second, measured seconds apart):", ""]
    out += _ratios(points, levels)
    out += ["", "Requests/s by closed-loop concurrency:", ""]
    out += _by_level(points, names, configs, levels, "rps", 0, meta)
    out += ["", "p99 latency (ms) by closed-loop concurrency:", ""]
    out += _by_level(points, names, configs, levels, "p99_ms", 2, meta)
    if any(_disturbed(p, meta) for p in points):
        out += ["", f"† other processes used more than {meta['max_other_cpu']:.0%} of the server's core during this "
                "point, measured twice: the figure understates the configuration."]
    opened = [p for p in points if p["mode"] == "open"]
    if opened:
        out += ["", "Open loop (requests start at a fixed rate whatever the latency; latency of the answered requests "
                "counts from each request's due time, so queueing shows):", "",
                "| configuration | offered req/s | answered req/s | p50 ms | p90 ms | p99 ms | errors | lag ms |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {names[p['config']]} | {p['load']:,.0f} | {p['rps']:,.0f} | {p['p50_ms']:,.1f} | {p['p90_ms']:,.1f} "
                f"| {p['p99_ms']:,.1f} | {_errors(p)} | {p.get('lag_ms', 0):,.0f} |" for p in opened]
    if plot_name:
        out += ["", f"![requests/s and p99 latency by concurrency]({plot_name})"]
    out += ["", "Every closed-loop point (CPU: seconds per second of the point; CPU per request split into the "
            "event-loop thread and the model threads; mean batch and padding from the service's own metrics):", "",
            "| configuration | clients | req/s | sentences/s | p50 ms | p99 ms | errors | server CPU | others on its "
            "core | load CPU | CPU us/request (loop + model) | mean batch | padded/real |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted((p for p in points if p["mode"] == "closed"), key=lambda p: (configs.index(p["config"]), p["load"])):
        split = p.get("cpu_us_per_request")
        cpu = f"{split['event_loop']:,.0f} + {split['model']:,.0f}" if split else "-"
        out.append(f"| {names[p['config']]} | {p['load']} | {p['rps']:,.0f} | {p['sentences_per_s']:,.0f} "
                   f"| {p['p50_ms']:,.2f} | {p['p99_ms']:,.2f} | {_errors(p)} | {p.get('server_cpu', 0):.2f} "
                   f"| {_share(p.get('other_cpu'))} | {p.get('load_cpu', 0):.2f} | {cpu} "
                   f"| {_number(p.get('mean_batch'), 1)} | {_number(p.get('padding_ratio'), 3)} |")
    ceiling = run.get("ceiling")
    if ceiling and ceiling.get("rows"):
        sizes = sorted({r["batch"] for r in ceiling["rows"]})
        out += ["", "Model in process (sentences/s, 1 thread on the server core, batches of similar length):", "",
                "| | " + " | ".join(f"batch {size}" for size in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for tokenize in (False, True):
            rates = {r["batch"]: r["sentences_per_s"] for r in ceiling["rows"] if r["tokenize"] == tokenize}
            out.append(f"| {'with tokenization' if tokenize else 'ids given'} | "
                       + " | ".join(_number(rates.get(size)) for size in sizes) + " |")
    out += ["", "Setup:", ""]
    out += [f"- {names[c]}: `{run['commands'][c]}`" for c in configs]
    out += [f"- request mix: {meta['mix']}", f"- load generator: {meta['generator']}",
            f"- versions: {meta['versions']}", f"- model: {meta['model']}", f"- command: `{meta['command']}`"]
    out += [f"- not measured: {name} ({why})" for name, why in run.get("skipped", {}).items()]
    return "\n".join(out) + "\n"


def _ratios(points: list[dict], levels: list[int]) -> list[str]:
    pairs = [("on", "off"), ("on", "naive"), ("off", "naive"), ("v2", "on"), ("grpc", "v2"), ("grpc", "on"),
             ("grpc-const", "raw"), ("cores", "on"), ("on", "fastapi"), ("on", "raw"), ("on", "reference"),
             ("traced", "on"), ("traced-sampled", "on"), ("traced-dead", "on")]
    pairs = [(a, b) for a, b in pairs if closed(points, a) and closed(points, b)]
    if not pairs:
        return ["(no two configurations measured)"]
    rows = [f"| ratio | {' | '.join(f'c={level}' for level in levels)} |", f"|---|{'---:|' * len(levels)}"]
    for a, b in pairs:
        cells = []
        for level in levels:
            first, second = at(points, a, level), at(points, b, level)
            cells.append(f"{first['rps'] / second['rps']:.2f}x" if first and second and second["rps"] else "-")
        rows.append(f"| {a} / {b} | {' | '.join(cells)} |")
    return rows


def _verdict(passed: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: "not measured"}[passed]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _disturbed(point: dict, meta: dict) -> bool:
    """Other processes took a real share of the server's core during this point, even after a second try."""
    return (point.get("other_cpu") or 0.0) > meta.get("max_other_cpu", 1.0)


def _errors(point: dict) -> str:
    kinds = point.get("error_kinds")
    if point["errors"] and kinds:
        return f"{point['errors']} ({', '.join(f'{k}: {v}' for k, v in kinds.items())})"
    return str(point["errors"])


def _by_level(points, names, configs, levels, key, digits, meta) -> list[str]:
    rows = [f"| configuration | {' | '.join(f'c={level}' for level in levels)} |", f"|---|{'---:|' * len(levels)}"]
    for config in configs:
        cells = []
        for level in levels:
            found = at(points, config, level)
            if not found:
                cells.append("-")
                continue
            marks = (" (errors)" if found["errors"] else "") + (" †" if _disturbed(found, meta) else "")
            cells.append(_number(found[key], digits) + marks)
        rows.append(f"| {names[config]} | {' | '.join(cells)} |")
    return rows


CONSTANT_APPS = ("fastapi", "raw")  # the HTTP ceilings: no model, an answer written once (tens of thousands of req/s)


def plot(run: dict, path: Path) -> None:
    """Requests/s and p99 latency against closed-loop concurrency, one line per configuration, one colour each.

    The constant-answer apps (H_fastapi, H_raw) answer an order of magnitude faster than anything that runs the
    model: on one linear axis with the servers they flatten every other line, so they get a throughput panel of
    their own; the servers that run the model share the first panel, on a linear axis that starts at 0 so their
    ratios read as they are. p99 latency of every configuration is on a log axis (it spans 0.1 ms to seconds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    points, names = run["points"], run["names"]
    shown = [config for config in run["configs"] if closed(points, config)]
    models = [config for config in shown if config not in CONSTANT_APPS]
    ceilings_shown = [config for config in shown if config in CONSTANT_APPS]
    colours = {config: f"C{index % 10}" for index, config in enumerate(shown)}
    panels = 3 if models and ceilings_shown else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 5))
    rate_axes = {"models": axes[0]} if models else {}
    if ceilings_shown:
        rate_axes["ceilings"] = axes[1] if models else axes[0]
    p99_axis = axes[-1]

    def draw(axis, config: str, key: str, floor: float = 0.0) -> None:
        mine = closed(points, config)
        axis.plot([p["load"] for p in mine], [max(p[key], floor) for p in mine], "o-", color=colours[config],
                  label=names[config])

    for config in models:
        draw(rate_axes["models"], config, "rps")
    for config in ceilings_shown:
        draw(rate_axes["ceilings"], config, "rps")
    for config in shown:
        draw(p99_axis, config, "p99_ms", 0.01)
    titles = {"models": "throughput: configurations that run the model", "ceilings": "throughput: HTTP ceilings "
              "(constant answer, no model)"}
    for key, axis in rate_axes.items():
        axis.set_title(titles[key], fontsize=10)
        axis.set_ylabel("requests/s")
        axis.set_ylim(bottom=0)
    p99_axis.set_title("p99 latency, every configuration", fontsize=10)
    p99_axis.set_ylabel("ms (log)")
    p99_axis.set_yscale("log")
    p99_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    levels = sorted({p["load"] for config in shown for p in closed(points, config)})
    for axis in axes:
        axis.set_xlabel("concurrent clients (closed loop, log)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels)
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = p99_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"{run['meta']['cpu']}: server on one core, load on another", fontsize=9)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def update_benchmarks(path: Path, section: str) -> None:
    """Replace the section between the markers in BENCHMARKS.md (create the file if needed), keep the rest."""
    block = f"{BEGIN}\n{section}{END}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or not Path(args[0]).is_file():
        print("error: usage: python -m loadtest.report path/to/bench.json", file=sys.stderr)
        return 2
    source = Path(args[0])
    try:
        run = json.loads(source.read_text(encoding="utf-8"))
        run["bars"] = bars(run)
        plot(run, source.with_name("bench.png"))
        source.with_name("bench.md").write_text(markdown(run, "bench.png"), encoding="utf-8")
    except (ValueError, KeyError, TypeError) as error:
        print(f"error: {source}: not a harness result ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    print(f"wrote {source.with_name('bench.md')} and {source.with_name('bench.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
