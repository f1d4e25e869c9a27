"""The README's Python example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    coadd = namespace["coadd"]
    assert coadd.attrs["kind"] == "coadd"
    n = coadd["n_image"].values
    assert n.max() == 2 and np.isfinite(coadd["image"].values[n > 0]).all()
    assert (tmp_path / "calexp.fits").exists()


def test_readme_commands_exist():
    from click.testing import CliRunner

    from graphs.cli import main

    text = README.read_text()
    for command in sorted(set(re.findall(r"^skystack (?:--\S+ \S+ )?(\w+)", text, flags=re.M))):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
