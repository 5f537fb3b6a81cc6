"""``wtours pretrain``: the whole pipeline (:mod:`wtours.pipeline.run`), or stage 1 alone
(:mod:`wtours.stages.video.run`) when an option only a stage-1 run has is given (``--config``, ``--init``,
``--frames``, ``--resume``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from wtours.commands.common import auto_resume, print_loss_line
from wtours.errors import UserError
from wtours.stages.video import run as stage1


def cli_main(args: Any) -> int:
    if pipeline_mode(args):  # no stage-1-only option (--config, --init, --frames, --resume): the whole chain
        return pipeline_main(args)
    cfg = stage1.load_pretrain_config(args.config, args.overrides, args.max_steps, args.video,
                               init=getattr(args, "init", None), frames=getattr(args, "frames", None))
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    import torch

    # auto-resume (as DINOv2 and solo-learn do): re-running a command continues its run, and a finished
    # run only re-exports; --fresh starts over
    resume, fresh = auto_resume(args, run_dir / "stage1" / "last.ckpt",
                                f"wtours pretrain: {run_dir} holds a run: continuing it (--fresh starts over)")
    try:
        summary = stage1.run_pretrain(cfg, run_dir, resume=resume, devices=args.devices, num_nodes=args.num_nodes,
                               fresh=fresh, trust=getattr(args, "trust_checkpoint", False))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory (data.batch_size={cfg.data.batch_size}, crops.local_number="
                        f"{cfg.crops.local_number}, tracking.objects={cfg.tracking.objects}, model.arch="
                        f"{cfg.model.arch}): {stage1.OOM_HINT}") from None
    except KeyboardInterrupt:
        last = run_dir / "stage1" / "last.ckpt"
        hint = f"; continue with --resume (checkpoint: {last})" if last.is_file() else ""
        print(f"wtours pretrain: stopped before the end{hint}", file=sys.stderr)
        raise
    print_loss_line(summary, run_dir / "stage1" / "metrics.csv")
    if summary.get("backbone"):
        print(f"backbone: {summary['backbone']}")
        print(f"report: {summary['report']}")
    return 0




# ----------------------------------------------------------------------------------------------- command

# options of `wtours pretrain` that only a stage-1 run alone has, and those that only the pipeline has
STAGE1_OPTIONS = ("config", "init", "frames", "resume")
PIPELINE_OPTIONS = ("pipeline", "stages", "davis", "ytvos", "images")


def _given(args: Any, names: Sequence[str]) -> list[str]:
    return [f"--{n}" for n in names if getattr(args, n, None) not in (None, [], False)]


def pipeline_mode(args: Any) -> bool:
    """``wtours pretrain`` runs the pipeline unless an option of a stage-1 run alone is given
    (``--config``, ``--init``, ``--frames``, ``--resume``); mixing both kinds is a usage error."""
    one, chain = _given(args, STAGE1_OPTIONS), _given(args, PIPELINE_OPTIONS)
    if one and chain:
        raise UserError(f"{' '.join(chain)} run(s) a pipeline, {' '.join(one)} a stage-1 run alone: give one kind "
                        "(a pipeline stage takes its config from the pipeline file and --set stage.key=value)")
    return not one


def _command(args: Any) -> str:
    import shlex

    parts = ["wtours", "pretrain"]
    for v in args.video:
        parts += ["--video", v]
    for flag in ("pipeline", "stages", "out", "davis", "ytvos", "images", "devices", "num_nodes"):
        v = getattr(args, flag, None)
        if v not in (None, ""):
            parts += [f"--{flag.replace('_', '-')}", str(v)]
    for o in args.overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def pipeline_main(args: Any) -> int:
    """``wtours pretrain`` in pipeline mode."""
    from wtours.pipeline.run import PipelineRun
    from wtours.pipeline.spec import DEFAULT_PIPELINE, load_pipeline, select_stages
    from wtours.pipeline.status import read_status

    pipe = load_pipeline(args.pipeline or DEFAULT_PIPELINE, args.overrides)
    if args.max_steps is not None:
        sets = " ".join(f"--set {s.name}.trainer.max_steps={args.max_steps}" for s in pipe.stages if s.trains)
        raise UserError(f"--max-steps: in pipeline mode each training stage has its own length: {sets}")
    stages = select_stages(pipe, args.stages)
    out = Path(args.out) if args.out else Path("runs") / pipe.name
    runner = PipelineRun(pipe, out, stages, videos=args.video, images=args.images, davis=args.davis,
                         ytvos=args.ytvos, devices=args.devices, num_nodes=args.num_nodes,
                         trust=getattr(args, "trust_checkpoint", False), fresh=args.fresh, command=_command(args))
    try:
        result = runner.run()
    except KeyboardInterrupt:
        running = [s.name for s in pipe.stages if read_status(runner.stage_dir(s)).get("state") == "running"]
        where = f" during stage '{running[0]}'" if running else ""
        print(f"wtours pretrain: stopped{where}; run the same command again to continue (finished stages are kept)",
              file=sys.stderr)
        raise
    if result.get("table"):
        print(f"\n{pipe.name}: scores % per stage (F / C / D clustering" + (", K=<k> overclustering" if "K=" in
              result["table"] else "") + (", J&F propagation, in-context and linear-probe mIoU" if "J&F" in
                                          result["table"] else "") + ")")
        print(result["table"])
    if result.get("report"):
        print(f"report: {' '.join(result['report'])}")
    return 0
