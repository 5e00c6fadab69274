"""Scale benchmark: stream-prune a random Llama-3.1-8B-shaped bf16 checkpoint to the llama-3.2-1b shape.

Any config of the family table works (``--config``, ``--layers`` keeps the first N decoder layers of it): e.g. the
Qwen3-30B-A3B MoE shape (bench/configs/qwen3-30b-a3b.json, 128 experts of 768, top-8) is written per expert, as
Hub checkpoints are, and streamed one decoder layer at a time (whelp/pruning/moe_layout.py), so the peak grows with
one layer's experts, not with the model:

    python bench/prune_scale.py --config bench/configs/qwen3-30b-a3b.json --layers 8 \
        --target num_experts=64,num_hidden_layers=6 --ckpt /tmp/whelp-qwen3moe-random --out /tmp/whelp-qwen3moe-pruned

The 8B checkpoint (~16 GB of safetensors shards) is generated tensor by tensor and written shard by
shard, so the generator itself never holds more than one shard (``--shard-gb``). It is re-used when
it already exists (it is written to a temporary sibling and renamed, so an interrupted generation is
regenerated). The
prune runs as ``whelp prune ... --stream`` in a child process; its peak resident memory is the
child's ``ru_maxrss`` from ``os.wait4`` (Linux reports KiB), and a poller samples /proc meanwhile
so the report also says when the peak happened. Target: peak RSS <= 4 GiB.

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
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "whelp" / "configs" / "llama-3.1-8b.json"  # the shipped reference config
GIB = 1024**3


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of ``config`` stores, from a meta-device build: an MoE's fused
    experts as the per-expert tensors save_pretrained writes (moe_layout.to_disk)."""
    import torch
    from transformers import AutoModelForCausalLM

    from whelp.pruning import arch, moe_layout

    family = arch.family_of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [
        (disk, tuple(part.shape))
        for name, t in model.state_dict().items()
        for disk, part in (moe_layout.to_disk(name, t, family) if family else [(name, t)])
    ]


def layer_bytes(config, dtype_bytes: int = 4) -> int:
    """Bytes of decoder layer 0 at the compute dtype (fp32): what streaming holds resident besides activations."""
    return dtype_bytes * sum(math.prod(shape) for name, shape in tensor_specs(config) if ".layers.0." in name)


def random_tensor(name: str, shape: tuple[int, ...], generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    bound = 0.02 * math.sqrt(3.0)  # uniform(-a, a) has std a / sqrt(3)
    return torch.empty(shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=generator)


def load_shape(config_path: Path, layers: int | None):
    """The config of ``config_path`` in bf16, with its first ``layers`` decoder layers only when given."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(config_path.read_text()))
    config.dtype = torch.bfloat16
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def make_checkpoint(config, out: Path, shard_bytes: int, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random bf16 checkpoint of ``config``'s shape to ``out``, one shard resident at a time."""
    import torch

    from whelp.pruning.shards import INDEX, write_shards

    if (out / INDEX).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = ((name, random_tensor(name, shape, generator)) for name, shape in tensor_specs(config))
    write_shards(tensors, tmp, shard_bytes)
    config.save_pretrained(tmp)
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)
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


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; return its exit code, wall time, peak RSS (wait4 ru_maxrss) and the time of the peak."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **env})
    samples: list = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_rss, args=(proc.pid, samples, stop), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stop.set()
    poller.join()
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else float("nan")
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "peak_rss": usage.ru_maxrss * 1024,
        "peak_at_s": peak_at,
        "polled_peak": max((s[1] for s in samples), default=0),
    }


def check_output(out: Path) -> tuple[str, int]:
    """Parameters the output's config.json describes, checked against the tensors in its shards; shard bytes."""
    from safetensors import safe_open

    from whelp import architecture, models
    from whelp.pruning.shards import weight_map

    stored = 0
    for path in set(weight_map(out).values()):
        with safe_open(str(path), framework="pt") as f:
            stored += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    total, _ = architecture.count_params(models.load_config(str(out)))
    if stored != total:
        raise SystemExit(f"{out}: config.json describes {total:,} params but the shards hold {stored:,}")
    return f"{total:,} params (config.json = shards)", sum(p.stat().st_size for p in set(weight_map(out).values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="shape of the random source checkpoint")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers of --config")
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/whelp-llama8b-random"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/whelp-llama8b-pruned-1b"))
    parser.add_argument("--target", default="llama-3.2-1b")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-gb", type=float, default=4.0, help="source shard size (Meta ships ~5 GB shards)")
    parser.add_argument("--keep", action="store_true", help="keep the 16 GB source checkpoint afterwards")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()

    from whelp.models import registered_dir

    reused = args.ckpt.exists()
    t0 = time.monotonic()
    config = load_shape(args.config, args.layers)
    make_checkpoint(config, args.ckpt, int(args.shard_gb * 1e9), registered_dir("smollm2-135m"))
    made = "re-used from an earlier run" if reused else f"generated in {time.monotonic() - t0:.0f} s"
    src_bytes = sum(p.stat().st_size for p in args.ckpt.glob("*.safetensors"))
    cmd = [
        str(Path(sys.executable).with_name("whelp")),
        "prune",
        str(args.ckpt),
        "--target",
        args.target,
        "--out",
        str(args.out),
        "--force",
        "--stream",
        "--calib-samples",
        str(args.calib_samples),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.calib_samples),
    ]
    with tempfile.TemporaryDirectory() as home:  # a fresh score cache: the run calibrates
        result = run_measured(cmd, {"WHELP_HOME": home})
    report = json.loads((args.out / "prune_report.json").read_text()) if result["rc"] == 0 else {"timings": {}}
    params, out_bytes = check_output(args.out) if result["rc"] == 0 else ("no output", 0)
    lines = [
        f"\n## Streaming prune at scale ({datetime.date.today()})\n",
        f"- command: `python bench/prune_scale.py` -> `{' '.join(['whelp'] + cmd[1:])}` (child process; "
        "activation importance, fp32 compute)",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM, OMP threads 2, "
        "shared with other jobs",
        f"- source: random {args.config.stem} shape"
        f"{f' (its first {args.layers} layers)' if args.layers else ''}, bf16, {src_bytes / 1e9:.1f} GB in "
        f"{len(list(args.ckpt.glob('*.safetensors')))} shards ({made}); calibration {args.calib_samples} x "
        f"{args.seq_len} tokens",
        f"- exit code {result['rc']}; wall time {result['wall_s']:.0f} s (prune_report.json timings: "
        f"{', '.join(f'{k} {v:.0f} s' for k, v in report['timings'].items())}); "
        f"output {out_bytes / 1e9:.2f} GB, {params}",
        f"- **peak RSS {result['peak_rss'] / GIB:.2f} GiB** (wait4 ru_maxrss; /proc poll peak "
        f"{result['polled_peak'] / GIB:.2f} GiB at {result['peak_at_s']:.0f} s) vs target 4 GiB; "
        f"source/peak = {src_bytes / max(result['peak_rss'], 1):.1f}x; one decoder layer at the fp32 compute dtype is "
        f"{layer_bytes(config) / GIB:.2f} GiB (peak ~ a layer + activations + a shard: it grows with the layer, not "
        "with the number of layers)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)
    shutil.rmtree(args.out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.ckpt, ignore_errors=True)
    if result["rc"] != 0:
        sys.exit(result["rc"])


if __name__ == "__main__":
    main()
