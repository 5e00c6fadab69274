"""The student stays an assistant (whelp/assistant.py): ``whelp prune`` (in memory and streamed) and ``whelp distill``
outputs render a conversation through the teacher's chat template to the teacher's token ids, keep its special tokens
and stop at every eos id of its generation config, as stock transformers loads them (``conftest.assistant_of``).

The teacher is tiny over the real SmolLM2-Instruct tokenizer and generation config, shipped the way Hub chat models
are (template inside tokenizer_config.json, additional special tokens) and stopping at two ids, ``<|im_end|>`` and
``<|endoftext|>``: a model's own generation config (derived from config.json) keeps one. The search winner, the build's
stages and ``final/`` are checked on the fixtures test_search.py and test_build*.py already make, the GGUF in
test_export.py.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import assistant_of, make_chat_teacher, run_cli, save_tiny

from whelp import models

pytestmark = pytest.mark.demo  # the real SmolLM2 tokenizer and generation config
EOS_IDS = [2, 0]  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("assistant") / "teacher"
    save_tiny(path, models.load_tokenizer("smollm2-135m"), tie_word_embeddings=True)
    shutil.copyfile(models.registered_dir("smollm2-135m") / "generation_config.json", path / "generation_config.json")
    make_chat_teacher(path, EOS_IDS)
    return path


def test_the_teacher_is_a_chat_model_that_its_own_generation_config_would_lose(teacher):
    """The reference itself: ChatML with the SmolLM2 system turn, two stop ids, a pad; what ``from_config`` derives
    from config.json (what a pruned or distilled model holds) keeps one stop id and no pad."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    want = assistant_of(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    assert tok.decode(want["prompt"]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.decode(want["prompt"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert want["eos_token_ids"] == set(EOS_IDS) and want["generation"]["pad_token_id"] == 2
    assert want["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    derived = GenerationConfig.from_model_config(AutoConfig.from_pretrained(teacher))
    assert (derived.eos_token_id, derived.pad_token_id) == (2, None)


@pytest.mark.parametrize("flags", [(), ("--stream",)], ids=["in-memory", "streamed"])
def test_a_pruned_student_keeps_the_teachers_template_special_tokens_and_stop_ids(teacher, tmp_path, flags):
    out = tmp_path / "pruned"
    target = ("--target", "intermediate_size=64", "--importance", "magnitude")
    done = run_cli("prune", str(teacher), *target, "--out", str(out), *flags)
    assert done.exit_code == 0, done.stderr
    assert json.loads((out / "prune_report.json").read_text())["path"] == ("streaming" if flags else "in-memory")
    assert assistant_of(out) == assistant_of(teacher)


def test_a_distilled_student_takes_its_teachers_template_and_stop_ids(teacher, tmp_path):
    """A student without a chat template (a base model of the teacher's vocabulary) leaves distillation with the
    teacher's: it learnt to answer as the teacher, so it must be prompted and stopped as the teacher."""
    from transformers import AutoTokenizer

    base = copy.deepcopy(models.load_tokenizer("smollm2-135m"))
    base.chat_template = None
    save_tiny(tmp_path / "student", base, num_hidden_layers=1, tie_word_embeddings=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "student").chat_template is None
    out = tmp_path / "distilled"
    done = run_cli(
        "distill",
        str(tmp_path / "student"),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--data",
        "pydoc:train",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--seq-len",
        "16",
        "--eval-tokens",
        "32",
    )
    assert done.exit_code == 0, done.stderr
    assert assistant_of(out) == assistant_of(teacher)
