"""Pipeline files (``pipelines/*.yaml``): named chains of stages, validated before any work.

A pipeline file is a mapping::

    name: tiny                       # optional (default: the file's stem)
    description: ...                 # optional, free text
    stages:                          # an ordered mapping: stage name -> stage
      video:
        kind: video                  # video (stage 1: DoRA / TimeT), neco (stage 2), eval (clustering)
        config: video/dora_timet_tiny    # a file under configs/ (or a path)
        set: {model.arch: vit_nano_patch8_64}   # dotted overrides (nested mappings work too)
      eval_video: {kind: eval, config: eval/proof, input: video}
      neco: {kind: neco, config: neco/tiny, input: video}
      eval_neco: {kind: eval, config: eval/proof, input: neco}

``input`` names the stage whose ``backbone.pt`` a stage takes: required for ``neco`` and ``eval``
(a training stage: ``video`` or ``neco``), optional for ``video`` (it then fine-tunes that backbone:
``model.init``). Stages run in file order, each after its input. Every problem (an unknown key or
kind, a config that does not load, a missing or unknown input, an input that is an ``eval`` stage,
a cycle) is one :class:`~wtours.errors.UserError` naming the file and the stage.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from wtours.config import load_yaml_file
from wtours.errors import UserError
from wtours.config import flatten
from wtours.resources import PIPELINE_DIR

DEFAULT_PIPELINE = "walking-tours"
KINDS = ("video", "neco", "eval")
TRAINING_KINDS = ("video", "neco")
STAGE_KEYS = ("kind", "config", "set", "input", "description")
TOP_KEYS = ("name", "description", "stages")
# names the run directory uses for itself (stage folders live beside them)
RESERVED = ("data", "random", "report", "pipeline")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class Stage:
    """One stage of a pipeline: ``overrides`` are ``key=value`` strings (the file's ``set`` then ``--set``)."""

    name: str
    kind: str
    config: str
    overrides: list[str] = field(default_factory=list)
    input: str | None = None
    description: str = ""

    @property
    def trains(self) -> bool:
        return self.kind in TRAINING_KINDS


@dataclass
class Pipeline:
    """A validated pipeline: ``stages`` in execution order (file order, each after its input)."""

    name: str
    path: Path
    stages: list[Stage]
    description: str = ""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def chain(self, name: str) -> list[Stage]:
        """The stage ``name`` and its inputs, back to the first: ``[name, input, input's input, ...]``."""
        out, cur = [], self.stage(name)
        while True:
            out.append(cur)
            if cur.input is None:
                return out
            cur = self.stage(cur.input)

    def downstream(self, name: str) -> list[str]:
        """Stages that take (directly or not) ``name``'s backbone, in execution order."""
        hit = {name}
        out = []
        for s in self.stages:
            if s.input in hit:
                hit.add(s.name)
                out.append(s.name)
        return out


def resolve_pipeline_path(spec: str | Path) -> Path:
    """A pipeline by name (``tiny`` -> ``pipelines/tiny.yaml``) or by path."""
    p = Path(spec)
    for c in (p, PIPELINE_DIR / p, PIPELINE_DIR / f"{p}.yaml"):
        if c.is_file():
            return c
    names = ", ".join(sorted(q.stem for q in PIPELINE_DIR.glob("*.yaml"))) if PIPELINE_DIR.is_dir() else ""
    raise UserError("pipeline not found" + (f" (shipped pipelines: {names})" if names else ""), path=p)


def set_to_overrides(value: Any, where: str) -> list[str]:
    """A stage's ``set:`` mapping (dotted keys and/or nested mappings) -> ``key=value`` override strings."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'set' must be a mapping of config keys to values, got {type(value).__name__}")
    out = []
    for key, v in flatten(value).items():
        if not key:
            raise UserError(f"{where}: 'set' has an empty key")
        out.append(f"{key}={json.dumps(v)}")  # JSON is YAML: parse_overrides reads it back exactly
    return out


def _err(path: Path, msg: str) -> UserError:
    return UserError(msg, path=path)


def load_pipeline(spec: str | Path, sets: Sequence[str] = ()) -> Pipeline:
    """Read, validate and order a pipeline; ``sets`` are ``stage.key=value`` overrides (``--set``)."""
    path = resolve_pipeline_path(spec)
    data = load_yaml_file(path, "pipeline")
    if not isinstance(data, dict):
        raise _err(path, "a pipeline file must hold a mapping with a 'stages' mapping")
    unknown = sorted(set(map(str, data)) - set(TOP_KEYS))
    if unknown:
        raise _err(path, f"unknown key '{unknown[0]}'; valid keys: {', '.join(TOP_KEYS)}")
    raw = data.get("stages")
    if not isinstance(raw, dict) or not raw:
        raise _err(path, "'stages' must be a non-empty mapping of stage names to stages")
    stages: list[Stage] = []
    for name, body in raw.items():
        name = str(name)
        where = f"stage '{name}'"
        if not _NAME_RE.match(name):
            raise _err(path, f"{where}: a stage name is letters, digits, '_' and '-' (it names a folder)")
        if name in RESERVED:
            raise _err(path, f"{where}: '{name}' is reserved for the run directory ({', '.join(RESERVED)})")
        if not isinstance(body, dict):
            raise _err(path, f"{where}: expected a mapping with kind, config, set, input")
        bad = sorted(set(map(str, body)) - set(STAGE_KEYS))
        if bad:
            raise _err(path, f"{where}: unknown key '{bad[0]}'; valid keys: {', '.join(STAGE_KEYS)}")
        kind = body.get("kind")
        if kind not in KINDS:
            raise _err(path, f"{where}: unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        config = body.get("config")
        if not isinstance(config, str) or not config.strip():
            raise _err(path, f"{where}: 'config' must name a config file (e.g. {kind}/tiny under configs/)")
        inp = body.get("input")
        if inp is not None and not isinstance(inp, str):
            raise _err(path, f"{where}: 'input' must name a stage, got {inp!r}")
        try:
            ov = set_to_overrides(body.get("set"), where)
        except UserError as e:
            raise _err(path, str(e)) from None
        stages.append(Stage(name, kind, config, ov, inp, str(body.get("description") or "")))
    by_name = {s.name: s for s in stages}
    from_cli: dict[str, int] = {s.name: 0 for s in stages}  # how many of a stage's overrides came from --set
    # --set stage.key=value
    for item in sets:
        head, sep, rest = item.partition(".")
        if not sep or "=" in head or not rest or "=" not in rest or head not in by_name:
            raise UserError(f"--set {item!r}: in pipeline mode a key names its stage first: stage.key=value, "
                            f"stages of {path.name}: {', '.join(by_name)} (stage 1 alone: give --config)")
        by_name[head].overrides.append(rest)
        from_cli[head] += 1
    for s in stages:
        where = f"stage '{s.name}'"
        if s.input is None:
            if s.kind != "video":
                raise _err(path, f"{where}: a {s.kind} stage needs an 'input' (the training stage whose backbone "
                                 "it takes)")
            continue
        if s.input == s.name:
            raise _err(path, f"{where}: a stage cannot take its own backbone (cycle: {s.name} -> {s.name})")
        if s.input not in by_name:
            raise _err(path, f"{where}: input '{s.input}' is not a stage of this pipeline "
                             f"(stages: {', '.join(by_name)})")
        if not by_name[s.input].trains:
            raise _err(path, f"{where}: input '{s.input}' is an {by_name[s.input].kind} stage, which makes no "
                             "backbone; take a video or neco stage")
    for s in stages:  # each stage has at most one input: a cycle is a loop of input pointers
        seen = [s.name]
        cur = s
        while cur.input is not None:
            if cur.input in seen:
                loop = seen[seen.index(cur.input):] + [cur.input]
                raise _err(path, f"stage '{s.name}': its inputs form a cycle ({' -> '.join(loop)})")
            seen.append(cur.input)
            cur = by_name[cur.input]
    ordered: list[Stage] = []

    def place(s: Stage) -> None:
        if s in ordered:
            return
        if s.input is not None:
            place(by_name[s.input])
        ordered.append(s)

    for s in stages:
        place(s)
    pipe = Pipeline(str(data.get("name") or path.stem), path, ordered, str(data.get("description") or ""))
    for s in ordered:  # every config loads (unknown keys, bad values) before any work
        try:
            load_stage_config(s)
        except UserError as e:
            n = from_cli[s.name]
            if n and _loads(replace(s, overrides=s.overrides[:-n])):
                raise UserError(f"--set (stage '{s.name}'): {e}") from None  # the command line's, not the file's
            raise _err(path, f"stage '{s.name}': {e}") from None
    return pipe


def _loads(stage: Stage) -> bool:
    try:
        load_stage_config(stage)
    except UserError:
        return False
    return True


def load_stage_config(stage: Stage, videos: Sequence[str] = (), init: str | None = None, images: str | None = None,
                      frames_from: Sequence[str] = ()) -> Any:
    """The stage's config dataclass (defaults <- file <- overrides), validated; a training stage's data and
    input (``init``) filled in as its command line would (``videos`` for stage 1, ``images`` or
    ``frames_from`` for NeCo)."""
    from wtours.config import load_config

    if stage.kind == "video":
        from wtours.stages.video.run import load_pretrain_config

        return load_pretrain_config(stage.config, stage.overrides, videos=videos, init=init)
    if stage.kind == "neco":
        from wtours.stages.neco.run import load_neco_config

        return load_neco_config(stage.config, stage.overrides, init=init, images=images, frames_from=frames_from)
    from wtours.eval.config import EvalConfig

    return load_config(EvalConfig, stage.config, stage.overrides)


def select_stages(pipe: Pipeline, spec: str | None) -> list[Stage]:
    """``--stages a,b`` -> those stages in execution order (all when ``spec`` is None)."""
    if spec is None:
        return list(pipe.stages)
    want = [s.strip() for s in spec.split(",") if s.strip()]
    if not want:
        raise UserError("--stages: give stage names separated by commas")
    for w in want:
        if w not in pipe.names:
            raise UserError(f"--stages: unknown stage '{w}' (stages of {pipe.path.name}: {', '.join(pipe.names)})")
    return [s for s in pipe.stages if s.name in want]
