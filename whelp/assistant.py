"""What keeps a student an assistant: its teacher's tokenizer files and generation config, carried into every output.

A chat model is more than its weights. Its tokenizer files hold the chat template (``chat_template.jinja``, or a
``chat_template`` in ``tokenizer_config.json``: how a conversation becomes tokens, e.g. SmolLM2-Instruct's ChatML
``<|im_start|>user\\n...<|im_end|>``) and the special tokens (bos, eos, pad, unk and the additional ones); its
``generation_config.json`` holds the ids that end an answer (``eos_token_id``: one for SmolLM2-Instruct,
``<|im_end|>``; three for Llama 3.1 Instruct) with its bos, pad and sampling defaults. A student that loses the
template, a special token or one eos id never stops answering.

Decided once, here, for every output made from a teacher (``whelp prune`` in memory and streamed, ``distill``,
``search``'s winner, and so ``build``'s stages, its ``final/`` and ``export --gguf``, which read those files):

* **The teacher's files, verbatim** (``carry_assistant``): its tokenizer files (``TOKENIZER_FILES``) and its
  ``generation_config.json``, copied as they are. Pruning never touches the vocabulary and distillation requires
  the student's token ids to be the teacher's, so the teacher's tokenizer is the student's; nothing in a generation
  config depends on the shape. Copies, not ``save_pretrained`` of loaded objects: transformers re-saves a tokenizer
  in its own format only (transformers 5 drops a sentencepiece ``tokenizer.model``, which llama.cpp's converter
  reads), and the model's own generation config is never the teacher's: a pruned or distilled model is built
  afresh from its config (``from_config``), and transformers derives that one from ``config.json``: one eos id, no
  sampling defaults, a pad only if ``config.json`` names one.
* **Its licence files** (``LICENSE_FILES``): a student is a derivative of the teacher's weights, so it carries the
  terms and notices the teacher's licence attaches to copies.
* **A teacher without a generation_config.json** generates with one derived from its ``config.json``; the output
  then keeps the one derived from its own ``config.json``, whose token ids a pruned model copies from the teacher's.
* Transformers 4.x reads what these files say through ``whelp.hf_compat``, which then adds its fields to the copied
  ``tokenizer_config.json`` (a template only in ``chat_template.jinja`` goes in there too, where 4.46 looks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from whelp.errors import WhelpError

TOKENIZER_FILES = (
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, a sentencepiece tokenizer.model
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.*",  # .jinja (transformers >= 4.50 writes it), .json
    "additional_chat_templates/*.jinja",  # named templates beside the default one (tool use, ...)
)
# the teacher's licence terms and the notices its licence asks every copy to carry (Gemma's terms, section 3.1; a
# registered teacher's are written beside its weights by whelp.models.registered_dir)
LICENSE_FILES = ("LICENSE*", "NOTICE*", "USE_POLICY*", "*_TERMS.*")
CARRIED = (*TOKENIZER_FILES, *LICENSE_FILES, "generation_config.json")


def local_dir(source: str) -> Path:
    """Where a checkpoint's files are on this machine: its directory, or for a hub id the Hugging Face cache's
    snapshot that ``from_pretrained`` read it from (nothing is downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - heavy (1 s): only a hub id's outputs need it

    cached = try_to_load_from_cache(source, "config.json")
    if not isinstance(cached, str):
        raise WhelpError(
            f"{source} is neither a local directory nor in the Hugging Face cache, so its tokenizer and generation "
            f"config cannot be carried; download it (huggingface-cli download {source} --local-dir DIR) and pass DIR"
        )
    return Path(cached).parent


def carry_assistant(source: str, directory: Path) -> None:
    """Copy the teacher ``source``'s tokenizer files and generation config (``CARRIED``) into ``directory``, a
    model directory being written (after the model's own files: its generation config is replaced)."""
    root = local_dir(source)
    for pattern in CARRIED:
        for path in root.glob(pattern):
            if path.is_file():
                target = directory / path.relative_to(root)
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(path, target)
