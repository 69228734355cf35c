"""The report of a full run: the table of every target (with ratios to direct and to
nginx), the targets jwt-proxy must meet, the notes on method and noise, the machine."""

from __future__ import annotations

import argparse
import typing as t

from common import CONCURRENCY
from common import FOREIGN_CPU_WARN_CORES
from common import SLOW_DELAY_S
from common import TARGET_LABELS
from common import TARGET_ORDER


def _get(result: dict[str, t.Any], *keys: t.Any) -> float | None:
    value: t.Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


ROWS: list[tuple[str, tuple[t.Any, ...], str]] = [
    *[(f"requests/s, {c} conn", ("load", c, "rps"), "{:,.0f}") for c in CONCURRENCY],
    *[
        row
        for c in CONCURRENCY
        for row in (
            (f"p50 latency, {c} conn (ms)", ("load", c, "p50_ms"), "{:.2f}"),
            (f"p99 latency, {c} conn (ms)", ("load", c, "p99_ms"), "{:.2f}"),
        )
    ],
    *[(f"CPU per request, {c} conn (ms)", ("load", c, "cpu_ms_per_request"), "{:.3f}") for c in CONCURRENCY],
    ("first byte, slow chunked (ms, median)", ("ttfb", "first_ms_median"), "{:.2f}"),
    ("upload (MiB/s)", ("upload", "mib_per_s"), "{:,.0f}"),
    ("download (MiB/s)", ("download", "mib_per_s"), "{:,.0f}"),
    ("peak RSS during upload (MiB, growth)", ("upload", "rss_peak_mib"), "{:.1f}"),
    ("peak RSS during download (MiB, growth)", ("download", "rss_peak_mib"), "{:.1f}"),
    ("idle RSS, all processes (MiB)", ("idle", "rss_mib"), "{:.1f}"),
]


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def format_table(results: dict[str, dict[str, t.Any]], body_mib: int) -> str:
    names = [n for n in TARGET_ORDER if n in results]
    header = "| metric | " + " | ".join(TARGET_LABELS[n] for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for label, keys, fmt in ROWS:
        label = label.replace("upload (", f"upload {body_mib} MiB (").replace("download (", f"download {body_mib} MiB (")
        cells = []
        for name in names:
            value = _get(results[name], *keys)
            if value is None:
                cells.append("–")
                continue
            text = fmt.format(value)
            if keys[0] in ("upload", "download") and keys[-1] == "rss_peak_mib":
                text += f" (+{_get(results[name], keys[0], 'rss_growth_mib'):.1f})"
            refs = []
            if name != "direct" and "direct" in results:
                refs.append(_ratio(value, _get(results["direct"], *keys)))
            if name not in ("direct", "nginx") and "nginx" in results:
                refs.append(_ratio(value, _get(results["nginx"], *keys)))
            if refs and "RSS" not in label:
                text += " (" + " · ".join(refs) + ")"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(results: dict[str, dict[str, t.Any]], body_mib: int) -> list[tuple[str, str, str, bool | None]]:
    """The performance targets for jwt-proxy: (target, measured, verdict text, met)."""
    checks: list[tuple[str, str, str, bool | None]] = []
    jp = results.get("jwt-proxy")
    if jp is None:
        return checks

    def add(target: str, measured: str, met: bool | None) -> None:
        checks.append((target, measured, {True: "met", False: "NOT met", None: "not measured"}[met], met))

    cpu16 = _get(jp, "load", 16, "cpu_ms_per_request")
    cpu_all = ", ".join(f"{_get(jp, 'load', c, 'cpu_ms_per_request'):.3f} @{c}" for c in CONCURRENCY)
    add("CPU per proxied request ≤ 1.0 ms (16 conn)", f"{cpu16:.3f} ms ({cpu_all})", cpu16 <= 1.0)
    naive = results.get("naive")
    if naive:
        ratio = _get(jp, "load", 16, "rps") / _get(naive, "load", 16, "rps")
        add(
            "req/s at 16 conn ≥ 2× naive proxy",
            f"{_get(jp, 'load', 16, 'rps'):,.0f} vs {_get(naive, 'load', 16, 'rps'):,.0f} = {ratio:.2f}×",
            ratio >= 2.0,
        )
    else:
        add("req/s at 16 conn ≥ 2× naive proxy", "naive not run", None)
    direct = results.get("direct")
    if direct:
        added = _get(jp, "load", 1, "p50_ms") - _get(direct, "load", 1, "p50_ms")
        add("p50 added over direct at 1 conn ≤ 1.0 ms", f"+{added:.2f} ms", added <= 1.0)
        added_ttfb = _get(jp, "ttfb", "first_ms_median") - _get(direct, "ttfb", "first_ms_median")
        add("first byte of slow chunked ≤ direct + 2 ms", f"+{added_ttfb:.2f} ms", added_ttfb <= 2.0)
    nginx = results.get("nginx")
    if nginx:
        ratio = _get(jp, "upload", "mib_per_s") / _get(nginx, "upload", "mib_per_s")
        add(
            "upload ≥ 0.5× nginx proxy_pass",
            f"{_get(jp, 'upload', 'mib_per_s'):,.0f} vs {_get(nginx, 'upload', 'mib_per_s'):,.0f} MiB/s = {ratio:.2f}×",
            ratio >= 0.5,
        )
    else:
        add("upload ≥ 0.5× nginx proxy_pass", "nginx not available", None)
    growth = max(_get(jp, "upload", "rss_growth_mib"), _get(jp, "download", "rss_growth_mib"))
    # "Flat": a buffering proxy grows by about the body size; allow 5% of it (pools, buffers).
    add(
        f"RSS flat for any body size ({body_mib} MiB up/down)",
        f"peak growth +{_get(jp, 'upload', 'rss_growth_mib'):.1f} MiB up, +{_get(jp, 'download', 'rss_growth_mib'):.1f} MiB down",
        growth <= max(8.0, body_mib * 0.05),
    )
    idle = jp["idle"]
    per = ", ".join(f"{p['rss_mib']:.0f}" for p in idle["processes"])
    add(
        "idle RSS master + 2 workers ≤ 200 MiB",
        f"{idle['rss_mib']:.0f} MiB RSS ({per}); PSS {idle['pss_mib']:.0f} MiB",
        idle["rss_mib"] <= 200,
    )
    return checks


def format_report(
    results: dict[str, dict[str, t.Any]], machine: dict[str, str], args: argparse.Namespace, skipped: list[str]
) -> str:
    out = ["### Results", ""]
    out.append(
        f"Load: `GET /1k` (1 KiB static file) for {args.duration:g} s per level, "
        f"{args.repeat} run{'s' if args.repeat > 1 else ''} per level ({'the median by req/s' if args.repeat > 1 else 'one run'}) "
        f"({'wrk' if machine['wrk'] != 'not installed (Python load generator)' else 'Python load generator'}); "
        f"bodies: {args.body_mib} MiB; ratios in brackets: (to direct · to nginx proxy_pass)."
    )
    out.append("")
    out.append(format_table(results, args.body_mib))
    out.append("")
    for name in TARGET_ORDER:
        if name in results:
            out.append(f"- {TARGET_LABELS[name]}: {'; '.join(results[name]['notes'])}")
    for note in skipped:
        out.append(f"- {note}")
    for name in ("jwt-proxy", "naive"):
        if name in results and args.repeat > 1:
            spread = "; ".join(
                f"{c} conn: "
                + ", ".join(
                    f"{r['rps']:,.0f} ({'+'.join(map(str, r['connections_per_worker']))})"
                    for r in results[name]["load"][c]["runs"]
                )
                for c in CONCURRENCY[1:]
            )
            out.append(f"- {TARGET_LABELS[name]}, req/s of each run (connections per worker): {spread}")
    out.append(
        "- CPU is utime+stime of the target's whole process tree (master and workers) over the run, "
        "divided by the requests; for *direct* it is the upstream's own cost."
    )
    out.append(
        "- Upstreams: `GET /1k` is a static file served by nginx (2 workers); the slow chunked response "
        f"(first chunk at once, the next {SLOW_DELAY_S * 1000:.0f} ms later), the upload sink (reads the whole "
        "body, then answers) and the download come from a Python server doing 1 MiB reads/writes "
        "(3+ GB/s each way alone); each proxy is restarted against it for those rows. Without nginx, "
        "the Python server serves everything."
    )
    out.append(
        "- First byte: from sending the request to receiving the first body chunk, new connection each time. "
        "Upload: `Content-Length` body. RSS: VmRSS summed over the process tree, sampled every 50 ms; "
        "growth over the value before the transfer."
    )
    disturbed = [
        f"{TARGET_LABELS[name]} @{c} conn: {stats['foreign_cpu_cores']:.2f} cores"
        for name, result in results.items()
        for c, stats in result["load"].items()
        if stats.get("foreign_cpu_cores", 0) > FOREIGN_CPU_WARN_CORES
    ]
    worst_steal = max((s.get("steal_cores", 0) for r in results.values() for s in r["load"].values()), default=0)
    worst_foreign = max((s.get("foreign_cpu_cores", 0) for r in results.values() for s in r["load"].values()), default=0)
    if disturbed:
        out.append("- **Warning**: other processes on the machine used CPU during: " + "; ".join(disturbed) + ".")
    else:
        out.append(
            f"- Other processes used at most {worst_foreign:.2f} cores during any load run; "
            f"hypervisor steal at most {worst_steal:.2f} cores."
        )
    errors = [
        f"{TARGET_LABELS[name]} @{c}: {stats['errors']}"
        for name, result in results.items()
        for c, stats in result["load"].items()
        if stats["errors"]
    ]
    if errors:
        out.append("- **Errors** (socket errors or non-2xx/3xx): " + "; ".join(errors))
    checks = check_targets(results, args.body_mib)
    if checks:
        out += ["", "### Performance targets (jwt-proxy)", "", "| target | measured | |", "|---|---|---|"]
        out += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict, _ in checks]
    out += ["", "### Machine", ""]
    out += [f"- {key}: {value}" for key, value in machine.items()]
    return "\n".join(out)
