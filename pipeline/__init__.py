"""skystack tasks: pure functions on lazy xarray Datasets, plus the data model and I/O they share.

``import pipeline`` is all a notebook needs; every public function is re-exported here.
"""

__version__ = "0.1.0"

from .errors import (
    DataQualityError,
    FitsFormatError,
    MaskPlaneError,
    ProductIncompleteError,
    RepositoryError,
    SchemaError,
    SkyMapError,
    SkystackError,
    SkystackWarning,
)
from .model import (
    MaskPlane,
    bitmask,
    calibrate_to_njy,
    get_wcs,
    make_dataset,
    mask_planes,
    psf_grid,
    validate,
)

__all__ = [
    "__version__",
    # errors
    "DataQualityError", "FitsFormatError", "MaskPlaneError", "ProductIncompleteError", "RepositoryError",
    "SchemaError", "SkyMapError", "SkystackError", "SkystackWarning",
    # data model
    "MaskPlane", "bitmask", "calibrate_to_njy", "get_wcs", "make_dataset", "mask_planes", "psf_grid", "validate",
]
