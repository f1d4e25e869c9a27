"""The benchmark cases: for each, the implementations run side by side and the targets.

An implementation is ``prepare(ctx) -> state`` (not timed: open or load inputs, build what is not
part of the measured work) and ``run(state) -> extra`` (timed). ``state`` carries ``mpix`` (input
megapixels processed) and ``threads`` (cores the implementation may use; per-core throughput is
``mpix / (wall * threads)``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import inputs
from .inputs import Sizes


@dataclass(frozen=True)
class Impl:
    name: str  # key on the command line and in the JSON
    label: str  # what the table shows
    prepare: Callable
    run: Callable
    requires: tuple[str, ...] = ()  # Python modules or executables ("exe:NAME|NAME2")
    ours: bool = False
    reps: int | None = None  # override of --reps (long single-shot rows)
    warmup: Callable | None = None  # untimed small run (imports, JIT compilation, caches)


@dataclass(frozen=True)
class Target:
    ours: str
    peer: str
    op: str  # ">=" on per-core throughput ratio ours/peer, "<=" on peak-memory ratio; "info": ratio, no verdict
    factor: float
    text: str
    metric: str = "throughput"


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    impls: tuple[Impl, ...]
    targets: tuple[Target, ...] = field(default_factory=tuple)


def swarp_executable() -> str | None:
    for name in ("swarp", "SWarp"):
        path = shutil.which(name)
        if path:
            return path
    return None


def available(impl: Impl) -> tuple[bool, str]:
    """Whether every requirement of ``impl`` is installed (and the first missing one)."""
    for req in impl.requires:
        if req.startswith("exe:"):
            if not any(shutil.which(n) for n in req[4:].split("|")):
                return False, req[4:].split("|")[0]
        elif importlib.util.find_spec(req) is None:
            return False, req
    return True, ""


def _dask_threads(n: int):
    """dask's threaded scheduler with ``n`` workers; one thread: the synchronous scheduler, which runs
    the tasks on the calling thread, as the one-core peers do."""
    import dask

    if n == 1:
        return dask.config.set(scheduler="synchronous")
    return dask.config.set(scheduler="threads", num_workers=n)


# --------------------------------------------------------------------------------------------
# 1. resample


def _exposure_visits(ctx) -> list[int]:
    return ctx["layout"]["exposures"]["visits"]


def _patch(ctx):
    from pipeline.model.geometry import Box

    return Box(*ctx["layout"]["exposures"]["patch_box"])


def _tract(ctx):
    from pipeline.model.skymap import SkyMap

    s: Sizes = ctx["sizes"]
    return SkyMap.from_json(json.loads((inputs.work_dir(s) / "skymap.json").read_text())).tracts[0]


def prep_warp_skystack(ctx):
    from pipeline.io.repo import open_repo

    s: Sizes = ctx["sizes"]
    repo = open_repo(str(inputs.repo_path(s, s.scaling[0])), mode="r")
    visits = _exposure_visits(ctx)[: s.resample]
    exposures = [repo.open_exposure(v, 0) for v in visits]
    return {"exposures": exposures, "header": _tract(ctx).wcs_header(), "box": _patch(ctx),
            "threads": s.threads, "mpix": s.resample * s.exposure**2 / 1e6, "table": 0}


def prep_warp_skystack_table(ctx):
    return dict(prep_warp_skystack(ctx), table=10000)


def _no_psf(ds):
    return ds.drop_vars([v for v in ("psf", "psf_x", "psf_y") if v in ds.variables])


def warm_warp_skystack_small(st):
    """A small call: imports, numba, caches; the timed call is then the process's first full-size one."""
    small = dict(st, exposures=[_no_psf(ds.isel(y=slice(0, 160), x=slice(0, 160))) for ds in st["exposures"][:1]])
    run_warp_skystack(small)


def warm_warp_skystack(st):
    """One full-size call, as the in-memory convolution and background rows warm up: a worker warping
    visit after visit does not pay the first touch of its large buffers again (the caches that the
    call memoises are cleared by the timed call itself)."""
    run_warp_skystack(st)


def prep_warp_skystack_patch(ctx):
    return dict(prep_warp_skystack(ctx), footprint=False)


def run_warp_skystack(st):
    """Each exposure warped onto its footprint on the patch grid (the bounding box of its good output
    pixels, chunk edges at multiples of 1000 in the patch frame), as SWarp writes one resampled image
    per input cropped to its footprint; ``footprint=False``: onto the whole patch (the uncovered
    chunks are no-data fill, and the result holds three whole-patch planes per exposure)."""
    import dask

    from pipeline.warp import WarpConfig, clear_caches, plan_warp, replan, warp_exposure

    clear_caches()  # each repetition builds its WCS objects as a fresh call would
    chunk = min(1000, st["box"].width)
    config = WarpConfig(kernel_table_size=st["table"])
    with _dask_threads(st["threads"]):
        warps = []
        for ds in st["exposures"]:
            plan = plan_warp(ds, wcs=st["header"], box=st["box"], chunks=(chunk, chunk), config=config)
            if st.get("footprint", True) and plan.good_box is not None:
                plan = replan(plan, box=plan.good_box, chunks=(chunk, chunk))
            warps.append(warp_exposure(ds, plan=plan))
        out = dask.compute(*[(w["image"].data, w["variance"].data, w["mask"].data) for w in warps])
    return lambda: {"output_good_pixels": sum(int(np.isfinite(o[0]).sum()) for o in out),
                    "output_mpix": round(sum(o[0].size for o in out) / 1e6, 2)}


def prep_swarp(ctx):
    s: Sizes = ctx["sizes"]
    sw = inputs.work_dir(s) / "swarp"
    files = [str(sw / f) for f in ctx["layout"]["exposures"]["swarp_files"][: s.resample]]
    return {"files": files, "head": sw / "coadd.head", "threads": s.threads,
            "mpix": s.resample * s.exposure**2 / 1e6, "exe": swarp_executable()}


def warm_swarp(st):
    run_swarp(dict(st, files=st["files"][:1]))


def run_swarp(st):
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="swarp-"))
    try:
        shutil.copy(st["head"], tmp / "coadd.head")
        cmd = [
            st["exe"], *st["files"], "-c", "/dev/null",
            "-IMAGEOUT_NAME", str(tmp / "coadd.fits"), "-WEIGHTOUT_NAME", str(tmp / "coadd.weight.fits"),
            "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits",
            "-RESAMPLING_TYPE", "LANCZOS3", "-COMBINE", "N", "-RESAMPLE", "Y", "-RESAMPLE_DIR", str(tmp),
            "-SUBTRACT_BACK", "N", "-NTHREADS", str(st["threads"]), "-VERBOSE_TYPE", "QUIET",
            "-WRITE_XML", "N", "-DELETE_TMPFILES", "N", "-FSCALASTRO_TYPE", "FIXED", "-RESCALE_WEIGHTS", "N",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"SWarp failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        made = sorted(p.name for p in tmp.glob("*.resamp.fits"))
        if len(made) != len(st["files"]):
            raise RuntimeError(f"SWarp wrote {len(made)} resampled images for {len(st['files'])} inputs")
        return {"resampled_files": len(made)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prep_reproject(ctx, n):
    from astropy.io import fits
    from astropy.wcs import WCS

    s: Sizes = ctx["sizes"]
    sw = inputs.work_dir(s) / "swarp"
    names = ctx["layout"]["exposures"]["swarp_files"][:n]
    pairs = []
    for name in names:
        with fits.open(sw / name) as hdul:
            image = hdul[0].data.astype(np.float32)
            w = WCS(hdul[0].header)
        with fits.open(sw / name.replace(".fits", ".weight.fits")) as hdul:
            weight = hdul[0].data
        with np.errstate(divide="ignore"):
            variance = np.where(weight > 0, 1.0 / weight, np.inf).astype(np.float32)
        pairs.append((np.stack([image, variance]), w))
    head = fits.Header.fromstring((sw / "coadd.head").read_text(), sep="\n")
    out_wcs = WCS(head)
    shape = (head["NAXIS2"], head["NAXIS1"])
    # like SWarp (and skystack's covered chunks), reproject works only on the box of the patch the
    # exposures cover, not on the whole patch
    xs, ys = [], []
    for data, w in pairs:
        ny, nx = data.shape[1:]
        cx = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        cy = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        px, py = out_wcs.world_to_pixel(w.pixel_to_world(cx, cy))
        xs += list(px)
        ys += list(py)
    x0, x1 = max(0, int(np.floor(min(xs))) - 4), min(shape[1], int(np.ceil(max(xs))) + 5)
    y0, y1 = max(0, int(np.floor(min(ys))) - 4), min(shape[0], int(np.ceil(max(ys))) + 5)
    return {"pairs": pairs, "wcs": out_wcs[y0:y1, x0:x1], "shape": (y1 - y0, x1 - x0), "threads": 1,
            "mpix": n * s.exposure**2 / 1e6}


def prep_reproject_n(ctx):
    return _prep_reproject(ctx, ctx["sizes"].resample)


def prep_reproject_adaptive(ctx):
    return _prep_reproject(ctx, ctx["sizes"].adaptive)


def _run_reproject(st, fn, **kw):
    foots = [fn((data, w), st["wcs"], shape_out=st["shape"], **kw)[1] for data, w in st["pairs"]]
    return lambda: {"output_good_pixels": sum(int((foot > 0).sum()) for foot in foots)}


def warm_reproject(st):
    import reproject

    data, w = st["pairs"][0]
    small = (data[:, :64, :64], w[:64, :64])
    reproject.reproject_interp(small, st["wcs"], shape_out=(32, 32), order="bilinear")
    reproject.reproject_interp(small, st["wcs"], shape_out=(32, 32), order="bicubic")
    reproject.reproject_adaptive(small, st["wcs"], shape_out=(32, 32), conserve_flux=True)


def run_reproject_bilinear(st):
    from reproject import reproject_interp

    return _run_reproject(st, reproject_interp, order="bilinear")


def run_reproject_bicubic(st):
    from reproject import reproject_interp

    return _run_reproject(st, reproject_interp, order="bicubic")


def run_reproject_adaptive(st):
    from reproject import reproject_adaptive

    return _run_reproject(st, reproject_adaptive, conserve_flux=True)


# --------------------------------------------------------------------------------------------
# 2. PSF-matching convolution


def _open_big(ctx, chunk=None):
    import xarray as xr

    s: Sizes = ctx["sizes"]
    c = chunk or min(1000, s.big)
    ds = xr.open_zarr(inputs.work_dir(s) / "big.zarr", consolidated=False, chunks={"y": c, "x": c})
    if "psf" in ds:
        ds["psf"] = ds["psf"].load()
    return ds


def _load_big_image(ctx) -> tuple[np.ndarray, np.ndarray]:
    ds = _open_big(ctx)
    return np.ascontiguousarray(ds["image"].values, dtype=np.float32), ds["mask"].values


def prep_conv_skystack(ctx, memory=False, threads=None, **config):
    """The kernel solve happens here (not timed); ``memory``: the exposure is loaded outside the timed
    piece, as fftconvolve's image is, and handed over as dask arrays over it in 1000x1000 blocks."""
    import time

    from pipeline.psf import GaussianPsf
    from pipeline.psf_match import ModelPsfMatchConfig, model_psf_match

    s: Sizes = ctx["sizes"]
    ds = _open_big(ctx)
    if memory:
        c = min(1000, s.big)
        ds = ds.load().chunk({"y": c, "x": c})
        ds["psf"] = ds["psf"].load()
    t0 = time.perf_counter()
    out, model = model_psf_match(ds, GaussianPsf(sigma=3.0), config=ModelPsfMatchConfig(kernel_size=21, **config))
    solve_s = time.perf_counter() - t0
    order = model.report.attrs.get("spatial_kernel_order") if model.report is not None else None
    return {"out": out, "ds": ds, "config": config, "solve_s": solve_s, "kernel_size": model.kernel_size, "order": order,
            "threads": threads or s.threads, "mpix": s.big**2 / 1e6, "memory": memory}


def warm_conv_skystack(st):
    """In memory: one full-size call, as for fftconvolve (first touch of large buffers is a one-off cost
    of a fresh process); from zarr: a small call (imports, numba, caches)."""
    import dask

    from pipeline.psf import GaussianPsf
    from pipeline.psf_match import ModelPsfMatchConfig, model_psf_match

    if st.get("memory"):
        run_conv_skystack(st)
        return
    small = st["ds"].isel(y=slice(0, 256), x=slice(0, 256))
    config = ModelPsfMatchConfig(kernel_size=21, **st.get("config", {}))
    out, _ = model_psf_match(small, GaussianPsf(sigma=3.0), config=config)
    with _dask_threads(st["threads"]):
        dask.compute(out["image"].data, out["variance"].data, out["mask"].data)


def run_conv_skystack(st):
    import dask

    from pipeline._kernels_convolve import clear_caches

    clear_caches()  # each repetition transforms its kernel images as a single pass over the exposure does
    with _dask_threads(st["threads"]):
        dask.compute(st["out"]["image"].data, st["out"]["variance"].data, st["out"]["mask"].data)
    return {"kernel_solve_s_untimed": round(st["solve_s"], 3), "kernel_size": st["kernel_size"],
            "spatial_kernel_order": st.get("order")}


def _gauss_kernel(size=21, sigma=2.5):
    r = np.arange(size) - size // 2
    k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    return (k / k.sum()).astype(np.float32)


def prep_conv_image(ctx, threads=1):
    """The image in memory for the scipy yardsticks; ``threads``: scipy.fft workers of fftconvolve."""
    s: Sizes = ctx["sizes"]
    image, _ = _load_big_image(ctx)
    image = np.nan_to_num(image)
    return {"image": image, "kernel": _gauss_kernel(), "threads": threads, "mpix": s.big**2 / 1e6}


def warm_conv_image(st):
    """fftconvolve warms up with one full-size call, as the in-memory skystack rows do; ndimage (slow,
    not judged) with a small one."""
    from scipy import ndimage
    from scipy.signal import fftconvolve

    run_fftconvolve(st)
    ndimage.convolve(st["image"][:128, :128], st["kernel"], mode="constant")


def run_fftconvolve(st):
    import scipy.fft
    from scipy.signal import fftconvolve

    with scipy.fft.set_workers(st["threads"]):  # fftconvolve's transforms take the default worker count
        out = fftconvolve(st["image"], st["kernel"], mode="same")
    return {"dtype": str(out.dtype)}


def run_ndimage_convolve(st):
    from scipy import ndimage

    out = ndimage.convolve(st["image"], st["kernel"], mode="constant")
    return {"dtype": str(out.dtype)}


# --------------------------------------------------------------------------------------------
# 3. stacking


def _open_frames(ctx, chunk):
    import xarray as xr

    s: Sizes = ctx["sizes"]
    path = inputs.work_dir(s) / "stack.zarr"
    return [xr.open_zarr(path, group=f"frame{i}", consolidated=False, chunks={"y": chunk, "x": chunk})
            for i in range(s.n_stack)]


def _prep_stack_skystack(ctx, which):
    s: Sizes = ctx["sizes"]
    chunk = s.stack_chunks[which]
    return {"frames": _open_frames(ctx, chunk), "chunk": chunk, "threads": s.threads,
            "mpix": s.n_stack * s.stack_side**2 / 1e6}


def prep_stack_small(ctx):
    return _prep_stack_skystack(ctx, 0)


def prep_stack_large(ctx):
    return _prep_stack_skystack(ctx, 1)


def warm_stack_skystack(st):
    run_stack_skystack(dict(st, frames=[f.isel(y=slice(0, 64), x=slice(0, 64)) for f in st["frames"]]))


def prep_stack_memory(ctx, threads=None):
    """The frames loaded into memory outside the timed piece, as astropy's cube is.

    Dask arrays over the loaded numpy arrays, in bands of full rows (contiguous, so no block copies).
    """
    s: Sizes = ctx["sizes"]
    band = min(500, s.stack_side)
    frames = [f.load().chunk({"y": band, "x": -1}) for f in _open_frames(ctx, s.stack_side)]
    return {"frames": frames, "chunk": f"{band} rows x full width", "threads": threads or s.threads,
            "mpix": s.n_stack * s.stack_side**2 / 1e6, "all_planes": True}


def run_stack_skystack(st):
    import dask

    from pipeline.stack import StackConfig, stack

    with _dask_threads(st["threads"]):
        out = stack(st["frames"], config=StackConfig(statistic="MEANCLIP", num_sigma_clip=3.0, num_iter=2))
        names = ("image", "variance", "mask") if st.get("all_planes") else ("image",)
        image, *_ = dask.compute(*[out[n].data for n in names])
    return lambda: {"chunk": st["chunk"], "planes": "+".join(names),
                    "finite_fraction": round(float(np.isfinite(image).mean()), 6)}


def prep_stack_arrays(ctx):
    from pipeline.model.masks import MaskPlane

    s: Sizes = ctx["sizes"]
    frames = _open_frames(ctx, s.stack_side)
    cube = np.stack([f["image"].values for f in frames]).astype(np.float32)
    bad = np.uint32(MaskPlane.NO_DATA | MaskPlane.BAD | MaskPlane.SAT | MaskPlane.EDGE)
    masks = np.stack([(f["mask"].values & bad) != 0 for f in frames])
    return {"cube": cube, "masks": masks, "threads": 1, "mpix": s.n_stack * s.stack_side**2 / 1e6}


def prep_stack_zarr_arrays(ctx):
    s: Sizes = ctx["sizes"]
    return {"ctx": ctx, "threads": 1, "mpix": s.n_stack * s.stack_side**2 / 1e6}


def run_astropy_from_zarr(st):
    """astropy's row with the cube read from the same zarr store inside the timed piece."""
    return run_astropy_sigma_clip(prep_stack_arrays(st["ctx"]))


def warm_stack_arrays_zarr(st):
    rng = np.random.default_rng(1)
    run_astropy_sigma_clip({"cube": rng.normal(size=(4, 32, 32)).astype(np.float32),
                            "masks": np.zeros((4, 32, 32), bool)})


def warm_stack_arrays(st):
    small = dict(st, cube=st["cube"][:, :32, :32], masks=st["masks"][:, :32, :32])
    run_astropy_sigma_clip(small)
    if importlib.util.find_spec("ccdproc") is not None:
        run_ccdproc(small)


def run_astropy_sigma_clip(st):
    from astropy.stats import sigma_clip

    data = np.ma.masked_array(st["cube"], mask=st["masks"])
    clipped = sigma_clip(data, sigma=3.0, maxiters=2, axis=0, cenfunc="median", stdfunc="std")
    mean = clipped.mean(axis=0)
    return {"masked_fraction": round(float(np.ma.getmaskarray(mean).mean()), 6)}


def run_ccdproc(st):
    from astropy import units as u
    from astropy.nddata import CCDData
    from ccdproc import Combiner

    ccds = [CCDData(img, mask=m, unit=u.adu) for img, m in zip(st["cube"], st["masks"])]
    comb = Combiner(ccds)
    comb.sigma_clipping(low_thresh=3.0, high_thresh=3.0, func=np.ma.median)
    out = comb.average_combine()
    return {"shape": list(out.data.shape)}


# --------------------------------------------------------------------------------------------
# 4. background


def prep_bg_skystack(ctx):
    s: Sizes = ctx["sizes"]
    return {"ds": _open_big(ctx), "threads": s.threads, "mpix": s.big**2 / 1e6}


def prep_bg_memory(ctx):
    """The exposure loaded into memory (numpy-backed) outside the timed piece, as sep's image is.

    fit_background and evaluate run on one thread on numpy input, so the row uses one core, as sep does.
    """
    s: Sizes = ctx["sizes"]
    return {"ds": _open_big(ctx)[["image", "variance", "mask"]].load(), "threads": 1, "mpix": s.big**2 / 1e6}


def prep_bg_memory_dask(ctx):
    """The exposure in memory as dask arrays of 1000x1000 chunks, computed on the threads of the run."""
    s: Sizes = ctx["sizes"]
    c = min(1000, s.big)
    ds = _open_big(ctx)[["image", "variance", "mask"]].load().chunk({"y": c, "x": c})
    return {"ds": ds, "threads": s.threads, "mpix": s.big**2 / 1e6}


def warm_bg_memory(st):
    # one full-size call: the first call in a fresh process pays one-off costs (about 0.15-0.3 s of
    # first-touch memory on this machine) that a long-lived worker does not; sep and photutils get
    # the same full-size warm-up (warm_bg_arrays)
    run_bg_skystack(st)


def warm_bg_skystack(st):
    small = dict(st, ds=st["ds"].isel(y=slice(0, 300), x=slice(0, 300)))
    run_bg_skystack(small)
    run_scale_variance(small)


def run_bg_skystack(st):
    import dask

    from pipeline.background import BackgroundConfig, fit_background

    with _dask_threads(st["threads"]):
        model = fit_background(st["ds"], config=BackgroundConfig(bin_size=128))
        dask.compute(model.evaluate().data)
    return {"statistic": "MEANCLIP 3 sigma x3 (median/IQR start), 1/err-weighted Chebyshev order 6 on the cell grid"}


def run_scale_variance(st):
    import dask

    from pipeline.scale_variance import scale_variance

    with _dask_threads(st["threads"]):
        out = scale_variance(st["ds"])
        factor, _ = dask.compute(out["variance_scale"].data, out["variance"].data)
    return {"variance_scale": round(float(factor), 5)}


def prep_bg_arrays(ctx):
    from pipeline.model.masks import MaskPlane

    s: Sizes = ctx["sizes"]
    image, mask = _load_big_image(ctx)
    bad = np.uint32(MaskPlane.BAD | MaskPlane.EDGE | MaskPlane.NO_DATA)
    return {"image": image, "mask": ((mask & bad) != 0) | ~np.isfinite(image), "threads": 1,
            "mpix": s.big**2 / 1e6}


def warm_bg_arrays(st):
    # full size, as warm_bg_memory does for skystack
    if importlib.util.find_spec("sep") is not None:
        run_sep(st)
    if importlib.util.find_spec("photutils") is not None:
        run_photutils(st)


def run_sep(st):
    import sep

    bkg = sep.Background(st["image"], mask=st["mask"], bw=128, bh=128, fw=3, fh=3)
    back = bkg.back()
    return {"global": round(float(bkg.globalback), 3), "shape": list(back.shape)}


def run_photutils(st):
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, SExtractorBackground

    bkg = Background2D(st["image"], (128, 128), filter_size=(3, 3), mask=st["mask"],
                       sigma_clip=SigmaClip(sigma=3.0, maxiters=3), bkg_estimator=SExtractorBackground())
    back = bkg.background
    return {"median": round(float(bkg.background_median), 3), "shape": list(back.shape)}


# --------------------------------------------------------------------------------------------
# 5. machine limits


def prep_bandwidth(ctx):
    s: Sizes = ctx["sizes"]
    n = s.bandwidth_mb * 2**20 // 8
    src = np.arange(n, dtype=np.float64)
    dst = np.empty_like(src)
    dst[:] = 0.0  # fault the pages in before timing
    np.copyto(dst, src)
    return {"src": src, "dst": dst, "threads": 1, "mpix": 0.0, "copies": 5}


def run_bandwidth(st):
    import time

    best = None
    for _ in range(st["copies"]):
        t0 = time.perf_counter()
        np.copyto(st["dst"], st["src"])
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    nbytes = st["src"].nbytes
    return {"copy_GB_per_s": round(2 * nbytes / best / 1e9, 2), "array_MB": nbytes // 2**20,
            "note": "read + write bytes per second, best of the copies"}


def prep_lanczos(ctx):
    from . import _lanczos

    s: Sizes = ctx["sizes"]
    rng = np.random.default_rng(s.seed + 4)
    side = s.exposure
    image = rng.standard_normal((side, side)).astype(np.float32)
    variance = np.ones((side, side), np.float32)
    mask = (rng.random((side, side)) < 0.01).astype(np.uint32)
    affine = _lanczos.rotation_affine((side, side), 10.0, (0.3, -0.2))
    _lanczos.run(image[:16, :16], variance[:16, :16], mask[:16, :16], affine)  # compile
    return {"args": (image, variance, mask, affine), "threads": 1, "mpix": side * side / 1e6}


def run_lanczos(st):
    from . import _lanczos

    out = _lanczos.run(*st["args"])
    return lambda: {"good_fraction": round(float(np.isfinite(out[0]).mean()), 4)}


# --------------------------------------------------------------------------------------------
# 6. scaling


def _clear_warps(repo_dir: Path):
    for t in repo_dir.glob("tract_*"):
        for sub in ("warps", "coadds"):
            shutil.rmtree(t / sub, ignore_errors=True)


def _graph_size_per_exposure(repo) -> float:
    from graphs.warps import warp_units
    from pipeline.testing import graph_size

    units = warp_units(repo, overwrite=True)[:2]
    sizes = [sum(graph_size(w) for w in u.build()) for u in units]
    return float(np.mean(sizes)) if sizes else 0.0


def _prep_warp_n(ctx, n, workers=None):
    from pipeline.io.repo import open_repo

    s: Sizes = ctx["sizes"]
    path = inputs.repo_path(s, n)
    _clear_warps(path)
    repo = open_repo(str(path), mode="r+")
    tasks = _graph_size_per_exposure(repo)
    client = None
    if workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    return {"repo": repo, "n": n, "client": client, "tasks": tasks, "threads": workers or s.threads,
            "mpix": n * s.exposure**2 / 1e6}


def _warm_warp(repo_url: str, visit: int) -> None:
    import dask

    from pipeline.io.repo import open_repo
    from pipeline.model.geometry import Box
    from pipeline.warp import warp_exposure

    repo = open_repo(repo_url, mode="r")
    ds = _no_psf(repo.open_exposure(visit, 0).isel(y=slice(0, 160), x=slice(0, 160)))
    w = warp_exposure(ds, wcs=ds["wcs"].attrs["fits_header"], box=Box(0, 0, 160, 160), chunks=(80, 80))
    dask.compute(w["image"].data, w["variance"].data, w["mask"].data, scheduler="sync")


def warm_warp_n(st):
    visit = st["repo"].list_exposures()[0]["visit"]
    _warm_warp(st["repo"].url, visit)
    if st["client"] is not None:
        st["client"].run(_warm_warp, st["repo"].url, visit)


def run_warp_n(st):
    from graphs.warps import run_warps

    report = run_warps(st["repo"], overwrite=True, client=st["client"], progress=False)
    if not report.ok:
        raise RuntimeError(report.summary())
    out = {"exposures": st["n"], "graph_tasks_per_exposure": st["tasks"], "units": len(report.done)}
    if st["client"] is not None:
        st["client"].close()
    return out


def prep_coadd(ctx):
    from graphs.warps import run_warps
    from pipeline.io.repo import open_repo

    s: Sizes = ctx["sizes"]
    n = s.scaling[0]
    repo = open_repo(str(inputs.repo_path(s, n)), mode="r+")
    report = run_warps(repo, progress=False)  # no-op when the warps are complete
    if not report.ok:
        raise RuntimeError(report.summary())
    return {"repo": repo, "n": n, "threads": s.threads, "mpix": n * s.exposure**2 / 1e6}


def run_coadd(st):
    from graphs.coadd import coadd_units
    from graphs.execute import run_units

    report = run_units(coadd_units(st["repo"], overwrite=True), progress=False)
    if not report.ok:
        raise RuntimeError(report.summary())
    return {"visits": st["n"], "patches": len(report.done)}


# --------------------------------------------------------------------------------------------
# 7. coadd: warp + combine of the N = 8 repository onto the patch, side by side with the peers


def prep_pipeline_coadd(ctx):
    from pipeline.io.repo import open_repo

    s: Sizes = ctx["sizes"]
    n = s.scaling[0]
    path = inputs.repo_path(s, n)
    _clear_warps(path)  # every repetition starts from the ingested repository: no warps, no coadds
    repo = open_repo(str(path), mode="r+")
    return {"repo": repo, "n": n, "client": None, "threads": s.threads, "mpix": n * s.exposure**2 / 1e6}


def run_pipeline_coadd(st):
    import time

    from graphs.coadd import coadd_units
    from graphs.execute import run_units
    from graphs.warps import warp_units

    t0 = time.perf_counter()
    warps = run_units(warp_units(st["repo"], overwrite=True), progress=False, threads=st["threads"])
    if not warps.ok:
        raise RuntimeError(warps.summary())
    t1 = time.perf_counter()
    coadds = run_units(coadd_units(st["repo"], overwrite=True), progress=False, threads=st["threads"])
    if not coadds.ok:
        raise RuntimeError(coadds.summary())
    t2 = time.perf_counter()
    return {"visits": st["n"], "patches": len(coadds.done), "warp_s": round(t1 - t0, 2),
            "coadd_only_s": round(t2 - t1, 2)}


def prep_swarp_coadd(ctx, combine: str):
    s: Sizes = ctx["sizes"]
    n = s.scaling[0]
    sw = inputs.work_dir(s) / "swarp"
    files = [str(sw / f) for f in ctx["layout"]["exposures"]["swarp_files"][:n]]
    return {"files": files, "head": sw / "coadd.head", "threads": s.threads, "combine": combine,
            "mpix": n * s.exposure**2 / 1e6, "exe": swarp_executable()}


def swarp_coadd_command(st, tmp: Path) -> list[str]:
    """One SWarp call that resamples (LANCZOS3) and combines the image+weight copies onto the patch."""
    return [
        st["exe"], *st["files"], "-c", "/dev/null",
        "-IMAGEOUT_NAME", str(tmp / "coadd.fits"), "-WEIGHTOUT_NAME", str(tmp / "coadd.weight.fits"),
        "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits",
        "-RESAMPLING_TYPE", "LANCZOS3", "-COMBINE", "Y", "-COMBINE_TYPE", st["combine"], "-RESAMPLE", "Y",
        "-RESAMPLE_DIR", str(tmp), "-SUBTRACT_BACK", "N", "-NTHREADS", str(st["threads"]),
        "-VERBOSE_TYPE", "QUIET", "-WRITE_XML", "N", "-DELETE_TMPFILES", "Y", "-FSCALASTRO_TYPE", "FIXED",
        "-RESCALE_WEIGHTS", "N",
    ]


def warm_swarp_coadd(st):
    run_swarp_coadd(dict(st, files=st["files"][:1]))


def run_swarp_coadd(st):
    import subprocess

    from astropy.io import fits

    tmp = Path(tempfile.mkdtemp(prefix="swarp-coadd-"))
    try:
        shutil.copy(st["head"], tmp / "coadd.head")
        proc = subprocess.run(swarp_coadd_command(st, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"SWarp failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        header = fits.getheader(tmp / "coadd.fits")
        return {"combine_type": st["combine"], "output": f"{header['NAXIS1']}x{header['NAXIS2']}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prep_reproject_coadd(ctx):
    s: Sizes = ctx["sizes"]
    st = _prep_reproject(ctx, s.scaling[0])
    images, weights = [], []
    for data, w in st["pairs"]:
        images.append((data[0], w))
        with np.errstate(divide="ignore"):
            weights.append(np.where(np.isfinite(data[1]) & (data[1] > 0), 1.0 / data[1], 0.0).astype(np.float32))
    return dict(st, pairs=None, images=images, weights=weights)


def warm_reproject_coadd(st):
    small = dict(st, images=[(d[:64, :64], w[:64, :64]) for d, w in st["images"][:2]],
                 weights=[x[:64, :64] for x in st["weights"][:2]], shape=(32, 32))
    run_reproject_coadd(small)


def run_reproject_coadd(st, combine="mean"):
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd

    out, foot = reproject_and_coadd(st["images"], st["wcs"], shape_out=st["shape"], input_weights=st["weights"],
                                    reproject_function=reproject_interp, combine_function=combine,
                                    order="bilinear")
    return lambda: {"combine_function": combine, "output_good_pixels": int((foot > 0).sum())}


def reproject_supports_median() -> bool:
    """Whether the installed reproject_and_coadd accepts combine_function='median'."""
    import inspect

    try:
        from reproject.mosaicking import reproject_and_coadd
    except ImportError:
        return False
    return "'median'" in (inspect.getdoc(reproject_and_coadd) or "")


# --------------------------------------------------------------------------------------------
# registry


def cases(s: Sizes) -> list[Case]:
    big = f"{s.big}x{s.big}"
    n8 = s.scaling[0]
    scaling_impls = [
        Impl(f"warp_N{n}", f"skystack run_warps N={n} ({s.threads} threads)",
             (lambda ctx, n=n: _prep_warp_n(ctx, n)), run_warp_n, ours=True, reps=1, warmup=warm_warp_n)
        for n in s.scaling
    ]
    scaling_impls += [
        Impl(f"warp_N{n8}_workers{k}", f"skystack run_warps N={n8}, {k} distributed worker(s)",
             (lambda ctx, k=k: _prep_warp_n(ctx, n8, workers=k)), run_warp_n, requires=("distributed",), ours=True,
             reps=1, warmup=warm_warp_n)
        for k in (1, 2)
    ]
    scaling_impls.append(Impl(f"coadd_N{n8}", f"skystack coadd_units N={n8} (graphs.coadd)", prep_coadd, run_coadd,
                              ours=True, reps=1))
    coadd_impls = [
        Impl("skystack", f"skystack warp_units + coadd_units, run_units ({s.threads} threads)", prep_pipeline_coadd,
             run_pipeline_coadd, ours=True, warmup=warm_warp_n),
    ]
    coadd_impls += [
        Impl(f"swarp_{kind.lower()}", f"SWarp LANCZOS3 + COMBINE_TYPE {kind} (image+weight, NTHREADS {s.threads})",
             (lambda ctx, kind=kind: prep_swarp_coadd(ctx, kind)), run_swarp_coadd, requires=("exe:swarp|SWarp",),
             warmup=warm_swarp_coadd)
        for kind in ("CLIPPED", "MEDIAN", "WEIGHTED")
    ]
    coadd_impls.append(Impl("reproject_mean", "reproject_and_coadd reproject_interp bilinear, mean, weights 1/variance",
                            prep_reproject_coadd, run_reproject_coadd, requires=("reproject",),
                            warmup=warm_reproject_coadd))
    if reproject_supports_median():
        coadd_impls.append(Impl("reproject_median", "reproject_and_coadd reproject_interp bilinear, median",
                                prep_reproject_coadd, lambda st: run_reproject_coadd(st, "median"),
                                requires=("reproject",), warmup=warm_reproject_coadd))
    coadd_targets = tuple(Target(i.name, "swarp_clipped", "info", 1.0, "information")
                          for i in coadd_impls if i.name != "swarp_clipped")
    return [
        Case("resample", f"Lanczos3 warp of {s.exposure}x{s.exposure} exposures onto the {s.patch}x{s.patch} patch", (
            Impl("skystack", f"skystack warp_exposure onto each exposure's footprint (image+variance+mask, "
                 f"{s.threads} threads)", prep_warp_skystack, run_warp_skystack, ours=True, warmup=warm_warp_skystack),
            Impl("skystack_first", f"skystack warp_exposure onto each exposure's footprint, first full-size call "
                 f"of a fresh process (image+variance+mask, {s.threads} threads)", prep_warp_skystack,
                 run_warp_skystack, ours=True, warmup=warm_warp_skystack_small),
            Impl("skystack_patch", f"skystack warp_exposure onto the whole patch (image+variance+mask, "
                 f"{s.threads} threads)", prep_warp_skystack_patch, run_warp_skystack, ours=True,
                 warmup=warm_warp_skystack),
            Impl("skystack_table", f"skystack warp_exposure, Lanczos weights tabulated (kernel_table_size 10000, "
                 f"{s.threads} threads)", prep_warp_skystack_table, run_warp_skystack, ours=True,
                 warmup=warm_warp_skystack),
            Impl("swarp", f"SWarp LANCZOS3 COMBINE N (image+weight, NTHREADS {s.threads})", prep_swarp, run_swarp,
                 requires=("exe:swarp|SWarp",), warmup=warm_swarp),
            Impl("reproject_bilinear", "reproject_interp bilinear (image+variance)", prep_reproject_n,
                 run_reproject_bilinear, requires=("reproject",), reps=2, warmup=warm_reproject),
            Impl("reproject_bicubic", "reproject_interp bicubic (image+variance)", prep_reproject_n,
                 run_reproject_bicubic, requires=("reproject",), reps=2, warmup=warm_reproject),
            Impl("reproject_adaptive", f"reproject_adaptive ({s.adaptive} exposure, image+variance)",
                 prep_reproject_adaptive, run_reproject_adaptive, requires=("reproject",), reps=2,
                 warmup=warm_reproject),
        ), (Target("skystack", "swarp", ">=", 2.0, ">= 2x SWarp per core"),
            Target("skystack_first", "swarp", "info", 1.0, "information"),
            Target("skystack_patch", "swarp", "info", 1.0, "information"),
            Target("skystack_table", "swarp", "info", 1.0, "information"))),
        Case("psf_match_convolution", f"spatially varying 21x21 PSF-matching convolution of a {big} exposure", (
            Impl("skystack_memory_1", "skystack model_psf_match convolution, exposure in memory "
                 "(image+variance+mask, 1 thread)", (lambda ctx: prep_conv_skystack(ctx, memory=True, threads=1)),
                 run_conv_skystack, ours=True, warmup=warm_conv_skystack),
            Impl("skystack_memory", f"skystack model_psf_match convolution, exposure in memory "
                 f"(image+variance+mask, {s.threads} threads)", (lambda ctx: prep_conv_skystack(ctx, memory=True)),
                 run_conv_skystack, ours=True, warmup=warm_conv_skystack),
            Impl("skystack", f"skystack model_psf_match convolution, read from zarr "
                 f"(image+variance+mask, {s.threads} threads)",
                 prep_conv_skystack, run_conv_skystack, ours=True, warmup=warm_conv_skystack),
            Impl("skystack_float64", f"skystack model_psf_match convolution, fft_precision float64, exposure in memory "
                 f"(image+variance+mask, {s.threads} threads)",
                 (lambda ctx: prep_conv_skystack(ctx, memory=True, fft_precision="float64")),
                 run_conv_skystack, ours=True, warmup=warm_conv_skystack),
            Impl("skystack_reference_fit", f"skystack model_psf_match convolution, spatial_fit reference (order 2), "
                 f"exposure in memory (image+variance+mask, {s.threads} threads)",
                 (lambda ctx: prep_conv_skystack(ctx, memory=True, spatial_fit="reference")),
                 run_conv_skystack, ours=True, warmup=warm_conv_skystack),
            Impl("skystack_exact", f"skystack model_psf_match convolution, convolution exact, exposure in memory "
                 f"(image+variance+mask, {s.threads} threads)",
                 (lambda ctx: prep_conv_skystack(ctx, memory=True, convolution="exact")),
                 run_conv_skystack, ours=True, warmup=warm_conv_skystack),
            Impl("fftconvolve", "scipy.signal.fftconvolve, constant 21x21 (image)", prep_conv_image, run_fftconvolve,
                 warmup=warm_conv_image),
            Impl("fftconvolve_threads", f"scipy.signal.fftconvolve, constant 21x21 (image), {s.threads} scipy.fft workers",
                 (lambda ctx: prep_conv_image(ctx, threads=s.threads)), run_fftconvolve, warmup=warm_conv_image),
            Impl("ndimage", "scipy.ndimage.convolve, constant 21x21 (image)", prep_conv_image, run_ndimage_convolve,
                 warmup=warm_conv_image),
        ), (Target("skystack_memory_1", "fftconvolve", ">=", 0.5,
                   "within 2x of fftconvolve per core (both in memory, one core each)"),
            Target("skystack_memory", "fftconvolve_threads", "info", 1.0,
                   f"information (both in memory, {s.threads} threads each)"),
            Target("skystack", "fftconvolve", "info", 1.0, "information (ours reads zarr)"),
            Target("skystack_float64", "fftconvolve", "info", 1.0, "information"),
            Target("skystack_reference_fit", "fftconvolve", "info", 1.0, "information"),
            Target("skystack_exact", "fftconvolve", "info", 1.0, "information"))),
        Case("stacking", f"clipped stacking of {s.n_stack} pre-aligned {s.stack_side}x{s.stack_side} frames", (
            Impl("skystack_memory_1", "skystack stack MEANCLIP, frames in memory, image+variance+mask (1 thread)",
                 (lambda ctx: prep_stack_memory(ctx, 1)), run_stack_skystack, ours=True, warmup=warm_stack_skystack),
            Impl("skystack_memory", f"skystack stack MEANCLIP, frames in memory, image+variance+mask "
                 f"({s.threads} threads)", prep_stack_memory, run_stack_skystack, ours=True,
                 warmup=warm_stack_skystack),
            Impl("skystack_small_chunks", f"skystack stack MEANCLIP from zarr, chunks {s.stack_chunks[0]} "
                 f"({s.threads} threads)", prep_stack_small, run_stack_skystack, ours=True, warmup=warm_stack_skystack),
            Impl("skystack_large_chunks", f"skystack stack MEANCLIP from zarr, chunks {s.stack_chunks[1]} "
                 f"({s.threads} threads)", prep_stack_large, run_stack_skystack, ours=True, warmup=warm_stack_skystack),
            Impl("astropy", "astropy sigma_clip 3 sigma x2 + mean, cube in memory", prep_stack_arrays,
                 run_astropy_sigma_clip, requires=("astropy",), warmup=warm_stack_arrays),
            Impl("astropy_zarr", "astropy sigma_clip 3 sigma x2 + mean, cube read from zarr", prep_stack_zarr_arrays,
                 run_astropy_from_zarr, requires=("astropy",), reps=1, warmup=warm_stack_arrays_zarr),
            Impl("ccdproc", "ccdproc Combiner sigma_clipping + average_combine", prep_stack_arrays, run_ccdproc,
                 requires=("ccdproc",), warmup=warm_stack_arrays),
        ), (Target("skystack_memory_1", "astropy", ">=", 5.0, ">= 5x astropy per core (both in memory, one core each)"),
            Target("skystack_memory", "astropy", ">=", 5.0, ">= 5x astropy per core (both in memory)"),
            Target("skystack_small_chunks", "astropy_zarr", "info", 1.0, "information (both read zarr)"),
            Target("skystack_large_chunks", "astropy_zarr", "info", 1.0, "information (both read zarr)"))),
        Case("background", f"background of a {big} image, 128x128 cells", (
            Impl("skystack", "skystack fit_background + evaluate, image in memory (numpy, 1 thread)",
                 prep_bg_memory, run_bg_skystack, ours=True, warmup=warm_bg_memory),
            Impl("skystack_dask", f"skystack fit_background + evaluate, image in memory (dask chunks 1000, "
                 f"{s.threads} threads)", prep_bg_memory_dask, run_bg_skystack, ours=True, warmup=warm_bg_memory),
            Impl("skystack_zarr", f"skystack fit_background + evaluate, read from zarr ({s.threads} threads)",
                 prep_bg_skystack, run_bg_skystack, ours=True, warmup=warm_bg_skystack),
            Impl("sep", "sep.Background bw=bh=128, 3x3 filter", prep_bg_arrays, run_sep, requires=("sep",),
                 warmup=warm_bg_arrays),
            Impl("photutils", "photutils Background2D 128, SExtractorBackground, 3x3 filter", prep_bg_arrays,
                 run_photutils, requires=("photutils",), warmup=warm_bg_arrays),
            Impl("scale_variance", f"skystack scale_variance (no peer, {s.threads} threads)", prep_bg_skystack,
                 run_scale_variance, warmup=warm_bg_skystack),
        ), (Target("skystack", "sep", ">=", 1 / 1.5, "within 1.5x of sep per core"),
            Target("skystack", "photutils", ">", 1.0, "faster than photutils per core"),
            Target("skystack_dask", "sep", "info", 1.0, "information"),
            Target("skystack_zarr", "sep", "info", 1.0, "information (ours reads zarr, sep's image is in memory)"))),
        Case("machine", "machine limits", (
            Impl("bandwidth", f"memory bandwidth: numpy copy of {s.bandwidth_mb} MB", prep_bandwidth, run_bandwidth),
            Impl("lanczos3_loop", f"numba Lanczos3 loop, image+variance+mask, {s.exposure}x{s.exposure}, 1 thread",
                 prep_lanczos, run_lanczos),
        )),
        Case("scaling", f"warping N {s.exposure}x{s.exposure} exposures into a repository; coadd", tuple(scaling_impls),
             (Target(f"warp_N{s.scaling[-1]}", f"warp_N{n8}", "<=", 1.2, f"peak <= 1.2x N={n8}", metric="peak"),)),
        Case("coadd", f"warp + coadd of N={n8} {s.exposure}x{s.exposure} exposures onto the {s.patch}x{s.patch} "
             "patch", tuple(coadd_impls), coadd_targets),
    ]


def find(s: Sizes, case: str, impl: str) -> Impl:
    for c in cases(s):
        if c.name == case:
            for i in c.impls:
                if i.name == impl:
                    return i
    raise KeyError(f"no implementation {impl!r} in case {case!r}")
