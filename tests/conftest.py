"""Shared fixtures and helpers: tiny in-process models (seconds on CPU), the real demo teacher (cached), and
the two ways of running the command line (in this process, or as a real ``python -m whelp`` process)."""

from __future__ import annotations

import copy
import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from whelp.distillation.losses import LOSSES, LiveTarget, LossSpec
from whelp.specs import DistillSpec

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


# tiny_config overrides of the MoE families: 8 experts, top-2; Qwen2-MoE with a shared expert and one dense layer,
# Qwen3-MoE with renormalized top-k
MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
}


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


def bpe_tokenizer(specials: list[str], **tokens):
    """A 512-token byte-level BPE trained on the pydoc train split (about a second) with ``specials`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from whelp.data import read_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(read_documents("pydoc:train")[:80], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """``bpe_tokenizer`` with an EOS; cached."""
    return bpe_tokenizer(["<eos>"], eos_token="<eos>")


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


# ---- the distillation loop on tiny models (test_loop, test_onpolicy, test_loop_dist, test_cuda, ...)

LOOP_SPEC = DistillSpec(
    data="pydoc:train",
    steps=6,
    batch_size=2,
    grad_accum=2,
    seq_len=32,
    lr=3e-3,
    warmup=2,
    max_grad_norm=1.0,
    eval_data="pydoc:eval",
    eval_tokens=256,
    seed=0,
    dtype="float32",
    save_every=2,
    keep_last=2,
    chunk_size=16,
)


def make_models(root: Path) -> tuple[str, str, str]:
    """Saved tiny (teacher, second teacher, student) directories sharing one tokenizer and vocab 512.

    Teacher lm_heads are scaled up so their next-token distributions are far from uniform (a random
    init with std 0.02 is nearly uniform, which would make the KL trivially small)."""
    tokenizer = tiny_tokenizer()
    dirs = []
    for name, seed, scale, overrides in [
        ("teacher", 1, 40.0, {}),
        ("teacher2", 3, 40.0, {}),
        ("student", 2, 1.0, dict(intermediate_size=64, num_hidden_layers=1)),
    ]:
        model = tiny_model(seed=seed, **overrides)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return tuple(dirs)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """``make_models`` once per test module."""
    return make_models(tmp_path_factory.mktemp("models"))


class Crash(Exception):
    pass


def killed_and_resumed(monkeypatch, run, ref, crashed, call: int) -> None:
    """``run(ref)`` uninterrupted; ``run(crashed)`` killed at the ``call``-th micro-batch, then run again to its end:
    the resumed weights equal the uninterrupted ones (1e-6)."""
    run(ref)
    fail_at(monkeypatch, call, lambda result: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        run(crashed)
    monkeypatch.undo()
    run(crashed)
    assert max_diff(load_weights(crashed), load_weights(ref)) <= 1e-6


def fail_at(monkeypatch, call: int, action):
    """Make the ``call``-th kd_loss call (1-based, one per micro-batch) run ``action(result)``."""
    from whelp.distillation import losses

    real, count = losses.kd_loss, {"n": 0}

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        count["n"] += 1
        return action(result) if count["n"] == call else result

    monkeypatch.setattr(losses, "kd_loss", wrapped)


# ---- the fused KD losses against a naive fp32 reference (test_losses, test_cuda, test_onpolicy)

KD_N, KD_HS, KD_HT, KD_V = 21, 16, 24, 300  # tokens, student and teacher hidden sizes, vocabulary


def naive_divergence(name: str, s: torch.Tensor, t: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-token divergence from full log-probs [n, V] with torch.nn.functional: [n]."""

    def kl(logp, logq):  # KL(p || q)
        return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)

    if name == "forward_kl":
        return kl(t, s)
    if name == "reverse_kl":
        return kl(s, t)
    p, q = t.exp(), s.exp()
    if name == "jsd":
        m = (spec.beta * p + (1 - spec.beta) * q).log()
        return spec.beta * kl(t, m) + (1 - spec.beta) * kl(s, m)
    if name == "skew_kl":
        return kl(t, (spec.alpha * p + (1 - spec.alpha) * q).log())
    return 0.5 * (p - q).abs().sum(-1)


def naive_kd_loss(h, w, teacher_logits, weights, spec, labels=None, mask=None, transform=None):
    """The full-logits reference: loss SUM over unmasked tokens, as kd_loss defines it (``transform``: the
    student's logit transform, applied to ``h @ w.T``)."""
    z = h.float() @ w.float().T
    z = z if transform is None else transform(z)
    mask = torch.ones(len(h), dtype=torch.bool) if mask is None else mask
    T = spec.temperature
    s = F.log_softmax(z / T, -1)
    kd = sum(
        wt * naive_divergence(spec.name, s, F.log_softmax(tz.float() / T, -1), spec)[mask].sum()
        for wt, tz in zip(weights, teacher_logits)
    )
    loss = (1 - spec.ce_weight) * (T * T if spec.t2_scale else 1) * kd
    if spec.ce_weight:
        loss = loss + spec.ce_weight * F.cross_entropy(z[mask], labels[mask], ignore_index=-100, reduction="sum")
    return loss


def kd_inputs(seed=0, dtype=torch.float32, n=KD_N, n_teachers=2):
    """Random (student hidden, student lm_head, live teachers, labels with one -100, mask) for the loss tests."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, KD_HS, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(KD_V, KD_HS, generator=g) / 2).to(dtype).requires_grad_()
    teachers = [
        LiveTarget(torch.randn(n, KD_HT, generator=g).to(dtype), (torch.randn(KD_V, KD_HT, generator=g) / 2).to(dtype))
        for _ in range(n_teachers)
    ]
    labels = torch.randint(0, KD_V, (n,), generator=g)
    labels[3] = -100
    mask = torch.rand(n, generator=g) > 0.25
    return h, w, teachers, labels, mask


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


KD_SPECS = [LossSpec(name=name, chunk_size=5) for name in LOSSES] + [
    LossSpec(name="forward_kl", temperature=2.0, t2_scale=True, ce_weight=0.3, chunk_size=8),
    LossSpec(name="jsd", beta=0.9, temperature=0.7, chunk_size=4),
    LossSpec(name="skew_kl", alpha=0.3, ce_weight=0.5, chunk_size=64),
    LossSpec(name="reverse_kl", temperature=1.5, t2_scale=True, chunk_size=1),
]


# ---- pruning the family rows (test_prune_families, test_families, test_prune_moe)

TOKENS = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
AXIS_TARGETS = {
    "num_hidden_layers": "num_hidden_layers=2",
    "hidden_size": "hidden_size=48",
    "intermediate_size": "intermediate_size=96",
    "num_attention_heads": "num_attention_heads=2",
    "num_key_value_heads": "num_key_value_heads=1,num_attention_heads=2",
    "head_dim": "head_dim=8",
}
ALL_AXES = (
    "num_hidden_layers=2,hidden_size=48,intermediate_size=96,num_attention_heads=1,num_key_value_heads=1,"
    "head_dim=8,tie_word_embeddings=true"
)


def with_keep(model, **axes):
    """The identity Keep of ``model`` with ``axes`` replaced."""
    from whelp.pruning import keep

    return keep.Keep(**{**keep.identity_keep(model.config).__dict__, **axes})


def complement(n, kept):
    """The indices of range(n) not in ``kept``."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def zeroed_equivalents(model):
    """``{axis: (keep, zeroed teacher)}`` for every axis where removing units equals zeroing them in the teacher
    (of a 3-layer teacher; MLP neurons where it has dense MLPs: an MoE's sparse layers leave their entries unused)."""
    from whelp.pruning import arch, surgery
    from whelp.pruning.keep import identity_keep, rope_exact_dims

    ident = identity_keep(model.config)
    d, n_rep = 16, 2
    out = {}
    mlp = (torch.tensor([3, 7, 50, 90]), torch.arange(0, 128, 32), torch.tensor([1, 5, 9, 100]))
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            if hasattr(layer.mlp, "down_proj"):
                layer.mlp.down_proj.weight[:, complement(128, mlp[i])] = 0
    if any(hasattr(layer.mlp, "down_proj") for layer in model.model.layers):
        out["intermediate_size"] = (with_keep(model, mlp=mlp), zeroed)
    q_heads = (torch.tensor([[1], [0]]), torch.tensor([[0], [0]]), torch.tensor([[1], [1]]))
    kv_heads = (torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
    for axis, keep in (
        ("num_attention_heads", with_keep(model, q_heads=q_heads)),
        (
            "num_key_value_heads",
            with_keep(model, kv_heads=kv_heads, q_heads=tuple(torch.arange(n_rep)[None] for _ in range(3))),
        ),
    ):
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for i, layer in enumerate(zeroed.model.layers):
                kept = surgery.q_rows(keep.kv_heads[i], keep.q_heads[i], n_rep, torch.arange(d), d)
                layer.self_attn.o_proj.weight[:, complement(4 * d, kept)] = 0
        out[axis] = (keep, zeroed)
    skipped = copy.deepcopy(model)
    skipped.model.layers[1].register_forward_hook(lambda m, args, kwargs, o: args[0], with_kwargs=True)
    out["num_hidden_layers"] = (
        with_keep(model, layers=(0, 2), mlp=ident.mlp[:2], kv_heads=ident.kv_heads[:2], q_heads=ident.q_heads[:2]),
        skipped,
    )
    dims = rope_exact_dims(d, 4)
    restricted = copy.deepcopy(model)
    with torch.no_grad():
        for layer in restricted.model.layers:
            attn = layer.self_attn  # Phi-3's fused [q; k; v] is d-row blocks too
            for proj in [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]:
                dropped = (complement(d, dims) + torch.arange(0, proj.out_features, d)[:, None]).flatten()
                proj.weight[dropped] = 0
                if proj.bias is not None:
                    proj.bias[dropped] = 0
    out["head_dim"] = (with_keep(model, head_dims=dims), restricted)
    assert set(out) | {"intermediate_size"} == set(arch.AXES) - {"hidden_size", "num_experts"}
    return out


PLAN_TARGETS = list(AXIS_TARGETS.values()) + [
    ALL_AXES,
    "head_dim=6",
    "head_dim=12",
    "num_attention_heads=3",
    "num_key_value_heads=2,num_attention_heads=6",
    "hidden_size=65",
    "num_hidden_layers=0",
    "tie_word_embeddings=true",
    "vocab_size=100",
    "llama-3.2-1b",
    "num_key_value_heads=1",
]


def accepted_alike_by_plan_and_prune(model, tmp_path, targets) -> list[str]:
    """The targets ``whelp plan`` accepts for ``model`` (saved to ``tmp_path``), asserting that ``whelp prune``
    accepts the same ones with the same shape and refuses the others with the very message plan prints."""
    from whelp import architecture
    from whelp.errors import WhelpError
    from whelp.pruning import moe
    from whelp.pruning.api import prune
    from whelp.pruning.targets import parse_target

    model.save_pretrained(tmp_path / "src")
    accepted = []
    for target in targets:
        try:
            small = prune(model, target, TOKENS[:2])
        except WhelpError as exc:
            pruned_ok, message = False, str(exc)
        else:
            pruned_ok, message = True, None
        result = run_cli("plan", str(tmp_path / "src"), "--target", target)
        assert (result.exit_code == 0) == pruned_ok, (target, result.stderr, message)
        if pruned_ok:
            accepted.append(target)
            shape = moe.moe_shape if moe.moe_family_of(model.config) else architecture.shape
            assert shape(small.config) == parse_target(model.config, target).shape
        else:
            assert result.stderr == f"error: {message}\n"
    return accepted


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


# ---- what keeps a student an assistant (whelp/assistant.py): test_assistant_outputs, test_search, test_build*,
# test_export, test_hf_compat

CHAT = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."}]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_chat_teacher(path: Path, eos_ids: list[int]) -> None:
    """Give the checkpoint saved at ``path`` what a chat model on the Hub ships: its chat template inside
    tokenizer_config.json (the one its tokenizer had, else ChatML), its bos and eos tokens as additional special
    tokens too, and a generation config that stops at every id of ``eos_ids`` (Llama 3.1 Instruct stops at three;
    ``stop_at``)."""
    import json

    template = path / "chat_template.jinja"
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template.read_text() if template.is_file() else CHATML
    config["additional_special_tokens"] = [config[k] for k in ("bos_token", "eos_token") if config.get(k)]
    config.pop("extra_special_tokens", None)
    template.unlink(missing_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    stop_at(path, eos_ids)


def stop_at(path: Path, eos_ids: list[int]) -> None:
    """Edit the generation config of the checkpoint at ``path`` to stop at every id of ``eos_ids``, pad with the
    first and sample by default."""
    import json

    generation = json.loads((path / "generation_config.json").read_text())
    generation.update(eos_token_id=eos_ids, pad_token_id=eos_ids[0], do_sample=True, temperature=0.7, top_p=0.9)
    (path / "generation_config.json").write_text(json.dumps(generation))


def assistant_of(directory) -> dict:
    """What makes the checkpoint at ``directory`` an assistant, as stock transformers loads it: its chat template(s)
    and the token ids the default makes of a 2-turn conversation and of a prompt for the answer, its special tokens,
    and its generation config (every eos id, as a set; bos, pad, sampling defaults)."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(directory)
    generation = GenerationConfig.from_pretrained(directory).to_diff_dict()
    eos = generation.pop("eos_token_id")
    for key in ("transformers_version", "_from_model_config"):
        generation.pop(key, None)
    return {
        "templates": tok.chat_template,
        "conversation": tok.apply_chat_template(CHAT)["input_ids"],
        "prompt": tok.apply_chat_template(CHAT[:1], add_generation_prompt=True)["input_ids"],
        "special_tokens": tok.special_tokens_map,
        "additional_special_tokens": tok.extra_special_tokens,
        "eos_token_ids": set(eos if isinstance(eos, list) else [eos]),
        "generation": generation,
    }
