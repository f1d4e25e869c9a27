"""Standard benchmark inputs, built once per mode and cached under ``benchmarks/_work/<mode>/``.

- ``calexp/``: seeded simulated exposures (``pipeline.sim``), dithered and rotated, as LSST-style
  multi-extension FITS files, plus ``swarp/`` copies in the layout SWarp reads (one image file with
  its WCS and one weight file ``1/variance`` per exposure) and ``swarp/coadd.head``, the header of
  the destination patch;
- ``repo_N<n>.zarr``: repositories holding the first ``n`` exposures (``n`` in the scaling list),
  all with the same sky map: one tract whose central patch is the destination grid;
- ``big.zarr``: one large exposure (sky not subtracted) for the convolution and background cases;
- ``stack.zarr``: pre-aligned frames on one grid (groups ``frame<i>``) for the stacking case.

A file ``ready.json`` marks each finished piece; deleting ``_work`` rebuilds everything.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

WORK = Path(os.environ.get("SKYSTACK_BENCH_WORK") or Path(__file__).resolve().parent / "_work")


@dataclass(frozen=True)
class Sizes:
    """Input sizes of one mode."""

    mode: str
    exposure: int  # detector side (pixels)
    patch: int  # patch inner side (pixels)
    border: int  # patch border (pixels)
    dither_arcsec: float
    scaling: tuple[int, ...]  # numbers of exposures of the scaling rows
    resample: int  # exposures warped in the resample case
    adaptive: int  # exposures given to reproject_adaptive (slow)
    big: int  # side of the convolution / background image
    n_stack: int  # frames of the stacking case
    stack_side: int  # side of the stacked frames
    stack_chunks: tuple[int, ...]  # dask chunk sides of the two stacking rows
    threads: int  # threads of the multi-threaded implementations
    bandwidth_mb: int  # size of the array copied by the bandwidth probe
    seed: int = 20261121

    @property
    def n_max(self) -> int:
        return max(self.scaling)


def sizes(mode: str, threads: int) -> Sizes:
    if mode == "quick":
        return Sizes(
            mode="quick", exposure=384, patch=1000, border=50, dither_arcsec=6.0, scaling=(2, 3, 4), resample=2,
            adaptive=1, big=800, n_stack=6, stack_side=800, stack_chunks=(200, 400), threads=threads,
            bandwidth_mb=128,
        )
    return Sizes(
        mode="full", exposure=2048, patch=4000, border=100, dither_arcsec=30.0, scaling=(8, 16, 32), resample=2,
        adaptive=1, big=4000, n_stack=16, stack_side=4000, stack_chunks=(500, 1000), threads=threads,
        bandwidth_mb=1024,
    )


def work_dir(s: Sizes) -> Path:
    return WORK / s.mode


def _ready(s: Sizes) -> dict:
    path = work_dir(s) / "ready.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _mark(s: Sizes, key: str, info) -> None:
    path = work_dir(s) / "ready.json"
    data = _ready(s)
    data[key] = info
    path.write_text(json.dumps(data, indent=1))


def repo_path(s: Sizes, n: int) -> Path:
    return work_dir(s) / f"repo_N{n}.zarr"


def layout(s: Sizes) -> dict:
    """What the builder recorded: file names, visits, patch box."""
    return _ready(s)


def _codec_tag() -> str:
    from pipeline.io.repo import pixel_compressors

    return json.dumps([c.to_dict() for c in pixel_compressors()], sort_keys=True)


def _pixel_encoding(chunk: int) -> dict:
    """Encoding of image/variance/mask as the repository stores them (chunks and codec)."""
    from pipeline.io.repo import pixel_compressors

    return {v: {"chunks": (chunk, chunk), "compressors": pixel_compressors()} for v in ("image", "variance", "mask")}


def build(s: Sizes, echo=print) -> dict:
    """Build every missing input of mode ``s`` and return the recorded layout."""
    work_dir(s).mkdir(parents=True, exist_ok=True)
    ready = _ready(s)
    sig = {k: v for k, v in asdict(s).items() if k != "threads"}
    if ready.get("sizes") != json.loads(json.dumps(sig)):
        ready = {}
        (work_dir(s) / "ready.json").unlink(missing_ok=True)
        _mark(s, "sizes", sig)
    ready = _ready(s)
    if ready.get("pixel_codec") != _codec_tag():
        # zarr inputs are written with the repository's codec: rebuild them when it changes
        for key in ("repos", "big", "stack"):
            ready.pop(key, None)
        ready["pixel_codec"] = _codec_tag()
        (work_dir(s) / "ready.json").write_text(json.dumps(ready, indent=1))
    if "exposures" not in ready:
        _build_exposures(s, echo)
    if "repos" not in _ready(s):
        _build_repos(s, echo)
    if "big" not in _ready(s):
        _build_big(s, echo)
    if "stack" not in _ready(s):
        _build_stack(s, echo)
    return _ready(s)


def _build_exposures(s: Sizes, echo) -> None:
    from astropy.io import fits

    from pipeline.io.fits import write_fits
    from pipeline.model.skymap import SkyMap
    from pipeline.model.wcs import get_wcs
    from pipeline.sim import SimConfig, simulate

    t0 = time.perf_counter()
    echo(f"  simulating {s.n_max} exposures of {s.exposure}x{s.exposure} (seed {s.seed})")
    cfg = SimConfig(n_visits=s.n_max, shape=(s.exposure, s.exposure), dither_arcsec=s.dither_arcsec,
                    rotation_deg=(-15.0, 15.0))
    sim = simulate(cfg, seed=s.seed)
    echo(f"  simulated in {time.perf_counter() - t0:.0f} s")
    raw = work_dir(s) / "calexp"
    sw = work_dir(s) / "swarp"
    raw.mkdir(exist_ok=True)
    sw.mkdir(exist_ok=True)
    files, swarp_files, visits = [], [], []
    for ds in sim.exposures:
        visit = int(ds.attrs["visit"])
        path = raw / f"calexp_{visit}.fits"
        write_fits(ds, path, overwrite=True)
        header = get_wcs(ds).to_header()
        image = np.asarray(ds["image"].values, dtype=np.float32)
        var = np.asarray(ds["variance"].values, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(np.isfinite(var) & (var > 0), 1.0 / var, 0.0).astype(np.float32)
        img_path = sw / f"exp_{visit}.fits"
        fits.PrimaryHDU(image, header=header).writeto(img_path, overwrite=True)
        fits.PrimaryHDU(weight, header=header).writeto(sw / f"exp_{visit}.weight.fits", overwrite=True)
        files.append(path.name)
        swarp_files.append(img_path.name)
        visits.append(visit)
    footprints = [(get_wcs(ds), (ds.sizes["y"], ds.sizes["x"])) for ds in sim.exposures]
    skymap = SkyMap.centred_on(footprints, patch_inner=(s.patch, s.patch), patch_border=s.border)
    tract = skymap.tracts[0]
    patch = tract.patch_at_sky(tract.ra, tract.dec)
    box = patch.inner
    # the destination grid as SWarp reads it: FITS header (1-based) of the patch's inner box
    from astropy.wcs import WCS

    w = tract.wcs()
    head = w.to_header()
    head["CRPIX1"] = head["CRPIX1"] - box.x0
    head["CRPIX2"] = head["CRPIX2"] - box.y0
    head["NAXIS"] = 2
    head["NAXIS1"] = box.width
    head["NAXIS2"] = box.height
    (sw / "coadd.head").write_text("\n".join(str(c) for c in head.cards) + "\nEND\n")
    WCS(head)  # the header must parse
    (work_dir(s) / "skymap.json").write_text(json.dumps(skymap.to_json()))
    _mark(s, "exposures", {
        "files": files, "swarp_files": swarp_files, "visits": visits, "patch_box": box.to_list(),
        "patch": patch.name, "tract": tract.id, "tract_box": tract.bbox.to_list(),
        "seconds": time.perf_counter() - t0,
    })


def _build_repos(s: Sizes, echo) -> None:
    import shutil

    from graphs.ingest import ingest_files
    from pipeline.io.repo import open_repo
    from pipeline.model.skymap import SkyMap

    lay = _ready(s)["exposures"]
    skymap = SkyMap.from_json(json.loads((work_dir(s) / "skymap.json").read_text()))
    raw = work_dir(s) / "calexp"
    for n in s.scaling:
        path = repo_path(s, n)
        if path.exists():
            shutil.rmtree(path)
        echo(f"  ingesting {n} exposures into {path.name}")
        repo = open_repo(str(path), create=True, mode="a")
        ingest_files(repo, [raw / f for f in lay["files"][:n]], skymap=skymap)
    _mark(s, "repos", [repo_path(s, n).name for n in s.scaling])


def _build_big(s: Sizes, echo) -> None:
    import shutil

    from pipeline.sim import SimConfig, simulate

    path = work_dir(s) / "big.zarr"
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    echo(f"  simulating one {s.big}x{s.big} exposure (sky not subtracted)")
    cfg = SimConfig(n_visits=1, shape=(s.big, s.big), sky_subtraction="none",
                    n_stars=150.0 * (s.big / 1024) ** 2, n_galaxies=150.0 * (s.big / 1024) ** 2)
    ds = simulate(cfg, seed=s.seed + 1).exposures[0]
    chunk = min(1000, s.big)
    enc = _pixel_encoding(chunk)
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=enc)
    _mark(s, "big", {"path": path.name, "seconds": time.perf_counter() - t0})


def _build_stack(s: Sizes, echo) -> None:
    """Pre-aligned frames: a fixed sky of point sources plus per-frame noise, outliers and bad pixels."""
    import shutil

    from pipeline.model.masks import CANONICAL_PLANES, MaskPlane
    from pipeline.model.schema import make_dataset
    from pipeline.model.skymap import SkyMap

    path = work_dir(s) / "stack.zarr"
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    n, side = s.n_stack, s.stack_side
    echo(f"  writing {n} pre-aligned {side}x{side} frames")
    skymap = SkyMap.from_json(json.loads((work_dir(s) / "skymap.json").read_text()))
    header = skymap.tracts[0].wcs_header()
    rng = np.random.default_rng(s.seed + 2)
    sky = np.zeros((side, side), np.float32)
    ys, xs = rng.integers(0, side, size=(2, side * side // 2000))
    sky[ys, xs] = rng.pareto(1.5, size=ys.size).astype(np.float32) * 50.0
    chunk = min(s.stack_chunks)
    enc = _pixel_encoding(chunk)
    for i in range(n):
        frng = np.random.default_rng([s.seed + 3, i])
        sigma = np.float32(1.0 + 0.2 * i / max(n - 1, 1))
        image = sky + sigma * frng.standard_normal((side, side), dtype=np.float32)
        hits = frng.integers(0, side, size=(2, side * side // 1000))
        image[hits[0], hits[1]] += np.float32(100.0)
        variance = np.full((side, side), sigma * sigma, np.float32)
        mask = np.zeros((side, side), np.uint32)
        bad = frng.integers(0, side, size=(2, side * side // 500))
        mask[bad[0], bad[1]] = np.uint32(MaskPlane.BAD)
        ds = make_dataset(image, variance, mask, wcs=header, kind="warp", planes=CANONICAL_PLANES,
                          attrs={"visit": 5000 + i, "bunit": "nJy"})
        ds.to_zarr(path, group=f"frame{i}", mode="w", zarr_format=3, consolidated=False, encoding=enc)
    _mark(s, "stack", {"path": path.name, "frames": n, "seconds": time.perf_counter() - t0})
