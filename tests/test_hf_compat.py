"""whelp's outputs load in transformers 4.x as in transformers 5 (whelp/hf_compat.py).

transformers 4.x is installed once per ``$WHELP_HOME`` (``pip install --no-deps --target
$WHELP_HOME/tools/transformers-VERSION`` with the tokenizers / huggingface_hub it needs; about 135 MB and 10 s;
a lock makes parallel workers install it once, into a temporary sibling renamed into place). A subprocess of this
interpreter with that directory first on ``PYTHONPATH`` (torch from the venv, transformers 4.x from the target)
loads each output; its logits and token ids are compared with transformers 5's in this process.
``OLDEST`` is the oldest release the README promises, ``LATEST`` the last 4.x (which vLLM and others pin).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import CHAT, CHATML, run_cli, save_tiny, tiny_model, tiny_tokenizer

from whelp.errors import WhelpError
from whelp.hf_compat import chat_templates, legacy_config, legacy_tokenizer_config
from whelp.store import clean_stale, locked, tag, whelp_home

OLDEST, LATEST = "4.46.3", "4.57.3"
DEPS = {
    OLDEST: ("tokenizers==0.20.3", "huggingface_hub==0.36.2"),
    LATEST: ("tokenizers==0.22.2", "huggingface_hub==0.36.2"),
}
# what each release has, of the families whelp prunes (OLMo 2 came in 4.47, Phi-3's partial rotary factor of
# Phi-4-mini ("phi4_mini") in 4.49, Gemma 3 in 4.50, Qwen3 in 4.51)
FAMILIES = {
    OLDEST: ("llama", "mistral", "qwen2", "granite", "gemma", "gemma2", "phi3"),
    LATEST: (
        "llama",
        "mistral",
        "qwen2",
        "granite",
        "gemma",
        "gemma2",
        "phi3",
        "phi4_mini",
        "olmo2",
        "gemma3_text",
        "qwen3",
    ),
}
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
# non-default RoPE everywhere, so a field 4.x does not read shows as different logits
FAMILY_OVERRIDES = {
    "llama": dict(rope_theta=100000.0, rope_scaling=LLAMA3_ROPE),
    "phi4_mini": dict(rope_theta=100000.0, partial_rotary_factor=0.5),
    "gemma2": dict(rope_theta=100000.0, sliding_window=8),
    "gemma3_text": dict(
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=500000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=20000.0),
        },
    ),
}
TARGET = "num_hidden_layers=3,hidden_size=48,intermediate_size=96,num_attention_heads=2,num_key_value_heads=1"
TEXT = "def f(x):\n    return x  # ünïcode <eos> done"
IDS = torch.arange(60).reshape(2, 30) * 7 % 500

LOADER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
dirs, text, ids, chat = json.loads(sys.argv[1]), sys.argv[2], torch.load(sys.argv[3]), json.loads(sys.argv[4])
out = {"version": transformers.__version__}
for d in dirs:
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, d + ".logits4.pt")
    tok = AutoTokenizer.from_pretrained(d) if d.endswith("+tok") else None
    out[d] = tok and [type(tok).__name__, tok(text)["input_ids"], tok.chat_template and tok.apply_chat_template(chat)]
print(json.dumps(out))
"""


def legacy_transformers(version: str) -> Path:
    """``$WHELP_HOME/tools/transformers-VERSION``: transformers ``version`` and its tokenizers / huggingface_hub,
    installed once (locked; into a temporary sibling renamed into place)."""
    dest = whelp_home() / "tools" / f"transformers-{version}"
    if (dest / "transformers").is_dir():
        return dest
    with locked(dest, f"to install transformers {version}"):
        if (dest / "transformers").is_dir():
            return dest
        clean_stale(dest.parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{tag()}-", dir=dest.parent))
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--no-deps",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                    str(tmp / "lib"),
                    f"transformers=={version}",
                    *DEPS[version],
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.fail(f"pip could not install transformers=={version}: {done.stderr[-2000:]}")
            os.replace(tmp / "lib", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_in(version: str, dirs: list[Path], tmp: Path) -> dict:
    """Logits of ``IDS`` (``DIR.logits4.pt``) and, for directories named ``*+tok``, the tokenizer's class, ids of
    ``TEXT`` and of ``CHAT`` through its chat template (None without one), as transformers ``version`` loads each
    directory."""
    torch.save(IDS, tmp / "ids.pt")
    env = {**os.environ, "PYTHONPATH": str(legacy_transformers(version)), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps([str(d) for d in dirs]), TEXT, str(tmp / "ids.pt"), json.dumps(CHAT)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("version") == version
    return result


def check_same(directory: Path, got: dict) -> None:
    """transformers 4.x's logits (and tokenizer) of ``directory`` equal transformers 5's in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    torch.testing.assert_close(torch.load(f"{directory}.logits4.pt"), want, rtol=0, atol=1e-5)
    if directory.name.endswith("+tok"):
        tok = AutoTokenizer.from_pretrained(directory)
        chat = tok.chat_template and tok.apply_chat_template(CHAT)["input_ids"]
        assert got[str(directory)] == ["PreTrainedTokenizerFast", tok(TEXT)["input_ids"], chat]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """What whelp writes from a tiny Llama (RoPE base 100,000, llama3 scaling): in-memory and streamed prunes, a
    distilled student, each with whelp's tokenizer (``+tok``), whose chat template transformers 5 writes to
    chat_template.jinja alone."""
    root = tmp_path_factory.mktemp("outputs")
    src = root / "teacher+tok"
    chat = copy.deepcopy(tiny_tokenizer())
    chat.chat_template = CHATML
    save_tiny(src, chat, num_hidden_layers=4, **FAMILY_OVERRIDES["llama"])
    assert (src / "chat_template.jinja").read_text() == CHATML
    for name, flags in (("pruned+tok", ()), ("streamed+tok", ("--stream",))):
        result = run_cli(
            "prune", str(src), "--target", TARGET, "--out", str(root / name), "--importance", "magnitude", *flags
        )
        assert result.exit_code == 0, result.stderr
    result = run_cli(
        "distill",
        str(root / "pruned+tok"),
        "--teacher",
        str(src),
        "--out",
        str(root / "distilled+tok"),
        "--data",
        "pydoc:train",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--seq-len",
        "16",
    )
    assert result.exit_code == 0, result.stderr
    return [root / name for name in ("teacher+tok", "pruned+tok", "streamed+tok", "distilled+tok")]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """One tiny model of each family, saved by whelp (``save_model``)."""
    root = tmp_path_factory.mktemp("families")
    for name in FAMILIES[LATEST]:
        save_tiny(
            root / name,
            family=name.replace("phi4_mini", "phi3"),
            **FAMILY_OVERRIDES.get(name, dict(rope_theta=100000.0)),
        )
    return root


@pytest.mark.parametrize("version", [OLDEST, LATEST])
def test_outputs_load_in_transformers_4(outputs, version, tmp_path):
    """Pruned (in memory and streamed) and distilled outputs: same logits and token ids as transformers 5."""
    config = json.loads((outputs[1] / "config.json").read_text())
    assert (config["rope_theta"], config["rope_scaling"]["rope_type"]) == (100000.0, "llama3")
    got = load_in(version, outputs, tmp_path)
    for directory in outputs:
        check_same(directory, got)


@pytest.mark.parametrize("version", [OLDEST, LATEST])
def test_every_family_loads_in_transformers_4(families, version, tmp_path):
    """Each family's RoPE fields as 4.x reads them: Phi-3's partial rotary factor, Gemma 3's per-layer-type RoPE."""
    dirs = [families / name for name in FAMILIES[version]]
    got = load_in(version, dirs, tmp_path)
    for directory in dirs:
        check_same(directory, got)


@pytest.mark.demo
def test_pruned_demo_loads_in_transformers_4(demo_dir, tmp_path):
    """The case 4.x got silently wrong: a student of the demo teacher (RoPE base 100,000) under the last 4.x."""
    out = tmp_path / "demo+tok"
    result = run_cli(
        "prune", str(demo_dir), "--target", "smollm2-quarter", "--importance", "magnitude", "--out", str(out)
    )
    assert result.exit_code == 0, result.stderr
    check_same(out, load_in(LATEST, [out], tmp_path))


def test_transformers_5_reads_the_legacy_fields_back_the_same(tmp_path):
    """With the legacy fields beside them, transformers 5 builds the same RoPE and the same model; without them
    (``save_pretrained`` alone) 4.x would find no ``rope_theta`` and no tokenizer class it has."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = tiny_model(**FAMILY_OVERRIDES["llama"])
    model.save_pretrained(tmp_path / "raw")
    tiny_tokenizer().save_pretrained(tmp_path / "raw")
    raw = json.loads((tmp_path / "raw" / "config.json").read_text())
    assert "rope_theta" not in raw and "rope_scaling" not in raw and "torch_dtype" not in raw
    raw_tok_config = json.loads((tmp_path / "raw" / "tokenizer_config.json").read_text())
    assert raw_tok_config["tokenizer_class"] == "TokenizersBackend"
    save_tiny(tmp_path / "fixed", tiny_tokenizer(), **FAMILY_OVERRIDES["llama"])
    raw_cfg, fixed_cfg = (AutoConfig.from_pretrained(tmp_path / name) for name in ("raw", "fixed"))
    assert {**fixed_cfg.to_dict(), "_name_or_path": ""} == {**raw_cfg.to_dict(), "_name_or_path": ""}
    with torch.no_grad():
        raw_logits, fixed_logits = (
            AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()(IDS).logits for name in ("raw", "fixed")
        )
    assert torch.equal(raw_logits, fixed_logits)
    raw_tok, fixed_tok = (AutoTokenizer.from_pretrained(tmp_path / name) for name in ("raw", "fixed"))
    assert type(fixed_tok) is type(raw_tok) and fixed_tok(TEXT)["input_ids"] == raw_tok(TEXT)["input_ids"]


def test_legacy_fields():
    config = legacy_config(
        {
            "model_type": "phi3",
            "dtype": "bfloat16",
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0],
            },
        }
    )
    assert (config["rope_theta"], config["partial_rotary_factor"], config["torch_dtype"]) == (1e4, 0.75, "bfloat16")
    assert config["rope_scaling"] == {"rope_type": "longrope", "short_factor": [1.0]}
    plain = legacy_config({"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}})
    assert plain["text_config"]["rope_theta"] == 5e5 and plain["text_config"]["rope_scaling"] is None
    gemma3 = legacy_config(
        {
            "model_type": "gemma3_text",
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
    )
    assert (gemma3["rope_theta"], gemma3["rope_local_base_freq"]) == (1e6, 1e4)
    assert gemma3["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    with pytest.raises(WhelpError, match="sliding-attention"):
        legacy_config(
            {
                "model_type": "gemma3_text",
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                },
            }
        )
    tok = legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>"]}, "T")
    assert tok == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<a>"],
        "chat_template": "T",
    }
    assert legacy_tokenizer_config({"chat_template": "own"}, "T") == {"chat_template": "own"}
    assert legacy_tokenizer_config({"tokenizer_class": "LlamaTokenizer"}) == {"tokenizer_class": "LlamaTokenizer"}


def test_chat_templates_are_read_as_tokenizer_config_holds_them(tmp_path):
    """The default template alone as its text; with named ones (transformers 5's additional_chat_templates/) the list
    4.x reads, the default first; no chat_template.jinja: None."""
    assert chat_templates(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("D")
    assert chat_templates(tmp_path) == "D"
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("T")
    assert chat_templates(tmp_path) == [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
