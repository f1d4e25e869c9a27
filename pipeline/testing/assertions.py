"""Numerical and structural assertions for Datasets of the data model."""

from __future__ import annotations

from collections.abc import Callable

import dask
import numpy as np
import xarray as xr

from .laziness import raise_if_dask_computes

_VARS = ("image", "variance", "mask")


def assert_datasets_equal(a: xr.Dataset, b: xr.Dataset, *, rtol: float = 0.0, atol: float = 0.0, variables=None):
    """Pixels (NaN-aware), coordinates and mask planes of two Datasets agree within tolerances."""
    variables = variables or [v for v in _VARS if v in a.data_vars]
    for axis in ("y", "x"):
        np.testing.assert_array_equal(a[axis].values, b[axis].values, err_msg=f"coordinate {axis}")
    for name in variables:
        va, vb = np.asarray(a[name].values), np.asarray(b[name].values)
        if np.issubdtype(va.dtype, np.integer):
            np.testing.assert_array_equal(va, vb, err_msg=name)
        else:
            np.testing.assert_allclose(va, vb, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)
    if "mask" in variables:
        from ..model.masks import planes_from_attrs

        assert planes_from_attrs(a["mask"].attrs) == planes_from_attrs(b["mask"].attrs), "mask planes differ"


def assert_lazy(build: Callable[[], object], max_computes: int = 0):
    """Call ``build()`` under a counting scheduler that allows ``max_computes`` computations.

    Returns what ``build`` returned, after checking its dask-backed variables are still lazy.
    """
    with raise_if_dask_computes(max_computes):
        out = build()
    items = out if isinstance(out, tuple) else (out,)
    for item in items:
        if isinstance(item, xr.Dataset):
            for name in item.data_vars:
                # image planes must stay lazy; small metadata arrays (a PSF grid) may be in memory
                if {"y", "x"} <= set(item[name].dims):
                    assert dask.is_dask_collection(item[name].data), f"variable {name!r} is not dask-backed"
    return out


def assert_numpy_dask_equal(
    func: Callable[[xr.Dataset], xr.Dataset], ds: xr.Dataset, chunks, *, rtol: float = 1e-6, atol: float = 0.0
):
    """``func`` gives the same result on numpy-backed ``ds`` and on ``ds.chunk(chunks)``."""
    eager = func(ds.load() if dask.is_dask_collection(ds) else ds)
    lazy = func(ds.chunk(chunks))
    for item_e, item_l in zip(_as_tuple(eager), _as_tuple(lazy)):
        if isinstance(item_e, xr.Dataset):
            assert_datasets_equal(item_e, item_l.compute(), rtol=rtol, atol=atol)
        elif isinstance(item_e, xr.DataArray):
            np.testing.assert_allclose(item_e.values, item_l.values, rtol=rtol, atol=atol, equal_nan=True)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def graph_size(obj) -> int:
    """Number of tasks in the dask graph of ``obj`` (0 when not lazy)."""
    if not dask.is_dask_collection(obj):
        return 0
    return len(obj.__dask_graph__())
