"""Backbone checkpoints anyone can load: ``backbone.pt`` export and a loader for what users have.

``backbone.pt`` = ``{"arch": timm name, "state_dict": timm-compatible, "meta": {...}}``. The state
dict is the backbone **without a classifier head** (DINO's and timm's convention for feature extractors:
none is trained), so it loads strictly into ``timm.create_model(arch, num_classes=0)``::

    ckpt = torch.load("runs/venice/stage1/backbone.pt", map_location="cpu", weights_only=True)
    model = timm.create_model(ckpt["arch"], num_classes=0)   # after `import wtours` for wtours' small ViTs
    model.load_state_dict(ckpt["state_dict"])

``meta["timm_base"]`` and ``meta["timm_kwargs"]`` build the same module tree with timm alone (no wtours):
``timm.create_model(meta["timm_base"], **meta["timm_kwargs"], num_classes=0)``: for a timm name they are the
name and ``{}``; for wtours' own CPU-scale ViTs (:mod:`wtours.models.small_vits`) a timm ViT and the
keyword arguments that reshape it. Exports of wtours < 0.2 carried a zeroed 1000-class head; every wtours
loader drops ``head.*`` keys, so they still load.

``meta["wtours_checksum"]`` is a checksum of the file's content (:mod:`wtours.integrity`), verified
by :func:`read_state_dict`: a damaged file is refused with one line naming it. Non-finite weights
are never exported.

:func:`load_backbone` accepts a ``backbone.pt``, a bare timm ViT state dict file (DINO's released
``dino_deitsmall16_pretrain.pth`` is a plain dict of tensors with exactly timm's key names and loads
with ``weights_only=True``; such foreign files carry no checksum and load as unverified), a training
checkpoint of ``wtours pretrain`` (``stage1/last.ckpt``), or ``random:<timm arch>[@<seed>]`` for the
untrained baseline (init seed 0 unless given), or ``pixels:<patch>[@<position weight>]`` for the raw-pixel
pseudo-encoder (:mod:`wtours.models.pixels`, a calibration floor; no weights). Files are read with ``weights_only=True``; one that
needs pickle is refused unless ``trust`` (``--trust-checkpoint``).

A training checkpoint holds two backbones (``student.vit.*`` and ``teacher.vit.*``; older layouts
``student.backbone.vit.*``) beside the objectives' heads: the **teacher** (the EMA, what ``wtours
pretrain`` exports as ``backbone.pt``) is loaded unless the spec ends in ``:student``
(``runs/x/stage1/last.ckpt:student``; ``:teacher`` is the default spelled out). The suffix also picks
``student`` / ``teacher`` in a foreign file that holds both (DINO's full checkpoints). The arch is the
checkpoint's own (``checkpoint["wtours"]["arch"]``).

:func:`load_init`: the encoder a post-pretraining stage starts from (``wtours neco --init SPEC``).
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

``random:<timm arch>[@<seed>]`` is parsed in one place (:func:`parse_random_spec`) and built by
:func:`random_vit` inside ``torch.random.fork_rng``: loading a random baseline never reseeds the caller's
global random stream (the same seed gives the same weights). Position embeddings of another grid size are
resampled in one place (:func:`resample_pos_embed`, used by :func:`load_backbone` and :func:`build_vit`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

import wtours.models.small_vits  # noqa: F401 - registers the CPU-scale ViTs with timm
from wtours.errors import UserError
from wtours.fsutil import torch_save
from wtours.integrity import CHECKSUM_KEY, load_verified, seal

# Prefixes stripped from foreign state dicts, tried in this order.
_PREFIXES = ("module.", "backbone.", "student.backbone.", "teacher.backbone.", "student.vit.", "teacher.vit.",
             "model.", "encoder.")
_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16}
_SIZE_BY_DIM = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


class ViTGeometry(NamedTuple):
    """What a config needs to know about a timm ViT: ``patch_size`` (pixels), ``num_heads``, ``embed_dim``,
    ``depth`` (transformer blocks)."""

    patch_size: int
    num_heads: int
    embed_dim: int
    depth: int = 0


@functools.lru_cache(maxsize=64)
def _meta_vit(arch: str) -> tuple[ViTGeometry | None, str | None]:
    """Build ``arch`` on the ``meta`` device (no memory, no init cost) -> (geometry, None) or (None, problem)."""
    import timm

    if not timm.is_model(arch):
        return None, (f"unknown or unsupported timm architecture '{arch}' (not a timm model name; "
                      "e.g. vit_small_patch16_224, vit_tiny_patch16_224)")
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except Exception as e:  # noqa: BLE001 - whatever timm raises for a name it cannot build
        return None, f"unsupported timm architecture '{arch}' ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(model, timm.models.VisionTransformer):
        return None, (f"'{arch}' is a {type(model).__name__}, not a ViT: wtours trains and evaluates timm "
                      "VisionTransformer models (e.g. vit_small_patch16_224)")
    patch = model.patch_embed.patch_size
    return ViTGeometry(patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
                       num_heads=int(model.blocks[0].attn.num_heads), embed_dim=int(model.embed_dim),
                       depth=len(model.blocks)), None


def fit_problem(want: dict[str, Any], sd: dict[str, Any]) -> str | None:
    """Why state dict ``sd`` does not load into a model whose state dict is ``want`` (the first key of
    another shape, the missing and unexpected keys; ``pos_embed`` may differ in size), None if it does."""
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = sorted(k for k in set(want) & set(sd) if k != "pos_embed" and tuple(want[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or bad):
        return None
    parts = []
    if bad:
        parts.append(f"{bad[0]} has shape {tuple(sd[bad[0]].shape)}, arch expects {tuple(want[bad[0]].shape)}")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    return "; ".join(parts)


def vit_arch_problem(arch: str) -> str | None:
    """Why ``arch`` is not a timm VisionTransformer name (None when it is); builds nothing real."""
    return _meta_vit(arch)[1]


def vit_geometry(arch: str) -> ViTGeometry:
    """Patch size, heads and width of the timm ViT ``arch``, read from the model built on the ``meta`` device
    (so ``vit_nano_patch8_64`` and any timm name work, whatever the name says). Raises UserError for a non-ViT."""
    geometry, problem = _meta_vit(arch)
    if geometry is None:
        raise UserError(problem or f"'{arch}' is not a ViT")
    return geometry


def create_vit(arch: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(arch)`` of a ViT, with a one-line error for an unknown or non-ViT name."""
    import timm

    problem = vit_arch_problem(arch)
    if problem:
        raise UserError(problem)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"unknown or unsupported timm architecture '{arch}' ({e})") from None


def timm_recipe(arch: str) -> tuple[str, dict[str, Any]]:
    """``(timm name, keyword arguments)`` that build ``arch`` with timm alone (see the module docstring)."""
    from wtours.models.small_vits import SMALL_VITS, TIMM_BASE

    if arch in SMALL_VITS:
        return TIMM_BASE, dict(SMALL_VITS[arch])
    return arch, {}


def export_backbone(model: torch.nn.Module, arch: str, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``backbone.pt`` atomically from a timm ViT: its state dict without the classifier head (if any),
    checked against ``timm.create_model(arch, num_classes=0)``; ``meta`` gains ``timm_base`` / ``timm_kwargs``."""
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()
          if not k.startswith("head.")}
    with torch.device("meta"):
        ref = create_vit(arch, num_classes=0).state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit timm '{arch}' (num_classes=0): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"refusing to export non-finite weights ({bad[0]}"
                        + (f" and {len(bad) - 1} more)" if len(bad) > 1 else ")"), path=path)
    base, kwargs = timm_recipe(arch)
    meta = {**dict(meta or {}), "timm_base": base, "timm_kwargs": kwargs}
    return torch_save(seal({"arch": arch, "state_dict": sd, "meta": meta}, in_meta=True), path)


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


ROLES = ("teacher", "student")


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"last.ckpt:student"`` -> ``("last.ckpt", "student")``; ``"backbone.pt"`` -> ``("backbone.pt", None)``.
    A file whose own name ends in ``:student`` / ``:teacher`` is taken as it is."""
    for role in ROLES:
        suffix = f":{role}"
        if spec.endswith(suffix) and not Path(spec).exists():
            return spec[: -len(suffix)], role
    return spec, None


def _role_prefixes(role: str) -> tuple[str, ...]:
    return (f"{role}.vit.", f"{role}.backbone.vit.", f"{role}.backbone.", f"{role}.")


def _training_backbone(sd: dict[str, torch.Tensor], role: str) -> dict[str, torch.Tensor] | None:
    """The ``role`` backbone of a training checkpoint's state dict (None if it holds no such backbone)."""
    for prefix in _role_prefixes(role):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if "patch_embed.proj.weight" in sub:
            return sub
    return None


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if "patch_embed.proj.weight" in sub:
                return sub
    return sd


def read_state_dict(path: str | Path, trust: bool = False, role: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    """Read a checkpoint file -> (ViT state dict, arch if recorded, meta without the checksum).

    A file that carries a checksum is verified (a damaged one raises a one-line :class:`UserError`);
    foreign files carry none. ``trust`` allows files that need pickle. ``role``: the backbone of a file that
    holds a student and a teacher (default: the teacher); a file with one backbone refuses a role.
    """
    sd, arch, meta, _ = _read_checked(path, trust, role)
    return sd, arch, meta


def _read_checked(path: str | Path, trust: bool, role: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], str | None, dict, bool]:
    """:func:`read_state_dict` + whether the file's checksum was verified. When the file holds a student and a
    teacher, ``meta["checkpoint"]`` says which was read (``role``; a training checkpoint's ``global_step`` and
    ``config_hash`` too)."""
    p = Path(path)
    obj, verified = load_verified(p, trust=trust, hint="restore it from a copy, or export it again (re-running "
                                  "'wtours pretrain' on its run re-exports it from last.ckpt)")
    if role is not None and role not in ROLES:
        raise UserError(f"unknown backbone ':{role}' (choose :teacher or :student)", path=p)
    single = UserError(f"':{role}' picks one backbone of a file that holds a student and a teacher (a training "
                       "checkpoint); this one holds a single backbone: drop the suffix", path=p)
    arch, meta = None, {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        hp, run = obj.get("hyper_parameters"), obj.get("wtours")
        if arch is None and isinstance(hp, dict) and isinstance(hp.get("arch"), str):
            arch = hp["arch"]
        if arch is None and isinstance(run, dict) and isinstance(run.get("arch"), str):
            arch = run["arch"]  # a training checkpoint of wtours pretrain
        sd = obj["state_dict"]
        if any(_training_backbone(sd, r) is not None for r in ROLES):
            which = role or "teacher"
            picked = _training_backbone(sd, which)
            if picked is None:
                raise UserError(f"training checkpoint without a {which} backbone ({which}.vit.* keys)", path=p)
            info = {"role": which, "global_step": int(obj.get("global_step", 0) or 0)}
            if isinstance(run, dict) and isinstance(run.get("config_hash"), str):
                info["config_hash"] = run["config_hash"]
            return picked, arch, {"checkpoint": info}, verified
        if role is not None:
            raise single
        obj = sd
    elif isinstance(obj, dict):
        for key in (role,) if role else ("teacher", "model", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                if key in ROLES:
                    meta = {"checkpoint": {"role": key}}
                break
        else:
            if role is not None:
                raise single
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("not a state dict of tensors", path=p)
    meta = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    return _strip(obj), arch, meta, verified


def load_backbone(spec: str, arch: str | None = None, trust: bool = False) -> tuple[torch.nn.Module, dict]:
    """Build a timm ViT from ``spec`` -> (model in eval mode on CPU, identity info).

    ``info["verified"]``: the file's checksum was checked (False for foreign files without one).
    ``trust`` allows files that need pickle (see :func:`wtours.integrity.safe_load`).
    """
    if spec.startswith("pixels:"):  # the raw-pixel pseudo-encoder (wtours.models.pixels), a calibration floor
        from wtours.models.pixels import parse_pixels_spec

        enc = parse_pixels_spec(spec)
        return enc.eval(), {"kind": "pixels", "arch": f"pixels_patch{enc.patch_embed.patch_size[0]}", "spec": spec}
    if spec.startswith("random:"):
        name, seed = parse_random_spec(spec)
        name = name or arch or ""
        if not name:
            raise UserError("random:<timm arch> needs an architecture name, e.g. random:vit_small_patch16_224")
        if seed is None:
            raise UserError(f"{spec}: the init seed after '@' must be an integer, e.g. random:{name}@1")
        return random_vit(name, seed).eval(), {"kind": "random", "arch": name, "spec": spec}
    path, role = split_spec(spec)
    sd, recorded, meta, verified = _read_checked(path, trust, role)
    if arch is None:
        arch = recorded
    if arch is None and is_dinov2_state_dict(sd):  # Meta's DINOv2 layout -> timm's (registers kept)
        try:
            arch, sd = dinov2_to_timm(sd, drop_registers=False)
        except ValueError as e:
            raise UserError(str(e), path=path) from None
    if arch is None:
        try:
            arch = infer_arch(sd)
        except ValueError as e:
            raise UserError(str(e), path=path) from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with torch.device("meta"):
        want = create_vit(arch, num_classes=0, dynamic_img_size=True).state_dict()
    problem = fit_problem(want, sd)
    if problem:
        raise UserError(f"weights do not match arch '{arch}': {problem}", path=path)
    model = build_vit(arch, sd)
    info = {"kind": "checkpoint", "arch": arch, "spec": str(spec), "meta": meta, "verified": verified}
    picked = meta.get("checkpoint") if isinstance(meta, dict) else None
    if isinstance(picked, dict) and "role" in picked:
        info["role"] = picked["role"]
    return model.eval(), info


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
        name, seed = parse_random_spec(spec)
        problem = vit_arch_problem(name) if name else "needs an architecture name, e.g. random:vit_small_patch16_224"
        if problem:
            raise UserError(f"{what} {spec}: {problem}")
        if seed is None:
            raise UserError(f"{what} {spec}: the init seed after '@' must be an integer")
        model = random_vit(name, seed)
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
        model.load_state_dict(resample_pos_embed(model, sd))
    return model


def parse_random_spec(spec: str) -> tuple[str, int | None]:
    """``random:<timm arch>[@<init seed>]`` -> ``(arch, seed)``: arch ``""`` when none is named, seed 0 when none
    is given and None when it is not an integer (each caller words its own error)."""
    name, _, seed_txt = spec.split(":", 1)[1].partition("@")
    try:
        return name, int(seed_txt) if seed_txt else 0
    except ValueError:
        return name, None


def random_vit(arch: str, seed: int, **kwargs: Any) -> torch.nn.Module:
    """The untrained ``arch`` of init seed ``seed`` (``create_vit(arch, num_classes=0, dynamic_img_size=True)``),
    built inside ``torch.random.fork_rng``: the caller's global random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_vit(arch, num_classes=0, dynamic_img_size=True, **kwargs)


def resample_pos_embed(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with its ``pos_embed`` resampled to ``model``'s patch grid when the sizes differ (a copy)."""
    want = model.state_dict()["pos_embed"]
    if "pos_embed" not in sd or sd["pos_embed"].shape == want.shape:
        return sd
    from timm.layers import resample_abs_pos_embed

    sd = dict(sd)
    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                             num_prefix_tokens=n_prefix)
    return sd
