"""The encoder a post-pretraining stage starts from (``wtours neco --init SPEC``).

``SPEC`` is one of

* a ``backbone.pt`` of ours (stage 1's export; the arch is recorded in it, the checksum verified),
* a timm ViT state dict file (arch inferred from the shapes for the standard ViT-T/S/B/L, or
  recorded in the file),
* DINOv2-style weights (Meta's ``dinov2_vits14_reg4_pretrain.pth`` and friends: keys
  ``register_tokens``, ``mask_token``, ``blocks.*.ls1.gamma``, optionally chunked
  ``blocks.<chunk>.<i>.``), converted to timm's ``vit_<size>_patch14_dinov2`` (or ``..._reg4_dinov2``
  with ``drop_registers=False``),
* ``random:<timm arch>[@<seed>]``.

Registers: NeCo's headline model loads DINOv2-reg weights into an architecture without registers
(``shared/reference/neco.md`` §1.1, vpariza/NeCo#3); ``drop_registers=True`` (the default) does
the same for any file with register tokens: they are removed and the register-free timm arch is
used. The result is a timm-compatible state dict that loads strictly into
``create_vit(arch, num_classes=0, dynamic_img_size=True)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wtours.errors import UserError
from wtours.models.weights import create_vit, fit_problem, infer_arch, read_state_dict, vit_arch_problem

_DINOV2_BY_DIM = {384: "small", 768: "base", 1024: "large"}


@dataclass
class InitWeights:
    """``arch`` (timm name), ``state_dict`` (timm keys, no classifier), and where they came from."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def is_dinov2_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """Meta's DINOv2 layout (``mask_token`` / ``register_tokens`` and LayerScale ``ls1.gamma``)."""
    return any(k.endswith("ls1.gamma") for k in sd) and ("mask_token" in sd or "register_tokens" in sd)


def dinov2_to_timm(sd: dict[str, torch.Tensor], drop_registers: bool = True) -> tuple[str, dict[str, torch.Tensor]]:
    """Convert DINOv2-style weights to a timm ``vit_*_patch14[_reg4]_dinov2`` state dict -> ``(arch, sd)``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        if k == "register_tokens":
            if not drop_registers:
                out["reg_token"] = v
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block_chunks > 0: blocks.<chunk>.<i>.
        out[k] = v
    if any(".mlp.w12." in k for k in out):
        raise ValueError("SwiGLU blocks (DINOv2 ViT-g) are not supported; use ViT-S/B/L weights")
    w = out.get("patch_embed.proj.weight")
    if w is None:
        raise ValueError("no patch_embed.proj.weight: not a ViT state dict")
    size = _DINOV2_BY_DIM.get(int(w.shape[0]))
    if size is None:
        raise ValueError(f"DINOv2 weights of width {int(w.shape[0])} match no timm ViT-S/B/L")
    regs = "_reg4" if "reg_token" in out else ""
    return f"vit_{size}_patch{int(w.shape[-1])}{regs}_dinov2", out


def _without_registers(arch: str, sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    if "reg_token" not in sd:
        return arch, sd
    import timm

    plain = re.sub(r"_reg\d+", "", arch)
    if plain == arch or not timm.is_model(plain):
        raise ValueError(f"cannot drop the registers of '{arch}' (no register-free timm arch '{plain}'); "
                         "set model.drop_registers=false")
    sd = {k: v for k, v in sd.items() if k != "reg_token"}
    with torch.device("meta"):
        want = create_vit(plain, num_classes=0, dynamic_img_size=True).state_dict()["pos_embed"]
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[1] + 1 == want.shape[1]:
        # timm's register archs add no position to [CLS] (no_embed_class); the plain arch does: give it zero
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    return plain, sd


def _infer(sd: dict[str, torch.Tensor]) -> str:
    """timm arch of a bare state dict: DINOv2-family (patch 14, LayerScale) or a standard ViT."""
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4 and int(w.shape[-1]) == 14 and any(k.endswith("ls1.gamma") for k in sd):
        size = _DINOV2_BY_DIM.get(int(w.shape[0]))
        if size:
            return f"vit_{size}_patch14{'_reg4' if 'reg_token' in sd else ''}_dinov2"
    return infer_arch(sd)


def load_init(spec: str, drop_registers: bool = True, trust: bool = False, what: str = "--init") -> InitWeights:
    """Read the encoder ``spec`` (see the module docstring) -> :class:`InitWeights`.

    Every problem is a one-line :class:`UserError` naming ``what`` or the file: missing or damaged
    file, not a ViT, weights that do not fit the arch.
    """
    if not spec:
        raise UserError(f"{what}: give the encoder to start from (a backbone.pt, a timm ViT state dict, "
                        "DINOv2 weights, or random:<timm arch>)")
    if spec.startswith("random:"):
        name, _, seed_txt = spec.split(":", 1)[1].partition("@")
        problem = vit_arch_problem(name) if name else "needs an architecture name, e.g. random:vit_small_patch16_224"
        if problem:
            raise UserError(f"{what} {spec}: {problem}")
        try:
            seed = int(seed_txt) if seed_txt else 0
        except ValueError:
            raise UserError(f"{what} {spec}: the init seed after '@' must be an integer") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_vit(name, num_classes=0, dynamic_img_size=True)
        arch, sd = _without_registers(name, model.state_dict()) if drop_registers else (name, model.state_dict())
        return InitWeights(arch, sd, {"kind": "random", "spec": spec})
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{what}: encoder file not found", path=path)
    try:
        sd, recorded, meta = read_state_dict(path, trust=trust)
    except UserError as e:
        raise UserError(f"{what}: {str(e).removeprefix(f'{path}: ')}", path=path) from None
    try:
        if recorded is None and is_dinov2_state_dict(sd):
            arch, sd = dinov2_to_timm(sd, drop_registers)
            kind = "dinov2"
        else:
            arch = recorded if recorded is not None else _infer(sd)
            kind = "backbone" if recorded is not None else "state_dict"
            if drop_registers:
                arch, sd = _without_registers(arch, sd)
    except ValueError as e:  # infer_arch's "pass --arch" names an option only `eval` has
        msg = str(e).replace("; pass --arch", "; save it as {'arch': <timm name>, 'state_dict': <weights>} "
                             "(the layout of a backbone.pt) so that its architecture is known")
        raise UserError(f"{what}: {msg}", path=path) from None
    problem = vit_arch_problem(arch)
    if problem:
        raise UserError(f"{what}: {problem}", path=path)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier (zero in backbone.pt)
    check_fits(arch, sd, path, what)
    return InitWeights(arch, sd, {"kind": kind, "spec": str(path), "meta": meta})


def check_fits(arch: str, sd: dict[str, torch.Tensor], path: Any, what: str = "--init") -> None:
    """One-line :class:`UserError` unless ``sd`` loads into ``arch`` (position embeddings may differ in
    size: :func:`build_vit` resamples them)."""
    with torch.device("meta"):
        want = create_vit(arch, num_classes=0, dynamic_img_size=True).state_dict()
    problem = fit_problem(want, sd)
    if problem:
        raise UserError(f"{what}: weights do not match arch '{arch}': {problem}", path=path)


def build_vit(arch: str, sd: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> torch.nn.Module:
    """``create_vit(arch, num_classes=0, dynamic_img_size=True, **kwargs)`` loaded with ``sd`` (strict;
    position embeddings resampled to the arch's grid when their size differs)."""
    model = create_vit(arch, num_classes=0, dynamic_img_size=True, **kwargs)
    if sd is not None:
        sd = dict(sd)
        want = model.state_dict()["pos_embed"]
        if sd["pos_embed"].shape != want.shape:
            from timm.layers import resample_abs_pos_embed

            n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                     num_prefix_tokens=n_prefix)
        model.load_state_dict(sd)
    return model
