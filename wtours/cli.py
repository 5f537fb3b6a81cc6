"""The ``wtours`` command: one subcommand per user task.

This module only declares arguments and dispatches; each subcommand's work lives in the module
named by its ``handler`` (a ``cli_main(args) -> int | None`` function). Every failure a user can
cause is a :class:`wtours.errors.UserError`: printed here as one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from wtours import __version__
from wtours.errors import UserError

EPILOG_TMPL = "example:\n  {}"


def _sub(subs, name: str, handler: str | None, help: str, example: str) -> argparse.ArgumentParser:
    p = subs.add_parser(
        name,
        help=help,
        description=help,
        epilog=EPILOG_TMPL.format(example),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(_handler=handler)
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (a path, or a name under configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config key (dotted, value parsed as YAML); repeatable",
    )


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also read a checkpoint that contains pickled Python objects (they can run code while "
                        "loading; only for files from a source you trust)")


def _add_dense_config_args(q: argparse.ArgumentParser) -> None:
    """The dense instruments' config options of ``bench learn`` and ``bench instruments``."""
    for opt, what, default in (("--propagation-config", "propagation", "eval/propagation_tiny"),
                               ("--incontext-config", "in-context retrieval", "eval/incontext_tiny"),
                               ("--linear-config", "linear-probe", "eval/linear_tiny")):
        q.add_argument(opt, default=default, metavar="FILE", help=f"{what} config (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wtours",
        description="Learn dense image encoders from long unlabelled walking-tour videos, "
        "and evaluate them by unsupervised video segmentation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'wtours <command> --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"wtours {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="<command>")
    groups: dict[str, argparse.ArgumentParser] = {}
    parser.set_defaults(_groups=groups)

    p = _sub(subs, "download", "wtours.commands.download", "fetch a video with yt-dlp (video-only stream)",
             "wtours download 'https://www.youtube.com/watch?v=...' --out videos/ --max-height 2160")
    p.add_argument("url", help="video URL (file:// URLs work too)")
    p.add_argument("--out", default="videos", metavar="DIR", help="output folder (default: videos)")
    p.add_argument("--max-height", type=int, default=2160, help="highest resolution to take (default: 2160)")
    p.add_argument("--allow-av1", action="store_true",
                   help="do not prefer VP9/H.264 over AV1 (Hopper GPUs cannot decode AV1 in hardware)")
    p.add_argument("--format", dest="format_spec", metavar="SPEC", help="raw yt-dlp format selector (overrides the above)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _sub(subs, "index", "wtours.commands.index", "probe a video and build its keyframe index (cached)",
             "wtours index venice.mp4 --json")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files to index (mp4, mkv, webm, ...)")
    p.add_argument("--json", action="store_true", help="print the index summary as JSON")
    p.add_argument("--rebuild", action="store_true", help="ignore a cached index")

    p = _sub(subs, "prepare", "wtours.commands.prepare", "transcode a video to a training proxy (H.264, short GOP)",
             "wtours prepare venice.mp4 --short-side 540 --out venice_540p.mp4")
    p.add_argument("video", metavar="VIDEO", help="source video to transcode")
    p.add_argument("--short-side", type=int, default=540,
                   help="short side of the proxy in pixels (default: 540, configs/video/dora_vits16's training size)")
    p.add_argument("--out", metavar="FILE", help="output file (default: <video>_<N>p.mp4 beside the input)")
    p.add_argument("--gop", type=int, default=None, help="keyframe spacing in frames (default: one per second)")
    p.add_argument("--crf", type=int, default=20, help="x264 quality (default: 20)")
    p.add_argument("--preset", default="veryfast", help="x264 preset (default: veryfast)")
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: keep)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _sub(subs, "synth", "wtours.commands.synth", "write a synthetic walking tour (video + DAVIS/YTVOS-style masks)",
             "wtours synth --out data/synth --width 640 --height 360 --seconds 10 --seed 0")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: tour.mp4, davis/ and ytvos/ evaluation sets, synth.json")
    p.add_argument("--width", type=int, default=640, help="frame width in pixels (default: 640)")
    p.add_argument("--height", type=int, default=360, help="frame height in pixels (default: 360)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second (default: 30)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the tour in seconds (default: 10)")
    p.add_argument("--codec", default="h264", help="h264, hevc, vp9 or av1 (default: h264)")
    p.add_argument("--gop", type=int, default=None, help="keyframe spacing in frames (default: 2 s)")
    p.add_argument("--sequences", type=int, default=3, help="DAVIS-layout sequences to write (default: 3)")
    p.add_argument("--seq-frames", type=int, default=12, help="frames per DAVIS sequence (default: 12)")
    p.add_argument("--objects", type=int, default=4, help="moving objects in the scene (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic world (streets, objects, camera path; default: 0)")

    p = _sub(subs, "pretrain", "wtours.commands.pretrain",
             "the whole chain (a pipeline: video stage -> NeCo -> evaluation -> report, resumable stage by "
             "stage), or with --config / --init / --frames / --resume stage 1 alone (DoRA and/or TimeT)",
             "wtours pretrain --video venice.mp4 --out runs/venice                  # pipelines/walking-tours.yaml\n"
             "  wtours pretrain --pipeline tiny --out runs/demo                        # CPU demo, synthetic tour\n"
             "  wtours pretrain --video venice.mp4 --davis DAVIS --set neco.optim.lr_head=1e-3 --stages neco,eval_neco\n"
             "  wtours pretrain --video venice.mp4 --config configs/video/dora_vits16.yaml --out runs/venice  # stage 1\n"
             "  wtours pretrain --config video/timet_vits16 --init runs/venice/stage1/backbone.pt --frames YTVOS/train\n"
             "\n"
             "modes: without --config, --init, --frames and --resume, 'wtours pretrain' runs a pipeline (default\n"
             "walking-tours; --set keys name their stage first: video.optim.lr=1e-4); re-running the same command\n"
             "skips finished stages and continues an interrupted one; a changed stage config re-runs that stage and\n"
             "every stage after it. With any of those four options it runs stage 1 alone into --out (as before).")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="training video; repeatable (default: a synthetic walking tour)")
    p.add_argument("--pipeline", metavar="NAME|FILE", default=None,
                   help="pipeline mode: a pipeline under pipelines/ (walking-tours [default], dora-only, "
                        "timet-finetune, tiny) or a YAML file")
    p.add_argument("--stages", metavar="A,B", default=None,
                   help="pipeline mode: run only these stages (their inputs must have finished in --out)")
    p.add_argument("--davis", metavar="ROOT", default=None,
                   help="pipeline mode: evaluate on this DAVIS-2017 root (default: the synthetic tour's ground truth)")
    p.add_argument("--ytvos", metavar="ROOT", default=None, help="pipeline mode: also / instead evaluate on YouTube-VOS")
    p.add_argument("--images", metavar="DIR", default=None,
                   help="pipeline mode: NeCo trains on these images (default: frames of the training videos)")
    p.add_argument("--frames", metavar="DIR", default=None,
                   help="train on folders of frames instead (YouTube-VOS layout: DIR/JPEGImages/<video>/*.jpg)")
    p.add_argument("--init", metavar="BACKBONE", default=None,
                   help="start from these weights (backbone.pt or a timm ViT state dict) instead of random init")
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<pipeline name>, or runs/<config name> "
                                                "for stage 1 alone)")
    p.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="stage 1 alone: continue a run: a checkpoint path, or 'last' in --out (the default when given "
                        "bare); a run directory that holds stage1/last.ckpt is continued anyway unless --fresh")
    p.add_argument("--fresh", action="store_true",
                   help="start from scratch even if --out holds a run (pipeline mode: re-run every selected stage)")
    p.add_argument("--devices", default=None, help="GPUs per node (int or 'auto')")
    p.add_argument("--num-nodes", type=int, default=None, help="machines for multi-node DDP (default: trainer.num_nodes of the config, 1)")
    p.add_argument("--max-steps", type=int, default=None, help="shortcut for --set trainer.max_steps=N")
    _add_trust_arg(p)

    p = _sub(subs, "neco", "wtours.commands.neco", "stage 2: NeCo post-pretraining of an encoder on image crops",
             "wtours neco --init runs/venice/stage1/backbone.pt --frames-from venice.mp4 --out runs/venice")
    p.add_argument("--init", metavar="BACKBONE",
                   help="encoder to start from: a stage-1 backbone.pt, a timm ViT state dict, DINOv2 weights, or "
                        "random:<timm arch>")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", help="folder of images (jpg/png/webp, any depth; COCO train2017 works)")
    src.add_argument("--frames-from", nargs="+", default=[], metavar="VIDEO",
                     help="sample data.frames frames from these videos (decoded once into a cache in the run directory)")
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>); stage 2 writes <out>/stage2/")
    p.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="continue a run: a checkpoint path, or 'last' in --out (the default when given bare); "
                        "a run directory that holds stage2/last.ckpt is continued anyway unless --fresh")
    p.add_argument("--fresh", action="store_true", help="start stage 2 from scratch even if --out holds a stage-2 run")
    p.add_argument("--devices", default=None, help="GPUs per node (int or 'auto')")
    p.add_argument("--num-nodes", type=int, default=None, help="machines for multi-node DDP (default: trainer.num_nodes of the config, 1)")
    p.add_argument("--max-steps", type=int, default=None, help="shortcut for --set trainer.max_steps=N")
    _add_trust_arg(p)

    p = groups["eval"] = _sub(subs, "eval", None, "evaluate an encoder",
             "wtours eval clustering --dataset davis --root DAVIS --checkpoint runs/venice/backbone.pt")
    esubs = p.add_subparsers(dest="eval_command", metavar="<protocol>")
    q = _sub(esubs, "clustering", "wtours.commands.eval_clustering",
             "unsupervised video segmentation by clustering (F / C / D mIoU, overclustering)",
             "wtours eval clustering --dataset davis --root DAVIS --checkpoint random:vit_small_patch16_224 --k 100 300")
    q.add_argument("--dataset", required=True, choices=["davis", "ytvos", "synth"],
                   help="layout of --root: davis (DAVIS-2017), ytvos (YouTube-VOS) or synth (wtours synth output); the README's \"Dataset layouts\" section shows each")
    q.add_argument("--root", required=True, metavar="PATH", help="dataset root")
    q.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="backbone.pt; a training checkpoint (stage1/last.ckpt: its teacher, last.ckpt:student for "
                        "the student); a timm ViT state dict file (e.g. DINO's dino_deitsmall16_pretrain.pth); or "
                        "random:<timm arch>")
    q.add_argument("--arch", default=None, help="timm arch for a bare state dict (default: inferred)")
    q.add_argument("--videos", metavar="FILE", help="file with one video name per line")
    q.add_argument("--k", type=int, nargs="*", default=[], help="overclustering K values (e.g. 100 300 500)")
    q.add_argument("--frames-per-clip", type=int, default=None, metavar="N",
                   help="annotated frames per video, evenly spaced (frame_sampling=random: random sorted ones, as "
                        "the reference); 0 = all (default: 4, as the reference)")
    q.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="repeat k-means with N seeds (frame_sampling=random: and N frame draws) and report "
                        "mean ± std (default: 1)")
    q.add_argument("--out", metavar="DIR", help="output folder (default: runs/eval/<dataset>)")
    q.add_argument("--device", default="auto", help="cuda, cpu or auto")
    _add_trust_arg(q)
    _add_config_args(q)

    def instrument(name: str, handler: str, help: str, example: str, datasets: list[str]) -> argparse.ArgumentParser:
        q = _sub(esubs, name, handler, help, example)
        q.add_argument("--dataset", required=True, choices=datasets,
                       help="layout of --root (see the README's \"Dataset layouts\"): " + ", ".join(datasets))
        q.add_argument("--root", required=True, metavar="PATH", help="dataset root")
        q.add_argument("--checkpoint", required=True, metavar="CKPT",
                       help="backbone.pt; last.ckpt (teacher) or last.ckpt:student; a timm ViT state dict file; or "
                            "random:<timm arch>[@seed]")
        q.add_argument("--arch", default=None, help="timm arch for a bare state dict (default: inferred)")
        q.add_argument("--videos", metavar="FILE", help="file with one video name per line (the evaluated videos)")
        q.add_argument("--out", metavar="DIR", help=f"output folder (default: runs/eval/{name}/<dataset>)")
        q.add_argument("--device", default="auto", help="cuda, cpu or auto")
        _add_trust_arg(q)
        _add_config_args(q)
        return q

    instrument("propagation", "wtours.commands.eval_propagation",
               "semi-supervised video object segmentation by label propagation (DINO's protocol), DAVIS-2017 J&F",
               "wtours eval propagation --dataset davis --root DAVIS --checkpoint runs/venice/stage1/backbone.pt\n"
               "  wtours eval propagation --dataset synth --root data/synth --checkpoint random:vit_nano_patch8_64 "
               "--config eval/propagation_tiny", ["davis", "synth"])
    for name, handler, help_, example in (
            ("incontext", "wtours.commands.eval_incontext",
             "in-context segmentation by dense nearest-neighbour retrieval (Hummingbird / open-hummingbird-eval), "
             "mIoU: memory from the training split, queries from the held-out split",
             "wtours eval incontext --dataset ytvos --root YTVOS --checkpoint runs/venice/stage1/backbone.pt\n"
             "  wtours eval incontext --dataset synth --root data/synth --checkpoint random:vit_nano_patch8_64 "
             "--config eval/incontext_tiny"),
            ("linear", "wtours.commands.eval_linear",
             "linear segmentation probe on frozen patch features (NeCo-style), trained on the training split, "
             "mIoU on the held-out split",
             "wtours eval linear --dataset ytvos --root YTVOS --checkpoint runs/venice/stage1/backbone.pt\n"
             "  wtours eval linear --dataset synth --root data/synth --checkpoint random:vit_nano_patch8_64 "
             "--config eval/linear_tiny")):
        q = instrument(name, handler, help_, example, ["ytvos", "synth"])
        q.add_argument("--memory-root", metavar="PATH", default=None,
                       help="take the memory / training frames from every video of this YTVOS-layout root instead "
                            "(the queries are then every held-out video of --root)")

    p = groups["bench"] = _sub(subs, "bench", None, "benchmarks (decode, train, eval, learn, neco, instruments)",
                               "wtours bench decode venice.mp4")
    bsubs = p.add_subparsers(dest="bench_command", metavar="<what>")
    q = _sub(bsubs, "decode", "wtours.commands.bench_decode",
             "training loader throughput vs the decode ceiling and the GPU's appetite",
             "wtours bench decode venice.mp4 --short-side 360 --proxy --json bench-decode.json")
    q.add_argument("video", nargs="?", help="video to decode (default: a synthetic 4K H.264 tour, cached)")
    q.add_argument("--short-side", type=int, default=None, help="delivered short side (default: --config's data.short_side, 540 for the paper recipe)")
    q.add_argument("--backends", nargs="+", default=["pyav", "decord"], help="decoders to compare (default: pyav decord)")
    q.add_argument("--clips", type=int, default=None,
                   help="clips to deliver per backend (default: enough for the steady state)")
    q.add_argument("--stride", type=int, default=None,
                   help="clip stride in frames (default: 1 s, less when the video is too short)")
    q.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all cores)")
    q.add_argument("--batch-size", type=int, default=16, help="clips per batch (default: 16, the paper's per GPU)")
    q.add_argument("--lanes", type=int, default=None, help="places a batch draws from (default: the batch size)")
    q.add_argument("--proxy", action="store_true",
                   help="also bench the video's training proxy (made once with 'wtours prepare', cached)")
    q.add_argument("--gpu", default="H100", help="GPU whose appetite to compare with (default: H100; 'none': skip)")
    q.add_argument("--mfu", type=float, default=0.3, help="model FLOPs utilisation assumed (default: 0.3)")
    q.add_argument("--config", default="video/dora_vits16", metavar="FILE",
                   help="stage-1 config whose model FLOPs per frame to use (default: video/dora_vits16)")
    q.add_argument("--gflop-per-frame", type=float, default=None, help="use this instead of counting the model's")
    q.add_argument("--seconds", type=float, default=64.0, help="length of the synthetic tour (default: 64)")
    q.add_argument("--gop", type=int, default=30, help="keyframe spacing of the synthetic tour (default: 30)")
    q.add_argument("--repeat", type=int, default=1,
                   help="measure ceiling + loader this many times back to back, report the median (default: 1)")
    q.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                   help="instead: run the loader (the first of --backends) epoch after epoch for MINUTES, sample "
                        "its memory and report the slope (MiB/h)")
    q.add_argument("--soak-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between memory samples of --soak (default: 60)")
    q.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON here")
    q = _sub(bsubs, "train", "wtours.commands.bench_train", "training step throughput, MFU, memory and loader speed",
             "wtours bench train --stage video --config configs/video/dora_vits16.yaml")
    q.add_argument("--stage", default="video", choices=["video"], help="stage to time (video: DoRA / TimeT stage 1)")
    q.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up (default: 20)")
    q.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON here")
    _add_config_args(q)
    q = _sub(bsubs, "eval", "wtours.commands.bench_eval", "evaluation speed on a DAVIS-sized synthetic set",
             "wtours bench eval --sequences 30 --frames 70")
    q.add_argument("--sequences", type=int, default=30, help="synthetic DAVIS-sized sequences to evaluate (default: 30, as DAVIS-2017 val)")
    q.add_argument("--frames", type=int, default=70, help="frames per sequence (default: 70)")
    q.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT, random init (default: vit_small_patch16_224)")
    q.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    q.add_argument("--k", type=int, nargs="*", default=[], help="also time overclustering with these K")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="where to write / reuse the synthetic set (default: the wtours cache)")
    q.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON here")

    q = _sub(bsubs, "neco", "wtours.commands.bench_neco",
             "NeCo step time and peak memory per sorter, against the naive (dense, diffsort-style) sorter",
             "wtours bench neco --config neco/neco_vits16 --json bench-neco.json")
    q.add_argument("--sorters", nargs="+", default=["bitonic", "odd_even", "torchsort"],
                   choices=["bitonic", "odd_even", "torchsort"],
                   help="differentiable sorters to time (default: all three; torchsort only where it is built)")
    q.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    q.add_argument("--batch", type=int, default=None, help="images per step (default: the config's data.batch_size)")
    q.add_argument("--arch", default=None, help="timm ViT for the step (default: vit_small_patch16_224 on a GPU, "
                                                "vit_nano_patch8_64 on CPU)")
    q.add_argument("--no-step", action="store_true", help="only the sorter + loss part, not the whole training step")
    q.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON here")
    _add_config_args(q)
    q = _sub(bsubs, "learn", "wtours.commands.bench_learn",
             "proof that training learns: stage 1 vs random init over seeds on the synthetic tour's ground truth",
             "wtours bench learn --config video/proof --eval-config eval/proof --seeds 0 1 2 --readme README.md")
    q.add_argument("--config", default="video/proof", metavar="FILE",
                   help="stage-1 config (a path, or a name under configs/; default: video/proof)")
    q.add_argument("--eval-config", default="eval/proof", metavar="FILE",
                   help="clustering eval config (default: eval/proof)")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S",
                   help="training seeds = random-init seeds (default: 0 1 2)")
    q.add_argument("--out", default="runs/proof", metavar="DIR", help="output folder (default: runs/proof)")
    q.add_argument("--max-steps", type=int, default=None, help="shortcut for --set trainer.max_steps=N")
    q.add_argument("--instruments", choices=["all", "clustering"], default="all",
                   help="all: clustering, propagation J&F, in-context and linear probe (default); clustering: F/C/D only")
    _add_dense_config_args(q)
    q.add_argument("--calibration", metavar="FILE", default=None,
                   help="instruments.json of 'wtours bench instruments' naming the primary instrument "
                        "(default: docs/calibration/instruments.json)")
    q.add_argument("--curve", action="store_true",
                   help="a learning curve instead: snapshots at --points steps of one longer run, beside the GT-supervised "
                        "curve of the same arch and budget, every instrument (make proof-long)")
    q.add_argument("--points", type=int, default=8, help="--curve: snapshots along the run (default: 8)")
    q.add_argument("--supervised-sequences", type=int, default=16,
                   help="--curve: scenes of the GT-labelled set of the supervised baseline (default: 16)")
    q.add_argument("--device", default="auto", help="evaluation device: cuda, cpu or auto (default: auto)")
    q.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="cap each seed's training time; a seed stopped by it is exported and evaluated as it stands")
    q.add_argument("--init-from", metavar="DIR", default=None,
                   help="fine-tune: seed s starts from DIR/seed<s>/stage1/backbone.pt (an earlier bench learn --out)")
    q.add_argument("--neco", metavar="CONFIG", default=None,
                   help="with --init-from: seed s is NeCo (stage 2, this config) started from DIR/seed<s>/stage1/"
                        "backbone.pt on the synthetic tour's frames, instead of stage 1")
    q.add_argument("--neco-set", dest="neco_overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one --neco config key; repeatable")
    q.add_argument("--readme-block", metavar="NAME", default=None,
                   help="--readme: the block between <!-- NAME:begin --> and <!-- NAME:end --> (default: proof)")
    q.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one stage-1 config key (dotted, value parsed as YAML); repeatable")
    q.add_argument("--eval-set", dest="eval_overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one eval config key; repeatable")
    q.add_argument("--readme", metavar="FILE", default=None,
                   help="replace the block between <!-- proof:begin --> and <!-- proof:end --> in FILE")
    q.add_argument("--json", metavar="FILE", default=None, help="also write proof.json here")
    q.add_argument("--quiet", action="store_true", help="no progress output")

    q = _sub(bsubs, "instruments", "wtours.commands.bench_instruments",
             "calibrate the dense instruments (clustering F/C/D, propagation J&F, in-context and linear mIoU) on the "
             "synthetic sets: random init vs raw pixels vs a ground-truth oracle (vs your encoders), over seeds",
             "wtours bench instruments --seeds 0 1 2 --out runs/bench-instruments\n"
             "  wtours bench instruments --encoder dora=runs/proof/seed{seed}/stage1/backbone.pt")
    q.add_argument("--arch", default="vit_nano_patch8_64", help="timm ViT of the random row (default: "
                   "vit_nano_patch8_64, the proof's); its patch size is the pixels / oracle rows'")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S", help="default: 0 1 2")
    q.add_argument("--encoder", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="one more row (any checkpoint form; {seed} in it is replaced by the seed); repeatable")
    q.add_argument("--range-row", default=None, metavar="NAME",
                   help="row whose distance from random is the dynamic range (default: supervised, else the first "
                        "--encoder, else oracle)")
    q.add_argument("--supervised-steps", type=int, default=300, metavar="N",
                   help="the 'supervised' row: the arch trained from random:<arch>@<seed> with GT labels for N steps of "
                        "--supervised-batch frames (default: 300 x 16, the proof's budget); 0: no such row")
    q.add_argument("--supervised-batch", type=int, default=16, metavar="FRAMES",
                   help="frames per supervised step (default: 16 = the proof's 4 clips x 4 frames)")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="a 'wtours synth' folder to use (default: written into <out>/data/synth)")
    q.add_argument("--width", type=int, default=320, help="synthetic sets' frame width (default: 320, the proof's)")
    q.add_argument("--height", type=int, default=180, help="... height (default: 180)")
    q.add_argument("--sequences", type=int, default=8, help="sequences per layout (default: 8)")
    q.add_argument("--seq-frames", type=int, default=12, help="frames per sequence (default: 12)")
    q.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic sets (default: 0)")
    q.add_argument("--eval-config", default="eval/proof", metavar="FILE", help="clustering config (default: eval/proof)")
    _add_dense_config_args(q)
    q.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    q.add_argument("--out", default="runs/bench-instruments", metavar="DIR", help="output folder (default: runs/bench-instruments)")
    q.add_argument("--json", metavar="FILE", default=None, help="also write instruments.json here")
    q.add_argument("--quiet", action="store_true", help="no progress output")

    p = _sub(subs, "report", "wtours.commands.report", "(re)write a run directory's report.md from its metrics and pictures",
             "wtours report runs/venice")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of wtours pretrain / neco (a stage or a pipeline run)")
    return parser


def _end_progress_bars() -> None:
    """Close the tqdm bars an error left open, so that the error starts on its own line (an open bar's line
    has no newline yet; a closed ``leave=False`` bar erases itself)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - best effort: the error line matters more
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    group = getattr(args, "_groups", {}).get(getattr(args, "command", None))
    if group is not None and not getattr(args, f"{args.command}_command", None):  # a group without its command
        group.print_help(sys.stderr)
        print(f"\nwtours {args.command}: error: choose one of the commands above", file=sys.stderr)
        return 2
    handler = getattr(args, "_handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        module = importlib.import_module(handler)
        rc = module.cli_main(args)
        return int(rc or 0)
    except UserError as e:
        _end_progress_bars()
        print(f"wtours {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file the user named: permissions, disk full, vanished path ...
        _end_progress_bars()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"wtours {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wtours {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
