"""MatchBackgrounds (legacy): matched backgrounds, reference choice, per-visit failures, laziness."""

from __future__ import annotations

import dask
import numpy as np
import pydantic
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs.diagnostics import plot_match_diagnostics
from pipeline.errors import MaskPlaneError, SchemaError
from pipeline.match_backgrounds import (
    NO_OVERLAP,
    OK,
    REFERENCE,
    UNDERSAMPLED,
    MatchBackgroundsConfig,
    match_backgrounds,
    select_reference,
)
from pipeline.model.masks import MaskPlane, bitmask
from pipeline.model.schema import make_dataset
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.conftest import make_tan_wcs

H, W = 256, 320
SIGMAS = (1.0, 1.3, 0.8, 1.1)
SPLINE = MatchBackgroundsConfig(bin_size=32)
POLY = MatchBackgroundsConfig(bin_size=32, use_polynomial=True, order=3)


def _backgrounds(h=H, w=W):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / w, y / h
    return [
        100.0 + 0.0 * u,
        103.0 + 2.0 * u - 1.0 * v,  # plane
        98.0 + 3.0 * u * v + 2.0 * v**2,  # smooth 2-D polynomial
        101.0 - 2.0 * u**2 + v + 0.5 * u**3,
    ]


def _sources(h=H, w=W):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for xs, ys, amp in ((40, 50, 300.0), (200, 120, 80.0), (290, 220, 150.0), (120, 200, 40.0)):
        img += amp * np.exp(-((x - xs) ** 2 + (y - ys) ** 2) / (2 * 2.5**2))
    return img


def _warps(seed=0, x0=1000, y0=2000, visits=(11, 12, 13, 14), no_data=None):
    rng = np.random.default_rng(seed)
    src = _sources()
    det = np.where(src > 0.5, np.uint32(MaskPlane.DETECTED), np.uint32(0))
    out = []
    for k, (bg, sig) in enumerate(zip(_backgrounds(), SIGMAS)):
        img = bg + src + rng.normal(0.0, sig, (H, W))
        mask = det.copy()
        if no_data is not None and no_data[k] is not None:
            sl = no_data[k]
            img[sl] = np.nan
            mask[sl] |= np.uint32(MaskPlane.NO_DATA)
        out.append(make_dataset(img, np.full((H, W), sig * sig), mask, wcs=make_tan_wcs(), kind="warp", x0=x0,
                                y0=y0, attrs={"visit": visits[k], "tract": 9, "patch": 4}))
    return out


def _hand_reference(warps, config):
    bad = bitmask(config.bad_mask_planes)
    var, lvl, npt = [], [], []
    for w in warps:
        img = w["image"].values.astype(np.float64)
        good = ((w["mask"].values & bad) == 0) & np.isfinite(img)
        var.append(img[good].var(ddof=1))
        lvl.append(img[good].mean())
        npt.append(good.sum())
    var, lvl, npt = map(np.array, (var, lvl, npt))
    cost = (config.best_ref_weight_variance * var / var.max() + config.best_ref_weight_level * lvl / lvl.max()
            + config.best_ref_weight_coverage * npt.min() / npt)
    return int(np.argmin(cost)), cost


@pytest.mark.parametrize("config", [SPLINE, POLY], ids=["spline", "polynomial"])
def test_backgrounds_matched_to_reference(config):
    warps = _warps()
    result = match_backgrounds(warps, config=config)
    ref = int(result.reference_index.compute())
    diag = result.diagnostics.compute()
    bgs = _backgrounds()
    for k in range(len(warps)):
        matched = result.warps[k]["image"].values.astype(np.float64)
        model = matched - warps[k]["image"].values.astype(np.float64)
        np.testing.assert_allclose(model, result.models[k].values, atol=1e-4, equal_nan=True)
        rms = np.sqrt(np.mean((bgs[k] + model - bgs[ref]) ** 2))
        assert rms < 0.1 * min(SIGMAS), (k, rms)
        if k == ref:
            assert bool(diag.isReference[k]) and int(diag.status[k]) == REFERENCE and diag.fitRMS[k] == 0.0
            np.testing.assert_array_equal(result.warps[k]["image"].values, warps[k]["image"].values)
            assert np.isnan(diag.matchedMSE[k]) and np.isnan(diag.diffImVar[k])
        else:
            assert not bool(diag.isReference[k]) and int(diag.status[k]) == OK and diag.failure[k] == ""
            # the reference's own success criterion; the variance planes are constant here
            expected_var = SIGMAS[k] ** 2 + SIGMAS[ref] ** 2
            np.testing.assert_allclose(diag.diffImVar[k], expected_var, rtol=1e-6)
            assert diag.matchedMSE[k] < 1.01 * diag.diffImVar[k]
            np.testing.assert_allclose(diag.matchedMSE[k], expected_var, rtol=0.03)
            assert 0.0 <= diag.fitRMS[k] < 0.05
        assert result.warps[k]["variance"].equals(warps[k]["variance"])
        np.testing.assert_array_equal(result.warps[k]["mask"].values, warps[k]["mask"].values)
    assert list(diag.visit.values) == [11, 12, 13, 14]


def test_reference_is_the_cost_function_choice():
    # coverage and level differ: warp 2 loses a third of its pixels, warp 0 has the lowest level
    warps = _warps(no_data=[None, None, (slice(None), slice(0, 110)), None])
    index, cost = select_reference(warps, config=SPLINE)
    hand, hand_cost = _hand_reference(warps, SPLINE)
    assert int(index.compute()) == hand
    np.testing.assert_allclose(cost.compute(), hand_cost, rtol=1e-9)
    # other weights, other choices: the level term alone picks the lowest mean level, which is
    # warp 2 once the NO_DATA columns are left out
    for wv, wl, wc in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.1, 0.7, 0.2)):
        cfg = MatchBackgroundsConfig(best_ref_weight_variance=wv, best_ref_weight_level=wl,
                                     best_ref_weight_coverage=wc)
        hand_w, _ = _hand_reference(warps, cfg)
        assert int(select_reference(warps, config=cfg)[0].compute()) == hand_w
    assert _hand_reference(warps, MatchBackgroundsConfig(best_ref_weight_variance=0.0, best_ref_weight_level=1.0,
                                                         best_ref_weight_coverage=0.0))[0] == 2
    result = match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, best_ref_weight_coverage=0.0,
                                                                    best_ref_weight_level=1.0,
                                                                    best_ref_weight_variance=0.0))
    assert list(result.diagnostics.isReference.values) == [False, False, True, False]


def test_given_reference_and_duplicates():
    warps = _warps(visits=(11, 12, 11, 14))
    result = match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, ref_visit=11))
    diag = result.diagnostics.compute()
    assert list(diag.isReference.values) == [True, False, True, False]
    assert int(result.reference_index.compute()) == 0
    for k in (0, 2):  # every copy of the reference visit is left alone
        np.testing.assert_array_equal(result.warps[k]["image"].values, warps[k]["image"].values)
    bgs = _backgrounds()
    model = result.models[1].values
    assert np.sqrt(np.mean((bgs[1] + model - bgs[0]) ** 2)) < 0.1


def test_stack_input_gives_stack_output():
    warps = _warps()
    stack = xr.concat([w.assign_coords(visit=w.attrs["visit"]) for w in warps], dim="visit")
    stack.attrs = {k: v for k, v in warps[0].attrs.items() if k != "visit"}
    result = match_backgrounds(stack, config=SPLINE)
    listed = match_backgrounds(warps, config=SPLINE)
    assert isinstance(result.warps, xr.Dataset) and list(result.warps.visit.values) == [11, 12, 13, 14]
    np.testing.assert_array_equal(result.warps["image"].values,
                                  np.stack([w["image"].values for w in listed.warps]))
    assert result.visits == [11, 12, 13, 14]


def test_per_visit_failures_are_reported():
    # visit 13 has no data at all, visit 14 only covers the left 96 columns
    warps = _warps(no_data=[None, None, (slice(None), slice(None)), (slice(None), slice(96, None))])
    cfg = MatchBackgroundsConfig(bin_size=64, use_polynomial=True, order=3, ref_visit=11,
                                 undersample_style="THROW_EXCEPTION")
    result = match_backgrounds(warps, config=cfg)
    diag = result.diagnostics.compute()
    assert list(diag.status.values) == [REFERENCE, OK, NO_OVERLAP, UNDERSAMPLED]
    assert diag.failure[2] == "No overlap with reference. Nothing to match"
    assert diag.failure[3] == "Image does not cover enough of ref image for order and binsize"
    for k in (2, 3):  # failed visits are returned unchanged, with NaN diagnostics
        np.testing.assert_array_equal(result.warps[k]["image"].values, warps[k]["image"].values)
        assert np.isnan(diag.fitRMS[k]) and np.isnan(diag.matchedMSE[k]) and np.isnan(diag.diffImVar[k])
    # with REDUCE_INTERP_ORDER the partial warp is fitted with order min(2 columns of cells) - 1 = 1
    result = match_backgrounds(warps, config=cfg.model_copy(update={"undersample_style": "REDUCE_INTERP_ORDER"}))
    diag = result.diagnostics.compute()
    assert list(diag.status.values) == [REFERENCE, OK, NO_OVERLAP, OK]
    plan = dask.compute(result.plans[3])[0]
    assert plan["order"] == 1 and plan["weighting"] is True
    # spline mode: no usable cell is also "no overlap" (the reference would add a NaN model)
    result = match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, ref_visit=11))
    assert int(result.diagnostics.status[2]) == NO_OVERLAP


def test_eager_errors():
    warps = _warps()
    with pytest.raises(ValueError, match="no exposures to match"):
        match_backgrounds([], config=SPLINE)
    small = warps[1].isel(x=slice(0, 300))
    with pytest.raises(SchemaError, match=r"Exposures are different dimensions: visit 12 .*\(300, 256\) but visit 11 "
                                          r".*\(320, 256\).*\[visit=12 tract=9 patch=4\]"):
        match_backgrounds([warps[0], small], config=SPLINE)
    with pytest.raises(ValueError, match="300 = config.bin_size > shorter dimension = 256"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=300, use_polynomial=True, order=1))
    with pytest.raises(ValueError, match="8 = config.order > npoints - 1 = 3"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=64, use_polynomial=True))
    with pytest.raises(ValueError, match=r"ref_visit 99 is not among the visits \[11, 12, 13, 14\]"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, ref_visit=99))
    with pytest.raises(ValueError, match=r"too few cells \(2x1\) for AKIMA_SPLINE"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(undersample_style="THROW_EXCEPTION"))
    other = warps[1].copy()
    other["mask"] = other["mask"].copy()
    other["mask"].attrs = {"flag_masks": [1, 2], "flag_meanings": "BAD SAT"}
    with pytest.raises(MaskPlaneError, match="mask planes of visit 12 differ from those of visit 11"):
        match_backgrounds([warps[0], other], config=SPLINE)
    with pytest.raises(SchemaError, match="needs a 'visit' dimension"):
        match_backgrounds(warps[0], config=SPLINE)
    with pytest.raises(SchemaError, match="every warp must be an xarray.Dataset, got int"):
        match_backgrounds([warps[0], 3], config=SPLINE)
    with pytest.raises(pydantic.ValidationError, match="INCREASE_NXNYSAMPLE|undersample_style"):
        MatchBackgroundsConfig(undersample_style="INCREASE_NXNYSAMPLE")
    with pytest.raises(pydantic.ValidationError, match="interp_style NONE cannot model the difference"):
        MatchBackgroundsConfig(interp_style="NONE")


@pytest.mark.parametrize("config", [SPLINE, POLY], ids=["spline", "polynomial"])
def test_numpy_dask_equal_and_lazy(config):
    warps = _warps()
    before = [w.copy(deep=True) for w in warps]
    eager = match_backgrounds(warps, config=config)
    chunked = [w.chunk({"y": 100, "x": 130}) for w in warps]  # 3 x 3 chunks that do not divide the image
    lazy = assert_lazy(lambda: match_backgrounds(chunked, config=config))
    with raise_if_dask_computes():
        for w in lazy.warps:
            assert dask.is_dask_collection(w["image"].data)
    for a, b in zip(eager.warps, lazy.warps):
        np.testing.assert_allclose(a["image"].values, b["image"].values, rtol=1e-6, atol=1e-5)
    de, dl = dask.compute(eager.diagnostics, lazy.diagnostics)
    for key in ("fitRMS", "matchedMSE", "diffImVar"):
        np.testing.assert_allclose(de[key].values, dl[key].values, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(de.status.values, dl.status.values)
    for w, b in zip(warps, before):
        np.testing.assert_array_equal(w["image"].values, b["image"].values)


def test_graph_size_bounded():
    warps = [w.chunk({"y": 64, "x": 80}) for w in _warps()]  # 4 x 4 chunks per warp
    sizes = []
    for n in (2, 4):
        result = match_backgrounds(warps[:n], config=SPLINE)
        g = dask.base.collections_to_expr([w["image"].data for w in result.warps] + [result.diagnostics])
        sizes.append(len(g.__dask_graph__()))
    # linear in the number of warps (each output block reads one block per warp for the lazy
    # reference pick, so tasks grow with n while their inputs grow with n too)
    assert sizes[1] < 2.6 * sizes[0]
    assert graph_size(result.warps[0]["image"].data) < 400 * 16


def test_plot_writes_png(tmp_path):
    warps = _warps()
    result = match_backgrounds(warps, config=POLY)
    ref_visit = result.visits[int(result.reference_index.compute())]
    other = next(v for v in result.visits if v != ref_visit)
    path = tmp_path / "match.png"
    plot_match_diagnostics(result, other, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    plot_match_diagnostics(result, ref_visit, tmp_path / "ref.png")  # no grid: still a picture
    assert (tmp_path / "ref.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="visit 77 is not among the matched visits"):
        plot_match_diagnostics(result, 77, tmp_path / "x.png")


# ------------------------------------------------------------------ mode "tract"

PW = PH = 256  # two patches side by side: tract pixels x in [0, 512), y in [0, 256)
TRACT = MatchBackgroundsConfig(mode="tract")


def _tract_bg(k, x, y):
    u, v = x / 512.0, y / 256.0
    return [100.0 + 0.0 * u, 103.0 + 2.0 * u - v, 98.0 + 1.5 * u * v + v**2, 101.0 + 30.0 * (u - 0.5) ** 2][k]


def _tract_warps(seed=5, sigmas=(1.0, 1.0, 1.0, 1.0), visits=(10, 11, 12, 13), skip=()):
    rng = np.random.default_rng(seed)
    warps, truth = [], []
    for k, v in enumerate(visits):
        for p, x0 in enumerate((0, 256)):
            if (k, p) in skip:
                continue
            y, x = np.mgrid[0:PH, x0:x0 + PW].astype(np.float64)
            bg = _tract_bg(k, x, y)
            img = bg + rng.normal(0.0, sigmas[k], (PH, PW))
            warps.append(make_dataset(img, np.full((PH, PW), sigmas[k] ** 2), np.zeros((PH, PW), np.uint32),
                                      wcs=make_tan_wcs(), kind="warp", x0=x0,
                                      attrs={"visit": v, "patch": p, "tract": 0}))
            truth.append(bg)
    return warps, truth


def test_window_families_closed_form():
    from pipeline.match_backgrounds import _window_families

    (e0, u0), (e1, u1) = _window_families(0, 512, 128, 2)
    np.testing.assert_array_equal(e0, [0, 192, 448, 512])
    np.testing.assert_array_equal(u0, [0, 2, 4])
    np.testing.assert_array_equal(e1, [0, 64, 320, 512])
    np.testing.assert_array_equal(u1, [-1, 1, 3])
    ((e, u),) = _window_families(256, 512, 128, 1)
    np.testing.assert_array_equal(e, [0, 128, 256])
    np.testing.assert_array_equal(u, [2, 3])


def test_tract_mode_matches_and_is_continuous():
    # planes and a gentle quadratic (the superpixel model is bilinear between 128-pixel superpixels)
    warps, truth = _tract_warps(visits=(10, 11, 12))
    result = match_backgrounds(warps, config=TRACT.model_copy(update={"ref_visit": 10}))
    diag = result.diagnostics.compute()
    assert list(diag.isReference.values) == [True, True] + [False] * 4
    assert list(diag.patch.values) == ["0", "1"] * 3
    models = [m.values for m in result.models]
    for k in range(len(warps)):
        ref = truth[k % 2]
        rms = np.sqrt(np.mean((truth[k] + models[k] - ref) ** 2))
        assert rms < 0.1, (k, rms)
        if k >= 2:
            assert int(diag.status[k]) == OK and 0.0 <= diag.fitRMS[k] < 0.05
            assert diag.matchedMSE[k] < 1.01 * diag.diffImVar[k] + 0.1
    # one model per visit across the tract: continuous over the patch boundary (x = 255 | 256)
    for k in range(2, 6, 2):
        step = models[k + 1][:, 0] - models[k][:, -1]
        truth_step = -(_tract_bg(k // 2, 256.0, 0.0) - _tract_bg(k // 2, 255.0, 0.0))
        assert np.abs(step - truth_step).max() < 0.02
    # the reference's 2x2 windows are biased where the tract edge clips them (documented)
    ref_cfg = TRACT.model_copy(update={"ref_visit": 10, "tract": TRACT.tract.model_copy(update={"window": 2})})
    plane = match_backgrounds(warps, config=ref_cfg).models[2].values
    assert np.sqrt(np.mean((truth[2] + plane - truth[0]) ** 2)) > 0.1


def _hand_tract_choice(warps, tc):
    from pipeline.stats import StatsConfig, compute_statistics
    from pipeline.stats import Statistic as S

    visits = list(dict.fromkeys(w.attrs["visit"] for w in warps))
    chi2, var, cov = [], [], []
    for v in visits:
        b = np.full((2, 4), np.nan)
        qn = np.full((2, 4), np.nan)
        for w in warps:
            if w.attrs["visit"] != v:
                continue
            x0 = int(w.x[0]) // 128
            img = w["image"].values.astype(np.float64)
            for j in range(2):
                for i in range(2):
                    cell = img[128 * j:128 * (j + 1), 128 * i:128 * (i + 1)].ravel()
                    st = compute_statistics(cell, statistics=(S.MEANCLIP, S.VARIANCECLIP),
                                            config=StatsConfig(num_iter=tc.num_iter))
                    b[j, x0 + i], qn[j, x0 + i] = st[S.MEANCLIP], st[S.VARIANCECLIP]
        yy, xx = np.mgrid[0:2, 0:4].astype(np.float64)
        a = np.stack([np.ones(8), xx.ravel(), yy.ravel()], axis=1)
        wts = 1.0 / qn.ravel()
        coef = np.linalg.solve(a.T @ (a * wts[:, None]), a.T @ (wts * b.ravel()))
        resid = b.ravel() - a @ coef
        chi2.append(np.sum(resid**2 / qn.ravel()) / (8 - 6))
        var.append(qn.mean())
        cov.append(8.0)
    chi2, var, cov = map(np.array, (chi2, var, cov))
    cost = (tc.best_ref_weight_chi2 * chi2 / chi2.max() + tc.best_ref_weight_variance * var / var.max()
            + tc.best_ref_weight_global_coverage * cov.min() / cov)
    return visits[int(np.argmin(cost))], chi2, var


def test_tract_reference_is_the_cost_function_choice():
    # visit 10: flat, noisiest; visit 13: quietest but strongly curved (large plane-fit chi2 and
    # large within-superpixel variance)
    warps, _ = _tract_warps(sigmas=(1.5, 1.2, 1.25, 0.9))
    hand, chi2, var = _hand_tract_choice(warps, TRACT.tract)
    assert np.argmax(chi2) == 3 and np.argmin(var) == 1 and hand == 11
    result = match_backgrounds(warps, config=TRACT)
    ref_warp = int(result.reference_index.compute())
    assert result.visits[ref_warp] == hand
    diag = result.diagnostics.compute()
    np.testing.assert_array_equal(diag.isReference.values, [v == hand for v in result.visits])


def test_tract_missing_patches_and_errors():
    # the reference visit 10 lacks patch 1; visit 12 only has patch 1: nothing to difference
    warps, _ = _tract_warps(skip={(0, 1), (2, 0)})
    result = match_backgrounds(warps, config=TRACT.model_copy(update={"ref_visit": 10}))
    diag = result.diagnostics.compute()
    assert list(diag.visit.values) == [10, 11, 11, 12, 13, 13]
    assert list(diag.status.values) == [REFERENCE, OK, OK, NO_OVERLAP, OK, OK]
    assert diag.failure[3] == "No overlap with reference. Nothing to match"
    np.testing.assert_array_equal(result.warps[3]["image"].values, warps[3]["image"].values)
    # visit 11's patch 1 gets the model extrapolated from patch 0: still a plane difference
    model = result.models[2].values
    assert np.isfinite(model).all()
    with pytest.raises(SchemaError, match="visit 10 has two warps of patch 0"):
        match_backgrounds([warps[0], warps[0]], config=TRACT)
    moved = warps[1].assign_coords(x=warps[1].x + 3)
    with pytest.raises(SchemaError, match=r"warps of patch 0 cover different boxes"):
        match_backgrounds([warps[0], moved], config=TRACT)
    with pytest.raises(ValueError, match=r"ref_visit 99 is not among the visits"):
        match_backgrounds(warps, config=TRACT.model_copy(update={"ref_visit": 99}))
    stack = xr.concat([w.assign_coords(visit=w.attrs["visit"]) for w in warps[:2]], dim="visit")
    with pytest.raises(SchemaError, match="mode 'tract' takes a list of warps"):
        match_backgrounds(stack, config=TRACT)
    with pytest.raises(pydantic.ValidationError, match="tract interpolation NONE"):
        MatchBackgroundsConfig(mode="tract", tract={"interpolation": "NONE"})


def test_tract_numpy_dask_equal_lazy_and_graph_size():
    warps, _ = _tract_warps()
    cfg = TRACT
    eager = match_backgrounds(warps[:4], config=cfg)
    chunked = [w.chunk({"y": 100, "x": 130}) for w in warps]
    lazy = assert_lazy(lambda: match_backgrounds(chunked[:4], config=cfg))
    for a, b in zip(eager.warps, lazy.warps):
        np.testing.assert_allclose(a["image"].values, b["image"].values, rtol=1e-6, atol=1e-5)
    de, dl = dask.compute(eager.diagnostics, lazy.diagnostics)
    np.testing.assert_allclose(de.fitRMS.values, dl.fitRMS.values, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(de.status.values, dl.status.values)
    sizes = []
    for n in (4, 8):
        result = match_backgrounds(chunked[:n], config=cfg)
        g = dask.base.collections_to_expr([w["image"].data for w in result.warps])
        sizes.append(len(g.__dask_graph__()))
    # tasks about linear in the number of warps (each block of the lazy reference pick reads one
    # block per visit, so dependencies, not tasks, grow with the square)
    assert sizes[1] < 3.0 * sizes[0]


@given(perm=st.permutations(range(4)))
@settings(max_examples=3, deadline=None)
def test_invariant_to_the_order_of_the_warps(perm):
    warps = _warps()
    base = match_backgrounds(warps, config=SPLINE)
    shuffled = match_backgrounds([warps[i] for i in perm], config=SPLINE)
    assert shuffled.visits[int(shuffled.reference_index.compute())] == base.visits[int(base.reference_index.compute())]
    for pos, i in enumerate(perm):
        np.testing.assert_array_equal(shuffled.models[pos].values, base.models[i].values)


def test_tract_plot(tmp_path):
    warps, _ = _tract_warps(visits=(10, 11))
    result = match_backgrounds(warps, config=TRACT.model_copy(update={"ref_visit": 10}))
    plot_match_diagnostics(result, 11, tmp_path / "tract.png")
    assert (tmp_path / "tract.png").read_bytes()[:4] == b"\x89PNG"
