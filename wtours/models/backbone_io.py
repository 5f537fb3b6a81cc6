"""Backbone checkpoints anyone can load: ``backbone.pt`` export and a loader for what users have.

``backbone.pt`` = ``{"arch": timm name, "state_dict": timm-compatible, "meta": {...}}``. The state
dict loads strictly into ``timm.create_model(arch)``: it carries a zero classifier head (no
classifier is trained) so that timm's default 1000-class head finds its keys::

    ckpt = torch.load("runs/venice/backbone.pt", map_location="cpu")
    model = timm.create_model(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])

:func:`load_backbone` accepts a ``backbone.pt``, a bare timm ViT state dict file (DINO's released
``dino_deitsmall16_pretrain.pth`` has exactly timm's key names), a Lightning checkpoint of ours,
or ``random:<timm arch>[@<seed>]`` for the untrained baseline (init seed 0 unless given).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from wtours.errors import UserError
from wtours.fsutil import torch_save

# Prefixes stripped from foreign state dicts, tried in this order.
_PREFIXES = ("module.", "backbone.", "student.backbone.", "teacher.backbone.", "model.", "encoder.")
_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16}
_SIZE_BY_DIM = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


def create_vit(arch: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(arch)`` with a one-line error for an unknown name."""
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"unknown or unsupported timm architecture '{arch}' ({e})") from None


def export_backbone(model: torch.nn.Module, arch: str, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``backbone.pt`` atomically from a timm ViT (its classifier head, if any, is zeroed)."""
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    ref = create_vit(arch).state_dict()
    for k in ("head.weight", "head.bias"):
        if k in ref and k not in sd:
            sd[k] = torch.zeros_like(ref[k])
        elif k in sd:
            sd[k] = torch.zeros_like(sd[k])
    missing = sorted(set(ref) - set(sd))
    if missing:
        raise ValueError(f"state dict does not fit timm '{arch}': missing {missing[:5]}")
    return torch_save({"arch": arch, "state_dict": sd, "meta": dict(meta or {})}, path)


def infer_arch(sd: dict[str, torch.Tensor]) -> str:
    """Guess the timm ViT name from a state dict's shapes (dim, patch size, depth)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise ValueError("no patch_embed.proj.weight: not a ViT state dict")
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    size = _SIZE_BY_DIM.get(dim)
    if size is None:
        raise ValueError(f"embedding width {dim} matches no standard ViT; pass --arch")
    expected_depth = 24 if size == "large" else 12
    if depth != expected_depth:
        raise ValueError(f"{depth} blocks at width {dim} match no standard ViT; pass --arch")
    return f"vit_{size}_patch{patch}_224"


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if "patch_embed.proj.weight" in sub:
                return sub
    return sd


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    """Read a checkpoint file -> (ViT state dict, arch if recorded, meta)."""
    p = Path(path)
    if not p.exists():
        raise UserError("checkpoint not found", path=p)
    if p.is_dir():
        raise UserError("is a directory, expected a checkpoint file", path=p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})", path=p) from None
    arch, meta = None, {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        meta = obj.get("meta") or {}
        hp = obj.get("hyper_parameters")
        if arch is None and isinstance(hp, dict) and isinstance(hp.get("arch"), str):
            arch = hp["arch"]
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for key in ("teacher", "model", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("not a state dict of tensors", path=p)
    return _strip(obj), arch, meta


def load_backbone(spec: str, arch: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Build a timm ViT from ``spec`` -> (model in eval mode on CPU, identity info)."""
    if spec.startswith("random:"):
        name, _, seed_txt = spec.split(":", 1)[1].partition("@")  # random:<arch>[@<init seed>]
        name = name or arch
        if not name:
            raise UserError("random:<timm arch> needs an architecture name, e.g. random:vit_small_patch16_224")
        try:
            seed = int(seed_txt) if seed_txt else 0
        except ValueError:
            raise UserError(f"{spec}: the init seed after '@' must be an integer, e.g. random:{name}@1") from None
        torch.manual_seed(seed)
        model = create_vit(name, num_classes=0, dynamic_img_size=True)
        return model.eval(), {"kind": "random", "arch": name, "spec": spec}
    sd, recorded, meta = read_state_dict(spec)
    if arch is None:
        arch = recorded
    if arch is None:
        try:
            arch = infer_arch(sd)
        except ValueError as e:
            raise UserError(str(e), path=spec) from None
    model = create_vit(arch, num_classes=0, dynamic_img_size=True)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad_shape = [k for k in set(want) & set(sd) if want[k].shape != sd[k].shape and k != "pos_embed"]
    if missing or unexpected or bad_shape:
        parts = []
        if bad_shape:
            k = sorted(bad_shape)[0]
            parts.append(f"{k} has shape {tuple(sd[k].shape)}, arch expects {tuple(want[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"weights do not match arch '{arch}': " + "; ".join(parts), path=spec)
    if sd["pos_embed"].shape != want["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=n_prefix)
    model.load_state_dict(sd)
    return model.eval(), {"kind": "checkpoint", "arch": arch, "spec": str(spec), "meta": meta}
