"""The notebooks in examples/ run from top to bottom (their Python cells, in order)."""

import re
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.md"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_notebook_runs(path, tmp_path, monkeypatch):
    cells = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert cells, f"{path.name} has no code cells"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for k, cell in enumerate(cells):
        exec(compile(cell, f"{path.name}[cell {k}]", "exec"), namespace)
    if path.stem == "coadd_one_patch":
        resid = namespace["resid"]
        assert abs(np.median(resid)) < 0.1
        assert 0.8 < 0.7413 * np.subtract(*np.percentile(resid, [75, 25])) < 1.2
        assert (tmp_path / "coadd.png").stat().st_size > 10_000
