"""Teacher-logit cache: bytes per token on disk and read throughput vs the student's training throughput.

A random tiny Llama with the Llama-3 vocabulary (128256) plays the teacher, so the bytes are those of the real
vocabulary and the write/read code paths are whelp's own (write_cache / open_cache / TeacherCache.targets).
Read throughput = tokens of decoded targets per second for random batches of blocks; training throughput =
tokens per second of one forward + backward of the demo student (smollm2-135m, fp32 CPU), the cheapest
student the loop would feed. Appends to bench/RESULTS.md.

    python bench/cache_bytes.py [--blocks 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_model  # noqa: E402

from whelp.data import TensorBlocks  # noqa: E402
from whelp.distillation.cache import open_cache  # noqa: E402
from whelp.distillation.capture import Teacher, write_cache  # noqa: E402
from whelp.specs import CacheSpec  # noqa: E402

VOCAB = 128256


class Vocab:
    def __init__(self, n):
        self.vocab, self.bos_token_id, self.eos_token_id, self.pad_token_id = {str(i): i for i in range(n)}, 0, 1, None

    def get_vocab(self):
        return self.vocab

    def __len__(self):
        return len(self.vocab)


def read_rate(cache, batch: int, seconds: float = 5.0) -> float:
    gen, done, start = torch.Generator().manual_seed(0), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, cache.manifest["n_blocks"], (batch,), generator=gen)
        done += cache.targets(idx).ids.shape[0]
    return done / (time.perf_counter() - start)


def train_rate(seq_len: int, batch: int) -> float:
    from whelp.models import load_model

    model, _ = load_model("smollm2-135m")
    model.train()
    ids = torch.randint(0, 49152, (batch, seq_len))
    model(input_ids=ids[:, :16], labels=ids[:, :16]).loss.backward()  # warm-up
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return ids.numel() / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="blocks per read (= a training micro-batch)")
    args = p.parse_args()
    teacher = tiny_model(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    tokens = torch.randint(0, VOCAB, (args.blocks, args.seq_len), generator=torch.Generator().manual_seed(0))
    blocks = TensorBlocks(tokens, source="random")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, k, limit in (("topk", 64, 264), ("sample", 16, 48)):
            start = time.perf_counter()
            path = write_cache(
                Teacher(teacher, Vocab(VOCAB), "tiny-128256"),
                blocks,
                Path(tmp) / mode,
                CacheSpec(mode, k, 1.0, batch_size=1),
            )
            write_s = time.perf_counter() - start
            cache = open_cache(path)
            rows.append(
                {
                    "mode": mode,
                    "k": k,
                    "bytes_per_token": round(cache.manifest["bytes_per_token"], 1),
                    "target": limit,
                    "write_tok_s": round(tokens.numel() / write_s),
                    "read_tok_s": round(read_rate(cache, args.batch)),
                }
            )
    student = round(train_rate(args.seq_len, 2))
    when = f"{datetime.date.today()}, {platform.node()}, {torch.get_num_threads()} threads"
    lines = [
        f"\n## Teacher-logit cache ({when})\n",
        f"`python bench/cache_bytes.py {' '.join(sys.argv[1:])}` - V={VOCAB}, {args.blocks} blocks x "
        f"{args.seq_len} tokens; bytes/token = shard files (incl. safetensors headers and the int32 token) / "
        f"tokens. Student training throughput (smollm2-135m fwd+bwd, fp32 CPU): {student} tok/s.\n",
        "| mode | bytes/token | target | write tok/s | read tok/s | read / student train |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']}-{r['k']} | {r['bytes_per_token']} | <= {r['target']} | {r['write_tok_s']} | "
            f"{r['read_tok_s']} | {r['read_tok_s'] / student:.0f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
        f.write(text)
    print(json.dumps({"student_train_tok_s": student, "cache": rows}))


if __name__ == "__main__":
    main()
