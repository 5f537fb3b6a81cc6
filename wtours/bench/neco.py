"""``wtours bench neco``: step time and peak memory of NeCo per sorter, against the naive sorter.

    wtours bench neco                                   # CPU: nano ViT, batch 4, ROI 7 (49 references)
    wtours bench neco --config neco/neco_vits16 --json bench-neco.json     # GPU: ViT-S/16, batch 64

Two measurements per variant, at the same batch:

* **sorter + loss**: the soft sort and cross-entropy of ``batch x 10 pairs x n`` rows of ``n``
  similarities (``n = roi^2``), forward + backward: time, peak memory, and the bytes autograd keeps
  between forward and backward (``saved``, counted with ``saved_tensors_hooks``: exact and device
  independent);
* **training step** (unless ``--no-step``): the whole NeCo optimizer step (GPU crops, teacher,
  student, ROI alignment, references, sorter, AdamW, EMA; bf16 autocast on CUDA) on a fixed batch
  of random canvases: time and peak memory.

Variants: ``bitonic`` and ``odd_even`` with ``impl=naive`` (diffsort's dense split/combine matmuls
through autograd: the reference's memory behaviour, teacher without grad), ``autograd`` (gather layers,
sorter part only) and ``lean`` (ours: fused loss, recomputation, ``loss.chunk_rows``); ``torchsort``
(soft ranks, rank matching). ``ratio`` = lean / naive of the same network.

Peak memory: CUDA ``max_memory_allocated`` above what was allocated before; on CPU every variant
runs in a fresh process (``MALLOC_MMAP_THRESHOLD_`` lowered so freed tensors leave the process) and
the peak is the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
above the resident set before the measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

VARIANTS = {"bitonic": ("naive", "autograd", "lean"), "odd_even": ("naive", "autograd", "lean"),
            "torchsort": ("torchsort",)}


# ----------------------------------------------------------------------------- memory probes


class _CPUPeak:
    """Resident-set high-water mark above a baseline (Linux ``/proc``); ``None`` values elsewhere."""

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> "_CPUPeak":
        import gc

        gc.collect()
        self.base = self._status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.ok = self.base is not None
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = self._status("VmHWM")
        self.peak = (hwm - self.base) if self.ok and hwm is not None else None


def _saved_bytes() -> tuple[Any, list[int]]:
    """A ``saved_tensors_hooks`` context that sums the distinct storages autograd keeps."""
    import torch

    total = [0]
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total[0] += st.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


# ----------------------------------------------------------------------------- one variant


def bench_loss(sorter: str, impl: str, rows: int, n: int, steps: int, device: Any, chunk_rows: int = 8192,
               steepness: float = 100.0) -> dict[str, Any]:
    """Sorter + loss forward/backward on ``rows x n`` similarities -> ms, peak and saved bytes."""
    import torch

    from wtours.objectives.sorting import rank_matching_loss, soft_sort_cross_entropy

    g = torch.Generator().manual_seed(0)
    base = (torch.rand(rows, n, generator=g) * 2 - 1).to(device)
    xt = (base + 0.02 * torch.randn(rows, n, generator=g).to(device)).clamp(-1, 1)

    def once(count_saved: bool = False) -> tuple[float, int]:
        xs = base.clone().requires_grad_(True)
        hooks, total = _saved_bytes()
        with hooks if count_saved else _null():
            if sorter == "torchsort":
                loss = rank_matching_loss(xs, xt).mean()
            else:
                ce, _ = soft_sort_cross_entropy(xs, xt, sorter, steepness, steepness, impl=impl, chunk_rows=chunk_rows)
                loss = ce.mean()
        loss.backward()
        return float(loss.detach()), total[0]

    _, saved = once(count_saved=True)  # also the warm-up (index caches, allocator)
    ms, peak = _timed_peak(device, once, steps)
    return {"loss_ms": ms, "loss_peak_bytes": peak, "loss_saved_bytes": saved}


def bench_step(cfg: Any, arch: str, sorter: str, impl: str, batch: int, steps: int, device: Any) -> dict[str, Any]:
    """The whole NeCo optimizer step on a fixed batch of random canvases -> ms and peak bytes."""
    import torch

    from wtours.models.weights import load_init
    from wtours.stages.neco.module import NeCoModule

    cfg.loss.sorter = sorter
    if impl in ("naive", "autograd", "lean"):
        cfg.loss.impl = impl
    w = load_init(f"random:{arch}")
    module = NeCoModule(cfg, w.arch, w.state_dict, steps_per_epoch=100).to(device)
    opt = module.configure_optimizers()
    s = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8).to(device)
    sizes = torch.tensor([[s, s]] * batch).to(device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def once() -> tuple[float, int]:
        with amp:
            loss, _ = module.forward_step(images, sizes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.after_optimizer_step(0.999)
        return float(loss.detach()), 0

    once()  # warm-up (AdamW state, allocator)
    ms, peak = _timed_peak(device, once, steps)
    return {"step_ms": ms, "step_peak_bytes": peak}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _timed_peak(device: Any, fn: Any, steps: int) -> tuple[float, int | None]:
    """Mean ms of ``steps`` calls of ``fn`` and the peak memory above the memory in use before them."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        ms = (time.perf_counter() - t0) / steps * 1e3
        return ms, int(torch.cuda.max_memory_allocated(device) - base)
    with _CPUPeak() as probe:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        ms = (time.perf_counter() - t0) / steps * 1e3
    return ms, probe.peak


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one variant in this process (``spec``: sorter, impl, config, overrides, arch, batch, steps, step)."""
    import torch

    from wtours.stages.neco.run import load_neco_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = load_neco_config(spec["config"], spec.get("overrides", []))
    n = cfg.loss.roi_size ** 2
    pairs = cfg.crops.global_number * (cfg.crops.global_number + cfg.crops.local_number - 1)
    rows = spec["batch"] * pairs * n
    out: dict[str, Any] = {"sorter": spec["sorter"], "impl": spec["impl"], "rows": rows, "n": n}
    out.update(bench_loss(spec["sorter"], spec["impl"], rows, n, spec["steps"], device, cfg.loss.chunk_rows,
                          cfg.loss.steepness_student))
    if spec.get("step", True) and spec["impl"] != "autograd":
        out.update(bench_step(cfg, spec["arch"], spec["sorter"], spec["impl"], spec["batch"], spec["steps"], device))
    return out


def _child() -> None:  # pragma: no cover - runs in the subprocess
    spec = json.loads(sys.stdin.read())
    try:
        res = run_variant(spec)
    except Exception as e:  # noqa: BLE001 - reported as a row, the bench goes on
        res = {"sorter": spec["sorter"], "impl": spec["impl"], "error": f"{type(e).__name__}: {str(e)[:200]}"}
    sys.stdout.write("\n@@RESULT@@" + json.dumps(res) + "\n")


def _in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-c", "from wtours.bench.neco import _child; _child()"],
                          input=json.dumps(spec), capture_output=True, text=True, env=env)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    if not marker:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"sorter": spec["sorter"], "impl": spec["impl"], "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(marker[-1][len("@@RESULT@@"):])


# ----------------------------------------------------------------------------- the table


def _mib(b: Any) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the variants, with lean / naive ratios per network."""
    naive = {r["sorter"]: r for r in rows if r.get("impl") == "naive" and "error" not in r}

    def ratio(r: dict[str, Any], key: str) -> str:
        base = naive.get(r["sorter"], {}).get(key)
        if r.get("impl") != "lean" or not base or r.get(key) is None:
            return ""
        return f"{r[key] / base:.2f}"

    head = ("| sorter | impl | rows x n | sorter+loss ms | sorter+loss peak MiB | saved MiB | step ms | "
            "step peak MiB | peak lean/naive (sorter, step) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['sorter']} | {r['impl']} | error: {r['error']} |||||||")
            continue
        rat = ", ".join(x for x in (ratio(r, "loss_peak_bytes"), ratio(r, "step_peak_bytes")) if x)
        step_ms = f"{r['step_ms']:.0f}" if "step_ms" in r else ""
        lines.append(f"| {r['sorter']} | {r['impl']} | {r['rows']} x {r['n']} | {r['loss_ms']:.0f} | "
                     f"{_mib(r.get('loss_peak_bytes'))} | {_mib(r.get('loss_saved_bytes'))} | {step_ms} | "
                     f"{_mib(r.get('step_peak_bytes')) if 'step_peak_bytes' in r else ''} | {rat} |")
    return "\n".join(lines)
