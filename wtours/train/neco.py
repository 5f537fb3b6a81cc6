"""``wtours neco``: stage 2, NeCo post-pretraining of an encoder on image crops.

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

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from wtours.config import load_config, to_dict, to_yaml
from wtours.errors import ConfigError, UserError
from wtours.fsutil import ensure_dir, remove_stale_temps, write_text
from wtours.train.checkpointing import config_changed
from wtours.train.neco_config import NeCoConfig, neco_training_hash, neco_training_view
from wtours.train.stage_run import (auto_resume, check_run_options, drop_set_aside, fresh_start, launch_rank_zero,
                                    loss_endpoints, print_loss_line)
from wtours.train.trainer_setup import parse_devices, resolve_accelerator, step_options

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


# ----------------------------------------------------------------------------- small run helpers


def _read_resume(path: Path, trust: bool) -> dict[str, Any]:
    from wtours.integrity import load_verified

    if not path.is_file():
        raise UserError("checkpoint to resume from not found" if not path.exists() else "not a checkpoint file",
                        path=path)
    ckpt, verified = load_verified(path, trust=trust, hint="restore it from a copy, or start over with --fresh")
    st = ckpt.get("wtours") if isinstance(ckpt, dict) else None
    if not isinstance(st, dict) or st.get("stage") != "neco" or "state_dict" not in ckpt:
        raise UserError("not a 'wtours neco' training checkpoint", path=path)
    return {**st, "global_step": int(ckpt.get("global_step", 0)), "verified": verified}


def _check_same_config(meta: dict[str, Any], cfg: NeCoConfig, path: Path) -> None:
    if meta.get("config_hash") == neco_training_hash(cfg):
        return
    raise config_changed(neco_training_view(meta.get("config", {})), neco_training_view(to_dict(cfg)), path)


def _patch_size(arch: str) -> int:
    from wtours.models.backbone_io import create_vit

    import torch

    with torch.device("meta"):
        return int(create_vit(arch, num_classes=0).patch_embed.patch_size[0])


def check_crops(cfg: NeCoConfig, arch: str, canvas: tuple[int, int]) -> None:
    """Crop sizes must be multiples of the patch size (boxes stay aligned to the token grid), and the
    overlap constraint must be satisfiable on this data's canvas (fallback rate <= 50 %)."""
    from wtours.neco_augment import overlap_feasibility

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
    from wtours.train.neco_data import ImageFolder

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
    from wtours.train.neco_data import FrameCache, ImageFolder, build_frame_cache

    if cfg.images and cfg.frames_from:
        raise UserError("give either --images or --frames-from, not both")
    if cfg.images:
        ds = ImageFolder(cfg.images, cfg.data.image_size)
        return ds, (cfg.data.image_size, cfg.data.image_size), f"{len(ds)} images in {cfg.images}"
    if not cfg.frames_from:
        raise UserError("no training data: give --images DIR (a folder of images) or --frames-from VIDEO ...")
    cache_dir = stage / "frames"
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) or 0)
    if local_rank > 0:  # local rank 0 builds the cache; the others wait for it
        for _ in range(7200):
            if (cache_dir / "frames.json").is_file():
                break
            time.sleep(0.5)
    d = cfg.data
    npy = build_frame_cache(cfg.frames_from, cache_dir, d.frames, d.frame_short_side, d.frame_sampling, cfg.seed,
                            progress=show)
    ds = FrameCache(npy)
    import numpy as np

    shape = np.load(npy, mmap_mode="r").shape
    return ds, (int(shape[1]), int(shape[2])), f"{len(ds)} frames of {len(cfg.frames_from)} video(s)"


# ----------------------------------------------------------------------------- callbacks

from wtours.train.callbacks import PeriodicPictures, StepProgressBar  # noqa: E402


class _NeCoBar(StepProgressBar):
    """The stage-1 step bar, labelled ``neco``."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.bar is not None:
            self.bar.set_description("neco")


class PCAPictures(PeriodicPictures):
    """Every ``every`` optimizer steps (and at the end): fixed images (the run's first 4, kept in the
    checkpoint) and the first 3 PCA components of the student's patch features, as
    ``pictures/pca_step{N:06d}.png`` (row 1 images, row 2 features as RGB)."""

    def __init__(self, out_dir: str | Path, every: int, count: int = 4) -> None:
        super().__init__(out_dir, every)
        self.count = count
        self.images: Any = None
        self.sizes: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "sizes": self.sizes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images, self.sizes = state_dict.get("images"), state_dict.get("sizes")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.images is None:
            self.images = batch["image"][: self.count].detach().to("cpu", copy=True)
            self.sizes = batch["size"][: self.count].detach().to("cpu", copy=True)

    def write(self, trainer: Any, pl_module: Any) -> Path | None:
        step = trainer.global_step
        if self.images is None or step == self._last or not trainer.is_global_zero:
            return None
        self._last = step
        crops, pca = pl_module.pca_features(self.images.to(pl_module.device), self.sizes)
        from wtours.fsutil import atomic_open

        path = ensure_dir(self.out_dir) / f"pca_step{step:06d}.png"
        with atomic_open(path, "wb") as f:
            f.write(render_pca_png(crops, pca))
        self.written.append(path)
        return path


def render_pca_png(crops: Any, pca: Any, min_size: int = 128) -> bytes:
    """PNG bytes (matplotlib): crops ``[M, 3, S, S]`` in a row and below them their patch features' first 3
    PCA components as RGB (``pca [M, 3, g, g]``, bilinearly upsampled to the crop), with headers."""
    import torch.nn.functional as F

    from wtours.figures import image_grid

    s = crops.shape[-1]
    up = F.interpolate(pca.float().cpu(), size=(s, s), mode="bilinear", align_corners=False).clamp(0, 1)
    rows = [list(t.permute(0, 2, 3, 1).numpy().clip(0, 1)) for t in (crops.float().cpu(), up)]
    g = pca.shape[-1]
    return image_grid(rows, col_titles=[f"image {i}" for i in range(crops.shape[0])],
                      row_titles=["crop", f"PCA of {g}x{g} patches (RGB)"], cell=min_size / 64)


# ----------------------------------------------------------------------------- the run


def run_neco(cfg: NeCoConfig, run_dir: str | Path, resume: str | None = None, devices: Any = None,
             num_nodes: int | None = None, extra_callbacks: Sequence[Any] = (), progress: bool | None = None,
             fresh: bool = False, trust: bool = False) -> dict[str, Any]:
    """Run stage 2 into ``run_dir`` (see the module docstring) -> a summary dict.

    ``fresh`` sets an existing ``stage2/`` aside first; ``trust`` reads files that need pickle
    (``--init``, ``resume``). ``extra_callbacks`` are added to the Trainer (tests simulate a kill).
    """
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from wtours.models.backbone_io import export_backbone
    from wtours.models.init_weights import load_init
    from wtours.train.callbacks import ThroughputMonitor
    from wtours.train.csv_logger import ResumableCSVLogger
    from wtours.train.checkpointing import AtomicCheckpointIO
    from wtours.train.guard import FiniteGuard
    from wtours.train.neco_data import NeCoDataModule
    from wtours.train.neco_module import NeCoModule

    check_run_options(cfg, resume, fresh, num_nodes)
    accelerator, on_gpu = resolve_accelerator(cfg)
    if cfg.loss.sorter == "torchsort":
        from wtours.objectives.sorting import torchsort_problem

        problem = torchsort_problem("cuda" if on_gpu else "cpu")
        if problem:
            raise ConfigError(f"loss.sorter: {problem}")
    if not on_gpu and cfg.trainer.cpu_threads > 0:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    dev = parse_devices(devices if devices is not None else cfg.trainer.devices)
    main_process = launch_rank_zero()
    run_dir = Path(run_dir)
    ckpt_path = None
    if resume is not None:
        ckpt_path = run_dir / STAGE / "last.ckpt" if resume == "last" else Path(resume)
    resumed = _read_resume(ckpt_path, trust) if ckpt_path is not None else None
    if resumed is not None:
        _check_same_config(resumed, cfg, ckpt_path)
        if not resumed["verified"] and main_process:
            print(f"wtours neco: {ckpt_path} carries no checksum: not verified", file=sys.stderr)
    resumed_step = resumed["global_step"] if resumed is not None else None
    # the encoder (its arch, and its weights unless a checkpoint replaces them)
    if resumed is not None:
        arch, init_sd, init_info = str(resumed["arch"]), None, {"kind": "checkpoint"}
    else:
        w = load_init(cfg.init, cfg.model.drop_registers, trust=trust)
        arch, init_sd, init_info = w.arch, w.state_dict, w.info
    run_dir = ensure_dir(run_dir)
    show = cfg.log.progress if progress is None else progress
    stage = run_dir / STAGE
    if fresh:
        check_data(cfg)  # every input checked before the old run is set aside
    if fresh and main_process:
        fresh_start(stage, "wtours neco")
    stage = ensure_dir(stage)
    if main_process:
        remove_stale_temps(stage)
    dataset, canvas, described = make_dataset(cfg, stage, show)
    check_crops(cfg, arch, canvas)
    write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
    loggers: list[Any] = [ResumableCSVLogger(run_dir, STAGE, keep_until_step=resumed_step)]
    if cfg.log.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name=STAGE, version="tb", default_hp_metric=False))
    ckpt_cb = ModelCheckpoint(dirpath=str(stage), filename="last", every_n_train_steps=cfg.trainer.checkpoint_every,
                              save_top_k=1, save_last=False, enable_version_counter=False, save_on_train_epoch_end=False)
    bar = _NeCoBar(refresh=cfg.trainer.log_every, enabled=show)
    pictures = PCAPictures(stage / "pictures", cfg.log.picture_every)
    crops_per_image = cfg.crops.global_number + cfg.crops.local_number
    throughput = ThroughputMonitor(0, crops_per_image, cfg.trainer.log_every)  # "clips" = images, "frames" = crops
    guard = FiniteGuard(cfg.trainer.log_every, f"lower optim.lr_backbone / optim.lr_head (now {cfg.optim.lr_backbone:g}"
                        f" / {cfg.optim.lr_head:g}) or set optim.clip_grad (e.g. 3.0)", stage / "last.ckpt",
                        saved_step=resumed_step if ckpt_path == stage / "last.ckpt" else None)

    def saved(path: Path, step: int) -> None:
        guard.saved(step)
        drop_set_aside(stage)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(GPU available but not used).*")
        try:
            trainer = pl.Trainer(
                accelerator=accelerator, devices=dev, num_nodes=num_nodes or cfg.trainer.num_nodes,
                **step_options(cfg, on_gpu), max_epochs=-1, max_steps=1,
                callbacks=[bar, throughput, pictures, guard, ckpt_cb, *extra_callbacks],
                log_every_n_steps=cfg.trainer.log_every,
                logger=loggers, plugins=[AtomicCheckpointIO(trust=trust, on_saved=saved)], limit_val_batches=0,
                num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(run_dir),
                use_distributed_sampler=False)
        except (MisconfigurationException, TypeError, ValueError) as e:
            msg = " ".join(str(e).split())[:300]
            raise UserError(f"cannot set up training (accelerator={accelerator!r}, devices={dev!r}; see --devices, "
                            f"--num-nodes, trainer.accelerator): {msg}") from None
    world = trainer.world_size
    per_step = cfg.data.batch_size * world * cfg.trainer.accumulate_grad_batches
    if len(dataset) < per_step:
        raise ConfigError(f"data.batch_size: {per_step} images per step (batch x ranks x accumulation) but the data has "
                          f"only {len(dataset)} ({described})")
    steps_per_epoch = max(1, len(dataset) // per_step)
    module = NeCoModule(cfg, arch, init_sd, steps_per_epoch)
    total = module.schedules.total_steps
    trainer.fit_loop.epoch_loop.max_steps = total
    throughput.clips_per_step = per_step
    dm = NeCoDataModule(dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.data.prefetch_factor, cfg.seed,
                        cfg.trainer.accumulate_grad_batches)
    if trainer.is_global_zero and show:
        print(f"neco: {arch} from {init_info.get('kind')} weights, {described}, {total} steps ({steps_per_epoch}/epoch),"
              f" {per_step} images/step on {world} {'GPU' if on_gpu else 'CPU'} rank(s), sorter {cfg.loss.sorter} "
              f"({cfg.loss.impl}), precision {trainer.precision}"
              + (f"; resuming at step {resumed_step}" if resumed_step is not None else ""), file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|is not resumable|LeafSpec"
                                "|exists and is not empty|checkpoint, but the dataloader|IterableDataset"
                                "|on_before_batch_transfer).*")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        except SystemExit as e:
            if trainer.interrupted:
                raise KeyboardInterrupt from e
            raise
    if trainer.interrupted or trainer.global_step < total:
        raise KeyboardInterrupt
    summary: dict[str, Any] = {"steps": trainer.global_step, "run_dir": str(run_dir),
                               "skipped_images": dm.skipped_images, "bad_images": list(dm.bad_examples)}
    trainer.save_checkpoint(str(stage / "last.ckpt"))  # the guard checks the weights first
    guard.check(trainer, module)
    if trainer.is_global_zero:
        net = module.student if cfg.export == "student" else module.teacher
        meta = {"stage": "neco", "steps": trainer.global_step, "config_hash": module.config_hash, "arch": arch,
                "init": cfg.init, "data": cfg.images or list(cfg.frames_from), "exported": cfg.export,
                "sorter": cfg.loss.sorter, "images_seen": trainer.global_step * per_step,
                "skipped_images": dm.skipped_images}
        export_backbone(net.vit, arch, stage / "backbone.pt", meta)
        summary["backbone"] = str(stage / "backbone.pt")
        for lg in loggers:
            lg.save()
        first, last = loss_endpoints(stage / "metrics.csv")
        summary.update(first_loss=first, last_loss=last, pictures=[str(p) for p in pictures.written])
        from wtours.report import write_report

        summary["report"] = str(write_report(run_dir))
    return summary


def cli_main(args: Any) -> int:
    cfg = load_neco_config(args.config, args.overrides, args.max_steps, args.init, args.images, args.frames_from)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    import torch

    resume, fresh = auto_resume(args, run_dir / STAGE / "last.ckpt",
                                f"wtours neco: {run_dir} holds a stage-2 run: continuing it (--fresh starts over)")
    if not cfg.init and resume is None:
        raise UserError("--init: give the encoder to start from (a stage-1 backbone.pt, a timm ViT state dict, "
                        "DINOv2 weights, or random:<timm arch>)")
    try:
        summary = run_neco(cfg, run_dir, resume=resume, devices=args.devices, num_nodes=args.num_nodes, fresh=fresh,
                           trust=getattr(args, "trust_checkpoint", False))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory (data.batch_size={cfg.data.batch_size}, crops.global_size="
                        f"{cfg.crops.global_size}, loss.impl={cfg.loss.impl}): {OOM_HINT}") from None
    except KeyboardInterrupt:
        last = run_dir / STAGE / "last.ckpt"
        hint = f"; continue by running the same command again (checkpoint: {last})" if last.is_file() else ""
        print(f"wtours neco: stopped before the end{hint}", file=sys.stderr)
        raise
    print_loss_line(summary, run_dir / STAGE / "metrics.csv")
    if summary.get("skipped_images"):
        eg = f" (e.g. {summary['bad_images'][0]})" if summary.get("bad_images") else ""
        print(f"wtours neco: skipped {summary['skipped_images']} unreadable image(s){eg}", file=sys.stderr)
    if summary.get("backbone"):
        print(f"backbone: {summary['backbone']}")
        print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from wtours.cli import main

    sys.exit(main(["neco", *sys.argv[1:]]))
