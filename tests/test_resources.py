"""The presets ship inside the package and are found with importlib.resources (a non-editable install has them);
the repository's top-level configs/ and pipelines/ are links to the same files."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from wtours.config import resolve_config_path
from wtours.pipeline.spec import load_pipeline
from wtours.resources import CONFIG_DIR, PIPELINE_DIR

PACKAGE = Path(str(files("wtours")))


def test_presets_resolve_inside_the_package():
    assert CONFIG_DIR == PACKAGE / "configs" and PIPELINE_DIR == PACKAGE / "pipelines"
    for name in ("video/tiny", "video/default", "neco/tiny", "eval/tiny"):
        path = resolve_config_path(name)
        assert path.is_file() and path.resolve().is_relative_to(PACKAGE.resolve()), (name, path)
    assert load_pipeline("tiny", []).name == "tiny"


def test_package_data_is_declared():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["wtours"]
    assert "configs/*/*.yaml" in data and "pipelines/*.yaml" in data
    shipped = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob("configs/*/*.yaml")}
    assert shipped and all(p.count("/") == 2 for p in shipped)  # every preset matches the pattern


def test_top_level_folders_are_the_same_files():
    root = Path(__file__).resolve().parents[1]
    assert (root / "configs").resolve() == CONFIG_DIR.resolve()
    assert (root / "pipelines").resolve() == PIPELINE_DIR.resolve()
