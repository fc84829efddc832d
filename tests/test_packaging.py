"""The wheel ships every package: each folder of mscl_stream/ with an __init__.py is listed in
pyproject.toml (an editable install finds unlisted packages; a built wheel silently leaves them out)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mscl_stream").rglob("__init__.py")}
    found.add("mscl_stream.kernels")      # kernels/ is installed as mscl_stream.kernels (package-dir)
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but not a package: {sorted(listed - found)}"
