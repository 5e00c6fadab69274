"""One-shot (no training) perplexity of the demo teacher pruned to fixed shapes, per importance method.

Rows: whelp's family-table path (prune.importance.calibrate/select + prune.surgery.prune_model) with
activation (Minitron), magnitude, Taylor and random importance, and torch-pruning's own group L2
magnitude and Taylor importance through whelp's generic path (prune.generic). Columns: MLP-only 50%,
heads 1/3 (one of the 3 query heads per KV group), hidden 25%, and a combined shape with 50% of the
non-embedding parameters. Appends a markdown table to bench/RESULTS.md.

    python bench/prune_quality.py [--seq-len 256] [--calib-blocks 32] [--eval-tokens 4096]

MoE section (``--moe``; runs alone): a small Qwen3-MoE (16 experts, top-2) trained from random init for a few hundred
steps on pydoc:train with a 1024-token BPE, then pruned one-shot to 8 experts (50%) by REAP saliency, router
frequency, expert weight magnitude and random (whelp.pruning.moe); held-out perplexity on pydoc:eval.

    python bench/prune_quality.py --moe [--moe-steps 400] [--seq-len 64] [--calib-blocks 32] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from whelp.architecture import count_params, shape
from whelp.data import open_blocks, read_documents, token_stream
from whelp.evals.perplexity import perplexity
from whelp.models import load_model
from whelp.pruning.arch import family_of
from whelp.pruning.generic import apply_generic, generic_scores, select_generic
from whelp.pruning.importance import calibrate, select
from whelp.pruning.surgery import prune_model, prune_moe_model, target_config
from whelp.pruning.targets import moe_config

SHAPES = {
    "mlp 50%": {"intermediate_size": 768},
    "heads 1/3": {"num_attention_heads": 6},
    "hidden 25%": {"hidden_size": 432},
    "combined 50%": {"hidden_size": 504, "intermediate_size": 768, "num_attention_heads": 6},
}
WHELP = ("activation", "magnitude", "taylor", "random")
TORCH_PRUNING = ("magnitude", "taylor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--moe", action="store_true", help="Run the MoE expert-pruning section instead")
    parser.add_argument("--moe-steps", type=int, default=400)
    args = parser.parse_args()
    if args.moe:
        return moe_main(args)
    start = time.time()
    teacher, tokenizer = load_model(args.model)
    calib = open_blocks("pydoc:calib", tokenizer, args.seq_len).head(args.calib_blocks)
    eval_ids = token_stream(read_documents("pydoc:eval"), tokenizer, args.eval_tokens)
    source = shape(teacher.config)

    def ppl(model) -> float:
        return perplexity(model, eval_ids, seq_len=args.seq_len).ppl

    base = ppl(teacher)
    params = {
        name: count_params(type(teacher.config).from_dict({**teacher.config.to_dict(), **overrides}))[1]
        for name, overrides in SHAPES.items()
    }
    rows: dict[str, dict[str, float]] = {}
    family = family_of(teacher.config)
    for method in WHELP:
        scores = calibrate(teacher, family, calib, method)
        rows[f"whelp {method}"] = {}
        for name, overrides in SHAPES.items():
            keep = select(scores, teacher.config, {**source, **overrides})
            rows[f"whelp {method}"][name] = ppl(prune_model(teacher, keep, family, target_config(teacher.config, keep)))
            print(f"whelp {method:10s} {name:13s} {rows[f'whelp {method}'][name]:10.2f}", file=sys.stderr)
    for method in TORCH_PRUNING:
        scores = generic_scores(teacher, method, calib)
        rows[f"torch-pruning {method}"] = {}
        for name, overrides in SHAPES.items():
            keep = select_generic(scores, teacher.config, overrides)
            rows[f"torch-pruning {method}"][name] = ppl(apply_generic(copy.deepcopy(teacher), keep))
            print(f"tp {method:10s} {name:13s} {rows[f'torch-pruning {method}'][name]:10.2f}", file=sys.stderr)
    report(args, base, params, rows, time.time() - start)


def report(args, base: float, params: dict, rows: dict, seconds: float) -> None:
    header = "| importance | " + " | ".join(f"{n} ({params[n] / 1e6:.1f}M)" for n in SHAPES) + " |"
    lines = [header, "|" + "---|" * (len(SHAPES) + 1)]
    lines += [f"| {row} | " + " | ".join(f"{vals[n]:.1f}" for n in SHAPES) + " |" for row, vals in rows.items()]
    act = rows["whelp activation"]
    wins = {n: act[n] < min(rows["whelp magnitude"][n], rows["whelp random"][n]) for n in SHAPES}
    text = "\n".join(
        [
            f"\n## Pruning quality: one-shot perplexity on pydoc:eval ({datetime.date.today()})\n",
            f"`python bench/prune_quality.py --seq-len {args.seq_len} --calib-blocks {args.calib_blocks} "
            f"--eval-tokens {args.eval_tokens}` on {platform.node()} ({platform.machine()}, CPU, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads); {args.model}, fp32, no training after "
            f"pruning. Calibration: {args.calib_blocks} x {args.seq_len} tokens of pydoc:calib; eval: first "
            f"{args.eval_tokens} tokens of pydoc:eval in windows of {args.seq_len}. Teacher ppl {base:.2f}. Column "
            f"headers give non-embedding params (teacher 106.2M). Wall time {seconds / 60:.1f} min.\n",
            *lines,
            "",
            "Activation beats magnitude and random: "
            + ", ".join(f"{n}: {'yes' if w else 'NO'}" for n, w in wins.items()),
            "",
        ]
    )
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


MOE_METHODS = ("activation", "frequency", "magnitude", "random")


def _bpe(docs: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def toy_moe(train_ids: torch.Tensor, vocab: int, steps: int, seq_len: int):
    """``(model, blocks, generator)``: a Qwen3-MoE of 4 layers, hidden 128, 16 experts of FFN 128, top-2
    (renormalised), trained from random init for ``steps`` steps of 16 x ``seq_len`` tokens of ``train_ids``
    (AdamW, one-cycle lr 3e-3, load balancing 0.01); the training blocks [n, seq_len] and the batch generator after
    training (the calibration draw continues it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    blocks = train_ids[: len(train_ids) // seq_len * seq_len].view(-1, seq_len)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"moe train step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    model.config.output_router_logits = False
    return model, blocks, gen


def moe_main(args) -> None:
    """Train a small MoE briefly, prune it to half its experts per method, report held-out ppl."""
    from whelp.pruning import moe

    start = time.time()
    train_docs = read_documents("pydoc:train")
    tokenizer = _bpe(train_docs, 1024)
    train_ids = token_stream(train_docs, tokenizer)
    eval_ids = token_stream(read_documents("pydoc:eval"), tokenizer, args.eval_tokens)
    model, blocks, gen = toy_moe(train_ids, len(tokenizer), args.moe_steps, args.seq_len)
    calib = blocks[torch.randperm(len(blocks), generator=gen)[: args.calib_blocks]]

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seq_len=args.seq_len).ppl

    base = ppl(model)
    source = moe.moe_shape(model.config)
    shape = {**source, "num_experts": 8}
    rows = {}
    for method in MOE_METHODS:
        scores = moe.calibrate_experts(model, calib, method, batch_size=8)
        keep = moe.select_experts(scores, model.config, shape)
        rows[method] = ppl(prune_moe_model(model, keep, moe_config(model.config, shape)))
        print(f"moe {method:10s} {rows[method]:10.2f}", file=sys.stderr)
    total, _, active = count_params(moe_config(model.config, shape), active=True)
    lines = ["| expert score | held-out ppl at 8/16 experts |", "|---|---|"]
    lines += [f"| {'REAP (activation)' if m == 'activation' else m} | {v:.2f} |" for m, v in rows.items()]
    text = "\n".join(
        [
            f"\n## MoE expert pruning: one-shot perplexity on pydoc:eval ({datetime.date.today()})\n",
            f"`python bench/prune_quality.py --moe --moe-steps {args.moe_steps} --seq-len {args.seq_len} --calib-blocks "
            f"{args.calib_blocks} --eval-tokens {args.eval_tokens}` on {platform.node()} (CPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads). A Qwen3-MoE of 4 layers, hidden 128, 16 experts of FFN 128, top-2 "
            f"(renormalized), trained {args.moe_steps} steps of 16 x {args.seq_len} tokens of pydoc:train from random "
            f"init (1024-token BPE, load-balancing loss 0.01), teacher ppl {base:.2f}; pruned one-shot to 8 experts per "
            f"layer ({total / 1e6:.2f}M params, {active / 1e6:.2f}M active), no training after. "
            f"Calibration: {args.calib_blocks} blocks of pydoc:train. Wall time {(time.time() - start) / 60:.1f} min.\n",
            *lines,
            "",
        ]
    )
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
