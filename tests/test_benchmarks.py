"""Smoke test of the benchmark runner: it runs, writes the table and the JSON; speed is not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
    assert "memory not written before measuring" in md and "prefault" not in json.loads((out / "results.json").read_text())["machine"]
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


def test_prefault_writes_the_requested_memory():
    import psutil

    from benchmarks import measure

    avail = psutil.virtual_memory().available
    got = measure.prefault_memory(fraction=0.02, piece_gb=0.01)
    piece = int(0.01 * 2**30) // 8 * 8
    want = int(0.02 * avail // piece) * piece / 2**30
    assert got["seconds"] >= 0 and abs(got["gb"] - round(want, 1)) <= 0.15, (got, want)


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


# the coadd case: registration, information-only ratios, and the peers' combination on tiny inputs


def _tiny_wcs(side):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [side / 2 + 0.5, side / 2 + 0.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_coadd_case_rows_and_information_targets(mode):
    s = inputs.sizes(mode, 2)
    (case,) = [c for c in C.cases(s) if c.name == "coadd"]
    names = [i.name for i in case.impls]
    assert names[:5] == ["skystack", "swarp_clipped", "swarp_median", "swarp_weighted", "reproject_mean"]
    assert ("reproject_median" in names) == C.reproject_supports_median()
    assert [i.name for i in case.impls if i.ours] == ["skystack"]
    assert f"N={s.scaling[0]}" in case.title and f"{s.patch}x{s.patch}" in case.title
    assert {t.ours for t in case.targets} == set(names) - {"swarp_clipped"}
    assert all(t.peer == "swarp_clipped" and t.op == "info" and t.text == "information" for t in case.targets)


def test_swarp_coadd_command_combines_in_one_call(tmp_path):
    s = inputs.sizes("full", 3)
    ctx = {"sizes": s, "layout": {"exposures": {"swarp_files": [f"exp_{v}.fits" for v in range(32)]}}}
    st = C.prep_swarp_coadd(ctx, "MEDIAN")
    assert len(st["files"]) == 8 and st["threads"] == 3
    assert st["mpix"] == pytest.approx(8 * 2048**2 / 1e6, rel=1e-12)
    cmd = C.swarp_coadd_command(dict(st, exe="swarp"), tmp_path)
    opts = dict(zip(cmd[9::2], cmd[10::2]))
    assert cmd[1:9] == st["files"]
    assert opts["-COMBINE"] == "Y" and opts["-COMBINE_TYPE"] == "MEDIAN" and opts["-RESAMPLE"] == "Y"
    assert opts["-RESAMPLING_TYPE"] == "LANCZOS3" and opts["-NTHREADS"] == "3"
    assert opts["-WEIGHT_TYPE"] == "MAP_WEIGHT" and opts["-IMAGEOUT_NAME"] == str(tmp_path / "coadd.fits")


def test_information_target_has_no_verdict_and_na_when_peer_missing():
    s = inputs.sizes("quick", 2)
    impls = (C.Impl("a", "a", None, None, ours=True), C.Impl("b", "b", None, None), C.Impl("c", "c", None, None))
    case = C.Case("c", "c", impls, (C.Target("a", "b", "info", 1.0, "information"),
                                    C.Target("a", "c", "info", 1.0, "information")))

    def row(impl, wall, threads):
        return report.record(case, impl, [{"wall_s": wall, "cpu_s": 2 * wall, "peak_mb": 10.0, "baseline_mb": 1.0,
                                           "mpix": 6.0, "threads": threads, "extra": {}}])

    machine = {"cores": 2, "memory_gb": 1.0, "cpu_model": "c", "python": "3", "platform": "p", "load_average": [0, 0, 0]}
    rows = [row(impls[0], 3.0, 2), row(impls[1], 1.5, 1), report.record(case, impls[2], [], status="not installed (c)")]
    res = report.assemble([case], rows, machine, mode="quick", reps=1, threads=2, sizes=s, seconds=1.0,
                          load_after=[0, 0, 0])
    info, na = res["targets"]
    # per core: a = 6 / (3 * 2) = 1, b = 6 / 1.5 = 4
    assert info["verdict"] == "info" and info["ratio"] == pytest.approx(0.25, rel=1e-12)
    assert info["cpu_ratio"] == pytest.approx(0.5, rel=1e-12)
    assert na["verdict"] == "N/A" and "not installed (c)" in na["ratio_text"]
    md = report.markdown(res)
    assert "**info** c: a vs b: 0.25x (CPU-time 0.50x)" in md
    assert "PASS" not in md.split("## Targets")[1] and "MISS" not in md.split("## Targets")[1]


def test_reproject_coadd_is_the_inverse_variance_weighted_mean():
    side = 40
    w = _tiny_wcs(side)
    values, variances = (3.0, -1.0, 7.5), (1.0, 4.0, 0.5)
    images = [(np.full((side, side), v, np.float32), w) for v in values]
    weights = [np.full((side, side), 1.0 / var, np.float32) for var in variances]
    out = C.run_reproject_coadd({"images": images, "weights": weights, "wcs": w, "shape": (side, side)})()
    expected = sum(v / var for v, var in zip(values, variances)) / sum(1.0 / var for var in variances)
    assert out["combine_function"] == "mean"
    assert out["output_good_pixels"] >= (side - 2) ** 2
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd

    mean, _ = reproject_and_coadd(images, w, shape_out=(side, side), input_weights=weights,
                                  reproject_function=reproject_interp, order="bilinear")
    np.testing.assert_allclose(mean[2:-2, 2:-2], expected, rtol=1e-6, atol=0)


@pytest.mark.skipif(C.swarp_executable() is None and os.environ.get("CI") != "true",
                    reason="SWarp is not installed (.ci/run installs it)")
@pytest.mark.parametrize("combine", ["WEIGHTED", "MEDIAN", "CLIPPED"])
def test_swarp_coadd_combines_constant_images(tmp_path, combine):
    from astropy.io import fits

    side = 48
    w = _tiny_wcs(side)
    values, variances = (3.0, -1.0, 7.5), (1.0, 4.0, 0.5)
    files = []
    for i, (v, var) in enumerate(zip(values, variances)):
        path = tmp_path / f"exp_{i}.fits"
        fits.PrimaryHDU(np.full((side, side), v, np.float32), header=w.to_header()).writeto(path)
        fits.PrimaryHDU(np.full((side, side), 1.0 / var, np.float32), header=w.to_header()).writeto(
            tmp_path / f"exp_{i}.weight.fits")
        files.append(str(path))
    head = w.to_header()
    head["NAXIS"], head["NAXIS1"], head["NAXIS2"] = 2, side, side
    (tmp_path / "coadd.head").write_text("\n".join(str(c) for c in head.cards) + "\nEND\n")
    st = {"files": files, "head": tmp_path / "coadd.head", "threads": 1, "combine": combine,
          "exe": C.swarp_executable()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    import shutil
    import subprocess

    shutil.copy(st["head"], out_dir / "coadd.head")
    proc = subprocess.run(C.swarp_coadd_command(st, out_dir), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]
    coadd = fits.getdata(out_dir / "coadd.fits")
    weighted = sum(v / var for v, var in zip(values, variances)) / sum(1.0 / var for var in variances)
    # CLIPPED rejects nothing among three values this close in units of their sigmas: the weighted mean
    expected = {"WEIGHTED": weighted, "MEDIAN": 3.0, "CLIPPED": weighted}[combine]
    np.testing.assert_allclose(coadd[8:-8, 8:-8], expected, rtol=1e-5, atol=1e-5)
    assert C.run_swarp_coadd(st) == {"combine_type": combine, "output": f"{side}x{side}"}


def test_kept_rows_are_listed_with_the_run_they_come_from():
    from benchmarks import report

    kept = [
        {"case": "coadd", "measured_utc": "2026-01-02 10:00 UTC", "load_average": [0.1, 0.2, 0.3]},
        {"case": "stacking", "measured_utc": "2026-01-03 09:00 UTC", "load_average": [1.0, 1.0, 1.0]},
        {"case": "machine", "measured_utc": "2026-01-02 10:00 UTC", "load_average": [0.1, 0.2, 0.3]},
        {"case": "machine", "measured_utc": "2026-01-02 10:00 UTC", "load_average": [0.1, 0.2, 0.3]},
    ]
    runs = report.earlier_runs(kept, ["stacking", "machine", "coadd"])
    assert [(e["date_utc"], e["cases"]) for e in runs] == [
        ("2026-01-02 10:00 UTC", ["machine", "coadd"]), ("2026-01-03 09:00 UTC", ["stacking"])]
    lines = report.markdown({"machine": {"cores": 2, "memory_gb": 1, "cpu_model": "x", "python": "3", "platform": "p",
                                         "load_average": [0, 0, 0]},
                             "date_utc": "d", "mode": "full", "reps": 1, "threads": 2, "load_average_after": [0, 0, 0],
                             "total_seconds": 1.0, "earlier": runs, "cases": [], "rows": [], "targets": []})
    assert "- rows of machine, coadd kept from the run of 2026-01-02 10:00 UTC (load average then: [0.1, 0.2, 0.3])" in lines
    assert "- rows of stacking kept from the run of 2026-01-03 09:00 UTC" in lines


def test_measure_counts_deferred_figures_outside_the_clock():
    """A run that returns a function: the function runs after the clock stops and its figures are kept."""
    from benchmarks import measure

    def run(st):
        return lambda: (time.sleep(0.3), {"counted": st["n"]})[1]

    res = measure.measure(run, {"n": 7})
    assert res["extra"] == {"counted": 7}
    assert res["wall_s"] < 0.25


def test_sampler_counts_a_child_started_during_the_piece():
    """The memory of a child process that starts after the sampler does is in the peak: descendants are
    searched for every few samples, not only at the start."""
    from benchmarks import measure

    code = "import time, numpy as np; a = np.ones(40_000_000); time.sleep(0.8)"  # 320 MB resident
    with measure.TreeSampler() as sampler:
        base = sampler.baseline
        time.sleep(0.15)
        subprocess.run([sys.executable, "-c", code], check=True)
    assert sampler.peak - base > 250 * 2**20
    assert sampler._count > measure.TreeSampler.CHILDREN_EVERY
