"""Smoke test of the benchmark runner: it runs, writes the table and the JSON; speed is not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cases as C
from benchmarks import inputs, report

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_machine_case_writes_table_and_json(tmp_path):
    env = dict(os.environ, SKYSTACK_BENCH_WORK=str(tmp_path / "work"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "machine", "--reps", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "results.md").read_text()
    header = "| " + " | ".join(report.COLUMNS) + " |"
    assert header in md
    assert "cores" in md and "GB RAM" in md
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "quick"
    assert data["machine"]["cores"] == os.cpu_count()
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"bandwidth", "lanczos3_loop"}
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["reps"] == 1
        assert row["wall_s"] > 0 and row["cpu_s"] >= 0 and row["peak_mb"] > 0
    assert rows["bandwidth"]["extra"]["copy_GB_per_s"] > 0
    assert rows["lanczos3_loop"]["mpix"] == pytest.approx(384 * 384 / 1e6, rel=1e-12)
    assert rows["lanczos3_loop"]["mpix_per_s_per_core"] == pytest.approx(
        rows["lanczos3_loop"]["mpix"] / rows["lanczos3_loop"]["wall_s"], rel=1e-12)
    # one table line per implementation
    assert sum(1 for line in md.splitlines() if line.startswith("| machine |")) == 2
    # the standard inputs were built under the work directory given by the environment
    assert (tmp_path / "work" / "quick" / "ready.json").exists()


def test_unknown_case_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "no_such_case", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown case 'no_such_case'" in proc.stderr


def test_missing_peer_is_reported_not_skipped():
    s = inputs.sizes("quick", 2)
    case = C.Case("demo", "demo", (
        C.Impl("ours", "ours", lambda ctx: {}, lambda st: {}, ours=True),
        C.Impl("peer", "a peer", lambda ctx: {}, lambda st: {}, requires=("no_such_module_for_skystack",)),
    ), (C.Target("ours", "peer", ">=", 2.0, ">= 2x peer"),))
    ok, missing = C.available(case.impls[1])
    assert (ok, missing) == (False, "no_such_module_for_skystack")
    assert C.available(C.Impl("x", "x", None, None, requires=("exe:no-such-binary-xyz",))) == (False, "no-such-binary-xyz")
    ours = report.record(case, case.impls[0], [
        {"wall_s": 2.0, "cpu_s": 3.0, "peak_mb": 10.0, "baseline_mb": 5.0, "mpix": 8.0, "threads": 2, "extra": {}},
        {"wall_s": 4.0, "cpu_s": 5.0, "peak_mb": 12.0, "baseline_mb": 5.0, "mpix": 8.0, "threads": 2, "extra": {}},
        {"wall_s": 3.0, "cpu_s": 4.0, "peak_mb": 11.0, "baseline_mb": 5.0, "mpix": 8.0, "threads": 2, "extra": {}},
    ])
    assert ours["wall_s"] == 3.0 and ours["cpu_s"] == 4.0 and ours["peak_mb"] == 12.0
    assert ours["mpix_per_s_per_core"] == pytest.approx(8.0 / (3.0 * 2), rel=1e-12)
    assert ours["mpix_per_cpu_s"] == pytest.approx(8.0 / 4.0, rel=1e-12)
    peer = report.record(case, case.impls[1], [], status=f"not installed ({missing})")
    results = report.assemble([case], [ours, peer], {"cores": 2, "memory_gb": 1.0, "cpu_model": "cpu",
                                                    "python": "3", "platform": "p", "load_average": [0, 0, 0]},
                              mode="quick", reps=3, threads=2, sizes=s, seconds=1.0, load_after=[0, 0, 0])
    (t,) = results["targets"]
    assert t["verdict"] == "N/A" and "not installed (no_such_module_for_skystack)" in t["ratio_text"]
    md = report.markdown(results)
    assert "| demo | a peer |" in md and "not installed (no_such_module_for_skystack)" in md


def test_target_verdicts():
    s = inputs.sizes("quick", 2)
    impls = (C.Impl("a", "a", None, None, ours=True), C.Impl("b", "b", None, None))
    case = C.Case("c", "c", impls, (C.Target("a", "b", ">=", 2.0, "x"), C.Target("a", "b", "<=", 1.2, "m", metric="peak")))

    def row(impl, wall, peak):
        return report.record(case, impl, [{"wall_s": wall, "cpu_s": wall, "peak_mb": peak, "baseline_mb": 1.0,
                                           "mpix": 4.0, "threads": 1, "extra": {}}])

    machine = {"cores": 2, "memory_gb": 1.0, "cpu_model": "c", "python": "3", "platform": "p", "load_average": [0, 0, 0]}
    res = report.assemble([case], [row(impls[0], 1.0, 130.0), row(impls[1], 2.5, 100.0)], machine, mode="quick",
                          reps=1, threads=1, sizes=s, seconds=1.0, load_after=[0, 0, 0])
    thr, mem = res["targets"]
    assert thr["ratio"] == pytest.approx(2.5, rel=1e-12) and thr["verdict"] == "PASS"
    assert thr["cpu_ratio"] == pytest.approx(2.5, rel=1e-12) and "(CPU-time 2.50x)" in thr["ratio_text"]
    assert mem["ratio"] == pytest.approx(1.3, rel=1e-12) and mem["verdict"] == "MISS"
