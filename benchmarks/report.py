"""Aggregating repetitions, judging targets, writing results.md and results.json."""

from __future__ import annotations

import datetime as _dt
import statistics
from dataclasses import asdict

COLUMNS = ("case", "implementation", "median wall s", "CPU s", "Mpix/s/core", "Mpix/CPU-s", "peak MB", "ratio", "target",
           "PASS/MISS", "notes")


def record(case, impl, runs: list[dict], status: str | None = None) -> dict:
    """One row: medians over the successful repetitions of one implementation."""
    ok = [r for r in runs if "error" not in r]
    row = {"case": case.name, "impl": impl.name, "label": impl.label, "ours": impl.ours, "reps": len(ok),
           "status": status or ("ok" if ok else "failed"), "wall_s": None, "cpu_s": None, "mpix": None,
           "threads": None, "mpix_per_s_per_core": None, "mpix_per_cpu_s": None, "peak_mb": None, "walls": [r["wall_s"] for r in ok],
           "extra": ok[-1]["extra"] if ok else {}}
    if runs and not ok:
        row["error"] = runs[-1]["error"]
    if ok:
        wall = statistics.median(r["wall_s"] for r in ok)
        row.update(
            wall_s=wall,
            cpu_s=statistics.median(r["cpu_s"] for r in ok),
            peak_mb=max(r["peak_mb"] for r in ok),
            baseline_mb=min(r["baseline_mb"] for r in ok),
            mpix=ok[0]["mpix"],
            threads=ok[0]["threads"],
        )
        if ok[0]["mpix"]:
            row["mpix_per_s_per_core"] = ok[0]["mpix"] / (wall * ok[0]["threads"])
            if row["cpu_s"] > 0:
                row["mpix_per_cpu_s"] = ok[0]["mpix"] / row["cpu_s"]
    return row


def complete(row: dict) -> dict:
    """Fill the derived figures of a row read back from an older results.json."""
    row = dict(row)
    row.setdefault("mpix_per_cpu_s", None)
    if row.get("mpix") and row.get("cpu_s"):
        row["mpix_per_cpu_s"] = row["mpix"] / row["cpu_s"]
    return row


def _judge(target, rows: dict) -> dict:
    ours, peer = rows.get(target.ours), rows.get(target.peer)
    out = {"ours": target.ours, "peer": target.peer, "text": target.text, "op": target.op,
           "factor": target.factor, "metric": target.metric, "ratio": None}
    key = "peak_mb" if target.metric == "peak" else "mpix_per_s_per_core"
    if ours is None or peer is None or ours.get(key) is None or peer.get(key) is None:
        missing = target.peer if (peer is None or peer.get(key) is None) else target.ours
        row = peer if missing == target.peer else ours
        why = row.get("status", "not run") if row is not None else "not run"
        out.update(verdict="N/A", ratio_text=f"n/a ({missing}: {why})")
        return out
    ratio = ours[key] / peer[key]
    if target.op == "info":  # a ratio shown for information, with no target to pass
        verdict = "info"
    else:
        passed = {">=": ratio >= target.factor, ">": ratio > target.factor, "<=": ratio <= target.factor}[target.op]
        verdict = "PASS" if passed else "MISS"
    out.update(ratio=ratio, verdict=verdict, ratio_text=f"{ratio:.2f}x")
    if key == "mpix_per_s_per_core" and ours.get("mpix_per_cpu_s") and peer.get("mpix_per_cpu_s"):
        # the same comparison on CPU time, which other work on a shared machine disturbs less
        out["cpu_ratio"] = ours["mpix_per_cpu_s"] / peer["mpix_per_cpu_s"]
        out["ratio_text"] += f" (CPU-time {out['cpu_ratio']:.2f}x)"
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def earlier_runs(kept: list[dict], case_order: list[str]) -> list[dict]:
    """The runs the kept rows come from: one entry per date, with its load average and cases."""
    runs: dict[str, dict] = {}
    for r in kept:
        e = runs.setdefault(r["measured_utc"], {"date_utc": r["measured_utc"], "load_average": r["load_average"],
                                                 "cases": []})
        if r["case"] not in e["cases"]:
            e["cases"].append(r["case"])
    for e in runs.values():
        e["cases"].sort(key=case_order.index)
    return sorted(runs.values(), key=lambda e: e["date_utc"])


def assemble(cases, records, machine, *, mode, reps, threads, sizes, seconds, load_after, earlier=None) -> dict:
    targets = []
    for case in cases:
        rows = {r["impl"]: r for r in records if r["case"] == case.name}
        for t in case.targets:
            j = _judge(t, rows)
            j["case"] = case.name
            targets.append(j)
    return {
        "date_utc": now_utc(),
        "machine": machine,
        "load_average_after": load_after,
        "mode": mode,
        "reps": reps,
        "threads": threads,
        "sizes": asdict(sizes),
        "total_seconds": round(seconds, 1),
        "cases": [{"name": c.name, "title": c.title} for c in cases],
        "rows": records,
        "targets": targets,
        "earlier": earlier,
    }


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def _notes(row) -> str:
    if row["status"] != "ok":
        return row["status"] + (f": {row['error'][:120]}" if row.get("error") else "")
    parts = [f"{row['reps']} rep(s)"]
    if row.get("mpix"):
        parts.append(f"{row['mpix']:.1f} Mpix in")
    for k, v in row["extra"].items():
        if k in ("note", "shape", "dtype"):
            continue
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# skystack benchmark results",
        "",
        f"- date: {results['date_utc']}; mode: {results['mode']}; repetitions: {results['reps']} "
        f"(fewer on long rows: see the notes); threads of the multi-threaded rows: {results['threads']}",
        f"- machine: {m['cores']} cores, {m['memory_gb']} GB RAM, {m['cpu_model']}; Python {m['python']}; "
        f"{m['platform']}",
        f"- load average (1, 5, 15 min) before: {m['load_average']}, after: {results['load_average_after']} "
        "(other work shared the machine when these exceed 0.5 or so)",
        f"- memory written once before measuring: {m['prefault']['gb']} GB in {m['prefault']['seconds']} s"
        if m.get("prefault") else "- memory not written before measuring (`--quick` or `--no-prefault`)",
        f"- total run time: {results['total_seconds']:.0f} s. Reproduce: `python -m benchmarks setup && "
        f"python -m benchmarks run{' --quick' if results['mode'] == 'quick' else ''}`",
    ]
    earlier = results.get("earlier") or []
    for e in [earlier] if isinstance(earlier, dict) else earlier:
        lines.append(f"- rows of {', '.join(e['cases'])} kept from the run of {e['date_utc']} "
                     f"(load average then: {e['load_average']})")
    if earlier:
        lines.append("- the other cases were measured at the date above")
    lines += [
        "",
        "Mpix/s/core = input megapixels / (median wall s x threads the implementation uses); Mpix/CPU-s = "
        "input megapixels / median CPU s. Ratios (what PASS/MISS judges): per-core throughput ours / peer, "
        "or peak memory ours / reference row; in brackets the same throughput ratio on CPU time, which "
        "other work on a shared machine disturbs less. Peak MB: resident memory "
        "of the measuring process and its children during the piece (inputs the implementation holds "
        "in memory included).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    judged: dict[tuple[str, str], list[dict]] = {}
    for t in results["targets"]:
        judged.setdefault((t["case"], t["ours"]), []).append(t)
    for row in results["rows"]:
        ts = judged.get((row["case"], row["impl"]), [])
        cells = [
            row["case"], row["label"], _f(row["wall_s"], ".2f"), _f(row["cpu_s"], ".2f"),
            _f(row["mpix_per_s_per_core"], ".2f"), _f(row["mpix_per_cpu_s"], ".2f"), _f(row["peak_mb"], ".0f"),
            "; ".join(t["ratio_text"] for t in ts), "; ".join(t["text"] for t in ts),
            "; ".join(t["verdict"] for t in ts), _notes(row).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    for t in results["targets"]:
        lines.append(f"- **{t['verdict']}** {t['case']}: {t['ours']} vs {t['peer']}: {t['ratio_text']} "
                     f"(target: {t['text']})")
    return "\n".join(lines) + "\n"
