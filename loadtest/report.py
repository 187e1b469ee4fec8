"""Turn one harness run into tables (Markdown), a plot (PNG) and the BENCHMARKS.md section. Ratios first."""

from __future__ import annotations

import re
from pathlib import Path

BEGIN, END = "<!-- bench:begin (written by python -m loadtest.bench) -->", "<!-- bench:end -->"


def peak(points: list[dict], config: str) -> dict | None:
    """The closed-loop point with the most sentences/s for ``config``."""
    mine = [p for p in points if p["config"] == config and p["mode"] == "closed"]
    return max(mine, key=lambda p: p["sentences_per_s"]) if mine else None


def ratios(run: dict) -> list[tuple[str, str, str]]:
    """(comparison, value, how) rows: the service with batching against each reference, from peak sentences/s."""
    points, names = run["points"], run["names"]
    service = peak(points, "batching")
    rows = []

    def add(label: str, other: float | None, kind: str, how: str) -> None:
        if service is None or not other:
            rows.append((label, "n/a", "not measured in this run"))
        elif kind == "x":
            rows.append((label, f"**{service['sentences_per_s'] / other:.2f}x**", how))
        else:
            rows.append((label, f"**{service['sentences_per_s'] / other:.0%}**", how))

    for key, label, kind in (("no-batching", "batching on vs off", "x"), ("naive-torch", "vs naive torch", "x"),
                             ("constant", "share of the HTTP ceiling", "%")):
        other = peak(points, key)
        add(label, other and other["sentences_per_s"], kind,
            f"{_peak_text(service)} / {names.get(key, key)} {_peak_text(other)}" if other else "")
    ceiling = run.get("ceiling", {}).get("best")
    add("share of the in-process model ceiling", ceiling and ceiling["sentences_per_s"], "%",
        f"{_peak_text(service)} / onnxruntime {ceiling['sentences_per_s']:,.0f} sentences/s at batch "
        f"{ceiling['batch']}, 1 thread" if ceiling else "")
    return rows


def _peak_text(point: dict | None) -> str:
    if point is None:
        return "n/a"
    return f"{point['sentences_per_s']:,.0f} sentences/s (c={point['load']})"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(run: dict, plot_name: str | None = "bench.png") -> str:
    """The whole report: ratios, p99 by concurrency, throughput by concurrency, open loop, every point, setup."""
    points, names, meta = run["points"], run["names"], run["meta"]
    configs = [c for c in run["configs"] if any(p["config"] == c for p in points)]
    levels = sorted({p["load"] for p in points if p["mode"] == "closed"})
    out = [f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), {meta['pinning']}; "
           f"1-minute load average {meta.get('load_average', 'n/a')}; {meta.get('seconds', '?')} s in all.", ""]
    out += ["| the service with batching | value | from |", "|---|---|---|"]
    out += [f"| {label} | {value} | {how} |" for label, value, how in ratios(run)]
    out += ["", "p99 latency (ms) by closed-loop concurrency (clients each waiting for their answer):", ""]
    out += _by_level(points, names, configs, levels, "p99_ms", 1, meta)
    out += ["", "Sentences/s by closed-loop concurrency:", ""]
    out += _by_level(points, names, configs, levels, "sentences_per_s", 0, meta)
    if any(_disturbed(p, meta) for p in points):
        out += ["", f"† other processes used more than {meta['max_other_cpu']:.0%} of the server's core during this "
                "point, measured twice: the figure understates the configuration."]
    opened = [p for p in points if p["mode"] == "open"]
    if opened:
        out += ["", "Open loop (requests start at a fixed rate whatever the latency; latency, of the answered "
                "requests, counts from each request's due time, so queueing shows; errors: HTTP refusals, or "
                "Timeout when no answer came within the grace period after the last start):", "",
                "| configuration | offered req/s | answered req/s | sentences/s | p50 ms | p90 ms | p99 ms | errors "
                "| generator lag ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in opened:
            out.append(f"| {names[p['config']]} | {p['load']:,.0f} | {p['rps']:,.0f} | {p['sentences_per_s']:,.0f} "
                       f"| {p['p50_ms']:,.1f} | {p['p90_ms']:,.1f} | {p['p99_ms']:,.1f} | {_errors(p)} "
                       f"| {p.get('lag_ms', 0):,.0f} |")
    if plot_name:
        out += ["", f"![latency percentiles vs throughput]({plot_name})"]
    out += ["", "Every closed-loop point (CPU columns: CPU seconds per second of the point. Server CPU below 1.0 at "
            "high concurrency means the server waited on something; others on server core: other processes' use of "
            "the server's core; load CPU near 1.0 would mean the load generator, not the server, was the limit):", "",
            "| configuration | generator | clients | req/s | sentences/s | p50 ms | p90 ms | p99 ms | errors "
            "| server CPU | others on server core | load CPU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        if p["mode"] in ("closed", "check"):
            out.append(f"| {names[p['config']]} | {p['generator']} | {p['load']} | {p['rps']:,.0f} "
                       f"| {p['sentences_per_s']:,.0f} | {p['p50_ms']:,.1f} | {p['p90_ms']:,.1f} | {p['p99_ms']:,.1f} "
                       f"| {_errors(p)} | {p.get('server_cpu', 0):.2f} | {_share(p.get('other_cpu'))} "
                       f"| {p.get('load_cpu', 0):.2f} |")
    check = _generator_check(points)
    if check:
        out += ["", check]
    ceiling = run.get("ceiling")
    if ceiling and ceiling.get("rows"):
        out += ["", "In-process onnxruntime ceiling (no HTTP; 1 intra-op thread on the server core; batches of "
                "similar length, as `python -m model_export bench` groups them):", "",
                "| batch | sentences/s |", "|---:|---:|"]
        out += [f"| {r['batch']} | {r['sentences_per_s']:,.0f} |" for r in ceiling["rows"]]
    out += ["", "Setup:", ""]
    out += [f"- {names[c]}: `{run['commands'][c]}`" for c in configs]
    out += [f"- request mix: {meta['mix']}", f"- load generator: {meta['generator']}",
            f"- versions: {meta['versions']}", f"- model: {meta['model']}", f"- command: `{meta['command']}`"]
    if run.get("skipped"):
        out += [f"- not measured: {name} ({why})" for name, why in run["skipped"].items()]
    return "\n".join(out) + "\n"


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
    rows = [f"| configuration | {' | '.join(f'c={level}' for level in levels)} |",
            f"|---|{'---:|' * len(levels)}"]
    for config in configs:
        cells = []
        for level in levels:
            found = [p for p in points if p["config"] == config and p["mode"] == "closed" and p["load"] == level]
            if not found:
                cells.append("-")
                continue
            marks = (" (errors)" if found[0]["errors"] else "") + (" †" if _disturbed(found[0], meta) else "")
            cells.append(_number(found[0][key], digits) + marks)
        rows.append(f"| {names[config]} | {' | '.join(cells)} |")
    return rows


def _generator_check(points: list[dict]) -> str | None:
    checks = [p for p in points if p["mode"] == "check"]
    if not checks:
        return None
    check = checks[0]
    same = [p for p in points if p["mode"] == "closed" and p["config"] == check["config"] and p["load"] == check["load"]]
    if not same:
        return None
    wrk = same[0]
    return (f"Generator check, same server ({check['config']}) at {check['load']} clients: {wrk['generator']} "
            f"{wrk['rps']:,.0f} req/s with {wrk['load_cpu']:.2f} CPU, Locust (one process, FastHttpUser) "
            f"{check['rps']:,.0f} req/s with {check['load_cpu']:.2f} CPU.")


def plot(run: dict, path: Path) -> None:
    """Latency percentiles (p50, p90, p99) against sentences/s, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, names = run["points"], run["names"]
    figure, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, config in enumerate(c for c in run["configs"] if any(p["config"] == c for p in points)):
        colour = colours[index % len(colours)]
        for mode, style, marker in (("closed", "-", "o"), ("open", "--", "x")):
            mine = sorted((p for p in points if p["config"] == config and p["mode"] == mode and p["rps"] > 0),
                          key=lambda p: p["load"])
            if not mine:
                continue
            for axis, key in zip(axes, ("p50_ms", "p90_ms", "p99_ms")):
                axis.plot([p["sentences_per_s"] for p in mine], [max(p[key], 0.01) for p in mine], style,
                          marker=marker, color=colour, label=f"{names[config]} ({mode} loop)")
                if mode == "closed":
                    for p in mine:
                        axis.annotate(str(p["load"]), (p["sentences_per_s"], max(p[key], 0.01)), fontsize=7,
                                      textcoords="offset points", xytext=(3, 3), color=colour)
    for axis, title in zip(axes, ("p50", "p90", "p99")):
        axis.set_title(f"{title} latency vs throughput")
        axis.set_xlabel("sentences/s (log scale)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(f"{run['meta']['cpu']}: server on one core, load on another "
                    "(numbers beside closed-loop points: concurrent clients)", fontsize=9)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.report RESULTS/bench.json``: redraw the table and plot of a finished run, no measuring."""
    import json
    import sys

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or not Path(args[0]).is_file():
        print("usage: python -m loadtest.report path/to/bench.json", file=sys.stderr)
        return 2
    source = Path(args[0])
    run = json.loads(source.read_text(encoding="utf-8"))
    plot(run, source.with_name("bench.png"))
    source.with_name("bench.md").write_text(markdown(run, "bench.png"), encoding="utf-8")
    print(f"wrote {source.with_name('bench.md')} and {source.with_name('bench.png')}")
    return 0


def update_benchmarks(path: Path, section: str) -> None:
    """Replace the section between the markers in BENCHMARKS.md (create the file if needed), keep the rest."""
    block = f"{BEGIN}\n{section}{END}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
