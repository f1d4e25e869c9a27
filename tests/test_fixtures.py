"""The shared fixtures are what later tests rely on."""

from pipeline.model.schema import validate
from pipeline.model.wcs import get_wcs


def test_small_sim_and_tract(small_sim, small_tract):
    assert len(small_sim.exposures) == 4
    for ds in small_sim.exposures:
        validate(ds, kind="exposure")
        found = small_tract.patches_overlapping(get_wcs(ds), ds.image.shape)
        assert found, "every simulated exposure lies on the tract"
    assert small_tract.patch_inner == (200, 200) and small_tract.patch_border == 20
