"""whelp's own training step on one GPU (issue 32): a Llama-3.2-1B-shaped student (random weights, bf16 autocast over
fp32 master weights, V = 128,256, sdpa attention) on random tokens, per configuration: tokens/s, MFU and peak memory
for (a) CE only (the floor), (b) KD from a top-64 cache, (c) KD with a live Llama-3.1-8B-shaped bf16 teacher on the
same GPU, (d) (c) with gradient checkpointing; and the fused KD loss alone (top-64 cached targets) against the bare
lm_head GEMM forward + backward at the same N, V, H.

MFU is model FLOPs over wall time over the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; ``--peak-tflops``
otherwise): the student's training 6 N + 12 L H T per token (PaLM's count, N the non-embedding parameters plus the
lm_head, T the sequence length), plus a live teacher's forward 2 N_t + 4 L_t H_t T. Each configuration times
``--steps`` optimizer steps of ``loop.optimizer_step`` after one warm-up step, in this process, the memory peak
reset before each. The cost grows linearly with tokens (and with T in the attention term); nothing is held per
token between steps. Runs from scripts/gpu_checks.sh; ``--tiny`` is the CPU smoke test of the same code.

    python bench/gpu_train.py [--steps 4] [--seq-len 4096] [--batch-size 1] [--json F] [--dry] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from capture_scale import synthetic
from publish import publish

from whelp.data import TensorBlocks
from whelp.distillation import loop, parallel, state
from whelp.distillation.cache import open_cache
from whelp.distillation.capture import Teacher, write_cache
from whelp.distillation.divergences import LossSpec, SparseTarget
from whelp.distillation.losses import kd_loss
from whelp.models import load_config
from whelp.specs import CacheSpec, DistillSpec

CONFIGS = ("ce", "kd_cache", "kd_live", "kd_live_ckpt")
PEAKS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def shapes(tiny: bool):
    """``(student config, teacher config)``: the shipped Llama-3.2-1B and 3.1-8B shapes (tiny: 2 layers, V 1,024)."""
    student, teacher = load_config("llama-3.2-1b"), load_config("llama-3.1-8b")
    for cfg in (student, teacher):
        cfg._attn_implementation = "sdpa"
        if tiny:
            for key, value in {**TINY, "vocab_size": 1024, "head_dim": 16}.items():
                setattr(cfg, key, value)
    return student, teacher


def flops_per_token(cfg, seq_len: int, train: bool) -> float:
    """6 N + 12 L H T (training) or 2 N + 4 L H T (forward), N the non-embedding parameters plus the lm_head."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    n = layers * (h * (q + 2 * kv) + q * h + 3 * h * inter) + cfg.vocab_size * h
    return (6 if train else 2) * n + (12 if train else 4) * layers * h * seq_len


def student_model(cfg, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def run(config: str, student_cfg, teacher, cache, blocks, args, device) -> dict:
    """One configuration: seconds per optimizer step (median after the warm-up step) and peak memory."""
    live = config.startswith("kd_live")
    spec = DistillSpec(
        steps=args.steps + 1,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=1e-5,
        warmup=0,
        dtype="bfloat16",
        ce_weight=1.0 if config == "ce" else 0.0,
        grad_checkpointing=config == "kd_live_ckpt",
        save_every=0,
    )
    world = parallel.World(0, 1, device, owns_group=False)
    teachers, caches = ([teacher] if live else []), ([cache] if config == "kd_cache" else [])
    weights = [1.0] * (len(teachers) + len(caches))
    lm = student_model(student_cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = state.setup(lm, teachers, caches, weights, ["t"] * len(weights), blocks, spec, world)
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(loop.optimizer_step(t, step, None)["step_s"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del t, lm
    gc.collect()  # the next configuration's student and optimizer state start from an empty GPU
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": statistics.median(times[1:]), "peak_bytes": peak}


def loss_vs_gemm(student_cfg, args, device) -> dict:
    """Median seconds of the fused KD loss (top-64 targets) forward + backward and of the bare lm_head GEMM
    forward + backward, both in bf16 at N = batch x seq tokens."""
    n, h, v = args.batch_size * args.seq_len, student_cfg.hidden_size, student_cfg.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(v, h, device=device, generator=g)).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (n, 64), device=device, generator=g)
    logp = torch.log_softmax(torch.randn(n, 64, device=device, generator=g), -1) - 0.1
    target = SparseTarget("topk", ids, 1.0, v, logp=logp, tail=1 - logp.exp().sum(-1))
    spec = LossSpec(chunk_size=1024)

    def fused():
        kd_loss(hidden, weight, [target], [1.0], spec).loss.backward()

    def gemm():
        out = hidden @ weight.T
        out.backward(torch.ones_like(out))

    return {"fused_s": timed(fused, device), "gemm_s": timed(gemm, device)}


def timed(fn, device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU when it is not an H100/H200")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU smoke test")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    student_cfg, teacher_cfg = shapes(args.tiny)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(teacher_cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
    tokens = (args.steps + 1) * args.batch_size * args.seq_len
    tokenizer, random_rows = synthetic(student_cfg.vocab_size, tokens, args.seq_len)
    blocks = TensorBlocks(random_rows.ids, source="random")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_cache(Teacher(teacher, tokenizer, "llama-3.1-8b-random"), blocks, Path(tmp) / "c", CacheSpec("topk", 64))
        results["capture_s"] = time.perf_counter() - t0
        cache = open_cache(Path(tmp) / "c", student_vocab_size=student_cfg.vocab_size, tokenizer=tokenizer)
        for config in CONFIGS:
            results["configs"][config] = run(config, student_cfg, teacher, cache, blocks, args, device)
            print(config, results["configs"][config], file=sys.stderr, flush=True)
    results["loss"] = loss_vs_gemm(student_cfg, args, device)
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in PEAKS.items() if k in results["device"]), None)
    )
    per_step = args.batch_size * args.seq_len
    train, forward = flops_per_token(student_cfg, args.seq_len, True), flops_per_token(teacher_cfg, args.seq_len, False)
    for config, row in results["configs"].items():
        row["tokens_per_s"] = per_step / row["step_s"]
        row["flops_per_token"] = train + (forward if config.startswith("kd_live") else 0)
        row["mfu"] = None if peak is None else row["tokens_per_s"] * row["flops_per_token"] / peak
    publish(report(results, args), results, args.json, args.dry)


def report(results: dict, args) -> str:
    rows = results["configs"]
    ce = rows["ce"]["tokens_per_s"]
    lines = ["| configuration | tokens/s | x CE only | MFU | peak GPU memory |", "|---|---|---|---|---|"]
    for config, row in rows.items():
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.1f} GiB"
        lines.append(f"| {config} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / ce:.2f} | {mfu} | {peak} |")
    loss = results["loss"]
    return "\n".join(
        [
            f"\n## Training step on one GPU (bench/gpu_train.py, {results['device']})\n",
            f"`python bench/gpu_train.py --steps {args.steps} --seq-len {args.seq_len} --batch-size {args.batch_size}"
            f"{' --tiny' if args.tiny else ''}`: a Llama-3.2-1B-shaped student (random, bf16 autocast), "
            "Llama-3.1-8B-shaped bf16 teacher, random tokens; median step after one warm-up; top-64 cache captured "
            f"in {results['capture_s']:.1f} s.\n",
            *lines,
            "",
            f"Fused KD loss (top-64) forward + backward {loss['fused_s'] * 1e3:.1f} ms against the bare lm_head GEMM "
            f"forward + backward {loss['gemm_s'] * 1e3:.1f} ms: {loss['fused_s'] / loss['gemm_s']:.2f}x "
            "(target <= 1.5x); KD from a cache against CE only: "
            f"{rows['kd_cache']['tokens_per_s'] / ce:.2f}x (target >= 0.85x).\n",
        ]
    )


if __name__ == "__main__":
    main()
