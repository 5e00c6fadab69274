"""``whelp export DIR --gguf OUT``: llama.cpp's own converter turns a pruned-shape Llama into a GGUF that transformers'
GGUF loader reads back with the same config shape and the same logits (to the rounding of the chosen outtype).

The converter is fetched once per ``$WHELP_HOME`` (llama-cpp-python's source package from PyPI, 76 MB; a lock keeps
pytest-xdist workers from fetching it twice). The model carries the demo teacher's tokenizer: llama.cpp converts
only tokenizers whose pre-tokenizer it knows, and a test-trained BPE is not one of them.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch
from conftest import assistant_of, logits, run_cli, save_tiny

from whelp.errors import WhelpError
from whelp.export import SCRIPT, VENDOR, _extract, converter, export_gguf

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
# outtype -> (the dtype its weights are rounded to, max |logit difference| to the fp32 source / max |logit|)
OUTTYPES = {
    "f32": (torch.float32, 1e-6),
    "f16": (torch.float16, 1e-3),
    "bf16": (torch.bfloat16, 1e-2),
    "q8_0": (None, 2e-2),
}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, demo_tokenizer):
    """(directory, model): a tiny Llama shaped like a pruned one (head_dim 16 != hidden 48 / 4 heads, 2 KV heads,
    tied embeddings), fp32, over the demo tokenizer."""
    path = tmp_path_factory.mktemp("export") / "pruned"
    model = save_tiny(path, demo_tokenizer, hidden_size=48, num_hidden_layers=3, tie_word_embeddings=True)
    return path, model


def read_back(gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def gguf_metadata(gguf) -> dict:
    """What llama.cpp reads of an assistant from a GGUF's metadata (gguf's own reader): the chat template and the
    bos, eos and pad ids."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    return {
        "template": fields["tokenizer.chat_template"].contents(),
        **{key: fields[f"tokenizer.ggml.{key}_token_id"].contents() for key in ("bos", "eos", "padding")},
    }


def rounded(model, dtype):
    """A copy of ``model`` with its weights rounded to ``dtype`` (and computing in fp32)."""
    import copy

    return copy.deepcopy(model).to(dtype).float()


@pytest.mark.demo
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_gguf_reads_back_with_the_same_shape_and_logits(pruned, tmp_path, outtype):
    from whelp.architecture import shape

    path, source = pruned
    out = export_gguf(str(path), str(tmp_path / f"pruned-{outtype}.gguf"), outtype)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left beside it
    back = read_back(out)
    assert shape(back.config) == shape(source.config)
    dtype, tolerance = OUTTYPES[outtype]
    ref = logits(source, IDS)
    diff = (logits(back, IDS) - ref).abs().max().item()
    print(f"{outtype}: max |logit diff| {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert diff <= tolerance * ref.abs().max().item()
    if dtype is not None:  # the same logits as the source rounded to the outtype: nothing else changed
        assert (logits(back, IDS) - logits(rounded(source, dtype), IDS)).abs().max().item() < 1e-5


@pytest.mark.demo
def test_the_cli_exports_quietly_and_refuses_an_existing_out_without_force(pruned, tmp_path):
    """The CLI: quiet, an existing OUT refused without --force; its GGUF keeps the chat template and the bos, eos and
    pad ids of the directory's tokenizer (what llama.cpp reads)."""
    from transformers import AutoTokenizer

    path, _ = pruned
    out = tmp_path / "student.gguf"
    done = run_cli("export", str(path), "--gguf", str(out), "--outtype", "q8_0")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (q8_0") and done.stderr == ""
    tok = AutoTokenizer.from_pretrained(path)  # the GGUF is the same assistant: same template over the same vocabulary
    assert gguf_metadata(out) == {
        "template": tok.chat_template,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "padding": tok.pad_token_id,
    }
    assert "<|im_start|>assistant" in tok.chat_template and tok.eos_token_id in assistant_of(path)["eos_token_ids"]
    again = run_cli("export", str(path), "--gguf", str(out))
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    size = out.stat().st_size
    assert run_cli("export", str(path), "--gguf", str(out), "--outtype", "f16", "--force").exit_code == 0
    assert out.stat().st_size > size  # replaced: f16 is larger than q8_0


@pytest.mark.demo
def test_an_unsupported_architecture_names_the_families_that_convert(pruned, tmp_path):
    path, _ = pruned
    foreign = tmp_path / "foreign"
    shutil.copytree(path, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(WhelpError, match=r"FooForCausalLM is not supported; .*\(llama, mistral, qwen2"):
        export_gguf(str(foreign), str(tmp_path / "foreign.gguf"))
    assert not any(p.suffix == ".gguf" or ".tmp-" in p.name for p in tmp_path.iterdir())


@pytest.mark.demo
def test_truncated_weights_are_one_line_before_the_converter_runs(pruned, tmp_path):
    path, _ = pruned
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(WhelpError, match=r"broken/model.safetensors is truncated \(1,000 bytes, shorter than") as exc:
        export_gguf(str(broken), str(tmp_path / "broken.gguf"))
    assert "\n" not in str(exc.value) and not any(p.suffix == ".gguf" for p in tmp_path.iterdir())


def test_every_family_whelp_prunes_converts():
    """The unsupported-architecture message promises these families convert: true of the pinned converter."""
    import subprocess
    import sys

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from whelp.pruning.arch import FAMILIES
    from whelp.pruning.moe import MOE_FAMILIES

    listed = subprocess.run(
        [sys.executable, str(converter() / SCRIPT), "--print-supported-models", "x"], capture_output=True, text=True
    ).stderr
    for family in [*FAMILIES, *MOE_FAMILIES]:
        assert f"  - {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]}\n" in listed, family


def _without_weights(p):
    save_tiny(p / "m")
    (p / "m" / "model.safetensors").unlink()
    return p / "m"


def _shipping_code(p):
    save_tiny(p / "m")
    (p / "m" / "tokenization_mine.py").write_text("import os  # runs on load")
    return p / "m"


def _bad_json(p):
    (p / "c").mkdir()
    (p / "c" / "config.json").write_text("{")
    return p / "c"


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: p / "nope", "no such model directory"),
        (lambda p: p.joinpath("cfg").mkdir() or p / "cfg", "no config.json"),
        (_bad_json, "not valid JSON"),
        (_without_weights, "has no weights"),
        (
            _shipping_code,
            "ships its own model or tokenizer code, which llama.cpp's converter may run; pass `whelp "
            "--trust-remote-code",
        ),
    ],
)
def test_a_missing_incomplete_or_untrusted_dir_is_refused_before_converting(tmp_path, make_bad, message):
    done = run_cli("export", str(make_bad(tmp_path)), "--gguf", str(tmp_path / "out.gguf"))
    assert done.exit_code == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.gguf").exists()


def test_a_file_that_is_not_a_gguf_is_never_overwritten(tmp_path):
    save_tiny(tmp_path / "m")
    precious = tmp_path / "notes.gguf"
    precious.write_text("my notes")
    with pytest.raises(WhelpError, match="not a GGUF file; whelp never overwrites it"):
        export_gguf(str(tmp_path / "m"), str(precious), force=True)
    assert precious.read_text() == "my notes"
    with pytest.raises(WhelpError, match="--outtype q4_0: choose one of auto, f16, bf16, q8_0, f32"):
        export_gguf(str(tmp_path / "m"), str(tmp_path / "x.gguf"), "q4_0")


def test_only_the_converters_regular_files_are_extracted(tmp_path):
    """A link, a name escaping the folder or an unrelated file in the source package is never written."""
    sdist = tmp_path / "sdist.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, kind in [
            (SCRIPT, tarfile.REGTYPE),
            ("conversion/llama.py", tarfile.REGTYPE),
            ("conversion/evil.py", tarfile.SYMTYPE),
            ("conversion/../../escape.py", tarfile.REGTYPE),
            ("setup.py", tarfile.REGTYPE),
            ("gguf-py/tests/test_x.py", tarfile.REGTYPE),
        ]:
            member = tarfile.TarInfo(VENDOR + name)
            member.type, member.linkname, member.size = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "", 2
            tar.addfile(member, io.BytesIO(b"ok") if kind == tarfile.REGTYPE else None)
    _extract(sdist, tmp_path / "tool")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    assert written == sorted(["sdist.tar.gz", f"tool/{SCRIPT}", "tool/conversion/llama.py"])


@pytest.mark.demo
@pytest.mark.parametrize(
    "family,config",
    [
        ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
        ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    ],
)
def test_a_pruned_moe_converts_with_its_kept_experts(family, config, tmp_path, demo_tokenizer, monkeypatch):
    """The GGUF holds the pruned expert count, top-k and expert FFN width, read with the converter's own gguf-py
    (transformers' GGUF loader reads no MoE back: it takes a Mixtral GGUF for a dense Llama)."""
    import os
    import subprocess
    import sys

    from whelp.pruning.api import prune_checkpoint
    from whelp.specs import PruneSpec

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    save_tiny(tmp_path / "teacher", demo_tokenizer, family=family, hidden_size=48, num_hidden_layers=2, **config)
    ffn = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    prune_checkpoint(
        str(tmp_path / "teacher"),
        f"num_local_experts=2,num_experts_per_tok=1,{ffn}=16",
        tmp_path / "pruned",
        PruneSpec(calib_samples=2, seq_len=16),
    )
    monkeypatch.undo()  # the converter lives in the shared $WHELP_HOME, fetched once
    out = export_gguf(str(tmp_path / "pruned"), str(tmp_path / "moe.gguf"), outtype="f32")
    read = (
        "import json, sys; from gguf import GGUFReader; r = GGUFReader(sys.argv[1]); "
        "arch = bytes(r.fields['general.architecture'].parts[-1]).decode(); "
        "print(json.dumps({'experts': r.fields[arch + '.expert_count'].parts[-1].tolist(), "
        "'used': r.fields[arch + '.expert_used_count'].parts[-1].tolist(), "
        "'shapes': {t.name: [int(n) for n in t.shape] for t in r.tensors}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", read, str(out)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(converter() / "gguf-py")},
    )  # its gguf, in its process
    gguf = json.loads(done.stdout)
    assert gguf["experts"] == [2] and gguf["used"] == [1]
    shapes = gguf["shapes"]
    for layer in range(2):
        assert shapes[f"blk.{layer}.ffn_gate_inp.weight"] == [48, 2]  # the router's rows follow the kept experts
        for part in ("gate", "up"):
            assert shapes[f"blk.{layer}.ffn_{part}_exps.weight"] == [48, 16, 2]
        assert shapes[f"blk.{layer}.ffn_down_exps.weight"] == [16, 48, 2]


def test_a_gguf_is_never_written_inside_the_model_it_exports(tmp_path):
    save_tiny(tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    with pytest.raises(WhelpError, match=r"--gguf .*/m/m.gguf would overwrite or nest in the input .*; choose a sep"):
        export_gguf(str(tmp_path / "m"), str(tmp_path / "m" / "m.gguf"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
