"""KD loss forward + backward: whelp's fused chunked loss vs naive full logits vs Liger-Kernel's chunked_loss.

Loss: forward KL (Liger: LigerFusedLinearJSDLoss with beta=0, which is forward KL, no hard loss, compiled=False;
it takes one teacher, so two teachers call it twice). Every configuration runs in its own process; its peak
memory is the growth of the peak RSS (VmHWM, reset after warm-up) over the RSS once the inputs exist (so W.grad
and all loss temporaries count, the inputs do not). One timed run per configuration after a short warm-up on 64 tokens.

    python bench/kd_loss.py                          # Llama-3 1B student, 8B teacher (V=128256, Hs=2048, Ht=4096)
    python bench/kd_loss.py --hs 256 --ht 512        # same V and N, 8x fewer matmul FLOPs
    python bench/kd_loss.py --softcap 30             # the student's logits soft-capped (Gemma 2/3's transform path)

The default chunk (128) is the setting that keeps the fused peak within 1/8 of naive's at V = 128,256 (RESULTS.md).
With ``--softcap CAP`` the student's logits are ``CAP * tanh(z / CAP)`` (``whelp.architecture.logit_transform`` of a
config with ``final_logit_softcapping=CAP``) in naive and fused; Liger has no such option and is not run.

Appends a table to bench/RESULTS.md and ends by printing one JSON line for the largest N with one teacher.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

IMPLS = ("naive", "fused", "liger")


def softcap(args):
    """The student's logit transform: Gemma 2/3's final soft-capping at ``--softcap``, or None."""
    from whelp.architecture import logit_transform

    if not args.softcap:
        return None
    text = SimpleNamespace(final_logit_softcapping=args.softcap)
    return logit_transform(SimpleNamespace(get_text_config=lambda: text))


def naive(h, w, teachers, args):
    transform = softcap(args)
    z = h @ w.T
    s = F.log_softmax(z if transform is None else transform(z), -1)
    return sum(F.kl_div(s, F.log_softmax(th @ tw.T, -1), log_target=True, reduction="sum") for th, tw in teachers)


def fused(h, w, teachers, args):
    from whelp.distillation.losses import LiveTarget, LossSpec, kd_loss

    targets = [LiveTarget(th, tw) for th, tw in teachers]
    spec = LossSpec(chunk_size=args.chunk)
    return kd_loss(h, w, targets, [1.0] * len(targets), spec, transform=softcap(args)).loss


def liger(h, w, teachers, args):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    if args.softcap:
        raise SystemExit("liger: no logit soft-capping")
    chunk = args.chunk
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False, chunk_size=chunk)
    labels = torch.zeros(len(h), dtype=torch.long)
    return sum(fn(h, w, th, tw, labels) * len(h) for th, tw in teachers)  # Liger averages over tokens


def status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS, so earlier peaks (input creation, warm-up) do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(impl: str, n: int, n_teachers: int, args) -> dict:
    """Run one configuration in this process: seconds and peak MB over the inputs."""
    torch.manual_seed(0)
    fn = {"naive": naive, "fused": fused, "liger": liger}[impl]
    h = torch.randn(n, args.hs).requires_grad_()
    w = (torch.randn(args.vocab, args.hs) / args.hs**0.5).requires_grad_()
    teachers = [(torch.randn(n, args.ht), torch.randn(args.vocab, args.ht) / args.ht**0.5) for _ in range(n_teachers)]
    fn(h[:64], w, [(th[:64], tw) for th, tw in teachers], args).backward()  # warm-up, allocates w.grad
    w.grad, h.grad = None, None
    reset_peak()
    base = status_mb("VmRSS")
    start = time.perf_counter()
    loss = fn(h, w, teachers, args)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM") - base
    return {
        "impl": impl,
        "n": n,
        "teachers": n_teachers,
        "s": round(seconds, 2),
        "peak_mb": round(peak),
        "loss_per_token": float(loss.detach()) / n,
    }


def run_child(impl, n, n_teachers, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{impl},{n},{n_teachers}",
        "--vocab",
        str(args.vocab),
        "--hs",
        str(args.hs),
        "--ht",
        str(args.ht),
        "--chunk",
        str(args.chunk),
        "--softcap",
        str(args.softcap),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"impl": impl, "n": n, "teachers": n_teachers, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(n: int, t: int, by: dict) -> str:
    """One table row from ``by``, the results of one (N, teachers) group by implementation."""

    def cell(impl, key):
        return str(by[impl].get(key, by[impl].get("error", "-"))) if impl in by else "-"

    def ratio(key):
        if key in by.get("fused", {}) and key in by.get("naive", {}):
            return f"{by['fused'][key] / by['naive'][key]:.2f}"
        return "-"

    return (
        f"| {n} | {t} | {cell('naive', 's')} | {cell('fused', 's')} | {cell('liger', 's')} | "
        f"{cell('naive', 'peak_mb')} | {cell('fused', 'peak_mb')} | {cell('liger', 'peak_mb')} | "
        f"{ratio('s')} | {ratio('peak_mb')} |"
    )


def report(rows: list[dict], args) -> str:
    lines = [
        f"\n## KD loss forward+backward ({datetime.date.today()}, {platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})\n",
        f"`python bench/kd_loss.py {' '.join(sys.argv[1:])}` - V={args.vocab}, Hs={args.hs}, Ht={args.ht}, "
        f"chunk={args.chunk}, forward KL, fp32, CPU"
        + (f", student logits soft-capped at {args.softcap}" if args.softcap else "")
        + ". Peak = VmHWM growth over the inputs.\n",
        "| N | teachers | naive s | fused s | liger s | naive MB | fused MB | liger MB | fused/naive time "
        "| fused/naive mem |",
        "|" + "---|" * 10,
    ]
    for n, t in sorted({(r["n"], r["teachers"]) for r in rows}):
        by = {r["impl"]: r for r in rows if (r["n"], r["teachers"]) == (n, t)}
        lines.append(_row(n, t, by))
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--teachers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hs", type=int, default=2048)
    p.add_argument("--ht", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--softcap", type=float, default=0.0, help="soft-cap the student's logits at CAP (0: none)")
    p.add_argument("--skip", nargs="*", default=[], help="configurations IMPL,N,TEACHERS not to run (e.g. too big)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.one:
        impl, n, t = args.one.split(",")
        print(json.dumps(one(impl, int(n), int(t), args)))
        return
    rows = []
    for n in args.n:
        for t in args.teachers:
            for impl in args.impls:
                if f"{impl},{n},{t}" in args.skip:
                    rows.append({"impl": impl, "n": n, "teachers": t, "error": "skipped"})
                    continue
                rows.append(run_child(impl, n, t, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = report(rows, args)
    print(text)
    if not args.no_write:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(text)
    n = max(args.n)
    by = {r["impl"]: r for r in rows if r["n"] == n and r["teachers"] == 1}

    def get(impl, key):
        return by.get(impl, {}).get(key)

    print(
        json.dumps(
            {
                "n": n,
                "naive_peak_mb": get("naive", "peak_mb"),
                "fused_peak_mb": get("fused", "peak_mb"),
                "liger_peak_mb": get("liger", "peak_mb"),
                "naive_s": get("naive", "s"),
                "fused_s": get("fused", "s"),
                "liger_s": get("liger", "s"),
            }
        )
    )


if __name__ == "__main__":
    main()
