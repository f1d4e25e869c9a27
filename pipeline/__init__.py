"""skystack tasks: pure functions on lazy xarray Datasets, plus the data model and I/O they share.

``import pipeline`` is all a notebook needs; every public function is re-exported here.
"""

__version__ = "0.1.0"

from .assemble import AssembleCoaddConfig, assemble_coadd, warp_weights
from .background import BackgroundConfig, BackgroundModel, fit_background, subtract_background
from .coadd_psf import CoaddPsfConfig, coadd_psf
from .errors import (
    DataQualityError,
    FitsFormatError,
    MaskPlaneError,
    ProductIncompleteError,
    PsfMatchError,
    RepositoryError,
    SchemaError,
    SkyMapError,
    SkystackError,
    SkystackWarning,
)
from .io.fits import read_fits, write_fits
from .io.psfex import PsfexModel
from .io.repo import Repository, open_repo
from .match_backgrounds import MatchBackgroundsConfig, MatchResult, match_backgrounds
from .model import (
    Box,
    MaskPlane,
    bitmask,
    calibrate_to_njy,
    get_wcs,
    make_dataset,
    mask_planes,
    psf_grid,
    validate,
)
from .model.skymap import Patch, SkyMap, Tract
from .psf import DoubleGaussianPsf, GaussianPsf, GridPsf, ImagePsf, MoffatPsf, PsfexPsf, model_psf
from .psf_match import KernelModel, ModelPsfMatchConfig, model_psf_match
from .scale_variance import ScaleVarianceConfig, compute_scale_factors, scale_variance
from .sim import SimConfig, Simulation, Truth, simulate
from .stack import StackConfig, stack
from .stats import Statistic, StatsConfig, compute_statistics
from .warp import WarpConfig, plan_warp, replan, warp_exposure, warp_psf

__all__ = [
    "__version__",
    # errors
    "DataQualityError", "FitsFormatError", "MaskPlaneError", "ProductIncompleteError", "PsfMatchError", "RepositoryError",
    "SchemaError", "SkyMapError", "SkystackError", "SkystackWarning",
    # data model and sky map
    "Box", "MaskPlane", "bitmask", "calibrate_to_njy", "get_wcs", "make_dataset", "mask_planes", "psf_grid",
    "validate", "Patch", "SkyMap", "Tract",
    # I/O
    "read_fits", "write_fits", "PsfexModel", "Repository", "open_repo",
    # simulated skies
    "SimConfig", "Simulation", "Truth", "simulate",
    # statistics, stacking, backgrounds
    "Statistic", "StatsConfig", "compute_statistics", "StackConfig", "stack",
    "BackgroundConfig", "BackgroundModel", "fit_background", "subtract_background",
    "ScaleVarianceConfig", "compute_scale_factors", "scale_variance",
    "MatchBackgroundsConfig", "MatchResult", "match_backgrounds",
    # warping and PSFs
    "WarpConfig", "plan_warp", "replan", "warp_exposure", "warp_psf", "CoaddPsfConfig", "coadd_psf",
    "GaussianPsf", "DoubleGaussianPsf", "MoffatPsf", "ImagePsf", "GridPsf", "PsfexPsf", "model_psf",
    "ModelPsfMatchConfig", "KernelModel", "model_psf_match",
    # coadds
    "AssembleCoaddConfig", "assemble_coadd", "warp_weights",
]
