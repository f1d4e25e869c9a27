"""``python -m benchmarks {run,setup}``: side-by-side speed and memory measurements.

    python -m benchmarks setup                      # install the peers (SWarp, reproject, ...)
    python -m benchmarks run                        # every case, standard inputs, 3 repetitions
    python -m benchmarks run --quick                # small inputs, a couple of minutes
    python -m benchmarks run --only resample stacking --reps 5 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import cases as C
from . import inputs, measure, report

PIP_PEERS = ("reproject", "photutils", "sep", "ccdproc")
HERE = Path(__file__).resolve().parent


def setup(echo=print) -> dict[str, str]:
    """Install the peers; return ``{peer: status}``. Failures are reported, never fatal."""
    status: dict[str, str] = {}
    if C.swarp_executable():
        status["swarp"] = "present"
    elif hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        echo("installing SWarp: apt-get update && apt-get install -y swarp")
        ok = subprocess.run("apt-get update && apt-get install -y swarp", shell=True).returncode == 0
        status["swarp"] = "installed" if ok and C.swarp_executable() else "could not be installed (apt-get failed)"
    else:
        status["swarp"] = "not installed (needs root and apt-get: install the Debian package 'swarp' by hand)"
    echo(f"installing {' '.join(PIP_PEERS)} with pip")
    for peer in PIP_PEERS:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", peer], capture_output=True, text=True)
        status[peer] = "installed" if proc.returncode == 0 else "could not be installed: " + (
            proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    for peer, st in status.items():
        echo(f"  {peer:10s} {st}")
    return status


def run(args) -> int:
    mode = "quick" if args.quick else "full"
    threads = args.threads or min(2, os.cpu_count() or 1)
    s = inputs.sizes(mode, threads)
    all_cases = C.cases(s)
    names = [c.name for c in all_cases]
    for n in args.only or []:
        if n not in names:
            print(f"unknown case {n!r}; cases: {', '.join(names)}", file=sys.stderr)
            return 2
    selected = [c for c in all_cases if not args.only or c.name in args.only]
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    out = Path(args.out) if args.out else HERE
    out.mkdir(parents=True, exist_ok=True)
    if not selected:
        return 2

    kept: list[dict] = []
    earlier = None
    previous = out / "results.json"
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("mode") == mode:
            rerun = {c.name for c in selected}
            kept = [report.complete(r) for r in old["rows"] if r["case"] not in rerun]
            for r in kept:  # rows from before rows carried their own date: the previous file's
                r.setdefault("measured_utc", old["date_utc"])
                r.setdefault("load_average", old["machine"].get("load_average"))
            earlier = report.earlier_runs(kept, names)

    t_start = time.perf_counter()
    print(f"building the {mode} inputs under {inputs.work_dir(s)} (cached)", flush=True)
    inputs.build(s, echo=lambda m: print(m, flush=True))
    machine = measure.machine()
    print(f"machine: {machine['cores']} cores, {machine['memory_gb']} GB, {machine['cpu_model']}; "
          f"load {machine['load_average']}", flush=True)
    if not (args.quick or args.no_prefault):
        machine["prefault"] = measure.prefault_memory()
        print(f"wrote {machine['prefault']['gb']} GB of memory once in {machine['prefault']['seconds']} s "
              "(see README: first writes to unused memory)", flush=True)
    records: list[dict] = []
    for case in selected:
        print(f"\n== {case.name}: {case.title}", flush=True)
        usable = []
        for impl in case.impls:
            ok, missing = C.available(impl)
            if ok:
                usable.append(impl)
            else:
                print(f"  {impl.label}: not installed ({missing})", flush=True)
                records.append(report.record(case, impl, [], status=f"not installed ({missing})"))
        runs: dict[str, list[dict]] = {i.name: [] for i in usable}
        # alternate the implementations within each repetition
        for r in range(reps):
            for impl in usable:
                n = min(impl.reps, reps) if impl.reps is not None else reps
                if r >= n or (runs[impl.name] and "error" in runs[impl.name][-1]):
                    continue
                res = measure.run_piece(case.name, impl.name, mode, threads)
                runs[impl.name].append(res)
                if "error" in res:
                    print(f"  [{r + 1}/{n}] {impl.label}: FAILED {res['error']}", flush=True)
                else:
                    print(f"  [{r + 1}/{n}] {impl.label}: {res['wall_s']:.2f} s wall, {res['cpu_s']:.2f} s CPU, "
                          f"peak {res['peak_mb']:.0f} MB", flush=True)
        for impl in usable:
            records.append(report.record(case, impl, runs[impl.name]))
            records[-1].update(measured_utc=report.now_utc(), load_average=machine["load_average"])
        # written after every case, so an interrupted run keeps what it measured
        rows = sorted(kept + records, key=lambda r: names.index(r["case"]))
        done = [c for c in all_cases if any(r["case"] == c.name for r in rows)]
        results = report.assemble(done, rows, machine, mode=mode, reps=reps, threads=threads, sizes=s,
                                  seconds=time.perf_counter() - t_start,
                                  load_after=measure.machine()["load_average"], earlier=earlier)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(report.markdown(results))
    print()
    print(report.markdown(results))
    for t in results["targets"]:
        print(f"{t['verdict']:5s} {t['case']}: {t['ours']} vs {t['peer']}: ratio {t['ratio_text']} (target {t['text']})")
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def render(args) -> int:
    """Re-judge the targets and rewrite results.md from the results.json in ``--out``."""
    out = Path(args.out) if args.out else HERE
    old = json.loads((out / "results.json").read_text())
    s = inputs.sizes(old["mode"], old["threads"])
    all_cases = C.cases(s)
    rows = [report.complete(r) for r in old["rows"]]
    done = [c for c in all_cases if any(r["case"] == c.name for r in rows)]
    results = report.assemble(done, rows, old["machine"], mode=old["mode"], reps=old["reps"], threads=old["threads"],
                              sizes=s, seconds=old["total_seconds"], load_after=old["load_average_after"],
                              earlier=old.get("earlier"))
    results["date_utc"] = old["date_utc"]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    print(report.markdown(results))
    return 0


def piece(args) -> int:
    s = inputs.sizes(args.mode, args.threads)
    impl = C.find(s, args.case, args.impl)
    ctx = {"sizes": s, "layout": inputs.layout(s)}
    state = impl.prepare(ctx)
    if impl.warmup is not None:
        impl.warmup(state)
    res = measure.measure(impl.run, state)
    res.update(mpix=state["mpix"], threads=state["threads"])
    print(measure.MARK + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the cases and write results.md / results.json")
    p_run.add_argument("--quick", action="store_true", help="small inputs (a couple of minutes in all)")
    p_run.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases")
    p_run.add_argument("--reps", type=int, default=None, help="repetitions per implementation (default 3, quick 1)")
    p_run.add_argument("--out", default=None, help="directory of results.md / results.json (default benchmarks/)")
    p_run.add_argument("--update", action="store_true",
                       help="keep the rows of the cases not run now from the results.json already in --out")
    p_run.add_argument("--threads", type=int, default=None, help="threads of the multi-threaded rows (default 2)")
    p_run.add_argument("--no-prefault", action="store_true",
                       help="do not write 80%% of the available memory once before measuring (full mode does by default)")
    sub.add_parser("setup", help="install the peers (SWarp via apt-get when root; pip packages)")
    p_render = sub.add_parser("render", help="rewrite results.md from results.json (targets judged again)")
    p_render.add_argument("--out", default=None, help="directory holding results.json (default benchmarks/)")
    p_piece = sub.add_parser("_piece", help=argparse.SUPPRESS)
    p_piece.add_argument("case")
    p_piece.add_argument("impl")
    p_piece.add_argument("--mode", choices=("quick", "full"), required=True)
    p_piece.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup()
        return 0
    if args.command == "render":
        return render(args)
    if args.command == "_piece":
        return piece(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
