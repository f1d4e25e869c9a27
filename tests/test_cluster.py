"""Real dask schedulers and workers on 127.0.0.1: a started-by-hand cluster and the local one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import pytest
from distributed import get_task_stream

import pipeline
from graphs.cluster import cluster, connect, default_n_workers, start_local_cluster
from pipeline.errors import SkystackError

pytestmark = pytest.mark.cluster

N = 10_000
EXPECTED_SUM = N * (N - 1) // 2


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a process this test started, then anything left in its own process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session created for this child only
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"scheduler exited early:\n{log.read_text()}")
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass  # being written
        time.sleep(0.1)
    raise RuntimeError(f"no scheduler file after {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def scheduler_and_workers(tmp_path_factory, request):
    """A ``dask scheduler`` and two ``dask worker`` processes; all terminated at teardown."""
    started: list[subprocess.Popen] = []
    request.addfinalizer(lambda: [_stop(p) for p in reversed(started)])
    tmp_path = tmp_path_factory.mktemp("cluster")
    sched_file = tmp_path / "scheduler.json"
    log = tmp_path / "scheduler.log"
    started.append(_spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                           "--no-dashboard", "--scheduler-file", str(sched_file)], log))
    info = _wait_for(sched_file, started[0], log)
    for k in range(2):
        started.append(_spawn(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                               "--host", "127.0.0.1", "--nthreads", "1", "--name", f"w{k}", "--no-dashboard",
                               "--memory-limit", "512MiB", "--local-directory", str(tmp_path / f"w{k}")],
                              tmp_path / f"worker{k}.log"))
    return {"address": info["address"], "file": str(sched_file), "processes": started}


def _sum_on(client) -> tuple[int, set[str]]:
    x = da.arange(N, chunks=997, dtype=np.int64)
    with get_task_stream(client) as ts:
        total = int(client.compute(x.sum()).result())
    return total, {t["worker"] for t in ts.data}


def test_connect_to_scheduler_and_workers(scheduler_and_workers):
    address = scheduler_and_workers["address"]
    assert address.startswith("tcp://127.0.0.1:")
    client = connect(address)
    try:
        client.wait_for_workers(2, timeout=60)
        workers = client.scheduler_info()["workers"]
        assert sorted(w["name"] for w in workers.values()) == ["w0", "w1"]
        total, ran_on = _sum_on(client)
        assert total == EXPECTED_SUM
        assert ran_on and ran_on <= set(workers)
        # the workers import skystack from the shared source tree
        assert client.submit(lambda: __import__("pipeline").__version__, pure=False).result() == pipeline.__version__
    finally:
        client.close()
    # closing a client leaves the scheduler and workers running
    assert all(p.poll() is None for p in scheduler_and_workers["processes"])


def test_cluster_context_with_address_and_scheduler_file(scheduler_and_workers):
    procs = scheduler_and_workers["processes"]
    with cluster(scheduler_and_workers["file"]) as client:
        client.wait_for_workers(2, timeout=60)
        assert client.scheduler.address == scheduler_and_workers["address"]
        assert _sum_on(client)[0] == EXPECTED_SUM
    assert client.status == "closed"
    assert all(p.poll() is None for p in procs)


def test_local_cluster_context_closes_what_it_started():
    with cluster(n_workers=1, threads_per_worker=1, memory_limit="1GiB") as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        (w,) = workers.values()
        assert w["nthreads"] == 1 and w["memory_limit"] == 2**30
        http = client.scheduler_info()["services"]
        assert set(http) == {"dashboard"}
        with socket.create_connection(("127.0.0.1", http["dashboard"]), timeout=5):
            pass  # the scheduler's HTTP endpoints: on a local free port, not 8787 on every interface
        total, ran_on = _sum_on(client)
        assert total == EXPECTED_SUM and ran_on == set(workers)
        pids = list(client.run(os.getpid).values())
        # scheduler (this process), nanny and worker listen on the loopback interface only
        for proc in (psutil.Process(), *(psutil.Process(p) for p in pids), psutil.Process(pids[0]).parent()):
            listening = [c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            assert listening and set(listening) == {"127.0.0.1"}, (proc, listening)
    assert client.status == "closed"
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"worker processes {pids} still alive"
        time.sleep(0.2)


def test_default_worker_count():
    assert default_n_workers() >= 1
    assert default_n_workers() <= (os.cpu_count() or 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors(tmp_path):
    port = _free_port()
    with pytest.raises(SkystackError, match=rf"cannot reach the dask scheduler at 'tcp://127.0.0.1:{port}' within 1 s"):
        connect(f"tcp://127.0.0.1:{port}", timeout=1)
    with pytest.raises(SkystackError, match=r"scheduler file '.*missing.json' does not exist"):
        connect(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="scheduler address must be a non-empty string, got ''"):
        connect("")
    with pytest.raises(ValueError, match="timeout must be positive, got 0"):
        connect("tcp://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match=r"local cluster options \['n_workers'\] cannot be combined"):
        with cluster("tcp://127.0.0.1:1", n_workers=2):
            pass
    with pytest.raises(ValueError, match="n_workers must be a positive integer, got 0"):
        start_local_cluster(n_workers=0)
    with pytest.raises(ValueError, match="threads_per_worker must be a positive integer, got 1.5"):
        start_local_cluster(n_workers=1, threads_per_worker=1.5)


# ------------------------------------------------------------------------- deploy/ files
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_slurm_script_is_valid_bash_and_runs_the_cli_on_its_cluster():
    script = DEPLOY / "slurm" / "skystack.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "dask scheduler" in text and "dask worker --scheduler-file" in text
    assert 'skystack --scheduler "$SCHEDULER_FILE" coadd' in text
    assert "trap cleanup EXIT" in text


def test_kubernetes_manifests():
    import yaml  # a dependency of dask
    docs = [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("Deployment", "skystack-scheduler"), ("Deployment", "skystack-worker"), ("Job", "skystack-coadd"),
                     ("PersistentVolumeClaim", "skystack-data"), ("Service", "skystack-scheduler")]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    service = by_name["Service", "skystack-scheduler"]
    port = service["spec"]["ports"][0]["port"]
    containers = [c for d in docs if "template" in d.get("spec", {}) for c in d["spec"]["template"]["spec"]["containers"]]
    assert {c["image"] for c in containers} == {"REGISTRY/skystack:TAG"}
    worker = by_name["Deployment", "skystack-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][:3] == ["dask", "worker", f"tcp://skystack-scheduler:{port}"]
    job = by_name["Job", "skystack-coadd"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][:3] == ["skystack", "--scheduler", f"tcp://skystack-scheduler:{port}"]
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfile_copies_what_the_build_needs():
    import tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set()
    for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(line.split()[1:-1])
    assert copied == needed


def test_no_credentials_in_deploy_files():
    words = ("password", "passwd", "secret_key", "secretkey", "aws_access_key_id", "aws_secret", "token:",
             "api_key", "apikey")
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text().lower()
            assert not [w for w in words if w in text], path
