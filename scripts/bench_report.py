#!/usr/bin/env python3
# SPDX-License-Identifier: BSL-1.0
"""Turns Google Benchmark JSON files into one table: weft next to each
alternative, in items/s (median of the repetitions), with the ratio
weft / alternative.

Usage: bench_report.py [DIR]   (default: build/bench)

Reads DIR/*.json (one file per benchmark executable, written by
scripts/bench.sh), prints the table as Markdown, and writes DIR/report.md.
DIR/host.txt, when there, holds cache_line_probe's lines from the start and
the end of the run, and the header shows them.

Benchmark names follow `<workload>/<impl>[/<args>][/<Google Benchmark
suffixes>]`: `<impl>` is `weft` for weft and anything else for an
alternative. The workload a row belongs to is everything before `/<impl>`,
plus the numeric arguments after it and the thread count when the name has
one, e.g. `contended_cap1/weft/real_time/threads:2` is weft on workload
`contended_cap1/threads:2`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Components that Google Benchmark appends to a benchmark's name.
GB_SUFFIX = re.compile(
    r"^(real_time|manual_time|process_time|threads:\d+|repeats:\d+|iterations:\d+"
    r"|min_time:[^/]*|min_warmup_time:[^/]*)$"
)
# An argument component: ->Arg(8) gives "8", ->ArgName("n") gives "n:8".
ARG = re.compile(r"^(-?\d+|[A-Za-z_]\w*:-?\d+)$")
WEFT = "weft"

TIME_UNIT_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


@dataclass
class Result:
    suite: str
    workload: str
    impl: str
    median: float | None = None  # items/s
    cv: float | None = None  # coefficient of variation, 0..1
    # One median (and cv) per run of the benchmark: several when bench.sh ran
    # it in rounds (see bench.sh).
    round_medians: list[float] = field(default_factory=list)
    round_cvs: list[float] = field(default_factory=list)
    per_iteration: bool = False  # no items_per_second: 1 / real_time instead
    error: str | None = None
    samples: list[float] = field(default_factory=list)


def split_name(run_name: str, threads: int | None) -> tuple[str, str]:
    """Returns (workload, impl) for a benchmark's run name."""
    parts = [p for p in run_name.split("/") if p != ""]
    has_threads = any(p.startswith("threads:") for p in parts)
    core = [p for p in parts if not GB_SUFFIX.match(p)]
    args: list[str] = []
    while len(core) > 1 and ARG.match(core[-1]):
        args.insert(0, core.pop())
    if len(core) >= 2:
        impl = core[-1]
        workload_parts = core[:-1] + args
    else:  # no "/<impl>": a benchmark outside the naming convention
        impl = core[0] if core else run_name
        workload_parts = (core or [run_name]) + args
    if has_threads:
        workload_parts.append(f"threads:{threads if threads is not None else '?'}")
    return "/".join(workload_parts), impl


def suite_name(path: Path) -> str:
    # `<exe>__<variant>`: the same benchmark built another way (with
    # WEFT_NO_REGISTRY, say) reports under <exe>'s suite.
    name = path.stem.split("__")[0]
    if name.startswith("bench_"):
        name = name[len("bench_"):]
    if name.endswith("_bench"):
        name = name[: -len("_bench")]
    return name


def rate_of(entry: dict) -> tuple[float | None, bool]:
    """items/s of one JSON entry, or 1/real_time when the benchmark sets no
    items counter (the bool says which)."""
    ips = entry.get("items_per_second")
    if isinstance(ips, (int, float)) and ips > 0:
        return float(ips), False
    real = entry.get("real_time")
    unit = TIME_UNIT_NS.get(entry.get("time_unit", "ns"), 1.0)
    if isinstance(real, (int, float)) and real > 0:
        return 1e9 / (real * unit), True
    return None, False


def load(directory: Path) -> tuple[list[Result], list[dict], list[str]]:
    results: dict[tuple[str, str, str], Result] = {}
    contexts: list[dict] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            text = path.read_text()
            if not text.strip():
                continue  # the binary ran no benchmark (e.g. --benchmark_filter matched none)
            data = json.loads(text)
        except (OSError, ValueError) as e:
            problems.append(f"{path.name}: unreadable ({e}); did the benchmark crash?")
            continue
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue  # not a Google Benchmark file
        context = dict(data.get("context", {}))
        context["_file"] = path.name
        contexts.append(context)
        suite = suite_name(path)
        # Interleaved repetitions (bench.sh) come out in a random order:
        # the registration order keeps the table's rows where the source
        # put them. An older file without these fields keeps its own order.
        entries = sorted(
            data.get("benchmarks", []),
            key=lambda e: (e.get("family_index", 0), e.get("per_family_instance_index", 0)),
        )
        for entry in entries:
            run_name = entry.get("run_name") or entry.get("name", "?")
            threads = entry.get("threads")
            workload, impl = split_name(run_name, threads)
            key = (suite, workload, impl)
            result = results.get(key)
            if result is None:
                result = results[key] = Result(suite, workload, impl)
            if entry.get("error_occurred"):
                result.error = entry.get("error_message") or "error"
                continue
            run_type = entry.get("run_type", "iteration")
            if run_type == "aggregate":
                aggregate = entry.get("aggregate_name")
                if aggregate == "median":
                    rate, result.per_iteration = rate_of(entry)
                    if rate is not None:
                        result.round_medians.append(rate)
                elif aggregate == "cv":
                    ips = entry.get("items_per_second")
                    if isinstance(ips, (int, float)) and math.isfinite(ips):
                        result.round_cvs.append(float(ips))
            else:
                rate, per_iteration = rate_of(entry)
                if rate is not None:
                    result.samples.append(rate)
                    result.per_iteration = per_iteration
    for result in results.values():
        if len(result.round_medians) == 1:
            result.median = result.round_medians[0]
            result.cv = result.round_cvs[0] if result.round_cvs else None
        elif result.round_medians:
            # Rounds: the median of their medians, and how far the rounds
            # themselves spread (drift over the run), not the repetitions.
            result.median = statistics.median(result.round_medians)
            mean = statistics.fmean(result.round_medians)
            result.cv = statistics.stdev(result.round_medians) / mean if mean else None
        if result.median is None and result.samples:
            result.median = statistics.median(result.samples)
            if result.cv is None and len(result.samples) > 1:
                mean = statistics.fmean(result.samples)
                result.cv = statistics.stdev(result.samples) / mean if mean else None
    return list(results.values()), contexts, problems


def human_rate(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{three_digits(value / scale)}{suffix}/s"
    return f"{three_digits(value)}/s"


def three_digits(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(result: Result | None) -> str:
    if result is None:
        return "—"
    if result.error is not None:
        return f"error: {result.error}"
    text = human_rate(result.median)
    if result.per_iteration and result.median is not None:
        text += "*"
    if result.cv is not None:
        text += f" ±{result.cv * 100:.0f}%"
    return text


def ratio(weft: Result | None, other: Result | None) -> str:
    if weft is None or other is None or weft.error or other.error:
        return "—"
    if not weft.median or not other.median:
        return "—"
    r = weft.median / other.median
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    if r >= 0.1:
        return f"{r:.2f}x"
    return f"{r:.2g}x"


def header(contexts: list[dict], host: list[str]) -> list[str]:
    if not contexts:
        return ["# weft benchmarks", "", "No benchmark results found."]
    c = contexts[0]
    cpus = c.get("num_cpus", "?")
    mhz = c.get("mhz_per_cpu")
    scaling = c.get("cpu_scaling_enabled")
    load = c.get("load_avg")
    lines = [
        "# weft benchmarks",
        "",
        f"- date: {c.get('date', '?')}",
        f"- machine: {c.get('host_name', '?')}, {cpus} CPUs"
        + (f" @ {mhz} MHz" if mhz else "")
        + (", CPU frequency scaling ON (numbers are less stable)" if scaling else ""),
    ] + host
    if load:
        lines.append("- load average at start: " + ", ".join(f"{x:.2f}" for x in load))
    build = c.get("library_build_type")
    if build:
        lines.append(f"- libbenchmark's own build type: {build} (weft's code is built by the"
                     " `bench` preset: Release)")
    dates = sorted({x.get("date", "?") for x in contexts})
    if len(dates) > 1:
        lines.append(f"- runs from {dates[0]} to {dates[-1]}")
    lines += [
        "- items/s: median of the repetitions (±: coefficient of variation across them);"
        " higher is better",
        "- weft / alternative: ratio of the medians in the same run (> 1: weft is faster)",
    ]
    if any("__round" in x.get("_file", "") for x in contexts):
        lines.append("- suites run in rounds (an executable and its `__variant` builds, alternating):"
                     " the median of the rounds' medians (±: their coefficient of variation)")
    return lines


def table(results: list[Result]) -> tuple[list[str], bool]:
    rows = [["suite", "workload", "weft", "alternative", "alternative items/s", "weft / alt"]]
    any_per_iteration = False
    # Group by (suite, workload), keeping the order of first appearance.
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.suite, r.workload), []).append(r)
        any_per_iteration = any_per_iteration or r.per_iteration
    for (suite, workload), members in groups.items():
        weft = next((m for m in members if m.impl == WEFT), None)
        others = [m for m in members if m.impl != WEFT]
        if not others:
            rows.append([suite, workload, cell(weft), "—", "—", "—"])
            continue
        for i, other in enumerate(others):
            first = i == 0
            rows.append([
                suite if first else "",
                workload if first else "",
                cell(weft) if first else "",
                other.impl,
                cell(other),
                ratio(weft, other),
            ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {2, 4, 5}

    def fmt(row: list[str]) -> str:
        cells = [
            row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i])
            for i in range(len(row))
        ]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join(
        ("-" * (widths[i] + 1) + ":") if i in right else ("-" * (widths[i] + 2))
        for i in range(len(widths))
    ) + "|"
    return [fmt(rows[0]), sep] + [fmt(r) for r in rows[1:]], any_per_iteration


def host_lines(directory: Path) -> list[str]:
    """The cache line's one-way time between two CPUs at each probe, from
    lines like `start one_way_ns=46.2 cpus=0,1`."""
    path = directory / "host.txt"
    if not path.is_file():
        return []
    times = []
    cpus = None
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        values = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        one_way = values.get("one_way_ns", "none")
        measured = "not measured" if one_way == "none" else f"{one_way} ns"
        times.append(f"{measured} at the {fields[0]}")
        cpus = values.get("cpus", cpus)
    if not times:
        return []
    between = f"CPUs {cpus.replace(',', ' and ')}" if cpus else "two CPUs"
    return [f"- a cache line between {between}, one way: " + ", ".join(times)
            + " (a shared VM moves between such states; benchmarks/README.md, Method)"]


def main(argv: list[str]) -> int:
    directory = Path(argv[1]) if len(argv) > 1 else Path("build/bench")
    if not directory.is_dir():
        print(f"bench_report: no directory {directory}", file=sys.stderr)
        return 2
    results, contexts, problems = load(directory)
    lines = header(contexts, host_lines(directory))
    if results:
        rows, any_per_iteration = table(results)
        lines += [""] + rows
        if any_per_iteration:
            lines += ["", "\\* no items counter: iterations/s (1 / real time) instead of items/s"]
    if problems:
        lines += ["", "Problems:"] + [f"- {p}" for p in problems]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (directory / "report.md").write_text(text)
    print(f"\n(written to {directory / 'report.md'})", file=sys.stderr)
    return 1 if problems and not results else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
