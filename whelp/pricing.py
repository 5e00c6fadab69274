"""What a planned recipe costs on N GPUs of one kind: FLOPs, GPU-hours, wall-clock hours, memory per GPU, disk.

Compute (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1): a forward costs 2 N FLOPs
per token and a training step (forward + backward) 6 N, N the total parameters including the embeddings.
GPU-hours = FLOPs / (peak FLOP/s x MFU) / 3600, whatever the number of GPUs. MFU is model FLOPs utilization as
PaLM defines it (Chowdhery et al. 2022, appendix B): it counts the model's FLOPs, not the hardware's, so
recomputation (``grad_checkpointing``) lowers the MFU a run reaches rather than adding FLOPs here. Wall-clock hours
= GPU-hours / the GPUs a stage runs on: all N for capture and distill (data-parallel under torchrun), one for
generate (one process). Prune runs in one host process on the CPU: its hours are shown at one GPU's rate.

Memory per GPU is a sum of the parts ``whelp.footprint`` lists for a stage, each ``replicated``, ``sharded``
(FSDP2: / N), ``gathered`` (held only when N > 1) or ``split`` (tensor parallel). GPU memory is the nominal
capacity (80 GB = 80e9 bytes), a few GB below what the device reports, which leaves room for the CUDA context, NCCL
buffers and allocator fragmentation.

FLOPs, time and disk are priced here from one GPU table and one MFU; what a stage holds is ``whelp.footprint``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from whelp import output
from whelp.errors import WhelpError

MFU = 0.4


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (no 2:4 sparsity)
    memory_bytes: int | None  # None: a GPU given by its FLOP/s alone, whose memory is unknown (no fit check)


# NVIDIA datasheets: H100 SXM5 989.4 TFLOP/s dense bf16, 80 GB; A100 SXM4 312 TFLOP/s, 80 GB; H200 SXM: H100's
# compute with 141 GB of HBM3e.
GPUS = {
    "h100": Gpu("h100", 989e12, 80 * 10**9),
    "a100": Gpu("a100", 312e12, 80 * 10**9),
    "h200": Gpu("h200", 989e12, 141 * 10**9),
}


def parse_gpu(text: str) -> Gpu:
    """A preset name (h100, a100, h200) or a peak FLOP/s number such as ``989e12`` (its memory then unknown)."""
    if text.lower() in GPUS:
        return GPUS[text.lower()]
    try:
        peak = float(text)
    except ValueError:
        peak = math.nan
    if not math.isfinite(peak) or peak < 1e9:
        raise WhelpError(
            f"--gpu {text!r} is not valid; choose {', '.join(GPUS)}, or a GPU's peak dense bf16 FLOP/s "
            "as a number of at least 1e9 (e.g. 989e12, not 989)"
        )
    return Gpu(f"{peak:.4g} FLOP/s", peak, None)


def check_pricing(gpus: int, mfu: float) -> None:
    if gpus < 1:
        raise WhelpError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise WhelpError(f"--mfu is the model FLOPs utilization, in (0, 1] (e.g. 0.4 for 40%); got {mfu}")


def memory_per_gpu(parts: list[dict], gpus: int) -> int:
    """Bytes on each of ``gpus`` GPUs: replicated parts whole, sharded parts / gpus (rounded up), gathered parts
    only when sharding happens (gpus > 1), split parts / their tensor-parallel ways."""
    share = {
        "replicated": lambda p: p["bytes"],
        "sharded": lambda p: -(-p["bytes"] // gpus),
        "gathered": lambda p: p["bytes"] if gpus > 1 else 0,
        "split": lambda p: -(-p["bytes"] // p["ways"]),
    }
    return sum(share[p["per_gpu"]](p) for p in parts)


def price(planned: dict, gpu: Gpu, gpus: int, mfu: float = MFU) -> dict:
    """``planned`` (whelp.plan.plan_recipe) with each stage's gpu_hours, wall_hours, its parts' per-GPU bytes,
    memory_per_gpu_bytes and fits; the totals; and a warning for every stage that does not fit one GPU."""
    check_pricing(gpus, mfu)
    stages, warnings = [], []
    for stage in planned["stages"]:
        n = gpus if stage["parallel"] else 1
        memory = memory_per_gpu(stage["memory"], n)
        fits = None if gpu.memory_bytes is None or stage["device"] == "cpu" else memory <= gpu.memory_bytes
        hours = stage["flops"] / (gpu.peak_flops * mfu) / 3600
        stages.append(
            {
                **stage,
                "gpus": n,
                "gpu_hours": hours,
                "wall_hours": hours / n,
                "memory": [{**p, "per_gpu_bytes": memory_per_gpu([p], n)} for p in stage["memory"]],
                "memory_per_gpu_bytes": memory,
                "fits": fits,
            }
        )
        if fits is False:
            warnings.append(_misfit(stages[-1], gpu))
        if stage.get("tp_size", 1) > 1 and n % stage["tp_size"]:
            t = stage["tp_size"]
            warnings.append(
                f"{stage['stage']}: tp_size {t} needs a multiple of {t} GPUs, not {n} (the run refuses "
                f"it); price it with --gpus {t} or another multiple of {t}"
            )
    return {
        **planned,
        "stages": stages,
        "warnings": warnings,
        "totals": _totals(stages),
        "pricing": {
            "gpu": gpu.name,
            "peak_flops": gpu.peak_flops,
            "gpu_memory_bytes": gpu.memory_bytes,
            "gpus": gpus,
            "mfu": mfu,
        },
    }


def _totals(stages: list[dict]) -> dict:
    """Sums over the stages (they run one after another); each token store counted once, at its largest."""
    stores: dict[str, int] = {}
    for s in stages:
        if "store" in s["disk_bytes"]:
            source = s["data"]["source"] if "data" in s else s["name"]  # a generate stage's: its source name
            stores[source] = max(stores.get(source, 0), s["disk_bytes"]["store"])
    disk = sum(stores.values()) + sum(b for s in stages for k, b in s["disk_bytes"].items() if k != "store")
    return {
        "flops": sum(s["flops"] for s in stages),
        "gpu_hours": sum(s["gpu_hours"] for s in stages),
        "wall_hours": sum(s["wall_hours"] for s in stages),
        "memory_per_gpu_bytes": max((s["memory_per_gpu_bytes"] for s in stages if s["device"] == "gpu"), default=None),
        "disk_bytes": disk,
    }


def _misfit(stage: dict, gpu: Gpu) -> str:
    """The warning of a stage over one GPU's memory: what it needs, who is too big, and the fixes."""
    need, have = stage["memory_per_gpu_bytes"] / 1e9, gpu.memory_bytes / 1e9
    head = f"{stage['stage']} needs {need:,.1f} GB per GPU, more than one {gpu.name}'s {have:,.0f} GB"
    if stage["kind"] == "distill":
        whole = [p for p in stage["memory"] if p.get("teacher") and p["per_gpu"] == "replicated"]
        if whole:
            names = ", ".join(f"{p['teacher']} ({p['bytes'] / 1e9:,.1f} GB)" for p in whole)
            return (
                f"{stage['stage']}: the live teacher{'s' * (len(whole) > 1)} {names} will not fit beside the "
                f"student on one {gpu.name} ({have:,.0f} GB; the step needs {need:,.1f} GB per GPU): cache it "
                "(move it to the step's caches:) or set shard_teachers: true"
            )
        return (
            f"{head}: use more GPUs (--gpus), a lower batch_size (raise grad_accum to keep the step) or "
            "grad_checkpointing: true"
        )
    if stage["kind"] == "capture":
        teacher = [p for p in stage["memory"] if p.get("teacher")]
        weights = sum(p["bytes"] for p in teacher)  # whole, whatever tp_size the stage has now
        rest = stage["memory_per_gpu_bytes"] - sum(p["per_gpu_bytes"] for p in teacher)
        split = 2 ** math.ceil(math.log2(weights / (gpu.memory_bytes - rest))) if rest < gpu.memory_bytes else None
        how = (
            f"split it tensor-parallel over at least {split} GPUs (tp_size: {split} on the recipe's cache entry, "
            f"or whelp cache-logits --tp-size {split}, under torchrun)"
            if split
            else "lower its batch"
        )
        return (
            f"{head}: the teacher {stage['teacher']} alone is {weights / 1e9:,.1f} GB; {how}, or use GPUs with "
            "more memory"
        )
    return f"{head}: lower its batch_size, or use GPUs with more memory"


def describe_cost(stage: dict) -> list[tuple[str, str]]:
    """A priced stage as ``(key, value)`` lines: FLOPs, GPU time, wall time on its GPUs, memory per GPU, disk."""
    host = stage["device"] == "cpu"
    where = " (CPU stage, at one GPU's rate)" if host else f" on {stage['gpus']} GPU{'s' * (stage['gpus'] > 1)}"
    memory = (
        output.size(stage["memory_per_gpu_bytes"])
        + (" host" if host else " per GPU")
        + (" (does not fit)" if stage["fits"] is False else "")
    )
    disk = ", ".join(f"{k} {output.size(b)}" for k, b in stage["disk_bytes"].items() if b)
    return [
        ("FLOPs", f"{stage['flops']:.3g}"),
        ("GPU time", output.duration(stage["gpu_hours"])),
        ("wall time", output.duration(stage["wall_hours"]) + where),
        ("memory", memory),
        ("disk", disk or "0 B"),
    ]


def describe_total(totals: dict) -> list[tuple[str, str]]:
    peak = totals["memory_per_gpu_bytes"]
    return [
        ("FLOPs", f"{totals['flops']:.3g}"),
        ("GPU time", output.duration(totals["gpu_hours"])),
        ("wall time", output.duration(totals["wall_hours"])),
        ("memory", "-" if peak is None else f"{output.size(peak)} per GPU at the peak"),
        ("disk", output.size(totals["disk_bytes"])),
    ]
