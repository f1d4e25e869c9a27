"""The executor: batches of units, completion markers, skips, failures, retries, a real cluster."""

from __future__ import annotations

import io
import threading

import dask
import dask.array as da
import numpy as np
import pytest
from dask.delayed import Delayed

from graphs.execute import RunError, RunReport, Unit, run_units
from pipeline.errors import DataQualityError, ProductIncompleteError
from pipeline.io.repo import coadd_path, open_repo
from pipeline.model.geometry import Box
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import empty_like_frame
from pipeline.testing import assert_datasets_equal, graph_size, raise_if_dask_computes

from conftest import make_tan_wcs

TRACT_SHAPE = (160, 200)
PATCH_INNER = (100, 80)  # (x, y)


def template():
    ny, nx = TRACT_SHAPE
    return empty_like_frame(
        x0=0, y0=0, nx=nx, ny=ny, wcs=make_tan_wcs(crpix=(100.0, 80.0)), kind="coadd",
        attrs={"tract": 0, "band": "r"}, chunks=40,
    )


def patch_value(i, j):
    return float(10 * i + j + 1)


def patch_window(box: Box, value: float, *, fail_block: bool = False, flaky: dict | None = None):
    """The patch's window: image = value, variance = 1, mask = 0 (lazy, chunked 37x41).

    ``fail_block`` makes one block raise a DataQualityError when computed; ``flaky`` (a dict with a
    counter) makes the first computation of one block raise and later ones succeed.
    """
    win = box.sel(template()).copy()
    shape = box.shape
    image = da.full(shape, value, dtype=np.float32, chunks=(37, 41))
    if fail_block:

        def bad_block(block, block_info=None):
            if block_info[0]["chunk-location"] == (1, 1):
                raise DataQualityError("too few good pixels", ids={"tract": 0, "patch": "x"})
            return block

        image = image.map_blocks(bad_block, dtype=np.float32)
    if flaky is not None:
        lock = threading.Lock()

        def flaky_block(block, block_info=None):
            if block_info[0]["chunk-location"] == (1, 1):
                with lock:
                    flaky["calls"] += 1
                    first = flaky["calls"] == 1
                if first:
                    raise OSError("transient store error")
            return block

        image = image.map_blocks(flaky_block, dtype=np.float32)
    win["image"] = (("y", "x"), image, dict(win["image"].attrs))
    win["variance"] = (("y", "x"), da.ones(shape, dtype=np.float32, chunks=(37, 41)), dict(win["variance"].attrs))
    win["mask"] = (("y", "x"), da.zeros(shape, dtype=np.uint32, chunks=(37, 41)), dict(win["mask"].attrs))
    return win


def coadd_units(repo, builds: dict, *, broken_build=(), failing=(), flaky=None):
    """One unit per patch of the test tract; ``builds`` counts build() calls per key."""
    path = repo.create_tract_product(coadd_path(0, "r"), template(), patch_inner=PATCH_INNER)
    units = []
    for name, box in sorted(repo.product_units(path).items()):
        i, j = (int(v) for v in name.split("_")[1:])
        key = f"coadd tract=0 patch={i},{j} band=r"

        def build(name=name, box=box, key=key, i=i, j=j):
            builds[key] = builds.get(key, 0) + 1
            if key in broken_build:
                raise ValueError(f"cannot plan patch {i},{j}")
            win = patch_window(
                box, patch_value(i, j), fail_block=key in failing, flaky=flaky if key in (flaky or {}).get("keys", ()) else None
            )
            return [repo.region_write(win, path, name)]

        units.append(
            Unit(
                key=key,
                build=build,
                done=lambda name=name: repo.is_complete(path, name),
                finish=lambda name=name: repo.mark_complete(path, name, task="test"),
            )
        )
    return path, units


@pytest.fixture
def repo(tmp_path):
    return open_repo(tmp_path / "repo.zarr", create=True)


def check_patch(repo, i, j):
    box = Box(i * 100, j * 80, (i + 1) * 100, (j + 1) * 80)
    ds = repo.open_coadd(0, "r", patch_box=box).compute()
    np.testing.assert_array_equal(ds["image"].values, np.full(box.shape, patch_value(i, j), np.float32))
    np.testing.assert_array_equal(ds["variance"].values, np.ones(box.shape, np.float32))
    np.testing.assert_array_equal(ds["mask"].values, np.zeros(box.shape, np.uint32))


def test_run_units_local_fills_product_and_skips_on_rerun(repo):
    builds = {}
    path, units = coadd_units(repo, builds)
    stream = io.StringIO()
    report = run_units(units, batch_size=3, stream=stream)
    assert isinstance(report, RunReport) and report.ok
    assert report.done == [u.key for u in units]
    assert report.skipped == [] and report.failed == []
    assert set(report.timings) == {u.key for u in units} and all(t >= 0 for t in report.timings.values())
    for i in (0, 1):
        for j in (0, 1):
            check_patch(repo, i, j)
    assert repo.marker_info(path, "patch_1_0")["provenance"] == {"task": "test"}
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[1/4] done    coadd tract=0 patch=0,0 band=r (")
    # a re-run builds nothing and skips every unit
    again = run_units(units, stream=io.StringIO())
    assert again.skipped == [u.key for u in units] and again.done == []
    assert builds == {u.key: 1 for u in units}


def test_building_units_computes_nothing(repo):
    _, units = coadd_units(repo, {})
    with raise_if_dask_computes():
        writes = [w for u in units for w in u.build()]
    assert all(isinstance(w, Delayed) for w in writes)
    # one patch window: 3 variables x (<= 9 source blocks + 16 stored chunks with <= 4 splits, a merge, a store)
    for w in writes:
        assert graph_size(w) <= 3 * (9 + 16 * 6) + 1


def test_failed_build_leaves_no_marker_and_others_finish(repo):
    builds = {}
    bad = "coadd tract=0 patch=1,0 band=r"
    path, units = coadd_units(repo, builds, broken_build={bad})
    report = run_units(units, progress=False)
    assert report.failed == [bad]
    assert report.errors[bad] == "ValueError: cannot plan patch 1,0"
    assert len(report.done) == 3
    assert not repo.is_complete(path, "patch_1_0")
    with pytest.raises(ProductIncompleteError, match=r"patch_1_0 not marked complete \[tract=0 patch=1,0 band=r"):
        repo.open_coadd(0, "r", patch_box=Box(100, 0, 200, 80))
    check_patch(repo, 0, 0)
    # the next run redoes only the failed unit
    builds.clear()
    path, units = coadd_units(repo, builds)
    report = run_units(units, progress=False)
    assert report.done == [bad] and len(report.skipped) == 3
    assert builds == {bad: 1}
    check_patch(repo, 1, 0)


def test_failing_computation_keeps_partial_data_invisible(repo, tmp_path):
    bad = "coadd tract=0 patch=0,1 band=r"
    path, units = coadd_units(repo, {}, failing={bad})
    report = run_units(units, progress=False, retries=2)
    assert report.failed == [bad]
    assert "DataQualityError: too few good pixels" in report.errors[bad]
    failed = [r for r in report.results if r.key == bad][0]
    assert failed.attempts == 3  # the first try and two retries
    # some chunks of the failed patch were written, yet the patch stays invisible
    written = list((tmp_path / "repo.zarr" / path / "image" / "c").rglob("*"))
    assert written
    with pytest.raises(ProductIncompleteError, match="patch_0_1"):
        repo.open_coadd(0, "r", patch_box=Box(0, 80, 100, 160))
    for i, j in ((0, 0), (1, 0), (1, 1)):
        check_patch(repo, i, j)


def test_local_retries_recover_transient_failures(repo):
    key = "coadd tract=0 patch=1,1 band=r"
    flaky = {"calls": 0, "keys": {key}}
    _, units = coadd_units(repo, {}, flaky=flaky)
    report = run_units(units, progress=False, retries=1)
    assert report.ok and key in report.done
    assert [r.attempts for r in report.results if r.key == key] == [2]
    check_patch(repo, 1, 1)
    repo2 = open_repo(repo.url.replace("repo.zarr", "repo2.zarr"), create=True)
    flaky2 = {"calls": 0, "keys": {key}}
    _, units2 = coadd_units(repo2, {}, flaky=flaky2)
    report2 = run_units(units2, progress=False, retries=0)
    assert report2.failed == [key]
    assert "OSError: transient store error" in report2.errors[key]


def test_raise_on_error_and_finish_failure(repo):
    builds = {}
    bad = "coadd tract=0 patch=0,0 band=r"
    _, units = coadd_units(repo, builds, broken_build={bad})
    with pytest.raises(RunError, match=r"1 of 4 units failed:\n  coadd tract=0 patch=0,0 band=r: ValueError: cannot plan patch 0,0") as info:
        run_units(units, progress=False, raise_on_error=True)
    assert info.value.report.done == [u.key for u in units if u.key != bad]

    def boom():
        raise OSError("marker store read-only")

    unit = Unit(key="u", build=lambda: [], done=lambda: False, finish=boom)
    report = run_units([unit], progress=False)
    assert report.errors == {"u": "finish: OSError: marker store read-only"}
    assert "FAILED u: finish: OSError" in report.summary()

    def not_sure():
        raise RuntimeError("cannot list markers")

    report = run_units([Unit(key="v", build=lambda: [], done=not_sure, finish=lambda: None)], progress=False)
    assert report.errors == {"v": "RuntimeError: cannot list markers"}


def test_units_without_writes_and_single_delayed(repo):
    calls = []
    units = [
        Unit(key="empty", build=lambda: [], done=lambda: False, finish=lambda: calls.append("empty")),
        Unit(key="one", build=lambda: dask.delayed(calls.append)("computed"), done=lambda: False, finish=lambda: calls.append("one")),
    ]
    report = run_units(units, progress=False)
    assert report.done == ["empty", "one"]
    assert sorted(calls) == ["computed", "empty", "one"]
    assert report.to_dict()["results"][0]["status"] == "done"


def test_run_units_validation():
    unit = Unit(key="a", build=lambda: [], done=lambda: False, finish=lambda: None)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        run_units([unit], batch_size=0)
    with pytest.raises(ValueError, match="retries must be non-negative, got -1"):
        run_units([unit], retries=-1)
    with pytest.raises(ValueError, match=r"unit keys must be unique; repeated: \['a'\]"):
        run_units([unit, unit])
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        run_units([unit], threads=0)


def _thread_names_of_blocks(**kwargs) -> set[str]:
    """Names of the threads that computed the 16 blocks of one unit's write."""
    names, lock = set(), threading.Lock()

    def record(block):
        with lock:
            names.add(threading.current_thread().name)
        return block

    arr = da.zeros((64, 64), chunks=16).map_blocks(record, dtype=float, meta=np.empty((0, 0)))
    unit = Unit(key="u", build=lambda: [arr.sum()], done=lambda: False, finish=lambda: None)
    assert run_units([unit], progress=False, **kwargs).ok
    return names


def test_local_pool_size_follows_threads_then_dask_config():
    assert _thread_names_of_blocks(threads=1) == {"skystack-compute_0"}
    with dask.config.set(num_workers=1):
        assert _thread_names_of_blocks() == {"skystack-compute_0"}
    # two threads: only the pool's threads compute (which of them takes which block is the scheduler's)
    names = _thread_names_of_blocks(threads=2)
    assert names <= {"skystack-compute_0", "skystack-compute_1"}


@pytest.mark.cluster
def test_run_units_on_local_cluster(repo, tmp_path):
    import distributed
    bad = "coadd tract=0 patch=1,1 band=r"
    builds = {}
    path, units = coadd_units(repo, builds, failing={bad})
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster, distributed.Client(cluster) as client:
        report = run_units(units, client=client, retries=1, progress=False, batch_size=2)
        assert report.failed == [bad]
        assert "too few good pixels" in report.errors[bad]
        assert len(report.done) == 3
        for i, j in ((0, 0), (1, 0), (0, 1)):
            check_patch(repo, i, j)
        with pytest.raises(ProductIncompleteError, match="patch_1_1"):
            repo.open_coadd(0, "r")
        # re-run with the fault gone: only the failed unit is built and computed
        builds.clear()
        _, units = coadd_units(repo, builds)
        report = run_units(units, client=client, progress=False)
        assert report.done == [bad] and len(report.skipped) == 3
        assert builds == {bad: 1}
    whole = repo.open_coadd(0, "r").compute()
    expected = np.empty(TRACT_SHAPE, np.float32)
    for i in (0, 1):
        for j in (0, 1):
            expected[j * 80 : (j + 1) * 80, i * 100 : (i + 1) * 100] = patch_value(i, j)
    np.testing.assert_array_equal(whole["image"].values, expected)
    assert not np.any(whole["mask"].values & np.uint32(MaskPlane.NO_DATA))
    # the same units run without a client give the same product
    local = open_repo(tmp_path / "local.zarr", create=True)
    _, units = coadd_units(local, {})
    assert run_units(units, progress=False).ok
    assert_datasets_equal(local.open_coadd(0, "r").compute(), whole)
