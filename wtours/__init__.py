"""wtours: learn dense image encoders from long unlabelled walking-tour videos.

Python API (:mod:`wtours.api`; imported on first use, so ``import wtours`` stays light)::

    import wtours
    model = wtours.load_backbone("runs/demo/video/stage1/backbone.pt")   # or "random:vit_nano_patch8_64"
    feats = wtours.extract_features(model, images)                      # [B, D, H/p, W/p] patch tokens
    m = wtours.evaluate("clustering", dataset="synth", root="runs/demo/data/synth",
                        checkpoint="runs/demo/video/stage1/backbone.pt", config="eval/tiny")

``evaluate_clustering``, ``evaluate_propagation``, ``evaluate_incontext`` and ``evaluate_linear`` are the
instruments' own functions. ``import wtours`` also registers wtours' CPU-scale ViTs (``vit_nano_patch8_64``)
with timm (:mod:`wtours._timm_registry`; timm itself is imported only when something uses it).
"""

from wtours._timm_registry import register_small_vits as _register_small_vits

__version__ = "0.1.0"
__all__ = ["load_backbone", "extract_features", "evaluate", "evaluate_clustering", "evaluate_propagation",
           "evaluate_incontext", "evaluate_linear", "__version__"]

_LAZY = {
    "load_backbone": ("wtours.api", "load_backbone"),
    "extract_features": ("wtours.api", "extract_features"),
    "evaluate": ("wtours.api", "evaluate"),
    "evaluate_clustering": ("wtours.eval.cli", "evaluate_clustering"),
    "evaluate_propagation": ("wtours.eval.propagation", "evaluate_propagation"),
    "evaluate_incontext": ("wtours.eval.incontext", "evaluate_incontext"),
    "evaluate_linear": ("wtours.eval.linear_probe", "evaluate_linear"),
}


def __getattr__(name: str):  # PEP 562: the API is imported when first used
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wtours' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


_register_small_vits()
