"""Bad inputs and safety opt-ins through the verbs as a user runs them (in-process CLI): one line, before any model
is loaded where none is needed, nothing written; ``--allow-pickle`` / ``--trust-remote-code`` reach every verb."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_tiny, tiny_config, tiny_model, tiny_tokenizer

from whelp import models
from whelp.errors import WhelpError

SMALL = ("--seq-len", "16")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A safetensors checkpoint, the same weights as pickle only, and a checkpoint that needs its own code."""
    root = tmp_path_factory.mktemp("inputs")
    tok = tiny_tokenizer()
    save_tiny(root / "safe", tok)
    pickled = root / "pickled"
    shutil.copytree(root / "safe", pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "whelp.json").unlink()
    torch.save(tiny_model(vocab_size=len(tok)).state_dict(), pickled / "pytorch_model.bin")
    remote = root / "remote"
    remote.mkdir()
    (remote / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = 'xllama'\n"
    )
    (remote / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import "
        "XConfig\n\n\nclass XForCausalLM(LlamaForCausalLM):\n"
        "    config_class = XConfig\n"
    )
    config = {
        **tiny_config(vocab_size=len(tok)).to_dict(),
        "model_type": "xllama",
        "architectures": ["XForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
    }
    (remote / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(remote)
    shutil.copy(root / "safe" / "model.safetensors", remote)
    return root


def verb(name: str, model: str, out: str) -> list[str]:
    """The cheapest complete run of each verb that loads ``model``."""
    return {
        "prune": ["prune", model, "--target", "intermediate_size=64", "--out", out, "--calib-samples", "1", *SMALL],
        "eval": [
            "eval",
            model,
            "--out",
            out,
            "--max-tokens",
            "128",
            *SMALL,
            "--speed-prompt-len",
            "4",
            "--speed-new-tokens",
            "1",
            "--speed-repeats",
            "1",
        ],
        "distill": [
            "distill",
            model,
            "--teacher",
            model,
            "--out",
            out,
            "--steps",
            "1",
            "--batch-size",
            "1",
            *SMALL,
            "--eval-tokens",
            "32",
        ],
        "cache-logits": [
            "cache-logits",
            model,
            "--data",
            "pydoc:train",
            "--out",
            out,
            "--topk",
            "2",
            *SMALL,
            "--max-tokens",
            "64",
        ],
        "inspect": ["inspect", model, "--json"],
    }[name]


@pytest.mark.parametrize("name", ["prune", "eval", "distill", "cache-logits"])
def test_allow_pickle_reaches_every_verb_that_loads_weights(dirs, tmp_path, name):
    refused = run_cli(*verb(name, str(dirs / "pickled"), str(tmp_path / "a")))
    assert refused.exit_code == 2 and "pickle" in refused.stderr and "--allow-pickle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    done = run_cli("--allow-pickle", *verb(name, str(dirs / "pickled"), str(tmp_path / "b")))
    assert done.exit_code == 0, done.stderr


@pytest.mark.parametrize("name", ["inspect", "prune"])
def test_trust_remote_code_reaches_the_verbs(dirs, tmp_path, name):
    refused = run_cli(*verb(name, str(dirs / "remote"), str(tmp_path / "a")))
    assert (
        refused.exit_code == 2
        and "--trust-remote-code" in refused.stderr
        and len(refused.stderr.strip().splitlines()) == 1
    )
    done = run_cli("--trust-remote-code", *verb(name, str(dirs / "remote"), str(tmp_path / "b")))
    assert done.exit_code == 0, done.stderr
    if name == "inspect":
        assert json.loads(done.stdout)["model_type"] == "xllama"


def no_model_loads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before an input that needs none was checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            lambda d, t: ["cache-logits", d, "--data", "pydoc:train", "--out", t, "--topk", "0"],
            "--topk must be at least 1",
        ),
        (
            lambda d, t: ["cache-logits", d, "--data", "pydoc:train", "--out", t, "--sample", "0"],
            "--sample must be at least 1",
        ),
        (lambda d, t: ["eval", d, "--out", t, "--batch-size", "0"], "batch_size must be positive"),
        (lambda d, t: ["eval", d, "--out", t, "--tasks", "whelp_pydocc"], "unknown lm-eval task 'whelp_pydocc'"),
        (
            lambda d, t: ["prune", d, "--target", "intermediate_size=64", "--out", t, "--scores", f"{d}/config.json"],
            "is not a safetensors scores file",
        ),
        (
            lambda d, t: ["prune", d, "--target", "intermediate_size=64", "--out", f"{d}/config.json/x"],
            "which is a file",
        ),
        (lambda d, t: ["prune", d, "--target", "intermediate_size=9999", "--out", t], "intermediate_size"),
        (lambda d, t: ["distill", d, "--teacher", d, "--out", t, "--steps", "1", "--loss", "kl"], "unknown loss 'kl'"),
        (
            lambda d, t: ["distill", d, "--teacher", d, "--out", t, "--steps", "1", "--schedule", "linear"],
            "positive step count",
        ),
        (lambda d, t: ["distill", d, "--out", t, "--steps", "1"], "nothing to distil from"),
        (
            lambda d, t: ["distill", d, "--teacher", d, "--out", t, "--steps", "1", "--data", "pydoc:trian"],
            "unknown pydoc split 'trian'",
        ),
        (
            lambda d, t: ["distill", d, "--teacher", d, "--out", t, "--steps", "4", "--warmup", "4"],
            "warmup=4 is not below the run's 4 steps",
        ),
        (
            lambda d, t: ["eval", d, "--out", t, "--tasks", "mine", "--include-path", str(Path(t).parent)],
            "holds no lm-eval task YAMLs",
        ),
    ],
)
def test_bad_flags_are_one_line_before_any_model_loads(dirs, tmp_path, monkeypatch, args, message):
    no_model_loads(monkeypatch)
    result = run_cli(*args(str(dirs / "safe"), str(tmp_path / "out")))
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_empty_perplexity_file_is_refused_before_any_model_loads(dirs, tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    no_model_loads(monkeypatch)
    ppl = ("--ppl", str(tmp_path / "empty.txt"), "--seq-len", "64")  # positions are checked first: the model has 256
    result = run_cli("eval", str(dirs / "safe"), "--out", str(tmp_path / "o"), *ppl)
    assert result.exit_code == 2 and "empty.txt" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("same_size", [True, False])
def test_a_teacher_with_another_tokenizer_is_refused_before_loading(dirs, tmp_path, monkeypatch, same_size):
    """Same vocabulary size but other ids (a shuffled vocabulary) is as wrong as another size."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer()
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)
    if same_size:  # swap two ids
        vocab[names[300]], vocab[names[301]] = vocab[names[301]], vocab[names[300]]
    else:
        state["model"]["merges"] = state["model"]["merges"][:-10]
        for name in names[-10:]:
            del vocab[name]
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token="<eos>")
    save_tiny(tmp_path / "teacher", other)
    no_model_loads(monkeypatch)
    result = run_cli(
        "distill",
        str(dirs / "safe"),
        "--teacher",
        str(tmp_path / "teacher"),
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "1",
        *SMALL,
    )
    assert result.exit_code == 2 and "another tokenizer" in result.stderr, result.stderr
    assert ("other ids" in result.stderr) == same_size


def test_a_cache_at_another_temperature_is_refused_before_loading(dirs, tmp_path, monkeypatch):
    from whelp.data import open_blocks
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.specs import CacheSpec

    model, tok = models.load_model(str(dirs / "safe"))
    write_cache(
        Teacher(model, tok, "t"),
        open_blocks("pydoc:train", tok, 16, max_tokens=64),
        tmp_path / "c",
        CacheSpec("topk", 2, 2.0),
    )
    no_model_loads(monkeypatch)
    result = run_cli(
        "distill",
        str(dirs / "safe"),
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
        *SMALL,
        "--max-tokens",
        "64",
    )
    assert result.exit_code == 2 and "temperature 2.0" in result.stderr and "--temperature 2.0" in result.stderr


def test_a_full_disk_is_one_line_and_leaves_nothing(dirs, tmp_path, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "write_model", full)
    result = run_cli(*verb("prune", str(dirs / "safe"), str(tmp_path / "o")))
    assert (
        result.exit_code == 2
        and f"could not write {tmp_path / 'o'}: the disk is full" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (
            lambda d, t: ["prune", d, "--target", "intermediate_size=64", "--out", d, "--force"],
            "would overwrite or nest",
        ),
        (
            lambda d, t: ["prune", d, "--target", "intermediate_size=64", "--out", f"{d}/student"],
            "would overwrite or nest",
        ),
        (lambda d, t: ["distill", d, "--teacher", d, "--out", d, "--force", "--steps", "1"], "would overwrite or nest"),
        (lambda d, t: ["eval", d, "--out", d, "--force"], "holds a whelp model output, not an eval output"),
        (lambda d, t: ["eval", d, "--out", f"{d}/report"], "would overwrite or nest"),
        (lambda d, t: ["prune", d, "--target", "intermediate_size=64,intermediate_size=32", "--out", t], "given twice"),
        (
            lambda d, t: ["prune", d, "--target", "intermediate_size=64", "--rope", "target", "--out", t],
            "--rope target takes the RoPE of a preset",
        ),
        (
            lambda d, t: ["prune", d, "--target", "intermediate_size=64", "--seq-len", "100000", "--out", t],
            "longer than the model's 256 positions",
        ),
        (
            lambda d, t: ["prune", d, "--target", "x", "--out", t, "--calib-samples", "abc"],
            "Invalid value for '--calib-samples'",
        ),
        (lambda d, t: ["prun", d], "No such command 'prun'"),
        (lambda d, t: ["distill", d, "--teacher", f"{d}:0", "--out", t, "--steps", "1"], "every teacher weight is 0"),
        (lambda d, t: ["distill", d, "--teacher", f"{d}:inf", "--out", t, "--steps", "1"], "finite number"),
        (
            lambda d, t: ["distill", d, "--teacher", d, "--out", t, "--steps", "1", "--lr", "inf"],
            "lr must be float (finite)",
        ),
        (lambda d, t: ["eval", d, d, "--out", t], "given twice"),
    ],
)
def test_inputs_that_would_destroy_or_mislead_are_refused(dirs, tmp_path, monkeypatch, args, message):
    no_model_loads(monkeypatch)
    before = sorted(p.name for p in (dirs / "safe").iterdir())
    result = run_cli(*args(str(dirs / "safe"), str(tmp_path / "out")))
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert sorted(p.name for p in (dirs / "safe").iterdir()) == before


def test_a_config_with_values_of_the_wrong_type_is_one_line(tmp_path):
    config = {**tiny_config().to_dict(), "hidden_size": "abc"}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", str(tmp_path / "m"))
    assert result.exit_code == 2 and "not a valid model config" in result.stderr and "hidden_size" in result.stderr


def test_the_python_api_refuses_what_the_cli_would(dirs):
    import whelp

    model, tok = models.load_model(str(dirs / "safe"))
    with pytest.raises(whelp.WhelpError, match="token ids"):
        whelp.prune(model, "intermediate_size=64", torch.full((1, 16), 10_000), whelp.PruneSpec(calib_samples=1))
    with pytest.raises(whelp.WhelpError, match="integers"):
        whelp.prune(model, "intermediate_size=64", torch.zeros(1, 16), whelp.PruneSpec(calib_samples=1))
    with pytest.raises(whelp.WhelpError, match="target is a preset name"):
        whelp.prune(model, 64, torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(whelp.WhelpError, match="pass whelp.blocks"):
        whelp.distill(model, [model], "pydoc:train", whelp.DistillSpec(steps=1, seq_len=16))
    with pytest.raises(whelp.WhelpError, match="finite numbers >= 0"):
        whelp.distill(
            model, [(model, -1.0)], torch.zeros(2, 16, dtype=torch.long), whelp.DistillSpec(steps=1, seq_len=16)
        )
    for bad in (dict(allow_pickle="no"), dict(trust_remote_code=1)):
        with pytest.raises(whelp.WhelpError, match="must be bool"):
            whelp.LoadPolicy(**bad)
    for bad in (dict(steps=1.5), dict(steps=1, lr="1e-3"), dict(steps=1, lr=float("inf"))):
        with pytest.raises(whelp.WhelpError):
            whelp.DistillSpec(**bad)
    with pytest.raises(whelp.WhelpError, match="ppl must be tuple"):
        whelp.EvalSpec(ppl="pydoc:eval")


def _damaged(tmp_path, family: str, edit, **config) -> Path:
    """A tiny checkpoint of ``family`` whose safetensors ``edit`` (a function of the tensor dict) changed."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / family
    save_tiny(path, tiny_tokenizer(), family=family, **config)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


MOE = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)


@pytest.mark.parametrize(
    "case,family,stream,message",
    [
        # the self-consistency check refuses before transformers or the streaming reader run, both paths alike
        ("missing", "llama", False, "config.json does not describe its weights (missing: model.layers.1.mlp.up_proj"),
        ("missing", "llama", True, "config.json does not describe its weights (missing: model.layers.1.mlp.up_proj"),
        ("reshaped", "llama", False, "says intermediate_size 128 but model.layers.1.mlp.up_proj.weight is [16, 64]"),
        ("missing", "mixtral", False, "does not describe its weights (missing: model.layers.1.block_sparse_moe.exp"),
        ("missing", "mixtral", True, "does not describe its weights (missing: model.layers.1.block_sparse_moe.exp"),
        ("reshaped", "mixtral", True, "says intermediate_size 32 but model.layers.1.block_sparse_moe.experts.2.w3"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_never_random_weights(tmp_path, monkeypatch, case, family, stream, message):
    """transformers fills a missing tensor with random weights and carries on; whelp refuses, naming it."""
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    name = (
        "model.layers.1.mlp.up_proj.weight"
        if family == "llama"
        else "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    )

    def edit(tensors):
        if case == "missing":
            tensors.pop(name)
        else:
            tensors[name] = torch.zeros(16, 64)

    source = _damaged(tmp_path, family, edit, **(MOE if family == "mixtral" else {}))
    target = "num_local_experts=2" if family == "mixtral" else "intermediate_size=64"
    done = run_cli(
        "prune",
        str(source),
        "--target",
        target,
        "--out",
        str(tmp_path / "out"),
        "--calib-samples",
        "2",
        "--seq-len",
        "16",
        *(["--stream"] if stream else []),
    )
    assert done.exit_code == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
    if not stream:  # every verb loads through the same check
        with pytest.raises(WhelpError, match="config.json"):
            models.load_model(str(source))
