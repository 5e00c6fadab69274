"""``prune_checkpoint``: teacher directory + target -> pruned vanilla HF checkpoint + prune_report.json.

Orchestration only; the math lives in importance.py (scores, selection) and surgery.py (slicing).
Three paths share the scores and the report: in memory (families of arch.py), streaming from the
shards (streaming.py, when the model does not fit or ``stream=True``) and torch-pruning's dependency
graph for architectures outside the family table (generic.py, width only).

Scores are cached under ``$WHELP_HOME/scores`` keyed by (teacher files, calibration fingerprint,
method) and copied next to the output as ``importance.safetensors``, so a second prune of the same
teacher on the same calibration data, to any shape, skips calibration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from whelp import data, models, store
from whelp.errors import WhelpError
from whelp.prune import arch, importance, surgery
from whelp.prune.targets import Target, parse_target

SCORES_FILE = "importance.safetensors"
REPORT_FILE = "prune_report.json"
ROPE_POLICIES = ("teacher", "target")


@dataclass(frozen=True)
class PruneSpec:
    """How to prune: importance method, calibration data, tie init, RoPE policy, execution path."""

    importance: str = "activation"  # activation | magnitude | taylor | random
    layer_importance: str = "block"  # block (1 - cos) | loss (skip one layer)
    calib: str = "pydoc:calib"
    calib_samples: int = 16
    seq_len: int = 256
    batch_size: int = 4
    tie: str = "embedding"  # embedding | lm_head | mean: init of the shared matrix of an untied teacher
    rope: str = "teacher"  # teacher | target
    stream: bool | None = None  # None: stream only when the teacher does not fit in memory
    scores: str | None = None  # a saved importance.safetensors to reuse
    seed: int = 0

    def __post_init__(self):
        check_spec(self)


def check_spec(spec: PruneSpec) -> None:
    for name, value, valid in (("importance", spec.importance, importance.METHODS),
                               ("layer importance", spec.layer_importance, importance.LAYER_METHODS),
                               ("tie", spec.tie, surgery.TIE_CHOICES), ("rope", spec.rope, ROPE_POLICIES)):
        if value not in valid:
            raise WhelpError(f"unknown {name} '{value}'; choose one of {', '.join(valid)}")
    for name, value in (("calib-samples", spec.calib_samples), ("seq-len", spec.seq_len), ("batch-size", spec.batch_size)):
        if value < 1:
            raise WhelpError(f"--{name} must be positive, got {value}")


def scores_cache() -> Path:
    """Where scores are kept for reuse across prunes: ``$WHELP_HOME/scores``."""
    return store.whelp_home() / "scores"


def teacher_id(source_dir: Path) -> str:
    """sha256 over the teacher's config and the names, sizes and mtimes of its weight files (no reads)."""
    files = sorted(source_dir.glob("*.safetensors")) + [source_dir / "config.json"]
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return store.content_id(stamp)


def load_scores(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Scores saved by ``save_scores``; WhelpError if they came from other calibration data or method."""
    from safetensors import safe_open

    if not path.is_file():
        raise WhelpError(f"scores file {path} does not exist; drop --scores to calibrate")
    with safe_open(str(path), "pt") as f:
        saved = f.metadata() or {}
        for key in ("teacher", "fingerprint", "importance", "version"):
            if saved.get(key) != meta[key]:
                what = "another teacher (or changed teacher files)" if key == "teacher" else f"{key}={saved.get(key)}"
                raise WhelpError(f"{path} was computed with {what}, this prune uses {meta[key]}; use the same "
                                 "teacher and --importance/--calib/--calib-samples/--seq-len, or drop --scores")
        return {k: f.get_tensor(k) for k in f.keys()}


def save_scores(path: Path, scores: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomic write of scores + metadata (calibration fingerprint, method, teacher) as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    store.clean_stale(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{store.tag()}")
    save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _progress(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task(description, total=total)
    return bar, lambda n: bar.advance(task, n)


def _calibrate(model, family, tokens, spec: PruneSpec, scores: dict | None) -> dict:
    """Scores of the spec's method; ``layers.loss`` added when the layer importance asks for it."""
    if scores is None:
        bar, advance = _progress(f"calibrating ({spec.importance})", len(tokens))
        with bar:
            scores = importance.calibrate(model, family, tokens, spec.importance, spec.batch_size, advance, spec.seed)
    if spec.layer_importance == "loss" and "layers.loss" not in scores:
        bar, advance = _progress("layer skip losses", len(model.model.layers))
        with bar:
            scores = {**scores, "layers.loss": importance.skip_losses(model, tokens, spec.batch_size, advance)}
    return scores


@torch.no_grad()
def kl_to_teacher(teacher, student, tokens: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) in nats on ``tokens`` [B, T]."""
    log_t = F.log_softmax(teacher(input_ids=tokens).logits.float(), dim=-1)
    log_s = F.log_softmax(student(input_ids=tokens).logits.float(), dim=-1)
    return float(F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean())


def tie_kls(teacher, pruned, keep, family, tokens: torch.Tensor) -> dict[str, float]:
    """KL to the teacher of each tie init; leaves ``pruned`` with the init ``keep.tie``."""
    state = teacher.state_dict()
    sliced = {}
    for name in (family.embed, family.lm_head):
        sliced.update(surgery.slice_tensor(name, state[name], keep, family, teacher.config, pruned.config))
    kls = {}
    weight = pruned.get_input_embeddings().weight
    for how in surgery.TIE_CHOICES + (keep.tie,):  # the last pass restores the chosen init
        weight.data.copy_(surgery.tie_embeddings(sliced[family.embed], sliced[family.lm_head], how))
        if how not in kls:
            kls[how] = kl_to_teacher(teacher, pruned, tokens)
    return kls


def kept_report(keep: surgery.Keep) -> dict:
    return {"layers": list(keep.layers), "hidden": keep.hidden.tolist(), "mlp": [m.tolist() for m in keep.mlp],
            "kv_heads": [k.tolist() for k in keep.kv_heads], "q_heads": [q.tolist() for q in keep.q_heads],
            "head_dims": keep.head_dims.tolist()}


def prune_checkpoint(source: str, target: str, out: str | Path, spec: PruneSpec = PruneSpec(), force: bool = False,
                     stage_key: str | None = None) -> dict:
    """Prune ``source`` (directory, registered name) to ``target`` (preset, config.json, key=value) into ``out``.

    Returns the report also written to ``out/prune_report.json``. The checkpoint, scores and report are
    written into one temporary directory renamed into place at the end, marked with ``stage_key`` (a
    build's key of this prune's inputs) so a build can prove which inputs made it.
    """
    check_spec(spec)
    out = store.check_writable(out, force, "model")
    timings, t0 = {}, time.perf_counter()
    source_dir = Path(models.resolve(source))
    if not source_dir.is_dir():
        raise WhelpError(f"prune reads a local checkpoint and '{source}' is not one; download it first "
                         f"(huggingface-cli download {source} --local-dir DIR) and pass DIR")
    source_cfg = models.load_config(str(source_dir))
    parsed = parse_target(source_cfg, target)
    family = arch.family_of(source_cfg)
    tokenizer = models.load_tokenizer(str(source_dir))
    rows = data.open_blocks(spec.calib, tokenizer, spec.seq_len, seed=spec.seed)
    calib_tokens = rows.head(spec.calib_samples)  # [calib_samples, seq_len]
    fingerprint = store.content_id([rows.fingerprint, len(calib_tokens)])
    meta = {"fingerprint": fingerprint, "importance": spec.importance, "teacher": teacher_id(source_dir),
            "version": str(importance.SCORES_VERSION)}
    cache = scores_cache() / f"{store.content_id(meta)[:32]}.safetensors"
    saved = Path(spec.scores).expanduser() if spec.scores else cache
    scores = load_scores(saved, meta) if spec.scores or cache.is_file() else None
    timings["prepare_s"] = time.perf_counter() - t0
    report = {"source": source, "target": target, "importance": spec.importance,
              "layer_importance": spec.layer_importance, "spec": asdict(spec), "scores_reused": scores is not None,
              "calibration": {"source": spec.calib, "samples": len(calib_tokens), "seq_len": spec.seq_len,
                              "fingerprint": fingerprint}}
    if family is None and spec.stream:
        raise WhelpError(f"streaming supports the families {', '.join(arch.FAMILIES)}, not '{source_cfg.model_type}'; "
                         "drop --stream to width-prune it in memory through torch-pruning")
    with store.atomic_dir(out, force, "model", stage_key=stage_key) as tmp:
        if family is None:
            scores, keep_report, extra = _prune_generic(source_dir, parsed, calib_tokens, spec, tmp, timings)
        else:
            stream = spec.stream if spec.stream is not None else _should_stream(source_dir)
            run = _prune_streaming if stream else _prune_in_memory
            scores, keep_report, extra = run(source_dir, parsed, family, calib_tokens, spec, scores, tmp, timings)
        if scores is not None and not spec.scores:  # the shared cache holds only what this teacher computed
            save_scores(cache, scores, meta)
            save_scores(tmp / SCORES_FILE, scores, meta)
        target_cfg = models.load_config(str(tmp))
        report.update(extra, kept=keep_report, params={"before": models.count_params(source_cfg)[0],
                                                       "after": models.count_params(target_cfg)[0]},
                      shape={"source": models.shape(source_cfg), "target": models.shape(target_cfg)},
                      timings={**timings, "total_s": time.perf_counter() - t0})
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _should_stream(source_dir: Path) -> bool:
    from whelp.prune import streaming

    return streaming.should_stream(source_dir, torch.float32)


def _prune_in_memory(source_dir, parsed: Target, family, tokens, spec, scores, out: Path, timings):
    t = time.perf_counter()
    model, tokenizer = models.load_model(str(source_dir))
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = _calibrate(model, family, tokens, spec, scores)
    timings["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    keep = importance.select(scores, model.config, parsed.shape, spec.layer_importance, spec.tie)
    target_cfg = surgery.target_config(model.config, keep, parsed.rope_parameters if spec.rope == "target" else None)
    pruned = surgery.prune_model(model, keep, family, target_cfg)
    timings["surgery_s"] = time.perf_counter() - t
    tie = None
    if keep.tie is not None:
        t = time.perf_counter()
        tie = {"init": keep.tie, "kl": tie_kls(model, pruned, keep, family, tokens[: spec.batch_size])}
        timings["tie_kl_s"] = time.perf_counter() - t
    t = time.perf_counter()
    models.write_model(pruned, tokenizer, out)
    timings["save_s"] = time.perf_counter() - t
    return scores, kept_report(keep), {"path": "in-memory", "tie": tie, "rope": spec.rope}


def _prune_streaming(source_dir, parsed: Target, family, tokens, spec, scores, out: Path, timings):
    from whelp.prune import streaming

    t = time.perf_counter()
    n_layers = surgery.text_config(models.load_config(str(source_dir))).num_hidden_layers
    bar, advance = _progress(f"streaming calibration ({spec.importance})", n_layers)
    with bar:
        keep, _, scores = streaming.prune_streaming(
            source_dir, out, parsed, tokens, method=spec.importance, layer_method=spec.layer_importance,
            tie=spec.tie, rope=spec.rope, scores=scores, batch_size=spec.batch_size, progress=advance)
    timings["stream_s"] = time.perf_counter() - t
    tie = {"init": keep.tie, "kl": None} if keep.tie else None  # KL needs the whole teacher in memory
    return scores, kept_report(keep), {"path": "streaming", "tie": tie, "rope": spec.rope}


def _prune_generic(source_dir, parsed: Target, tokens, spec, out: Path, timings):
    from whelp.prune import generic

    t = time.perf_counter()
    model, tokenizer = models.load_model(str(source_dir))
    pruned, keep = generic.prune_generic(model, parsed.shape, spec.importance, tokens, spec.seed)
    timings["generic_s"] = time.perf_counter() - t
    models.write_model(pruned, tokenizer, out)
    kept = {"hidden": keep.hidden.tolist(), "mlp": [m.tolist() for m in keep.mlp],
            "heads": [h.tolist() for h in keep.heads] if keep.heads else None}
    return None, kept, {"path": "generic", "tie": None, "rope": "teacher"}
