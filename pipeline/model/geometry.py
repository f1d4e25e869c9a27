"""Integer pixel boxes in a parent frame (half-open: ``x1``/``y1`` are one past the last pixel)."""

from __future__ import annotations

from dataclasses import dataclass

import xarray as xr

__all__ = ["Box"]


@dataclass(frozen=True, order=True)
class Box:
    """Pixel box ``[x0, x1) x [y0, y1)`` in parent coordinates. Empty when ``x1 <= x0`` or ``y1 <= y0``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def from_shape(cls, shape: tuple[int, int], x0: int = 0, y0: int = 0) -> Box:
        """The box of an array of ``shape`` (ny, nx) whose element [0, 0] sits at ``(x0, y0)``."""
        ny, nx = shape
        return cls(x0, y0, x0 + nx, y0 + ny)

    @classmethod
    def of(cls, ds: xr.Dataset | xr.DataArray) -> Box:
        """The box covered by a Dataset of the data model (from its ``x``/``y`` coordinates)."""
        xs, ys = ds.indexes["x"], ds.indexes["y"]
        return cls(int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)

    @property
    def width(self) -> int:
        return max(self.x1 - self.x0, 0)

    @property
    def height(self) -> int:
        return max(self.y1 - self.y0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def empty(self) -> bool:
        return self.width == 0 or self.height == 0

    def grow(self, n: int) -> Box:
        return Box(self.x0 - n, self.y0 - n, self.x1 + n, self.y1 + n)

    def shift(self, dx: int, dy: int) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def intersect(self, other: Box) -> Box:
        box = Box(max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1))
        return box if not box.empty else Box(box.x0, box.y0, box.x0, box.y0)

    def overlaps(self, other: Box) -> bool:
        return not self.intersect(other).empty

    def contains(self, x, y):
        """Whether parent pixel(s) ``(x, y)`` lie in the box (works elementwise on arrays)."""
        return (x >= self.x0) & (x < self.x1) & (y >= self.y0) & (y < self.y1)

    def slices(self, relative_to: Box | None = None) -> tuple[slice, slice]:
        """``(y, x)`` slices selecting this box from an array covering ``relative_to``."""
        ox, oy = (relative_to.x0, relative_to.y0) if relative_to is not None else (0, 0)
        return (slice(self.y0 - oy, self.y1 - oy), slice(self.x0 - ox, self.x1 - ox))

    def sel(self, ds: xr.Dataset | xr.DataArray):
        """The window of ``ds`` this box covers (label-based on the parent-frame coordinates)."""
        return ds.sel(x=slice(self.x0, self.x1 - 1), y=slice(self.y0, self.y1 - 1))

    def to_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]
