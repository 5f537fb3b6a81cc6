"""Stage 2 (``wtours neco``, :mod:`wtours.commands.neco`): NeCo post-pretraining of an encoder on image
crops, as hooks on the stage engine (:mod:`wtours.train.engine`).

    wtours neco --init runs/venice/stage1/backbone.pt --frames-from venice.mp4 --out runs/venice
    wtours neco --init dinov2_vits14_reg4_pretrain.pth --images coco/train2017 --config neco/neco_vits16
    wtours neco --init runs/demo/stage1/backbone.pt --frames-from runs/demo/data/synth/tour.mp4 \\
        --config neco/tiny --out runs/demo                                        # CPU, < 1 min

Writes into the run directory ``--out`` (default ``runs/<config name>``)::

    config_neco.yaml            the resolved stage-2 config (init, data source included)
    stage2/last.ckpt            training checkpoint (every trainer.checkpoint_every steps + at the end; atomic)
    stage2/metrics.csv          per-step metrics (CSV; TensorBoard events in stage2/tb/)
    stage2/pictures/*.png       fixed images and the first 3 PCA components of the student's patch features
    stage2/frames/              the frame cache of --frames-from (decoded once, reused on resume)
    stage2/backbone.pt          the student backbone (config ``export``), loadable by timm (at the end)
    report.md                   summary (``wtours report RUN_DIR`` rewrites it)

Re-running the same command continues the run (a finished run is only re-exported); ``--resume``
continues from ``stage2/last.ckpt`` or a given checkpoint; ``--fresh`` sets ``stage2/`` aside first.
Resume is exact: weights, optimizer, schedules, teacher, reference queues, position in the image
stream, random streams. Checkpoints are verified and read with ``weights_only=True``. A loss or
weights that become non-finite stop the run (exit status 2), keep the last good checkpoint and
export nothing. Multi-GPU: ``--devices N --num-nodes M`` (DDP).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from wtours.config import load_config
from wtours.errors import ConfigError, UserError
from wtours.stages.neco.config import NeCoConfig, neco_training_hash, neco_training_view
from wtours.train.engine import Built, Stage, StageRun, run_stage, wait_for_local_rank_zero

STAGE = "stage2"
CONFIG_FILE = "config_neco.yaml"
OOM_HINT = ("lower data.batch_size (e.g. --set data.batch_size=32 with trainer.accumulate_grad_batches=2), "
            "crops.global_size, or use loss.impl=lean (the default)")


def load_neco_config(config: str | None, overrides: Sequence[str], max_steps: int | None = None,
                     init: str | None = None, images: str | None = None,
                     frames_from: Sequence[str] = ()) -> NeCoConfig:
    """Defaults <- ``config`` <- ``--set`` <- ``--max-steps`` <- ``--init`` / ``--images`` / ``--frames-from``."""
    ov = list(overrides or [])
    if max_steps is not None:
        ov.append(f"trainer.max_steps={int(max_steps)}")
    cfg = load_config(NeCoConfig, config, ov)
    if init:
        cfg.init = init if init.startswith("random:") else str(Path(init).resolve())
    if images:
        cfg.images = str(Path(images).resolve())
    if frames_from:
        cfg.frames_from = [str(Path(v).resolve()) for v in frames_from]
    return cfg


def _patch_size(arch: str) -> int:
    from wtours.models.weights import create_vit

    import torch

    with torch.device("meta"):
        return int(create_vit(arch, num_classes=0).patch_embed.patch_size[0])


def check_crops(cfg: NeCoConfig, arch: str, canvas: tuple[int, int]) -> None:
    """Crop sizes must be multiples of the patch size (boxes stay aligned to the token grid), and the
    overlap constraint must be satisfiable on this data's canvas (fallback rate <= 50 %)."""
    from wtours.stages.neco.crops import overlap_feasibility

    c = cfg.crops
    patch = _patch_size(arch)
    for name, size in (("crops.global_size", c.global_size), ("crops.local_size", c.local_size)):
        if size % patch:
            near = max(patch, round(size / patch) * patch)
            raise ConfigError(f"{name}: {size} is not a multiple of the patch size {patch} of '{arch}' "
                              f"(use {near}: boxes must stay aligned to the token grid)")
    rate = overlap_feasibility(c, canvas[0], canvas[1], trials=256, seed=cfg.seed)
    if rate > 0.5:
        raise ConfigError(f"crops.min_overlap: the overlap constraint (min_overlap {c.min_overlap:g}, "
                          f"min_overlap_globals {c.min_overlap_globals:g}) fails for {100 * rate:.0f}% of crops within "
                          f"crops.max_tries={c.max_tries} tries; lower the overlaps or raise crops.local_scale / "
                          "crops.global_scale")


def check_data(cfg: NeCoConfig) -> None:
    """Check the training data (the image folder, or that every ``--frames-from`` video opens) without writing
    anything: run before ``--fresh`` sets an old run aside, and by a pipeline before its first stage."""
    from wtours.stages.neco.data import ImageFolder

    if cfg.images and cfg.frames_from:
        raise UserError("give either --images or --frames-from, not both")
    if cfg.images:
        ImageFolder(cfg.images, cfg.data.image_size)
        return
    if not cfg.frames_from:
        raise UserError("no training data: give --images DIR (a folder of images) or --frames-from VIDEO ...")
    from wtours.video.decode import open_video

    for v in cfg.frames_from:
        if not Path(v).is_file():
            raise UserError("video not found" if not Path(v).exists() else "not a file", path=v)
        open_video(v).close()


def make_dataset(cfg: NeCoConfig, stage: Path, show: bool) -> tuple[Any, tuple[int, int], str]:
    """The run's dataset -> (dataset, canvas (H, W), description)."""
    from wtours.stages.neco.data import FrameCache, ImageFolder, build_frame_cache

    if cfg.images and cfg.frames_from:
        raise UserError("give either --images or --frames-from, not both")
    if cfg.images:
        ds = ImageFolder(cfg.images, cfg.data.image_size)
        return ds, (cfg.data.image_size, cfg.data.image_size), f"{len(ds)} images in {cfg.images}"
    if not cfg.frames_from:
        raise UserError("no training data: give --images DIR (a folder of images) or --frames-from VIDEO ...")
    cache_dir = stage / "frames"
    # local rank 0 builds the cache; the others wait for it
    wait_for_local_rank_zero(lambda: (cache_dir / "frames.json").is_file(), "the frame cache", cache_dir,
                             timeout_s=3600)
    d = cfg.data
    npy = build_frame_cache(cfg.frames_from, cache_dir, d.frames, d.frame_short_side, d.frame_sampling, cfg.seed,
                            progress=show)
    ds = FrameCache(npy)
    import numpy as np

    shape = np.load(npy, mmap_mode="r").shape
    return ds, (int(shape[1]), int(shape[2])), f"{len(ds)} frames of {len(cfg.frames_from)} video(s)"


# ----------------------------------------------------------------------------- the run


class NeCoStage(Stage):
    """Stage 2 as hooks on :func:`wtours.train.engine.run_stage`."""

    command, subdir, config_file = "neco", STAGE, CONFIG_FILE
    checkpoint_stage = "neco"
    trainer_options = {"use_distributed_sampler": False}  # NeCoDataModule shards the images itself

    def config_hash(self) -> str:
        return neco_training_hash(self.cfg)

    def training_view(self, config: dict[str, Any]) -> dict[str, Any]:
        return neco_training_view(config)

    def divergence_hint(self) -> str:
        o = self.cfg.optim
        return f"lower optim.lr_backbone / optim.lr_head (now {o.lr_backbone:g} / {o.lr_head:g}) or set optim.clip_grad (e.g. 3.0)"

    def check_options(self, on_gpu: bool) -> None:
        if self.cfg.loss.sorter == "torchsort":
            from wtours.objectives.sorting import torchsort_problem

            problem = torchsort_problem("cuda" if on_gpu else "cpu")
            if problem:
                raise ConfigError(f"loss.sorter: {problem}")

    def prepare(self, run: StageRun) -> None:
        """The encoder: its arch, and its weights unless a checkpoint replaces them; with ``--fresh`` the data
        too (every input checked before the old run is set aside)."""
        from wtours.models.weights import load_init

        if run.resumed is not None:
            self.arch, self.init_sd, self.init_info = str(run.resumed["arch"]), None, {"kind": "checkpoint"}
        else:
            w = load_init(self.cfg.init, self.cfg.model.drop_registers, trust=run.trust)
            self.arch, self.init_sd, self.init_info = w.arch, w.state_dict, w.info
        if run.fresh:
            check_data(self.cfg)

    def data(self, run: StageRun) -> None:
        self.dataset, canvas, self.described = make_dataset(self.cfg, run.stage_dir, run.show)
        check_crops(self.cfg, self.arch, canvas)

    def build(self, run: StageRun) -> Built:
        from wtours.stages.neco.callbacks import PCAPictures
        from wtours.stages.neco.data import NeCoDataModule
        from wtours.stages.neco.module import NeCoModule

        cfg = self.cfg
        per_step = cfg.data.batch_size * run.world * cfg.trainer.accumulate_grad_batches
        if len(self.dataset) < per_step:
            raise ConfigError(f"data.batch_size: {per_step} images per step (batch x ranks x accumulation) but the data "
                              f"has only {len(self.dataset)} ({self.described})")
        self.steps_per_epoch = max(1, len(self.dataset) // per_step)
        module = NeCoModule(cfg, self.arch, self.init_sd, self.steps_per_epoch)
        dm = NeCoDataModule(self.dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.data.prefetch_factor,
                            cfg.seed, cfg.trainer.accumulate_grad_batches)
        self.pictures = PCAPictures(run.stage_dir / "pictures", cfg.log.picture_every)
        # the throughput monitor's "clips" are images, its "frames" crops
        return Built(module, dm, module.schedules.total_steps, per_step,
                     cfg.crops.global_number + cfg.crops.local_number, [self.pictures])

    def announce(self, run: StageRun, trainer: Any, built: Built) -> None:
        cfg = self.cfg
        if run.show:
            print(f"neco: {self.arch} from {self.init_info.get('kind')} weights, {self.described}, {built.total_steps} "
                  f"steps ({self.steps_per_epoch}/epoch), {built.per_step} images/step {run.ranks()}, sorter "
                  f"{cfg.loss.sorter} ({cfg.loss.impl}), {run.precision_and_resume(trainer)}", file=sys.stderr)

    def export(self, run: StageRun, trainer: Any, built: Built) -> tuple[Any, str, dict[str, Any]]:
        cfg, module, dm = self.cfg, built.module, built.datamodule
        net = module.student if cfg.export == "student" else module.teacher
        meta = {"stage": "neco", "steps": trainer.global_step, "config_hash": module.config_hash, "arch": self.arch,
                "init": cfg.init, "data": cfg.images or list(cfg.frames_from), "exported": cfg.export,
                "sorter": cfg.loss.sorter, "images_seen": trainer.global_step * built.per_step,
                "skipped_images": dm.skipped_images}
        return net.vit, self.arch, meta

    def summary(self, run: StageRun, trainer: Any, built: Built, rank_zero: bool) -> dict[str, Any]:
        dm = built.datamodule
        out: dict[str, Any] = {"skipped_images": dm.skipped_images, "bad_images": list(dm.bad_examples)}
        if rank_zero:
            out["pictures"] = [str(p) for p in self.pictures.written]
        return out


def run_neco(cfg: NeCoConfig, run_dir: str | Path, resume: str | None = None, devices: Any = None,
             num_nodes: int | None = None, extra_callbacks: Sequence[Any] = (), progress: bool | None = None,
             fresh: bool = False, trust: bool = False) -> dict[str, Any]:
    """Run stage 2 into ``run_dir`` (see the module docstring) -> a summary dict (:func:`run_stage`).

    ``fresh`` sets an existing ``stage2/`` aside first; ``trust`` reads files that need pickle
    (``--init``, ``resume``). ``extra_callbacks`` are added to the Trainer (tests simulate a kill).
    """
    return run_stage(NeCoStage(cfg), run_dir, resume=resume, devices=devices, num_nodes=num_nodes,
                     extra_callbacks=extra_callbacks, progress=progress, fresh=fresh, trust=trust)
