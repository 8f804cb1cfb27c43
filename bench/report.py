#!/usr/bin/env python3
"""Turns a pytest-benchmark JSON file from ``bench/`` into a Markdown table (standard library only).

Usage::

    python bench/report.py bench/results/cpu/bench.json --out bench/results/cpu/table.md

One row per benchmark: problem, tolerance, mode, provider, median thread CPU time and median wall time over the
interleaved rounds, the rounds' spread (flagged `!` above 20%), CPU time relative to torchdiffeq on the same
problem/tolerance/mode, NFE, accepted/rejected steps, maximum relative error against the scipy reference, the median
CPU time of one ``func`` call and the overhead ``t_solve / (NFE * t_func) - 1``. The table ends with a summary: per
mode, each provider's geometric-mean speed against torchdiffeq (and the adjoints against torchdiffeq's adjoint).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

BASELINE = "torchdiffeq"
ADJOINT_BASELINE = "torchdiffeq-adjoint"
# Average cores used by other processes during a benchmark above which its wall timing is marked as suspect.
FOREIGN_CPU_LIMIT = 0.25
# Rounds whose interquartile range exceeds this fraction of their median are flagged (bench/providers.py).
SPREAD_LIMIT = 0.20
_FOREIGN_KEYS = ("foreign_cpu_cores", "t_func_foreign_cpu_cores")

COLUMNS = (
    "problem",
    "tol",
    "mode",
    "provider",
    "cpu (ms)",
    "wall (ms)",
    "spread",
    "cpu / torchdiffeq",
    "NFE",
    "accepted/rejected",
    "max rel err",
    "t_func (ms)",
    "overhead",
)


def _fmt_num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _fmt_count(value: float | None) -> str:
    if value is None:
        return "–"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _steps(info: dict) -> str:
    """``acc/rej`` for shared-step solvers; ``mean/mean (max acc/rej)`` for per-sample ones."""
    acc_mean, acc_max = info.get("n_accepted_mean"), info.get("n_accepted_max")
    rej_mean, rej_max = info.get("n_rejected_mean"), info.get("n_rejected_max")
    if acc_mean is None or rej_mean is None:
        return "–"
    text = f"{_fmt_count(acc_mean)}/{_fmt_count(rej_mean)}"
    if info.get("per_sample") and (acc_max != acc_mean or rej_max != rej_mean):
        text += f" (max {_fmt_count(acc_max)}/{_fmt_count(rej_max)})"
    return text


def _disturbed(info: dict, *keys: str) -> bool:
    """Whether other processes used more than FOREIGN_CPU_LIMIT cores during any of the measurements ``keys``."""
    return any((info.get(k) or 0) > FOREIGN_CPU_LIMIT for k in keys)


def _overhead(info: dict, median_s: float) -> float | None:
    # Recomputed from the median when the benchmark could not store it (e.g. an older JSON).
    if info.get("overhead") is not None:
        return info["overhead"]
    nfe, t_func = info.get("nfe"), info.get("t_func_s")
    if not nfe or not t_func:
        return None
    return median_s / (nfe * t_func) - 1.0


def _entries(data: dict) -> list[tuple[tuple, str, float, float, dict]]:
    """``(group key, provider, cpu median s, wall median s, extra_info)`` per benchmark, grouped in run order.

    A JSON without interleaved rounds (older runs) has one clock: its median stands for both.
    """
    entries = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        key = (info.get("problem", bench.get("group") or "?"), info.get("tolerance", "–"), info.get("mode", "–"))
        cpu = info.get("cpu_median_s", bench["stats"]["median"])
        wall = info.get("wall_median_s", bench["stats"]["median"])
        entries.append((key, info.get("provider", bench.get("name", "?")), cpu, wall, info))
    order: dict[tuple, int] = {}
    for key, *_ in entries:
        order.setdefault(key, len(order))
    entries.sort(key=lambda e: order[e[0]])  # stable: providers keep their run order within a group
    return entries


def _flagged(info: dict) -> bool:
    """Whether the benchmark's rounds disagree by more than SPREAD_LIMIT (interquartile range over median)."""
    return (info.get("spread") or 0.0) > SPREAD_LIMIT


def build_rows(data: dict) -> list[list[str]]:
    """Builds the table rows from pytest-benchmark JSON ``data``, grouped by problem/tolerance/mode.

    Args:
        data: Parsed pytest-benchmark JSON.

    Returns:
        Rows of cell strings in :data:`COLUMNS` order.
    """
    entries = _entries(data)
    baseline = {key: cpu for key, provider, cpu, _, _ in entries if provider == BASELINE}
    rows = []
    for (problem, tol, mode), provider, cpu, wall, info in entries:
        base = baseline.get((problem, tol, mode))
        overhead = _overhead(info, cpu)
        t_func = info.get("t_func_s")
        spread = info.get("spread")
        rows.append(
            [
                problem,
                tol,
                mode,
                provider,
                f"{cpu * 1e3:.2f}",
                f"{wall * 1e3:.2f}" + ("*" if _disturbed(info, "foreign_cpu_cores") else ""),
                _fmt_num(None if spread is None else spread * 100, ".0f") + ("%" if spread is not None else "")
                + (" !" if _flagged(info) else ""),
                f"{cpu / base:.2f}" if base else "–",
                _fmt_count(info.get("nfe")),
                _steps(info),
                _fmt_num(info.get("max_rel_error"), ".1e"),
                _fmt_num(None if t_func is None else t_func * 1e3, ".3f")
                + ("*" if _disturbed(info, "t_func_foreign_cpu_cores") else ""),
                _fmt_num(overhead, ".2f"),
            ]
        )
    return rows


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))




def summary(data: dict) -> list[str]:
    """A few lines: per mode, each provider's geometric-mean CPU-time speed against torchdiffeq over the groups both
    ran (range in parentheses), adjoint providers also against torchdiffeq's adjoint; flagged rows are left out of
    the means (and counted).

    Args:
        data: Parsed pytest-benchmark JSON.

    Returns:
        Markdown lines (empty when there is nothing to compare).
    """
    entries = _entries(data)
    times = {(key, provider): (cpu, info) for key, provider, cpu, _, info in entries}
    modes = list(dict.fromkeys(key[2] for key, *_ in entries))
    lines = []
    for mode in modes:
        parts = []
        for base_name in (BASELINE, ADJOINT_BASELINE):
            providers = list(dict.fromkeys(p for key, p, *_ in entries if key[2] == mode and p != base_name))
            if base_name == ADJOINT_BASELINE:
                providers = [p for p in providers if "adjoint" in p]
            for prov in providers:
                ratios, n_flagged = [], 0
                for key, p, cpu, _, info in entries:
                    if p != prov or key[2] != mode or (key, base_name) not in times:
                        continue
                    base_cpu, base_info = times[(key, base_name)]
                    if _flagged(info) or _flagged(base_info):
                        n_flagged += 1
                        continue
                    ratios.append(base_cpu / cpu)
                if not ratios:
                    continue
                speed = _geomean(ratios)
                verdict = "faster than" if speed > 1.02 else "slower than" if speed < 0.98 else "as fast as"
                text = f"{prov} {verdict} {base_name}: {speed:.2f}x its speed"
                if len(ratios) > 1:
                    text += f" (rows {min(ratios):.2f}-{max(ratios):.2f}x, {len(ratios)} rows)"
                if n_flagged:
                    text += f", {n_flagged} flagged row(s) left out"
                parts.append(text)
        if parts:
            lines.append(f"- **{mode}**: " + "; ".join(parts) + ".")
    if not lines:
        return []
    clock = "thread CPU time" if all("cpu_median_s" in e[4] for e in entries) else "median time"
    return ["", f"## Summary ({clock}; speed = torchdiffeq's time / the provider's, geometric mean over"
            " problem/tolerance rows)", "", *lines]


def _header(data: dict) -> list[str]:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    first = next(iter(data.get("benchmarks", [])), {}).get("extra_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or "?"
    parts = [
        f"device {first.get('device', '?')}",
        f"CPU {cpu}",
        f"torch {first.get('torch_version', machine.get('torch_version', '?'))}",
        f"threads {first.get('torch_threads', machine.get('torch_threads', '?'))}",
        f"torchdiffeq {first.get('torchdiffeq_version', '?')}",
        f"torchode {first.get('torchode_version', '?')}",
        f"fastnode {first.get('fastnode_version', '?')}",
    ]
    if commit.get("id"):
        parts.append(f"commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}")
    if data.get("datetime"):
        parts.append(data["datetime"][:19])
    lines = ["# fastnode benchmarks", "", ", ".join(parts), ""]
    flagged = [b for b in data.get("benchmarks", []) if _disturbed(b.get("extra_info", {}), *_FOREIGN_KEYS)]
    if flagged:
        lines += [
            (
                f"**Note:** other processes used more than {FOREIGN_CPU_LIMIT} of a core during {len(flagged)}"
                " benchmark(s) (the disturbed wall time or t_func is marked `*`): those wall times are suspect; the CPU"
                " times much less so (rows whose rounds disagree are flagged `!` in the spread column)."
            ),
            "",
        ]
    return lines


def _footer() -> list[str]:
    notes = (
        (
            "cpu, wall: medians over interleaved rounds (every provider of a problem/tolerance/mode once per round, in"
            " a rotating order) of this thread's CPU time (`time.thread_time`, one torch thread) and of wall time."
            " CPU time is the one to compare on a shared machine: it leaves out time spent waiting for a core."
        ),
        (
            f"spread: interquartile range of the CPU-time rounds over their median; `!` marks rows above"
            f" {SPREAD_LIMIT:.0%} (rounds disagree: do not trust that median)."
        ),
        "cpu / torchdiffeq: CPU time over torchdiffeq's on the same problem, tolerance and mode (< 1 is faster).",
        (
            "NFE: batch-wide `func` calls. accepted/rejected: steps; per-sample solvers show the mean over samples"
            " and, in parentheses, the maximum."
        ),
        (
            "max rel err: max over samples and output times of |y - y_ref|_inf / |y_ref|_inf, y_ref from scipy"
            " DOP853 at rtol = atol = 1e-12."
        ),
        "t_func: median CPU time of one `func` call on the whole batch (forward + backward in `full` mode).",
        "overhead: cpu / (NFE x t_func) - 1, the solver's own cost relative to the unavoidable `func` work.",
        (
            "modes: `fwd` = one solve under no_grad; `full` = solve + gradient of sum(ys) w.r.t. y0 and parameters"
            " by backpropagation through the solver, or by the adjoint for the `-adjoint` providers (their NFE and"
            " overhead count the forward only; backward NFE: `bench/results/<device>/adjoint_nfe.md`)."
        ),
    )
    return ["", *(f"- {n}" for n in notes)]


def render(data: dict) -> str:
    """Renders the whole Markdown document for pytest-benchmark JSON ``data``.

    Args:
        data: Parsed pytest-benchmark JSON.
    """
    rows = build_rows(data)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    numeric = set(range(4, len(COLUMNS)))

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    body = [line(list(COLUMNS)), rule, *(line(r) for r in rows)] if rows else ["(no benchmarks in the JSON file)"]
    return "\n".join(_header(data) + body + _footer() + summary(data)) + "\n"


def write_markdown(text: str, out: Path | str | None, default_name: str, device: str) -> Path:
    """Print ``text`` and write it to ``out`` (default ``bench/results/<device>/<default_name>``); return the path."""
    path = Path(out) if out else Path(__file__).parent / "results" / device / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json output)")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"json: cannot read {args.json}: {exc}")
    text = render(data)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
