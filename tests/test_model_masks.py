import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import MaskPlaneError
from pipeline.model import masks as m


def test_canonical_bits_match_reference_table():
    expected = ["BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA",
                "VIGNETTED", "STREAK"]
    for bit, name in enumerate(expected):
        assert m.CANONICAL_PLANES[name] == bit
        assert int(m.MaskPlane[name]) == 1 << bit


def test_attrs_round_trip_canonical():
    attrs = m.mask_attrs()
    assert attrs["flag_masks"][:3] == [1, 2, 4]
    assert attrs["flag_meanings"].split()[8] == "NO_DATA"
    assert m.planes_from_attrs(attrs) == m.CANONICAL_PLANES


@given(st.lists(st.from_regex(r"[A-Z][A-Z_]{0,12}", fullmatch=True), unique=True, max_size=10))
def test_add_planes_round_trip(names):
    planes = m.add_planes(m.CANONICAL_PLANES, names)
    assert len(set(planes.values())) == len(planes)
    assert m.planes_from_attrs(m.mask_attrs(planes)) == planes
    for name, bit in m.CANONICAL_PLANES.items():
        assert planes[name] == bit


@given(st.integers(min_value=0, max_value=2**20 - 1))
def test_remap_round_trip(value):
    src = dict(m.CANONICAL_PLANES)
    dest = {name: 31 - bit for name, bit in src.items()}
    arr = np.array([value], dtype=np.uint32)
    there = m.remap_mask(arr, src, dest)
    back = m.remap_mask(there, dest, src)
    assert back[0] == value
    assert set(m.decode_pixel(value)) == set(m.decode_pixel(there[0], dest))


def test_bitmask_and_errors():
    assert m.bitmask(["BAD", "SAT"]) == 3
    assert m.bitmask(["BAD", "NOPE"], strict=False) == 1
    with pytest.raises(MaskPlaneError, match="unknown mask plane 'NOPE'"):
        m.bitmask("NOPE")
    with pytest.raises(MaskPlaneError, match="not a single bit"):
        m.planes_from_attrs({"flag_masks": [3], "flag_meanings": "X"})
    with pytest.raises(MaskPlaneError, match="1 flag_masks but 2 flag_meanings"):
        m.planes_from_attrs({"flag_masks": [1], "flag_meanings": "A B"})
    with pytest.raises(MaskPlaneError, match="listed twice"):
        m.planes_from_attrs({"flag_masks": [1, 2], "flag_meanings": "A A"})
    with pytest.raises(MaskPlaneError, match="flag_meanings"):
        m.planes_from_attrs({"flag_masks": [1]})
    with pytest.raises(MaskPlaneError, match="differ from those of warp 1"):
        m.check_same_planes(m.CANONICAL_PLANES, {"BAD": 3}, what=["warp 1", "warp 2"])
    with pytest.raises(MaskPlaneError, match=r"\['FOO'\] have no bit"):
        m.remap_mask(np.zeros(1, np.uint32), {"FOO": 3}, m.CANONICAL_PLANES)
