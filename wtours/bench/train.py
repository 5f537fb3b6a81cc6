"""``wtours bench train``: the stage-1 training step's speed, FLOPs, MFU and memory, and the loader alone.

    wtours bench train --stage video --config configs/video/dora_vits16.yaml --steps 20 --json bench-train.json

Measures, on the default device (CUDA when available, else CPU):

* loader: clips/s of ``ClipDataset`` + ``DataLoader`` (``data.num_workers``) without training;
* train step (one fixed batch already on the device, so the loader is out of the picture):
  optimizer steps/s and clips/s of training itself: a ``pl.Trainer`` set up as ``wtours pretrain``
  sets it up (:func:`wtours.train.trainer_setup.step_options`: precision, i.e. bf16-mixed on CUDA and
  fp32 on CPU, gradient accumulation, determinism) runs :class:`~wtours.stages.video.module.VideoModule`
  on a loader that yields that batch forever. Each optimizer step is therefore exactly the training
  step: schedules at the step, GPU augmentation, the objective (teacher, tracking, student forward),
  backward, the objective's frozen parameters, per-parameter clipping, AdamW, backbone EMA and the
  objective's state updates (centre), plus Lightning's own per-step work, which training pays too.
  Why a Trainer and not a hand-written loop: a copy of the step measures something else as soon as
  training changes (a bench that skipped the schedules, the frozen last layer and autocast on CPU
  did); the test ``tests/test_train_bench.py`` checks that the bench's weights after N steps equal
  those of N training steps on the same batch;
* FLOPs of one optimizer step (``torch.utils.flop_counter.FlopCounterMode`` around its micro-batches:
  matmuls, convolutions, SDPA), achieved TFLOP/s and MFU against the GPU's dense bf16 peak (H100 SXM
  / H200 989, H100 PCIe 756, A100 312 TFLOP/s; "n/a" on CPU or an unknown GPU);
* peak memory (CUDA: ``max_memory_allocated`` over the timed steps; CPU: the process's peak RSS).

The timed window is host time between two device syncs, around ``--steps`` optimizer steps after
``warmup`` steps (allocations, cuDNN autotuning, compilation) and the FLOP-counted step.

Without ``--config`` it uses ``configs/video/dora_vits16.yaml`` on a GPU and ``configs/video/tiny.yaml``
on CPU; without ``videos`` in the config it benchmarks on a synthetic walking tour (cached in
``runs/bench/data/synth``).
"""

from __future__ import annotations

import json
import resource
import time
from typing import Any, Iterator

from lightning.pytorch.callbacks import Callback
from torch.utils.data import IterableDataset

PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name (None when unknown)."""
    name = device_name.upper().replace("-", " ")
    for key, peak in PEAK_BF16:
        k = key.upper()
        if k == "H100 PCIE":
            if "H100" in name and "PCIE" in name:
                return peak
            continue
        if k in name:
            return peak
    return None


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_loader(cfg: Any, videos: list[str], batches: int) -> dict[str, float]:
    """Clips/s of the CPU loader alone (first batch excluded: worker start-up)."""
    from torch.utils.data import DataLoader

    from wtours.stages.video.data import make_clip_dataset
    from wtours.video.clips import worker_context

    ds = make_clip_dataset(cfg, videos)
    ds.clips_per_epoch = max(ds.clips_per_epoch, (batches + 1) * cfg.data.batch_size)
    w = cfg.data.num_workers
    dl = DataLoader(ds, batch_size=cfg.data.batch_size, num_workers=w, drop_last=True,
                    prefetch_factor=cfg.data.prefetch_factor if w > 0 else None,
                    multiprocessing_context=worker_context(w))
    it = iter(dl)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += b["clip"].shape[0]
    dt = time.perf_counter() - t0
    st = ds.stats()
    return {"loader_clips_per_s": n / dt if dt > 0 else float("nan"), "loader_clips": n,
            "loader_frames_per_s": n * cfg.data.frames_per_clip / dt if dt > 0 else float("nan"),
            "decode_ratio": st.get("ratio", float("nan"))}


class _RepeatBatch(IterableDataset):
    """The same batch, forever (the loader of the bench's Trainer)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


class StepClock(Callback):
    """Host time over optimizer steps ``[start, stop)`` of a fit (a device sync at both ends only),
    FLOPs of optimizer step ``flop_step`` (all its micro-batches), CUDA peak memory from ``start``."""

    def __init__(self, flop_step: int, start: int, stop: int) -> None:
        self.flop_step, self.start, self.stop = flop_step, start, stop
        self.flops: float | None = None
        self.t0: float | None = None
        self.t1: float | None = None
        self._counter: Any = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # the optimizer step this micro-batch belongs to
        if step == self.flop_step and self.flops is None and self._counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if step == self.start and self.t0 is None:
            _sync(pl_module.device)
            if pl_module.device.type == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # after the last micro-batch of step s: s + 1
        if self._counter is not None and step == self.flop_step + 1:
            self._counter.__exit__(None, None, None)
            self.flops = float(self._counter.get_total_flops())
            self._counter = None
        if step == self.stop and self.t1 is None:
            _sync(pl_module.device)
            self.t1 = time.perf_counter()


def bench_step(cfg: Any, clips: Any, steps: int, warmup: int = 2) -> tuple[dict[str, Any], Any]:
    """Train on the fixed batch ``clips`` (uint8 ``[B, T, 3, H, W]`` on the target device) for ``warmup``
    + 1 (FLOPs) + ``steps`` (timed) optimizer steps, exactly as ``wtours pretrain`` trains (see the
    module docstring). Returns ``(results, the trained VideoModule)``."""
    import warnings

    import torch
    from torch.utils.data import DataLoader

    from wtours.train.trainer_setup import make_trainer, quiet_lightning, step_options
    from wtours.stages.video.module import VideoModule

    device = clips.device
    on_gpu = device.type == "cuda"
    module = VideoModule(cfg)
    clock = StepClock(flop_step=warmup, start=warmup + 1, stop=warmup + 1 + steps)
    with warnings.catch_warnings():
        quiet_lightning()
        trainer = make_trainer(
            accelerator="gpu" if on_gpu else "cpu", devices=[device.index or 0] if on_gpu else 1, num_nodes=1,
            **step_options(cfg, on_gpu), max_epochs=-1, max_steps=clock.stop, callbacks=[clock], logger=False,
            log_every_n_steps=cfg.trainer.log_every, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=DataLoader(_RepeatBatch({"clip": clips}), batch_size=None))
    if clock.t0 is None or clock.t1 is None or clock.flops is None:
        raise RuntimeError(f"bench train: the fit ended at step {trainer.global_step} before the timed steps")
    dt = max(clock.t1 - clock.t0, 1e-9)
    sps = steps / dt
    clips_per_step = clips.shape[0] * cfg.trainer.accumulate_grad_batches
    out: dict[str, Any] = {"steps_per_s": sps, "clips_per_s": sps * clips_per_step,
                           "frames_per_s": sps * clips_per_step * clips.shape[1], "flops_per_step": clock.flops,
                           "achieved_tflops": clock.flops * sps / 1e12,
                           "final_loss": float(trainer.callback_metrics["train/loss"]),
                           "precision": str(trainer.precision)}
    if on_gpu:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return out, module
