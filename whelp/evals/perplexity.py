"""Token-level perplexity over fixed windows or a sliding stride, and bits per byte.

The sliding scheme is the one of the Hugging Face perplexity guide: windows of ``seq_len`` tokens
start every ``stride`` tokens and each scores only the tokens the previous window did not, so every
token after the first is predicted exactly once, with up to ``seq_len - stride`` tokens of context
carried over. ``stride = seq_len`` (the default) is plain non-overlapping windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood, nats per scored token
    tokens: int  # number of scored tokens
    bytes: int  # UTF-8 bytes of the text of the scored tokens (special tokens such as EOS count 0 bytes)
    ppl: float  # exp(nll)
    bits_per_byte: float  # total NLL in bits / bytes: comparable across tokenizers


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window over a stream of ``n_tokens``; scored are the last ``n_scored``."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of each token ``targets`` [B, L] under ``logits`` [B, L, V]: [B, L]. Taken over rows of the
    vocabulary as they lie in memory: cross-entropy over ``logits.transpose(1, 2)``, the [B, V, L] layout it is
    usually given, strides across the vocabulary, took 4.7x as long on the demo's [4, 256, 49152] (CPU) and was
    17x further from a float64 log-softmax (1.6e-4 against 9e-6 nats a token, bench/RESULTS.md)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, n_scored: int) -> torch.Tensor:
    """Summed NLL (nats, fp32) of the last ``n_scored`` tokens of each row of ``ids`` [B, L]: shape [B]."""
    logits = model(input_ids=ids.to(model.device)).logits[:, -n_scored - 1 : -1].float()
    return token_nll(logits, ids[:, -n_scored:].to(logits.device)).sum(dim=1).cpu()


def perplexity(
    model,
    ids: torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 4,
    tokenizer=None,
    progress=None,
) -> Perplexity:
    """Perplexity of ``model`` on the token stream ``ids`` [T]. ``tokenizer`` is needed for bits per byte.

    Windows of equal length and score count are batched ``batch_size`` at a time.
    ``progress(n)`` is called with the number of windows done, if given.
    """
    plan = windows(len(ids), seq_len, stride or seq_len)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    model.eval()
    for start in range(0, len(plan), batch_size):
        group = plan[start : start + batch_size]
        shapes = {(end - begin, n) for begin, end, n in group}
        for length, n_scored in sorted(shapes):
            rows = [ids[b:e] for b, e, n in group if (e - b, n) == (length, n_scored)]
            total_nll += float(window_nll(model, torch.stack(rows), n_scored).sum())
            total_tokens += n_scored * len(rows)
            if tokenizer is not None:
                total_bytes += sum(
                    len(tokenizer.decode(r[-n_scored:], skip_special_tokens=True).encode("utf-8")) for r in rows
                )
        if progress is not None:
            progress(len(group))
    nll = total_nll / total_tokens
    bpb = total_nll / math.log(2) / total_bytes if total_bytes else float("nan")
    return Perplexity(nll=nll, tokens=total_tokens, bytes=total_bytes, ppl=math.exp(nll), bits_per_byte=bpb)
