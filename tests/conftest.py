"""Shared fixtures and helpers: tiny in-process models (seconds on CPU), the real demo teacher (cached), and
the two ways of running the command line (in this process, or as a real ``python -m whelp`` process)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DEMO_FIXTURES = ("demo_dir", "demo", "demo_tokenizer")


def pytest_collection_modifyitems(config, items):
    """Keep the ``demo`` marker honest: a test that asks for the demo teacher through a fixture must carry it
    (``-m "not demo"`` promises no download). Tests that reach it by name ("smollm2-135m", or a recipe whose
    teacher it is) are marked by hand."""
    unmarked = [
        item.nodeid
        for item in items
        if set(DEMO_FIXTURES) & set(item.fixturenames) and item.get_closest_marker("demo") is None
    ]
    if unmarked:
        raise pytest.UsageError("these tests use the demo teacher but lack @pytest.mark.demo: " + ", ".join(unmarked))


def tiny_config(family: str = "llama", **overrides):
    """A tiny random decoder config: hidden 64, 2 layers, 4 query heads in 2 KV groups, head_dim 16."""
    from transformers import AutoConfig

    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if family == "phi3":  # its default pad_token_id (32000) is outside the tiny vocabulary
        base["pad_token_id"] = 0
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in fp32 eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def save_tiny(path, tokenizer=None, family: str = "llama", seed: int = 0, **overrides):
    """``tiny_model`` (over ``tokenizer``'s vocabulary when one is given) saved with ``whelp.models.save_model``
    to ``path``; returns the in-memory model."""
    from whelp.models import save_model

    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
    model = tiny_model(family, seed=seed, **overrides)
    save_model(model, tokenizer, path)
    return model


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on the pydoc train split (about a second), with an EOS; cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from whelp.data import read_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(read_documents("pydoc:train")[:80], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` [batch, seq], without autograd."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def naive_multiple_choice(model, tokenizer, item: dict, max_length: int) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of one multiple-choice ``item`` (``context``, ``choices``, ``gold``) the way lm-eval
    defines them, from the model's logits directly: each choice is scored as the summed log-probability of the
    tokens of ``context + " " + choice`` after those of ``context`` (trailing spaces of the context moved to the
    continuation, the sequence cut to its last ``max_length + 1`` tokens); ``acc``: the best choice is the gold one,
    ``acc_norm``: the same over log-probability per character of the choice."""
    context = item["context"].rstrip()
    spaces = item["context"][len(context) :]
    scores = []
    for choice in item["choices"]:
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(context + spaces + " " + choice)[len(context_ids) :]
        ids = torch.tensor((context_ids + continuation_ids)[-(max_length + 1) :])
        logp = torch.log_softmax(logits(model, ids[None, :-1])[0].double(), -1)
        picked = logp[-len(continuation_ids) :].gather(1, ids[-len(continuation_ids) :, None])
        scores.append(float(picked.sum()))
    best = max(range(len(scores)), key=scores.__getitem__)
    best_norm = max(range(len(scores)), key=lambda i: scores[i] / len(item["choices"][i]))
    return {"acc": float(best == item["gold"]), "acc_norm": float(best_norm == item["gold"])}


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """``whelp ARGS`` in this process, the one way tests drive the command line: the exit code and what it printed
    on stdout and on stderr, kept apart.

    It runs inside ``typer.testing.CliRunner``'s isolation (stdin, stdout and stderr swapped for buffers, colour
    stripped) but calls ``whelp.cli.app`` itself rather than ``CliRunner.invoke``, which calls the click command
    underneath and so bypasses the app: here a WhelpError comes out as it does for a user, one ``error: ...`` line
    on stderr and exit status 2. Any other exception propagates with its traceback, as a bug should."""
    from typer.testing import CliRunner

    from whelp.cli import app

    sigterm = signal.getsignal(signal.SIGTERM)  # the app installs its own SIGTERM handler
    code = 0
    try:
        with CliRunner().isolation() as (out, err, _):
            try:
                app(args=list(args), prog_name="whelp")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return CliResult(code, stdout, stderr)


def whelp_env(**extra: str) -> dict[str, str]:
    """This process's environment (as it is now), offline, plus ``extra``: for real whelp processes."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def whelp_process(*args: str, **popen) -> subprocess.Popen:
    """``whelp ARGS`` as a real ``python -m whelp`` process (offline, this process's environment as it is now), for
    the few tests where the process boundary is the point: signals and kill-resume, torchrun, start-up, the output
    of a fresh interpreter. ``popen``: ``subprocess.Popen``'s own options (stdout, stderr, text, env additions as
    ``env``)."""
    return subprocess.Popen([sys.executable, "-m", "whelp", *args], env=whelp_env(**popen.pop("env", {})), **popen)


def run_whelp(*args: str) -> CliResult:
    """``whelp ARGS`` as a real process run to its end (``whelp_process``), its output captured as text."""
    proc = whelp_process(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    return CliResult(proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def demo_dir():
    """Directory of the converted demo teacher (fetched and converted once per $WHELP_HOME)."""
    from whelp.models import registered_dir

    return registered_dir("smollm2-135m")


@pytest.fixture(scope="session")
def demo(demo_dir):
    """(model, tokenizer) of the demo teacher, fp32 on CPU."""
    from whelp.models import load_model

    return load_model(str(demo_dir))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_dir))
