"""Tests of graphs.warps: direct warps of simulated visits written to a repository."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from graphs.execute import run_units
from graphs.ingest import ingest_datasets
from graphs.warps import copy_good_pixels, plan_footprint, run_warps, warp_units
from conftest import make_small_repo
from pipeline.errors import RepositoryError
from pipeline.io.repo import open_repo, visit_unit, warp_path
from pipeline.model.geometry import Box
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import make_dataset
from pipeline.model.skymap import SkyMap
from pipeline.testing import raise_if_dask_computes
from pipeline.warp import WarpConfig, plan_warp, warp_exposure


NO_DATA = int(MaskPlane.NO_DATA)


@pytest.fixture(scope="module")
def sim(two_visit_sim):
    return two_visit_sim


make_repo = make_small_repo


def test_warp_units_write_the_direct_warp_of_each_visit(tmp_path, sim):
    repo = make_repo(tmp_path, sim.exposures)
    skymap = SkyMap.from_json(repo.skymap_json)
    tract = skymap.tract(skymap.tract_ids[0])
    units = warp_units(repo)
    assert [u.key for u in units] == [f"warp tract={tract.id} visit={v}" for v in (1000, 1001)]
    report = run_units(units, progress=False)
    assert report.ok, report.errors
    for ds in sim.exposures:
        visit = ds.attrs["visit"]
        got = repo.open_warp(tract.id, visit)
        expect = warp_exposure(ds, wcs=tract.wcs_header(), box=tract.bbox, chunks=1000)
        for name in ("image", "variance", "mask"):
            np.testing.assert_array_equal(got[name].values, expect[name].values)
        info = repo.marker_info(warp_path(tract.id, visit), visit_unit(visit))["provenance"]
        assert info["detectors"][0]["n_good_pixels"] == expect.attrs["n_good_pixels"] > 0
        assert info["detectors"][0]["variance_correlation_factor"] == pytest.approx(
            expect.attrs["variance_correlation_factor"], rel=1e-12
        )
        assert got.attrs["bunit"] == "nJy" and got.attrs["zero_point"] == 31.4 and got.attrs["band"] == "r"
        assert got.attrs["n_good_pixels"] == expect.attrs["n_good_pixels"]
        assert got.attrs["variance_correlation_factor"] == pytest.approx(expect.attrs["variance_correlation_factor"])
    # a re-run skips the finished units; overwrite redoes them
    assert run_units(warp_units(repo), progress=False).skipped == [u.key for u in units]
    assert run_units(warp_units(repo, visits=[1001], overwrite=True), progress=False).done == [units[1].key]


def test_building_a_unit_computes_nothing_and_graph_is_bounded(tmp_path, sim):
    repo = make_repo(tmp_path, sim.exposures[:1])
    (unit,) = warp_units(repo)
    with raise_if_dask_computes():
        writes = unit.build()
    assert len(writes) == 1
    # the graph holds the exposure's reads and one warp task per covered chunk, not per tract chunk
    n_tasks = len(writes[0].__dask_graph__())
    tract = SkyMap.from_json(repo.skymap_json).tract(0)
    plan = plan_warp(sim.exposures[0], wcs=tract.wcs_header(), box=tract.bbox, chunks=16)
    assert n_tasks < 40 * len(plan.covered_blocks) + 200


def two_detectors(sim):
    """Two overlapping 'detectors' of one visit: the left and right parts of one exposure."""
    ds = sim.exposures[0]
    left = ds.isel(x=slice(0, 70))
    right = ds.isel(x=slice(50, 112))
    out = []
    for det, part in ((1, left), (2, right)):
        part = part.drop_vars(["psf", "psf_x", "psf_y"])
        new = make_dataset(
            part.image.values, part.variance.values, part.mask.values, wcs=ds.coords["wcs"].attrs["fits_header"],
            x0=int(part.x[0]), y0=0, attrs={**ds.attrs, "detector": det},
        )
        out.append(new)
    return out


def test_detectors_of_a_visit_combine_last_one_wins(tmp_path, sim):
    d1, d2 = two_detectors(sim)
    repo = make_repo(tmp_path, [d1, d2])
    tract = SkyMap.from_json(repo.skymap_json).tract(0)
    report = run_units(warp_units(repo), progress=False)
    assert report.ok, report.errors
    got = repo.open_warp(tract.id, 1000)
    w1 = warp_exposure(d1, wcs=tract.wcs_header(), box=tract.bbox)
    w2 = warp_exposure(d2, wcs=tract.wcs_header(), box=tract.bbox)
    good2 = (w2.mask.values & NO_DATA) == 0
    good1 = (w1.mask.values & NO_DATA) == 0
    assert (good1 & good2).sum() > 500  # the detectors overlap
    np.testing.assert_array_equal(got.image.values[good2], w2.image.values[good2])
    only1 = good1 & ~good2
    np.testing.assert_array_equal(got.image.values[only1], w1.image.values[only1])
    assert np.all(got.mask.values[~good1 & ~good2] == NO_DATA)
    info = repo.marker_info(warp_path(tract.id, 1000), visit_unit(1000))["provenance"]
    assert [d["detector"] for d in info["detectors"]] == [1, 2]


def test_copy_good_pixels_closed_form():
    from conftest import make_tan_wcs

    w = make_tan_wcs()
    a = make_dataset(np.full((3, 3), 1.0), np.full((3, 3), 1.0), np.zeros((3, 3)), wcs=w, kind="warp")
    b_mask = np.full((3, 3), NO_DATA, np.uint32)
    b_mask[1, 1] = 0
    b = make_dataset(np.full((3, 3), 2.0), np.full((3, 3), 4.0), b_mask, wcs=w, kind="warp")
    out = copy_good_pixels([a, b])
    expect = np.ones((3, 3))
    expect[1, 1] = 2.0
    np.testing.assert_array_equal(out.image.values, expect)
    assert out.mask.values[1, 1] == 0 and out.mask.values[0, 0] == 0
    lazy = copy_good_pixels([a.chunk(2), b.chunk(2)])
    xr.testing.assert_identical(lazy.compute(), out)


def test_plan_footprint(sim):
    from conftest import make_tan_wcs

    ds = sim.exposures[0]
    plan = plan_warp(ds, wcs=make_tan_wcs(crpix=(500.0, 500.0)), box=Box(0, 0, 1000, 1000), chunks=64)
    fp = plan_footprint(plan)
    assert fp.x0 % 64 == 0 and fp.y0 % 64 == 0 and fp.width <= 4 * 64
    g = plan.good_box
    assert fp == Box(g.x0 // 64 * 64, g.y0 // 64 * 64, -(-g.x1 // 64) * 64, -(-g.y1 // 64) * 64)
    far = plan_warp(ds, wcs=make_tan_wcs(ra=10.0, dec=-30.0), box=Box(0, 0, 100, 100), chunks=64)
    assert plan_footprint(far).empty


def test_visit_that_does_not_touch_makes_no_unit(tmp_path, sim):
    from conftest import make_tan_wcs

    ds = sim.exposures[0]
    far = ds.copy()
    far.coords["wcs"] = ds.coords["wcs"].copy()
    far.coords["wcs"].attrs = {"fits_header": make_tan_wcs(ra=10.0, dec=-30.0).to_header().tostring()}
    far.attrs = {**ds.attrs, "visit": 5}
    repo = open_repo(tmp_path / "repo.zarr", create=True)
    skymap = SkyMap.centred_on([(make_tan_wcs(crpix=(48.0, 56.0)).deepcopy(), (96, 112))], patch_inner=(64, 64))
    ingest_datasets(repo, [ds, far], skymap=skymap)
    units = warp_units(repo)
    assert [u.key for u in units] == ["warp tract=0 visit=1000"]


def test_errors(tmp_path, sim):
    empty = open_repo(tmp_path / "empty.zarr", create=True)
    with pytest.raises(RepositoryError, match=r"has no sky map; ingest exposures first"):
        warp_units(empty)
    repo = make_repo(tmp_path, sim.exposures[:1])
    with pytest.raises(RepositoryError, match=r"warp kind 'psf_matched' is not built by warp_units"):
        warp_units(repo, kind="psf_matched")
    with pytest.raises(RepositoryError, match=r"no exposures of visit\(s\) \[77\]"):
        warp_units(repo, visits=[77])
    units = warp_units(repo, config=WarpConfig(kernel="lanczos5"))
    assert len(units) == 1


def test_run_warps_from_a_url(tmp_path, sim):
    repo = make_repo(tmp_path, sim.exposures)
    report = run_warps(str(tmp_path / "repo.zarr"), visits=[1001], progress=False)
    assert report.ok and report.done == ["warp tract=0 visit=1001"]
    assert repo.is_complete(warp_path(0, 1001), visit_unit(1001))
    assert not repo.is_complete(warp_path(0, 1000), visit_unit(1000))
    kinds = {(r["kind"], r.get("visit"), r["complete"]) for r in repo.inventory()}
    assert ("warp", 1001, True) in kinds


def test_mask_planes_are_remapped_to_the_canonical_bits(tmp_path, sim):
    from pipeline.model.masks import CANONICAL_PLANES

    ds = sim.exposures[0]
    planes = dict(CANONICAL_PLANES)
    planes["BAD"], planes["CR"] = CANONICAL_PLANES["CR"], CANONICAL_PLANES["BAD"]
    bad = ds.mask.values & np.uint32(MaskPlane.BAD) != 0
    assert bad.any()
    swapped = np.where(bad, np.uint32(MaskPlane.CR), np.uint32(0)) | (ds.mask.values & ~np.uint32(MaskPlane.BAD | MaskPlane.CR))
    other = make_dataset(
        ds.image.values, ds.variance.values, swapped.astype(np.uint32), wcs=ds.coords["wcs"].attrs["fits_header"],
        planes=planes, attrs=dict(ds.attrs),
    )
    repo = make_repo(tmp_path, [other])
    assert run_units(warp_units(repo), progress=False).ok
    got = repo.open_warp(0, 1000)
    expect = warp_exposure(ds.drop_vars(["psf", "psf_x", "psf_y"]), wcs=got.coords["wcs"].attrs["fits_header"],
                           box=Box.of(got))
    np.testing.assert_array_equal(got.mask.values, expect.mask.values)
