"""How a stage sets up its ``pl.Trainer``: shared by the stage engine (:mod:`wtours.train.engine`, both
stages) and ``wtours bench train``. Everything here reads only a config's ``trainer`` section, which every
stage's config has.

* :func:`step_options`: the Trainer arguments that define what one training step computes
  (precision, gradient accumulation, determinism, cuDNN autotuning). Both commands pass exactly
  these, so the bench times the step training runs.
* :func:`resolve_accelerator`, :func:`parse_devices`, :func:`world_size`: the number of ranks
  *before* the Trainer exists (the schedules, hence ``max_steps``, depend on it), from Lightning's
  public accelerator API (``parse_devices`` / ``auto_device_count``); :func:`make_trainer` checks that
  the Trainer agrees.
* :func:`quiet_lightning`: inside ``warnings.catch_warnings()``, ignores the Lightning warnings a run
  can do nothing about, each by category and emitting module (never by message text).

Every failure a user can cause (bad ``--devices``, ``--num-nodes``, ``trainer.accelerator``) is a
one-line :class:`~wtours.errors.UserError`.
"""

from __future__ import annotations

import warnings
from typing import Any

from wtours.errors import UserError

SETUP_HINT = "see --devices, --num-nodes, trainer.accelerator"


def precision(cfg: Any, on_gpu: bool) -> str:
    """``trainer.precision`` as Lightning spells it; ``auto``: bf16-mixed on CUDA, 32-true on CPU."""
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16-mixed" if on_gpu else "32-true"
    return {"32": "32-true"}.get(p, p)


def step_options(cfg: Any, on_gpu: bool) -> dict[str, Any]:
    """The Trainer arguments that decide what a training step computes (see the module docstring)."""
    return {"precision": precision(cfg, on_gpu),
            "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
            "deterministic": cfg.trainer.deterministic or None,
            "benchmark": on_gpu or None}


def resolve_accelerator(cfg: Any) -> tuple[str, bool]:
    """``(accelerator for pl.Trainer, on_gpu)``; ``auto`` without a usable GPU becomes ``cpu``."""
    import torch

    on_gpu = cfg.trainer.accelerator != "cpu" and torch.cuda.is_available()
    accelerator = cfg.trainer.accelerator if cfg.trainer.accelerator != "cuda" else "gpu"
    if not on_gpu and accelerator == "auto":
        accelerator = "cpu"
    return accelerator, on_gpu


def parse_devices(spec: Any) -> Any:
    """``--devices`` / ``trainer.devices``: ``"auto"``, an integer (-1: all), or ``"0,2"`` (device indices)."""
    if spec is None:
        return "auto"
    s = str(spec).strip()
    if s == "auto":
        return "auto"
    try:
        n = int(s)
    except ValueError:
        if "," in s:
            return [int(x) for x in s.split(",") if x.strip()]
        raise UserError(f"--devices: expected an integer or 'auto', got {spec!r}") from None
    if n < 1 and n != -1:
        raise UserError(f"--devices: must be >= 1 (or -1 for all), got {n}")
    return n


def _setup_error(e: BaseException, accelerator: Any, devices: Any, num_nodes: Any) -> UserError:
    msg = " ".join(str(e).split())[:300]
    return UserError(f"cannot set up training (accelerator={accelerator!r}, devices={devices!r}, "
                     f"num_nodes={num_nodes!r}; {SETUP_HINT}): {msg}")


def world_size(accelerator: str, devices: Any, num_nodes: int) -> int:
    """Ranks a Trainer with these arguments runs: devices per node (as Lightning parses them) x nodes."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    acc = CPUAccelerator if accelerator == "cpu" else CUDAAccelerator
    try:
        if devices == "auto":
            n = acc.auto_device_count()
        else:
            parsed = acc.parse_devices(devices)
            n = len(parsed) if isinstance(parsed, (list, tuple)) else int(parsed)
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise _setup_error(e, accelerator, devices, num_nodes) from None
    return max(1, n) * num_nodes


def quiet_lightning() -> None:
    """Ignore (inside ``warnings.catch_warnings()``) the Lightning warnings a run cannot act on."""
    from lightning.pytorch.utilities import disable_possible_user_warnings  # category PossibleUserWarning

    # "GPU available but not used": trainer.accelerator=cpu on a GPU machine is the user's choice
    disable_possible_user_warnings(module=r"lightning\.pytorch\.trainer\.setup")
    # "The 'train_dataloader' does not have many workers": data.num_workers is the user's choice (tiny presets: 0)
    disable_possible_user_warnings(module=r"lightning\.pytorch\.trainer\.connectors\.data_connector")
    # "resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable":
    # it is, by construction: VideoDataModule seeks the clip stream to global_step
    disable_possible_user_warnings(module=r"lightning\.pytorch\.loops\.training_epoch_loop")
    # "Your `IterableDataset` has `__len__` defined": ClipDataset shards itself over ranks and workers,
    # so its length is exact
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning\.(fabric|pytorch)\.utilities\.data")
    # "`isinstance(treespec, LeafSpec)` is deprecated": torch's deprecation, hit inside Lightning's own code
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def make_trainer(world: int | None = None, **kwargs: Any) -> Any:
    """``pl.Trainer(**kwargs)`` with Lightning's complaints about devices / nodes / accelerator as one line;
    with ``world``, also that the Trainer runs that many ranks (what the schedules were built for)."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = pl.Trainer(**kwargs)
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise _setup_error(e, kwargs.get("accelerator"), kwargs.get("devices"), kwargs.get("num_nodes")) from None
    if world is not None and trainer.world_size != world:
        raise UserError(f"cannot set up training: Lightning runs {trainer.world_size} rank(s) where devices "
                        f"{kwargs.get('devices')!r} x num_nodes {kwargs.get('num_nodes')!r} make {world} "
                        f"(a launcher's world size differs?; {SETUP_HINT})")
    return trainer
