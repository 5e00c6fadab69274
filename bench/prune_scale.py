"""Scale benchmark: stream-prune a random Llama-3.1-8B-shaped bf16 checkpoint to the llama-3.2-1b shape.

The 8B checkpoint (~16 GB of safetensors shards) is generated tensor by tensor and written shard by
shard, so the generator itself never holds more than one shard (``--shard-gb``). It is re-used when
it already exists (its index is written last, so an interrupted generation is regenerated). The
prune runs as ``whelp prune ... --stream`` in a child process; its peak resident memory is the
child's ``ru_maxrss`` from ``os.wait4`` (Linux reports KiB), and a poller samples /proc meanwhile
so the report also says when the peak happened. Target from issue 3: peak RSS <= 4 GiB.

    python bench/prune_scale.py [--ckpt /tmp/whelp-llama8b-random] [--keep]

Weights are uniform with std 0.02 (norms 1), which draws 4x faster than a normal on CPU; the values
do not matter for memory or time. The demo teacher's tokenizer is copied in so the pydoc
calibration text can be tokenized (its 49,152 ids are valid rows of the 128,256-row embedding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path("/work/shared/configs/llama-3.1-8b.json")
GIB = 1024**3


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every state-dict entry of the model ``config`` describes, from a meta-device build."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def random_tensor(name: str, shape: tuple[int, ...], generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    bound = 0.02 * math.sqrt(3.0)  # uniform(-a, a) has std a / sqrt(3)
    return torch.empty(shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=generator)


def make_checkpoint(config_path: Path, out: Path, shard_bytes: int, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random bf16 checkpoint of ``config_path``'s shape to ``out`` one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = AutoConfig.for_model(**json.loads(config_path.read_text()))
    config.dtype = torch.bfloat16
    specs = tensor_specs(config)
    groups, current, size = [], [], 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: random_tensor(name, shape, generator) for name, shape in group}
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({name: fname for name in shard})
        del shard
        print(f"  wrote {fname} ({i}/{len(groups)})", flush=True)
    config.save_pretrained(out)
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def poll_rss(pid: int, samples: list, stop: threading.Event) -> None:
    """Sample VmRSS of ``pid`` every 0.5 s into ``samples`` as (seconds, bytes)."""
    start = time.monotonic()
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((time.monotonic() - start, int(line.split()[1]) * 1024))
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.5)


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return its exit code, wall time, peak RSS (wait4 ru_maxrss) and the time of the peak."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    samples: list = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_rss, args=(proc.pid, samples, stop), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stop.set()
    poller.join()
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else float("nan")
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024,
            "peak_at_s": peak_at, "polled_peak": max((s[1] for s in samples), default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/whelp-llama8b-random"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/whelp-llama8b-pruned-1b"))
    parser.add_argument("--target", default="llama-3.2-1b")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-gb", type=float, default=4.0, help="source shard size (Meta ships ~5 GB shards)")
    parser.add_argument("--keep", action="store_true", help="keep the 16 GB source checkpoint afterwards")
    args = parser.parse_args()

    from whelp.models import registered_dir

    t0 = time.monotonic()
    make_checkpoint(CONFIG, args.ckpt, int(args.shard_gb * 1e9), registered_dir("smollm2-135m"))
    gen_s = time.monotonic() - t0
    src_bytes = sum(p.stat().st_size for p in args.ckpt.glob("*.safetensors"))
    cmd = [sys.executable, "-m", "whelp.cli", "prune", str(args.ckpt), "--target", args.target, "--out", str(args.out),
           "--force", "--stream", "--calib", "pydoc:calib", "--calib-samples", str(args.calib_samples),
           "--seq-len", str(args.seq_len)]
    result = run_measured(cmd)
    out_bytes = sum(p.stat().st_size for p in args.out.glob("*.safetensors")) if args.out.exists() else 0
    lines = [
        f"\n## Streaming prune at scale ({datetime.date.today()})\n",
        f"- command: `python bench/prune_scale.py` -> `{' '.join(['whelp'] + cmd[3:])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM, OMP threads 2, shared with other jobs",
        f"- source: random Llama-3.1-8B shape, bf16, {src_bytes / 1e9:.1f} GB in {len(list(args.ckpt.glob('*.safetensors')))} "
        f"shards (generated in {gen_s:.0f} s, or re-used); calibration {args.calib_samples} x {args.seq_len} tokens",
        f"- exit code {result['rc']}; wall time {result['wall_s']:.0f} s; output {out_bytes / 1e9:.2f} GB",
        f"- **peak RSS {result['peak_rss'] / GIB:.2f} GiB** (wait4 ru_maxrss; /proc poll peak "
        f"{result['polled_peak'] / GIB:.2f} GiB at {result['peak_at_s']:.0f} s) vs target 4 GiB; "
        f"source/peak = {src_bytes / max(result['peak_rss'], 1):.1f}x",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(text)
    shutil.rmtree(args.out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.ckpt, ignore_errors=True)
    if result["rc"] != 0:
        sys.exit(result["rc"])


if __name__ == "__main__":
    main()
