"""``import wtours`` registers wtours' CPU-scale ViTs with timm, without importing timm itself.

Importing timm (and torch) takes seconds; the command line must start in milliseconds. So: if timm is
already imported, :mod:`wtours.models.small_vits` registers the models at once; otherwise a one-shot
import hook does it right after timm's own module has run, whoever imports timm later. Either way
``import wtours; import timm; timm.create_model("vit_nano_patch8_64", num_classes=0)`` works.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is first imported it wraps that spec's ``exec_module`` so the
    registration runs once timm is complete, then removes itself from ``sys.meta_path``."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            sys.modules["timm"] = module  # complete: what small_vits' own `import timm` must find
            import wtours.models.small_vits  # noqa: F401 - registers the models

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader object
        return spec


def register_small_vits() -> None:
    """Register now if timm is imported, else when it is (idempotent)."""
    if "timm" in sys.modules:
        import wtours.models.small_vits  # noqa: F401
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())
