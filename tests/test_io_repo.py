"""The Zarr v3 repository: exposures, sparse tract products, completion markers, laziness."""

from __future__ import annotations

import functools
import json
import os

import dask
import dask.array as da
from dask.delayed import Delayed
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore, MemoryStore, WrapperStore

from pipeline.errors import MaskPlaneError, ProductIncompleteError, RepositoryError, SchemaError
from pipeline.io.repo import (
    FILL_VALUES,
    Repository,
    coadd_path,
    exposure_path,
    format_inventory,
    open_repo,
    patch_unit,
    visit_unit,
    warp_path,
)
from pipeline.model.geometry import Box
from pipeline.model.masks import CANONICAL_PLANES, MaskPlane, add_planes
from pipeline.model.schema import SCHEMA_VERSION, empty_like_frame, make_dataset, mask_planes, psf_grid, with_provenance
from pipeline.model.wcs import wcs_header_string
from pipeline.testing import assert_datasets_equal, assert_lazy, graph_size, raise_if_dask_computes
from conftest import make_tan_wcs

TRACT_SHAPE = (160, 200)  # (ny, nx): 2 x 2 patches of 80 x 100
PATCH_INNER = (100, 80)  # (x, y), as the sky map
CHUNKS = (20, 25)


def make_exposure(rng, *, visit=3, detector=7, shape=(45, 52), x0=10, y0=-4, planes=None):
    ny, nx = shape
    image = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
    image[3, 4] = np.nan
    variance = rng.uniform(20.0, 30.0, size=shape).astype(np.float32)
    planes = planes or add_planes(CANONICAL_PLANES, ["FOO_PLANE"])
    mask = rng.integers(0, 1 << 10, size=shape).astype(np.uint32)
    mask[0, :] |= np.uint32(1 << planes["FOO_PLANE"])
    yy, xx = np.mgrid[-3:4, -3:4]
    psfs = np.stack([np.stack([np.exp(-(xx**2 + yy**2) / (2 * s**2)) for s in (1.1, 1.3)]) for _ in range(2)])
    psf = psf_grid(psfs, x=[x0 + 10.0, x0 + 40.0], y=[y0 + 10.0, y0 + 35.0])
    ds = make_dataset(
        image,
        variance,
        mask,
        wcs=make_tan_wcs(crpix=(30.0, 20.0), rotation_deg=17.0),
        x0=x0,
        y0=y0,
        planes=planes,
        psf=psf,
        attrs={"visit": visit, "detector": detector, "band": "r", "zero_point": 27.25, "mjd": 60000.5, "exptime": 30.0},
    )
    return with_provenance(ds, "test.make", {"sigma": 5.0})


def tract_template(kind="coadd", attrs=None, chunks=40, with_n_image=False):
    ny, nx = TRACT_SHAPE
    ds = empty_like_frame(x0=0, y0=0, nx=nx, ny=ny, wcs=make_tan_wcs(crpix=(100.0, 80.0)), kind=kind, attrs=attrs, chunks=chunks)
    if with_n_image:
        ds["n_image"] = (("y", "x"), da.zeros((ny, nx), dtype=np.int32, chunks=chunks))
    return ds


def window_data(rng, box: Box, *, template=None, chunks=None):
    """A tract-frame window with random pixels (numpy-backed unless ``chunks``)."""
    template = template if template is not None else tract_template()
    win = box.sel(template)
    shape = box.shape
    out = win.copy()
    out["image"] = (("y", "x"), rng.normal(size=shape).astype(np.float32), dict(win["image"].attrs))
    out["variance"] = (("y", "x"), rng.uniform(1, 2, size=shape).astype(np.float32), dict(win["variance"].attrs))
    out["mask"] = (("y", "x"), rng.integers(0, 16, size=shape).astype(np.uint32), dict(win["mask"].attrs))
    if "n_image" in win:
        out["n_image"] = (("y", "x"), rng.integers(1, 9, size=shape).astype(np.int32))
    return out.chunk(chunks) if chunks is not None else out


@pytest.fixture
def repo(tmp_path):
    return open_repo(tmp_path / "repo.zarr", create=True)


def coadd_product(repo, **kw):
    return repo.create_tract_product(
        coadd_path(0, "r"), tract_template(attrs={"tract": 0, "band": "r"}, **kw), patch_inner=PATCH_INNER
    )


def chunk_files(root, product, var):
    base = os.path.join(root, product, var, "c")
    found = []
    for dirpath, _, files in os.walk(base):
        for f in files:
            found.append(os.path.relpath(os.path.join(dirpath, f), base))
    return sorted(found)


class CountingStore(WrapperStore):
    """A real store (wrapping another) that records the keys it is asked to read."""

    def __init__(self, store, log=None):
        super().__init__(store)
        self.log = [] if log is None else log

    def _with_store(self, store):
        return type(self)(store, self.log)

    async def get(self, key, prototype, byte_range=None):
        self.log.append(key)
        return await self._store.get(key, prototype, byte_range)


# ---------------------------------------------------------------------------------------------
# opening


def test_create_and_reopen(tmp_path):
    path = tmp_path / "r.zarr"
    repo = open_repo(path, create=True)
    assert repo.schema_version == SCHEMA_VERSION
    assert repo.writable
    again = open_repo(str(path))
    assert not again.writable
    root = zarr.open_group(LocalStore(str(path)), mode="r")
    assert root.attrs["schema_version"] == SCHEMA_VERSION
    assert "skystack_version" in root.attrs
    assert again.skymap_json is None


def test_open_missing_repo(tmp_path):
    with pytest.raises(RepositoryError, match=r"no skystack repository at .*nothing\.zarr"):
        open_repo(tmp_path / "nothing.zarr")
    with pytest.raises(RepositoryError, match="no skystack repository at"):
        open_repo(tmp_path / "nothing.zarr", mode="r+")


def test_open_not_a_skystack_repo(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(RepositoryError, match=r"is not a skystack repository \(no Zarr group"):
        open_repo(other)
    with pytest.raises(RepositoryError, match="is not empty and is not a skystack repository"):
        open_repo(other, create=True)
    plain = tmp_path / "plain.zarr"
    zarr.create_group(LocalStore(str(plain)), attributes={"title": "x"}, zarr_format=3)
    with pytest.raises(RepositoryError, match=r"plain\.zarr is not a skystack repository \(root has no schema_version\)"):
        open_repo(plain)


def test_open_schema_too_new(tmp_path):
    path = tmp_path / "new.zarr"
    open_repo(path, create=True)
    root = zarr.open_group(LocalStore(str(path)), mode="r+")
    root.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RepositoryError, match=rf"schema_version {SCHEMA_VERSION + 1}, newer than this code reads"):
        open_repo(path)
    root.attrs["schema_version"] = 0
    with pytest.raises(RepositoryError, match="schema_version 0, older than this code reads"):
        open_repo(path)
    root.attrs["schema_version"] = "1"
    with pytest.raises(RepositoryError, match=r"is not a skystack repository \(schema_version '1' is not an integer\)"):
        open_repo(path)


def test_open_bad_arguments(tmp_path):
    with pytest.raises(RepositoryError, match="mode 'w' is not one of"):
        open_repo(tmp_path / "x.zarr", mode="w")
    with pytest.raises(RepositoryError, match="must be a non-empty string or path"):
        open_repo("")


def test_read_only_repo_refuses_writes(tmp_path, rng):
    path = tmp_path / "r.zarr"
    open_repo(path, create=True)
    ro = open_repo(path)
    with pytest.raises(RepositoryError, match=r"open read-only; use open_repo\(..., mode='a'\)"):
        ro.write_exposure(make_exposure(rng))
    with pytest.raises(RepositoryError, match="open read-only"):
        ro.set_skymap({"a": 1})
    rw = open_repo(path, mode="r+")
    product = coadd_product(rw)
    ro = open_repo(path)
    with pytest.raises(RepositoryError, match="open read-only"):
        ro.create_tract_product(product, tract_template(), patch_inner=PATCH_INNER)
    with pytest.raises(RepositoryError, match="open read-only"):
        ro.region_write(window_data(rng, Box(0, 0, 100, 80)), product, "patch_0_0")
    with pytest.raises(RepositoryError, match="open read-only"):
        ro.mark_complete(product, "patch_0_0")
    with pytest.raises(RepositoryError, match="open read-only"):
        ro.remove_marker(product, "patch_0_0")


def test_memory_fsspec_url_round_trip(rng):
    repo = open_repo("memory://skystack-test-repo", create=True)
    ds = make_exposure(rng)
    repo.write_exposure(ds)
    back = open_repo("memory://skystack-test-repo").open_exposure(3, 7)
    assert_datasets_equal(ds, back)
    with pytest.raises(RepositoryError, match=r"no skystack repository at memory://skystack-absent"):
        open_repo("memory://skystack-absent")


def test_skymap_json(tmp_path):
    path = tmp_path / "r.zarr"
    repo = open_repo(path, create=True)
    sky = {"tracts": [{"id": 0, "ra": 150.0, "dec": 2.0}], "pixel_scale": 0.2, "patch_inner": [4000, 4000]}
    repo.set_skymap(sky)
    assert open_repo(path).skymap_json == sky

    class Sky:
        def to_json(self):
            return json.dumps({"kind": "discrete", "radius": 0.5})

    repo.set_skymap(Sky())
    assert open_repo(path).skymap_json == {"kind": "discrete", "radius": 0.5}
    with pytest.raises(RepositoryError, match="sky map must be a JSON dict, got list"):
        repo.set_skymap([1, 2])
    with pytest.raises(RepositoryError, match="sky map is not JSON-serialisable"):
        repo.set_skymap({"a": object()})


# ---------------------------------------------------------------------------------------------
# exposures


def test_exposure_round_trip_exact(repo, rng):
    ds = make_exposure(rng)
    before_attrs = dict(ds.attrs)
    before_enc = {k: dict(v.encoding) for k, v in ds.variables.items()}
    path = repo.write_exposure(ds)
    assert path == exposure_path(3, 7) == "exposures/visit_3/detector_7"
    assert repo.has_exposure(3, 7) and not repo.has_exposure(3, 8)
    back = repo.open_exposure(3, 7)
    for name in ("image", "variance", "mask"):
        assert back[name].dtype == ds[name].dtype
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    assert np.isnan(back["image"].values[3, 4])
    np.testing.assert_array_equal(back["y"].values, np.arange(-4, 41))
    np.testing.assert_array_equal(back["x"].values, np.arange(10, 62))
    assert mask_planes(back) == mask_planes(ds)
    assert "FOO_PLANE" in mask_planes(back)
    np.testing.assert_array_equal(back["psf"].values, ds["psf"].values)
    np.testing.assert_array_equal(back["psf_x"].values, ds["psf_x"].values)
    np.testing.assert_array_equal(back["psf_y"].values, ds["psf_y"].values)
    assert back.coords["wcs"].attrs["fits_header"] == ds.coords["wcs"].attrs["fits_header"]
    assert back.attrs == ds.attrs
    for name in ("image", "variance", "mask"):
        assert back[name].attrs == ds[name].attrs
    # the input is untouched
    assert ds.attrs == before_attrs
    assert {k: dict(v.encoding) for k, v in ds.variables.items()} == before_enc
    # pixel planes are stored with Blosc LZ4 and byte shuffle
    for name in ("image", "variance", "mask"):
        (codec,) = zarr.open_array(repo.store, path=f"{path}/{name}", mode="r").compressors
        assert (type(codec).__name__, codec.cname.value, codec.shuffle.value) == ("BloscCodec", "lz4", "shuffle")
        assert codec.typesize == ds[name].dtype.itemsize
    # every group carries schema_version
    store = repo.store
    for group in ("exposures", "exposures/visit_3", "exposures/visit_3/detector_7"):
        assert zarr.open_group(store, path=group, mode="r").attrs["schema_version"] == SCHEMA_VERSION


def test_open_exposure_is_lazy_and_rechunks(repo, rng):
    ds = make_exposure(rng, shape=(90, 100))
    repo.write_exposure(ds, chunk_size=32)
    back = assert_lazy(lambda: repo.open_exposure(3, 7))
    assert back["image"].data.chunksize == (32, 32)
    odd = assert_lazy(lambda: repo.open_exposure(3, 7, chunks={"y": 37, "x": 41}))
    assert odd["image"].data.chunks == ((37, 37, 16), (41, 41, 18))
    assert_datasets_equal(ds, odd.compute())
    # a dask-backed exposure chunked off the store's grid is stored identically
    repo.write_exposure(ds.chunk({"y": 37, "x": 41}), overwrite=True, chunk_size=32)
    assert_datasets_equal(ds, repo.open_exposure(3, 7).compute())


def test_duplicate_ingest_and_overwrite(repo, rng):
    ds = make_exposure(rng)
    repo.write_exposure(ds)
    with pytest.raises(RepositoryError, match=r"exposure visit=3 detector=7 is already ingested .*use overwrite=True"):
        repo.write_exposure(ds)
    ds2 = ds.copy()
    ds2["image"] = ds["image"] + np.float32(1)
    ds2["image"].attrs = dict(ds["image"].attrs)
    repo.write_exposure(ds2, overwrite=True)
    np.testing.assert_array_equal(repo.open_exposure(3, 7)["image"].values, ds["image"].values + np.float32(1))


def test_overwrite_removes_marker_before_writing(repo, rng):
    ds = make_exposure(rng)
    repo.write_exposure(ds)

    def explode(block):
        raise RuntimeError("disk on fire")

    broken = ds.chunk({"y": 20, "x": 20})
    broken["image"] = broken["image"].copy(data=broken["image"].data.map_blocks(explode, dtype=np.float32))
    with pytest.raises(RuntimeError, match="disk on fire"):
        repo.write_exposure(broken, overwrite=True)
    assert not repo.has_exposure(3, 7)
    with pytest.raises(ProductIncompleteError, match=r"exposure visit=3 detector=7 .* never completely written"):
        repo.open_exposure(3, 7)
    assert repo.list_exposures()[0]["complete"] is False


def test_write_exposure_validation(repo, rng):
    ds = make_exposure(rng)
    no_visit = ds.copy()
    no_visit.attrs = {k: v for k, v in ds.attrs.items() if k != "visit"}
    with pytest.raises(SchemaError, match=r"an exposure needs attrs 'visit' to be stored \[detector=7 band=r\]"):
        repo.write_exposure(no_visit)
    no_det = ds.copy()
    no_det.attrs = {k: v for k, v in ds.attrs.items() if k != "detector"}
    with pytest.raises(SchemaError, match="an exposure needs attrs 'detector'"):
        repo.write_exposure(no_det)
    warp = ds.copy()
    warp.attrs = dict(ds.attrs, kind="warp")
    with pytest.raises(SchemaError, match="expected a 'exposure' dataset, got kind 'warp'"):
        repo.write_exposure(warp)
    bad_visit = ds.copy()
    bad_visit.attrs = dict(ds.attrs, visit="12")
    with pytest.raises(RepositoryError, match="visit must be an integer, got '12'"):
        repo.write_exposure(bad_visit)
    stacked = ds.drop_vars("psf").expand_dims(visit=[3])
    stacked.attrs = dict(ds.attrs)
    with pytest.raises(SchemaError, match=r"an exposure cannot have a 'visit' dimension \[visit=3 detector=7"):
        repo.write_exposure(stacked)
    with pytest.raises(RepositoryError, match="chunk_size must be positive, got 0"):
        repo.write_exposure(ds, chunk_size=0)
    assert repo.list_exposures() == []


def test_open_missing_exposure(repo):
    with pytest.raises(RepositoryError, match=r"no exposure visit=1 detector=2 in .*repo\.zarr \[visit=1 detector=2"):
        repo.open_exposure(1, 2)


def test_list_exposures(repo, rng):
    repo.write_exposure(make_exposure(rng, visit=5, detector=1, shape=(20, 30)))
    repo.write_exposure(make_exposure(rng, visit=2, detector=9, shape=(25, 31)))
    assert repo.list_exposures() == [
        {"visit": 2, "detector": 9, "band": "r", "shape": [25, 31], "complete": True},
        {"visit": 5, "detector": 1, "band": "r", "shape": [20, 30], "complete": True},
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ny=st.integers(1, 40),
    nx=st.integers(1, 40),
    x0=st.integers(-50, 50),
    y0=st.integers(-50, 50),
    extra=st.lists(st.sampled_from(["ALPHA", "BETA", "GAMMA"]), unique=True),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 50),
)
def test_exposure_round_trip_property(ny, nx, x0, y0, extra, seed, chunk):
    rng = np.random.default_rng(seed)
    repo = open_repo(MemoryStore(), create=True)
    planes = add_planes(CANONICAL_PLANES, extra)
    mask = rng.integers(0, 2**32 - 1, size=(ny, nx), dtype=np.uint64).astype(np.uint32)
    keep = sum(1 << b for b in planes.values())
    ds = make_dataset(
        rng.normal(size=(ny, nx)),
        rng.uniform(0.5, 2, size=(ny, nx)),
        mask & np.uint32(keep),
        wcs=make_tan_wcs(ra=rng.uniform(0, 360), dec=rng.uniform(-80, 80)),
        x0=x0,
        y0=y0,
        planes=planes,
        attrs={"visit": int(seed % 1000), "detector": 0, "band": "g"},
    )
    repo.write_exposure(ds, chunk_size=chunk)
    back = repo.open_exposure(int(seed % 1000), 0)
    assert_datasets_equal(ds, back)
    assert back.attrs == ds.attrs
    assert mask_planes(back) == planes


# ---------------------------------------------------------------------------------------------
# tract products


def test_create_tract_product_layout_and_sparse_fill(repo, tmp_path):
    path = coadd_product(repo)
    assert path == "tract_0/coadds/r/deep"
    units = repo.product_units(path)
    assert units == {
        "patch_0_0": Box(0, 0, 100, 80),
        "patch_1_0": Box(100, 0, 200, 80),
        "patch_0_1": Box(0, 80, 100, 160),
        "patch_1_1": Box(100, 80, 200, 160),
    }
    # default chunks: the largest divisor of the inner size not above a quarter of it
    arr = zarr.open_array(repo.store, path=f"{path}/image", mode="r")
    assert arr.chunks == CHUNKS
    assert arr.shape == TRACT_SHAPE
    assert np.isnan(arr.fill_value)
    assert zarr.open_array(repo.store, path=f"{path}/variance", mode="r").fill_value == np.inf
    assert zarr.open_array(repo.store, path=f"{path}/mask", mode="r").fill_value == int(MaskPlane.NO_DATA)
    for var in ("image", "variance", "mask"):
        assert chunk_files(tmp_path / "repo.zarr", path, var) == []
        (codec,) = zarr.open_array(repo.store, path=f"{path}/{var}", mode="r").compressors
        assert (codec.cname.value, codec.shuffle.value, codec.typesize) == ("lz4", "shuffle", 4)
    for group in ("tract_0", "tract_0/coadds", "tract_0/coadds/r", path, f"{path}/_complete"):
        assert zarr.open_group(repo.store, path=group, mode="r").attrs["schema_version"] == SCHEMA_VERSION
    for unit in units:
        repo.mark_complete(path, unit)
    full = repo.open_coadd(0, "r")
    assert full.sizes == {"y": 160, "x": 200}
    assert np.all(np.isnan(full["image"].values))
    assert np.all(full["variance"].values == np.inf)
    assert np.all(full["mask"].values == np.uint32(MaskPlane.NO_DATA))
    assert full.attrs["band"] == "r" and full.attrs["kind"] == "coadd" and "product_layout" not in full.attrs
    assert full.coords["wcs"].attrs["fits_header"] == wcs_header_string(make_tan_wcs(crpix=(100.0, 80.0)))


def test_two_units_fill_a_product(repo, rng, tmp_path):
    path = coadd_product(repo)
    a = window_data(rng, Box(0, 0, 100, 80))
    b = window_data(rng, Box(100, 80, 200, 160), chunks={"y": 37, "x": 41})
    for unit, win in (("patch_0_0", a), ("patch_1_1", b)):
        dask.compute(repo.region_write(win, path, unit))
        repo.mark_complete(path, unit, source="test")
    got_a = repo.open_coadd(0, "r", patch_box=Box(0, 0, 100, 80)).compute()
    got_b = repo.open_coadd(0, "r", patch_box=Box(100, 80, 200, 160)).compute()
    assert_datasets_equal(a, got_a)
    assert_datasets_equal(b.compute(), got_b)
    # only the written patches hold chunks: 4 x 4 chunks per patch
    files = chunk_files(tmp_path / "repo.zarr", path, "image")
    assert len(files) == 32
    assert repo.marker_info(path, "patch_0_0")["provenance"] == {"source": "test"}
    assert repo.marker_info(path, "patch_1_0") is None
    # the other patches are not complete: reading them, or the whole tract, names the unit
    with pytest.raises(ProductIncompleteError, match=r"unit\(s\) patch_1_0 not marked complete \[tract=0 patch=1,0 band=r kind=coadd"):
        repo.open_coadd(0, "r", patch_box=Box(100, 0, 200, 80))
    with pytest.raises(ProductIncompleteError, match=r"unit\(s\) patch_1_0, patch_0_1 not marked complete"):
        repo.open_coadd(0, "r")
    # a patch outer box (inner + border) needs its neighbours too
    with pytest.raises(ProductIncompleteError, match="patch_1_0"):
        repo.open_coadd(0, "r", patch_box=Box(0, 0, 100, 80).grow(10))
    repo.mark_complete(path, "patch_1_0")
    repo.mark_complete(path, "patch_0_1")
    outer = repo.open_coadd(0, "r", patch_box=Box(0, 0, 100, 80).grow(10))
    assert (outer.indexes["x"][0], outer.indexes["x"][-1], outer.indexes["y"][-1]) == (0, 109, 89)
    whole = repo.open_coadd(0, "r").compute()
    np.testing.assert_array_equal(whole["image"].values[:80, :100], a["image"].values)
    assert np.all(np.isnan(whole["image"].values[:80, 100:]))
    assert np.all(whole["mask"].values[80:, :100] == np.uint32(MaskPlane.NO_DATA))


def test_region_write_numpy_and_dask_sources_agree(tmp_path, rng):
    win = window_data(rng, Box(100, 0, 200, 80), template=tract_template(with_n_image=True))
    stored = []
    for i, source in enumerate([win, win.chunk({"y": 37, "x": 41})]):
        repo = open_repo(tmp_path / f"r{i}.zarr", create=True)
        path = repo.create_tract_product(
            coadd_path(0, "r"), tract_template(with_n_image=True, attrs={"tract": 0, "band": "r"}), patch_inner=PATCH_INNER
        )
        dask.compute(repo.region_write(source, path, "patch_1_0"))
        repo.mark_complete(path, "patch_1_0")
        stored.append(repo.open_coadd(0, "r", patch_box=Box(100, 0, 200, 80)).compute())
    assert_datasets_equal(stored[0], stored[1])
    assert_datasets_equal(win, stored[0])
    np.testing.assert_array_equal(stored[0]["n_image"].values, win["n_image"].values)
    assert stored[0]["n_image"].dtype == np.int32


def test_region_write_is_lazy_with_bounded_graph(repo, rng, tmp_path):
    path = coadd_product(repo)
    win = window_data(rng, Box(0, 80, 100, 160), chunks={"y": 37, "x": 41})
    with raise_if_dask_computes():
        delayed = repo.region_write(win, path, "patch_0_1")
    assert isinstance(delayed, Delayed)
    assert chunk_files(tmp_path / "repo.zarr", path, "image") == []
    # per variable: 9 source blocks; each of the 16 stored chunks overlaps at most 4 source blocks
    # (<= 4 splits), needs one merge and one store; plus one final task
    n = graph_size(delayed)
    assert 3 * (9 + 16) < n <= 3 * (9 + 4 * 16 + 16 + 16) + 1, n
    dask.compute(delayed)
    assert len(chunk_files(tmp_path / "repo.zarr", path, "image")) == 16


def test_all_fill_chunks_are_not_stored(repo, tmp_path):
    path = coadd_product(repo)
    tmpl = tract_template()
    win = Box(0, 0, 100, 80).sel(tmpl).copy()
    image = np.full((80, 100), np.nan, np.float32)
    image[:20, :25] = 1.0  # one chunk holds data
    win["image"] = (("y", "x"), image, dict(win["image"].attrs))
    dask.compute(repo.region_write(win, path, "patch_0_0"))
    assert chunk_files(tmp_path / "repo.zarr", path, "image") == ["0/0"]
    assert chunk_files(tmp_path / "repo.zarr", path, "variance") == []
    assert chunk_files(tmp_path / "repo.zarr", path, "mask") == []


def test_window_read_touches_only_overlapping_chunks(tmp_path, rng):
    path = tmp_path / "repo.zarr"
    repo = open_repo(path, create=True)
    product = coadd_product(repo)
    win = window_data(rng, Box(0, 0, 200, 160), template=tract_template())
    units = repo.product_units(product)
    for unit, box in units.items():
        dask.compute(repo.region_write(box.sel(win), product, unit))
        repo.mark_complete(product, unit)
    counting = CountingStore(LocalStore(str(path), read_only=True))
    reader = open_repo(counting)
    window = Box(30, 15, 70, 45)  # x chunks 1..2 (25 px), y chunks 0..2 (20 px): 2 x 3 chunks
    ds = reader.open_product(product, window=window)
    counting.log.clear()
    got = ds["image"].values
    np.testing.assert_array_equal(got, win["image"].values[15:45, 30:70])
    image_keys = sorted(k for k in counting.log if k.startswith(f"{product}/image/c/"))
    assert image_keys == sorted(f"{product}/image/c/{j}/{i}" for j in (0, 1, 2) for i in (1, 2))
    assert not any(k.startswith(f"{product}/variance/c/") for k in counting.log)


def test_open_product_is_lazy(repo, rng):
    path = coadd_product(repo)
    for unit in repo.product_units(path):
        repo.mark_complete(path, unit)
    ds = assert_lazy(lambda: repo.open_product(path, window=Box(10, 10, 60, 50)))
    assert ds.sizes == {"y": 40, "x": 50}
    ds = assert_lazy(lambda: repo.open_coadd(0, "r"))
    assert ds["image"].data.chunksize == CHUNKS


def test_open_product_by_units(repo, rng):
    path = coadd_product(repo)
    repo.mark_complete(path, "patch_0_1")
    repo.mark_complete(path, "patch_1_1")
    ds = repo.open_product(path, units=["patch_0_1", "patch_1_1"])
    assert Box.of(ds) == Box(0, 80, 200, 160)
    with pytest.raises(RepositoryError, match=r"has no units \['patch_9_9'\]"):
        repo.open_product(path, units=["patch_9_9"])
    with pytest.raises(RepositoryError, match=r"window \[300, 0, 400, 10\] does not overlap the tract bbox"):
        repo.open_product(path, window=Box(300, 0, 400, 10))
    with pytest.raises(RepositoryError, match="window must be a Box"):
        repo.open_product(path, window=(0, 0, 10, 10))
    with pytest.raises(RepositoryError, match=r"no product tract_0/coadds/g/deep in"):
        repo.open_coadd(0, "g")


def test_align_box(repo):
    path = coadd_product(repo)  # chunks 20 (y) x 25 (x) on a 160 x 200 tract
    assert repo.align_box(path, Box(30, 15, 70, 45)) == Box(25, 0, 75, 60)
    assert repo.align_box(path, Box(-10, 150, 190, 300)) == Box(0, 140, 200, 160)
    assert repo.align_box(path, Box(0, 0, 25, 20)) == Box(0, 0, 25, 20)
    assert repo.align_box(path, Box(500, 500, 600, 600)).empty


@functools.cache
def _align_repo():
    repo = open_repo(MemoryStore(), create=True)
    return repo, repo.create_tract_product("tract_0/coadds/r/deep", tract_template(), patch_inner=PATCH_INNER)


@settings(max_examples=50, deadline=None)
@given(x0=st.integers(-50, 250), y0=st.integers(-50, 200), w=st.integers(1, 300), h=st.integers(1, 300))
def test_align_box_property(x0, y0, w, h):
    """The aligned box holds the (clipped) box, is chunk-aligned, and is the smallest such box."""
    repo, path = _align_repo()
    box = Box(x0, y0, x0 + w, y0 + h)
    clipped = box.intersect(Box(0, 0, 200, 160))
    aligned = repo.align_box(path, box)
    if clipped.empty:
        assert aligned.empty
        return
    assert aligned.intersect(clipped) == clipped
    assert aligned.x0 % 25 == 0 and aligned.y0 % 20 == 0
    assert aligned.x1 % 25 == 0 or aligned.x1 == 200
    assert aligned.y1 % 20 == 0 or aligned.y1 == 160
    assert aligned.x0 > clipped.x0 - 25 and aligned.y0 > clipped.y0 - 20
    assert aligned.x1 < clipped.x1 + 25 and aligned.y1 < clipped.y1 + 20


def test_warp_product_single_visit_unit(repo, rng):
    tmpl = tract_template(kind="warp", attrs={"tract": 0, "visit": 12, "band": "i"})
    path = repo.create_tract_product(warp_path(0, 12), tmpl, chunk_size=40)
    assert path == "tract_0/warps/direct/visit_12"
    assert repo.product_units(path) == {"visit_12": Box(0, 0, 200, 160)}
    footprint = Box(40, 40, 200, 120)  # ends at the tract edge in x
    win = window_data(rng, footprint, template=tmpl)
    dask.compute(repo.region_write(win, path, visit_unit(12)))
    with pytest.raises(ProductIncompleteError, match=r"unit\(s\) visit_12 not marked complete \[visit=12 tract=0 band=i kind=warp"):
        repo.open_warp(0, 12)
    repo.mark_complete(path, "visit_12")
    got = repo.open_warp(0, 12, window=footprint)
    assert_datasets_equal(win, got)
    assert got.attrs["visit"] == 12
    with pytest.raises(RepositoryError, match=r"warp kind 'psf' is not one of \['direct', 'psf_matched'\]"):
        repo.open_warp(0, 12, kind="psf")


def small_tract():
    from pipeline.model.skymap import Tract

    return Tract(id=3, ra=150.0, dec=2.0, radius_deg=0.005, tract_overlap_deg=0.0, patch_inner=(100, 80), patch_border=10)


def test_products_from_a_skymap_tract(repo, rng):
    from pipeline.model.skymap import SkyMap

    tract = small_tract()
    assert tract.bbox == Box(0, 0, 200, 240)
    repo.set_skymap(SkyMap(tracts=(tract,)))
    assert SkyMap.from_json(repo.skymap_json) == SkyMap(tracts=(tract,))
    deep = repo.create_coadd(tract, "g")
    assert deep == "tract_3/coadds/g/deep"
    assert repo.product_units(deep) == {patch_unit(p): p.inner for p in tract.patches()}
    assert zarr.open_array(repo.store, path=f"{deep}/image", mode="r").chunks == (20, 25)
    n_image = zarr.open_array(repo.store, path=f"{deep}/n_image", mode="r")
    assert n_image.dtype == np.int32 and n_image.fill_value == 0
    patch = tract.patch("1,2")
    tmpl = empty_like_frame(x0=0, y0=0, nx=200, ny=240, wcs=tract.wcs_header(), kind="coadd", chunks=40)
    win = window_data(rng, patch.inner, template=tmpl)
    win["n_image"] = (("y", "x"), np.full(patch.inner.shape, 3, np.int32))
    dask.compute(repo.region_write(win, deep, patch_unit(patch)))
    repo.mark_complete(deep, patch_unit(patch))
    got = repo.open_coadd(3, "g", patch_box=patch.inner)
    assert_datasets_equal(win, got)
    assert got.attrs["tract"] == 3 and got.attrs["band"] == "g" and got.attrs["kind"] == "coadd"
    np.testing.assert_array_equal(got["n_image"].values, 3)
    with pytest.raises(ProductIncompleteError, match=r"unit\(s\) patch_0_1, patch_1_1, patch_0_2 not marked complete \[tract=3 patch=0,1 band=g"):
        repo.open_coadd(3, "g", patch_box=patch.outer)
    template = repo.create_coadd(tract, "g", "template", n_image=False)
    assert zarr.open_group(repo.store, path=template, mode="r").attrs["kind"] == "template"
    warp = repo.create_warp(tract, 21, band="g")
    assert repo.product_units(warp) == {"visit_21": tract.bbox}
    psf_warp = repo.create_warp(tract, 21, kind="psf_matched", band="g")
    assert zarr.open_group(repo.store, path=psf_warp, mode="r").attrs["kind"] == "psf_matched_warp"
    art = repo.create_artifacts(tract, 21)
    assert sorted(zarr.open_group(repo.store, path=art, mode="r").array_keys()) == ["mask", "wcs", "x", "y"]
    kinds = {(r["kind"], r["name"]) for r in repo.inventory()}
    assert kinds == {("coadd", "deep"), ("template", "template"), ("warp", None), ("psf_matched_warp", None), ("artifact_mask", None)}


def test_artifact_product_mask_only(repo, rng):
    tmpl = tract_template(kind="artifact_mask", attrs={"tract": 0, "visit": 4}).drop_vars(["image", "variance"])
    path = repo.create_tract_product(("tract_0", "artifacts", "visit_4"), tmpl, chunk_size=(25, 20))
    win = Box(0, 0, 50, 40).sel(tmpl).copy()
    win["mask"] = (("y", "x"), np.full((40, 50), int(MaskPlane.CLIPPED), np.uint32), dict(win["mask"].attrs))
    dask.compute(repo.region_write(win, path, "visit_4"))
    repo.mark_complete(path, "visit_4")
    ds = repo.open_artifacts(0, 4)
    assert list(ds.data_vars) == ["mask"]
    m = ds["mask"].values
    assert np.all(m[:40, :50] == int(MaskPlane.CLIPPED)) and np.all(m[40:, :] == int(MaskPlane.NO_DATA))


def test_region_write_validation(repo, rng):
    path = coadd_product(repo)
    good = window_data(rng, Box(0, 0, 100, 80))
    with pytest.raises(RepositoryError, match=r"product tract_0/coadds/r/deep has no unit 'patch_5_5'"):
        repo.region_write(good, path, "patch_5_5")
    with pytest.raises(RepositoryError, match=r"window \[0, 0, 100, 80\] lies outside the box \[100, 0, 200, 80\] owned by unit patch_1_0"):
        repo.region_write(good, path, "patch_1_0")
    shifted = window_data(rng, Box(10, 0, 100, 80))
    with pytest.raises(RepositoryError, match=r"window \[10, 0, 100, 80\] .* is not aligned to the chunks 25x20 \(x, y\)"):
        repo.region_write(shifted, path, "patch_0_0")
    ragged = window_data(rng, Box(0, 0, 100, 70))
    with pytest.raises(RepositoryError, match="is not aligned to the chunks"):
        repo.region_write(ragged, path, "patch_0_0")
    with pytest.raises(SchemaError, match="window lacks variable 'variance'"):
        repo.region_write(good.drop_vars("variance"), path, "patch_0_0")
    with pytest.raises(SchemaError, match="expected an xarray.Dataset window, got DataArray"):
        repo.region_write(good["image"], path, "patch_0_0")
    with pytest.raises(SchemaError, match="window lacks the 'x' coordinate"):
        repo.region_write(good.drop_vars("x"), path, "patch_0_0")
    stacked = good.expand_dims(visit=[1])
    with pytest.raises(SchemaError, match=r"window variable 'image' has dims \('visit', 'y', 'x'\)"):
        repo.region_write(stacked, path, "patch_0_0")
    other_planes = good.copy()
    other_planes["mask"] = good["mask"].copy()
    other_planes["mask"].attrs = {"flag_masks": [1, 2], "flag_meanings": "BAD SAT"}
    with pytest.raises(MaskPlaneError, match="mask planes of the window differ from those of tract_0/coadds/r/deep"):
        repo.region_write(other_planes, path, "patch_0_0")
    moved = good.assign_coords(wcs=tract_template().coords["wcs"].copy())
    moved.coords["wcs"].attrs = {"fits_header": wcs_header_string(make_tan_wcs(crpix=(101.0, 80.0)))}
    with pytest.raises(SchemaError, match=r"the window's WCS differs from that of tract_0/coadds/r/deep \(corner offsets up to 200 mas\)"):
        repo.region_write(moved, path, "patch_0_0")
    dask.compute(repo.region_write(good, path, "patch_0_0"))
    repo.mark_complete(path, "patch_0_0")
    with pytest.raises(RepositoryError, match="unit patch_0_0 of tract_0/coadds/r/deep is already complete; use overwrite=True"):
        repo.region_write(good, path, "patch_0_0")


def test_region_write_overwrite(repo, rng):
    path = coadd_product(repo)
    first = window_data(rng, Box(0, 0, 100, 80))
    dask.compute(repo.region_write(first, path, "patch_0_0"))
    repo.mark_complete(path, "patch_0_0")
    second = window_data(rng, Box(0, 0, 100, 80))
    delayed = repo.region_write(second, path, "patch_0_0", overwrite=True)
    assert not repo.is_complete(path, "patch_0_0")  # the marker goes first
    with pytest.raises(ProductIncompleteError, match="patch_0_0"):
        repo.open_coadd(0, "r", patch_box=Box(0, 0, 100, 80))
    dask.compute(delayed)
    repo.mark_complete(path, "patch_0_0")
    assert_datasets_equal(second, repo.open_coadd(0, "r", patch_box=Box(0, 0, 100, 80)))


def test_create_tract_product_idempotent_and_overwrite(repo, rng, tmp_path):
    path = coadd_product(repo)
    repo.mark_complete(path, "patch_0_0")
    assert coadd_product(repo) == path
    assert repo.is_complete(path, "patch_0_0")
    with pytest.raises(RepositoryError, match=r"exists with another layout \(shape \[160, 200\] \(y, x\), chunks \[20, 25\] \(y, x\)"):
        repo.create_tract_product(path, tract_template(attrs={"tract": 0, "band": "r"}), patch_inner=PATCH_INNER, chunk_size=10)
    dask.compute(repo.region_write(window_data(rng, Box(0, 0, 100, 80)), path, "patch_0_0", overwrite=True))
    repo.create_tract_product(path, tract_template(attrs={"tract": 0, "band": "r"}), patch_inner=PATCH_INNER, overwrite=True)
    assert not repo.is_complete(path, "patch_0_0")
    assert chunk_files(tmp_path / "repo.zarr", path, "image") == []


def test_create_tract_product_validation(repo):
    tmpl = tract_template()
    with pytest.raises(RepositoryError, match=r"chunk size \(30, 30\) \(x, y\) does not divide the patch inner size \(100, 80\) \(x, y\)"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl, patch_inner=PATCH_INNER, chunk_size=30)
    with pytest.raises(SchemaError, match=r"template must cover the tract bbox from pixel \(0, 0\), starts at \(5, 0\)"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl.isel(x=slice(5, None)), patch_inner=PATCH_INNER)
    with pytest.raises(SchemaError, match="template has no 'wcs' coordinate"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl.drop_vars("wcs"), patch_inner=PATCH_INNER)
    with pytest.raises(SchemaError, match="template holds none of the product variables"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl.drop_vars(["image", "variance", "mask"]))
    with pytest.raises(SchemaError, match="template lacks variable 'n_image'"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl, variables=["image", "n_image"])
    no_nodata = tmpl.copy()
    no_nodata["mask"] = tmpl["mask"].copy()
    no_nodata["mask"].attrs = {"flag_masks": [1, 2], "flag_meanings": "BAD SAT"}
    with pytest.raises(MaskPlaneError, match="the template's mask planes lack NO_DATA"):
        repo.create_tract_product("tract_0/coadds/r/deep", no_nodata, patch_inner=PATCH_INNER)
    with pytest.raises(SchemaError, match="template must be an xarray.Dataset, got DataArray"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl["image"])
    with pytest.raises(RepositoryError, match=r"unit patch_a box \[0, 0, 30, 30\] is not aligned to the chunks 25x20 \(x, y\)"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl, patch_inner=PATCH_INNER, units={"patch_a": Box(0, 0, 30, 30)})
    with pytest.raises(RepositoryError, match=r"unit big box \[0, 0, 300, 80\] is empty or outside the tract"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl, units={"big": Box(0, 0, 300, 80)})
    with pytest.raises(RepositoryError, match=r"unit name 'a/b' must be letters"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl, units={"a/b": Box(0, 0, 100, 80)})
    with pytest.raises(RepositoryError, match="patch_inner must be positive"):
        repo.create_tract_product("tract_0/coadds/r/deep", tmpl, patch_inner=0)
    with pytest.raises(RepositoryError, match=r"band 'r/x' must be a non-empty name"):
        coadd_path(0, "r/x")
    with pytest.raises(RepositoryError, match=r"patch \(1, 2, 3\) must be an index"):
        patch_unit((1, 2, 3))
    assert patch_unit((1, 2)) == patch_unit("1,2") == "patch_1_2" and patch_unit(7) == "patch_7"


def test_mark_complete_validation(repo):
    path = coadd_product(repo)
    with pytest.raises(RepositoryError, match=r"has no unit 'patch_3_3' \(units: patch_0_0, patch_0_1"):
        repo.mark_complete(path, "patch_3_3")
    with pytest.raises(RepositoryError, match="completion info for tract_0/coadds/r/deep patch_0_0 is not JSON-serialisable"):
        repo.mark_complete(path, "patch_0_0", config=object())
    assert not repo.is_complete(path, "patch_0_0")
    exposure = repo.write_exposure(make_exposure(np.random.default_rng(0), visit=1, detector=1, shape=(5, 5)))
    with pytest.raises(RepositoryError, match=r"exposures/visit_1/detector_1 in .* is not a tract product"):
        repo.mark_complete(exposure, "exposure")


def test_inventory(repo, rng):
    repo.write_exposure(make_exposure(rng, visit=3, detector=7, shape=(10, 10)))
    coadd = coadd_product(repo)
    repo.mark_complete(coadd, "patch_1_0")
    tmpl = tract_template(kind="warp", attrs={"tract": 0, "visit": 3, "band": "r"})
    warp = repo.create_tract_product(warp_path(0, 3), tmpl, chunk_size=40)
    repo.mark_complete(warp, "visit_3")
    psfm = repo.create_tract_product(warp_path(0, 3, "psf_matched"), tract_template(kind="psf_matched_warp", attrs={"tract": 0, "visit": 3, "band": "r"}), chunk_size=40)
    template = repo.create_tract_product(coadd_path(0, "r", "template"), tract_template(kind="template", attrs={"tract": 0, "band": "r"}), patch_inner=PATCH_INNER)
    records = repo.inventory()
    assert json.loads(json.dumps(records)) == records
    by_product = {}
    for r in records:
        by_product.setdefault(r["product"], []).append(r)
    assert by_product["exposures/visit_3/detector_7"] == [
        {"kind": "exposure", "tract": None, "patch": None, "band": "r", "visit": 3, "detector": 7, "name": None,
         "product": "exposures/visit_3/detector_7", "unit": "exposure", "complete": True}
    ]
    assert [(r["patch"], r["complete"], r["kind"], r["name"], r["band"], r["tract"]) for r in by_product[coadd]] == [
        ("0,0", False, "coadd", "deep", "r", 0),
        ("0,1", False, "coadd", "deep", "r", 0),
        ("1,0", True, "coadd", "deep", "r", 0),
        ("1,1", False, "coadd", "deep", "r", 0),
    ]
    assert [(r["kind"], r["visit"], r["patch"], r["complete"]) for r in by_product[warp]] == [("warp", 3, None, True)]
    assert [(r["kind"], r["visit"], r["complete"]) for r in by_product[psfm]] == [("psf_matched_warp", 3, False)]
    assert {r["kind"] for r in by_product[template]} == {"template"}
    assert len(records) == 1 + 4 + 1 + 1 + 4
    table = format_inventory(records).splitlines()
    assert table[0].split() == ["kind", "tract", "patch", "band", "visit", "detector", "name", "complete"]
    assert table[1].split() == ["exposure", "-", "-", "r", "3", "7", "-", "yes"]
    assert len(table) == 1 + len(records)
    assert format_inventory([]) == "(empty repository)"


@settings(max_examples=8, deadline=None)
@given(
    cy=st.sampled_from([10, 20, 40]),
    cx=st.sampled_from([10, 25, 50]),
    j0=st.integers(0, 7),
    i0=st.integers(0, 9),
    nj=st.integers(1, 8),
    ni=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_aligned_region_writes_round_trip(cy, cx, j0, i0, nj, ni, seed):
    """Any chunk-aligned window written into a fresh product reads back exactly; the rest stays no-data."""
    rng = np.random.default_rng(seed)
    repo = open_repo(MemoryStore(), create=True)
    path = repo.create_tract_product("tract_1/coadds/z/deep", tract_template(attrs={"tract": 1, "band": "z"}), chunk_size=(cx, cy), units={"all": Box(0, 0, 200, 160)})
    ny, nx = TRACT_SHAPE
    y0, x0 = min(j0 * cy, ny - cy), min(i0 * cx, nx - cx)
    box = Box(x0, y0, min(x0 + ni * cx, nx), min(y0 + nj * cy, ny))
    win = window_data(rng, box)
    dask.compute(repo.region_write(win, path, "all"))
    repo.mark_complete(path, "all")
    whole = repo.open_product(path).compute()
    img = whole["image"].values
    np.testing.assert_array_equal(img[box.slices()], win["image"].values)
    outside = np.ones(TRACT_SHAPE, bool)
    outside[box.slices()] = False
    assert np.all(np.isnan(img[outside]))
    assert np.all(whole["mask"].values[outside] == FILL_VALUES["mask"])
    assert np.all(whole["variance"].values[outside] == np.inf)


def test_repository_repr(repo):
    assert repr(repo).startswith("Repository(") and "read/write" in repr(repo)
    assert isinstance(repo, Repository)
