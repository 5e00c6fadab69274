"""Pruning verbs: ``prune(model, target, calib)`` in memory, and ``prune_checkpoint`` from a directory to a directory.

Orchestration only; the math lives in importance.py (scores, selection) and surgery.py (slicing). Three paths share
the scores and the report: in memory (families of arch.py), streaming from the shards (streaming.py, when the model
does not fit or ``stream=True``) and torch-pruning's dependency graph for architectures outside the family table
(generic.py, width only, behind the ``whelp[generic]`` extra). ``prune_checkpoint`` is a thin wrapper: it validates
every input before loading anything, reuses saved scores (scores.py) and writes the output atomically.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from whelp import architecture, data, models, store
from whelp.errors import WhelpError
from whelp.output import Progress
from whelp.pruning import arch, generic, importance, moe, streaming, surgery
from whelp.pruning import reconstruct as reconstruction
from whelp.pruning import scores as saved
from whelp.pruning.keep import Keep, text_config
from whelp.pruning.obs import resolve_select
from whelp.pruning.targets import Target, parse_target, target_rope
from whelp.specs import TIE, LoadPolicy, Mixture, PruneSpec, record
from whelp.weights import check_safe_weights, save_dtype

REPORT_FILE = "prune_report.json"


def calibrate_scores(model, family, tokens, spec: PruneSpec, scores: dict | None) -> dict:
    """Scores of the spec's method (``scores``, when given, are reused); ``layers.loss`` added when the layer
    importance asks for it. Shared with whelp search's one calibration pass."""
    if scores is None:
        with Progress(f"calibrating ({spec.importance})", len(tokens)) as bar:
            scores = importance.calibrate(
                model, family, tokens, spec.importance, spec.batch_size, bar.advance, spec.seed
            )
    if spec.layer_importance == "loss" and "layers.loss" not in scores:
        with Progress("layer skip losses", text_config(model.config).num_hidden_layers) as bar:
            scores = {**scores, "layers.loss": importance.skip_losses(model, tokens, spec.batch_size, bar.advance)}
    return scores


@torch.no_grad()
def log_probs(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fp32 log-probs [n, L, V] of ``model`` on ``blocks`` [n, L] of token ids, ``batch_size`` blocks a forward."""
    return torch.cat(
        [
            F.log_softmax(model(input_ids=blocks[i : i + batch_size]).logits.float(), -1)
            for i in range(0, len(blocks), batch_size)
        ]
    )


def kl_to_teacher(teacher_logp: torch.Tensor, model, blocks: torch.Tensor, batch_size: int) -> dict:
    """How far ``model`` is from its teacher on ``blocks`` [n, L]: ``kl``, the mean KL(teacher || model) in nats per
    token, and ``ppl``, the model's perplexity of the next tokens. ``teacher_logp`` [n, L, V] is ``log_probs`` of
    the teacher on the same blocks, computed once for every candidate it is compared with (tie inits, a search's
    pool)."""
    logp = log_probs(model.eval(), blocks, batch_size)
    kl = F.kl_div(logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
    nll = F.nll_loss(logp[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
    return {"kl": float(kl), "ppl": float(nll.exp())}


def tie_kls(teacher, pruned, keep, family, tokens: torch.Tensor) -> dict[str, float]:
    """KL to the teacher of each tie init; leaves ``pruned`` with the init ``keep.tie``."""
    state = teacher.state_dict()
    sliced = {}
    for name in (family.embed, family.lm_head):
        sliced.update(surgery.slice_tensor(name, state[name], keep, family, teacher.config, pruned.config))
    kls = {}
    weight = pruned.get_input_embeddings().weight
    teacher_logp = log_probs(teacher, tokens, len(tokens))
    for how in TIE + (keep.tie,):  # the last pass restores the chosen init
        weight.data.copy_(surgery.tie_embeddings(sliced[family.embed], sliced[family.lm_head], how))
        if how not in kls:
            kls[how] = kl_to_teacher(teacher_logp, pruned, tokens, len(tokens))["kl"]
    return kls


def kept_report(keep: Keep) -> dict:
    experts = {} if keep.experts is None else moe.kept_report(keep.experts)
    return {
        "layers": list(keep.layers),
        "hidden": keep.hidden.tolist(),
        "mlp": [m.tolist() for m in keep.mlp],
        "kv_heads": [k.tolist() for k in keep.kv_heads],
        "q_heads": [q.tolist() for q in keep.q_heads],
        "head_dims": keep.head_dims.tolist(),
        **experts,
    }


def calibration_tokens(calib, n: int, vocab: int | None = None) -> torch.Tensor:
    """The first ``n`` rows of ``calib``: ``whelp.blocks(...)`` rows or a LongTensor [N, T] of ids below ``vocab``."""
    if isinstance(calib, (str, Mixture)):
        raise WhelpError(f"calibration data is rows of tokens: pass whelp.blocks('{calib}', tokenizer, seq_len)")
    tokens = calib.head(n) if hasattr(calib, "head") else torch.as_tensor(calib)[:n]
    if tokens.ndim != 2 or len(tokens) == 0:
        raise WhelpError(f"calibration data must be blocks [N, T] with N >= 1, got shape {list(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise WhelpError(f"calibration blocks must hold token ids (integers), got {tokens.dtype}")
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise WhelpError(
            f"calibration token ids must be in 0..{vocab - 1} (the model's vocabulary), got "
            f"{int(tokens.min())}..{int(tokens.max())}"
        )
    return tokens.long()


def _prune(model, target: Target, tokens: torch.Tensor, spec: PruneSpec, scores: dict | None):
    """``(pruned, scores, kept, details)``; ``model`` is left as it was."""
    family = arch.family_of(model.config)
    if family is None:
        pruned, keep = generic.prune_generic(copy.deepcopy(model), target.shape, spec.importance, tokens, spec.seed)
        kept = {
            "hidden": keep.hidden.tolist(),
            "mlp": [m.tolist() for m in keep.mlp],
            "heads": [h.tolist() for h in keep.heads] if keep.heads else None,
        }
        return pruned, None, kept, {"path": "generic", "tie": None, "rope": "teacher"}
    timings = {}
    t = time.perf_counter()
    scores = calibrate_scores(model, family, tokens, spec, scores)
    timings["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    keep = importance.select(scores, model.config, target.shape, spec.layer_importance, spec.tie)
    target_cfg = surgery.target_config(model.config, keep, target_rope(target, spec.rope))
    pruned = surgery.prune_model(model, keep, family, target_cfg)
    timings["surgery_s"] = time.perf_counter() - t
    tie = None
    if keep.tie is not None:
        t = time.perf_counter()
        tie = {"init": keep.tie, "kl": tie_kls(model, pruned, keep, family, tokens[: spec.batch_size])}
        timings["tie_kl_s"] = time.perf_counter() - t
    details = {"path": "in-memory", "tie": tie, "rope": spec.rope, "timings": timings}
    mode = reconstruction.resolve(spec.reconstruct, family)
    select = resolve_select(spec.select, mode, family)
    if mode != "none":
        t = time.perf_counter()
        with Progress(f"reconstructing ({mode}, {select} selection)", len(keep.layers)) as bar:
            refit = tokens[: spec.refit_blocks]
            pruned, errors, keep = reconstruction.reconstruct_model(
                model, pruned, keep, family, refit, spec.batch_size, mode, bar.advance, select == "obs"
            )
        details["select"] = select
        timings["reconstruct_s"] = time.perf_counter() - t
        details["reconstruct"] = reconstruction.summary(mode, errors)
    return pruned, scores, kept_report(keep), details


def prune(model, target: str | Target, calib, spec: PruneSpec = PruneSpec(), scores: dict | None = None):
    """A new model of ``target``'s shape (preset, config.json or ``key=value`` overrides) holding the most important
    structures of ``model``, ranked on the first ``spec.calib_samples`` rows of ``calib``. ``model`` is unchanged.

    The pruned model's config is the target's; ``pruned.whelp_kept`` holds the kept indices per axis (layers, hidden
    channels, MLP neurons, KV and query heads, head dims), ``pruned.whelp_scores`` the importance scores (pass them
    back as ``scores`` to prune the same teacher to another shape without calibrating again).
    """
    if not isinstance(target, (str, Target)):
        raise WhelpError(f"target is a preset name, a config.json path or key=value overrides, got {target!r}")
    parsed = target if isinstance(target, Target) else parse_target(model.config, target)
    family = arch.family_of(model.config)
    mode = reconstruction.resolve(spec.reconstruct, family)
    reconstruction.check_mode(mode, model.config, family, parsed.published, spec.select)
    vocab = model.get_input_embeddings().num_embeddings
    pruned, scores, kept, _ = _prune(model, parsed, calibration_tokens(calib, spec.calib_samples, vocab), spec, scores)
    pruned.whelp_kept, pruned.whelp_scores = kept, scores
    return pruned


@store.writer
def prune_checkpoint(
    source: str,
    target: str,
    out: str | Path,
    spec: PruneSpec = PruneSpec(),
    force: bool = False,
    stage_key: str | None = None,
    policy: LoadPolicy = LoadPolicy(),
) -> dict:
    """Prune ``source`` (directory, registered name) to ``target`` (preset, config.json, key=value) into ``out``.

    Returns the report also written to ``out/prune_report.json``. The checkpoint, scores and report are
    written into one temporary directory renamed into place at the end, marked with ``stage_key`` (a
    build's key of this prune's inputs) so a build can prove which inputs made it.
    """
    out = store.check_writable(out, force, "model")
    t0 = time.perf_counter()
    source_dir = Path(models.locate(source))
    if not source_dir.is_dir():
        raise WhelpError(
            f"prune reads a local checkpoint and '{source}' is not one; download it first "
            f"(huggingface-cli download {source} --local-dir DIR) and pass DIR"
        )
    check_safe_weights(str(source_dir), policy)
    models.check_checkpoint(str(source_dir), policy)  # before the scores' key or the streaming choice reads its files
    source_cfg = models.load_config(str(source_dir), policy)
    parsed = parse_target(source_cfg, target)
    target_rope(parsed, spec.rope)
    family = arch.family_of(source_cfg)
    mode = reconstruction.resolve(spec.reconstruct, family)
    reconstruction.check_mode(mode, source_cfg, family, parsed.published, spec.select)
    store.check_apart(out, [source_dir])
    architecture.check_positions(source_cfg, spec.seq_len, "--seq-len")
    if moe.moe_family_of(source_cfg) is not None:
        moe.check_spec(source_cfg, spec)
    if family is None and spec.stream:
        raise WhelpError(
            f"streaming supports the families {', '.join(arch.FAMILIES)}, not '{source_cfg.model_type}'; "
            "drop --stream to width-prune it in memory through torch-pruning"
        )
    if family is None:
        generic.require(source_cfg.model_type)
    if spec.scores:
        saved.check_scores_file(Path(spec.scores).expanduser())
    data.check_data(spec.calib)
    rows = data.open_blocks(spec.calib, models.load_tokenizer(str(source_dir), policy), spec.seq_len, seed=spec.seed)
    tokens = calibration_tokens(rows, spec.calib_samples)
    fingerprint = store.content_id([rows.fingerprint, len(tokens)])
    meta = saved.scores_meta(source_dir, fingerprint, spec.importance)
    cache = saved.cache_path(meta)
    scores_path = Path(spec.scores).expanduser() if spec.scores else cache
    scores = saved.load_scores(scores_path, meta) if spec.scores or cache.is_file() else None
    report = {
        "source": source,
        "target": target,
        "importance": spec.importance,
        "layer_importance": spec.layer_importance,
        "spec": record(spec),
        "scores_reused": scores is not None,
        "calibration": {
            "source": str(spec.calib),
            "samples": len(tokens),
            "seq_len": spec.seq_len,
            "fingerprint": fingerprint,
        },
    }
    timings = {"prepare_s": time.perf_counter() - t0}
    with store.atomic_dir(out, force, "model", stage_key=stage_key) as tmp:
        stream = family is not None and (spec.stream if spec.stream is not None else _should_stream(source_dir))
        run = _stream_to if stream else _prune_to
        scores, kept, details = run(source_dir, parsed, tokens, spec, scores, tmp, timings, policy)
        if scores is not None and not spec.scores:  # the shared cache holds only what this teacher computed
            saved.save_scores(cache, scores, meta)
            saved.save_scores(tmp / saved.SCORES_FILE, scores, meta)
        target_cfg = models.load_config(str(tmp), policy)
        timings.update(details.pop("timings", {}), total_s=time.perf_counter() - t0)
        report.update(
            details,
            kept=kept,
            params={
                "before": architecture.count_params(source_cfg, policy)[0],
                "after": architecture.count_params(target_cfg, policy)[0],
            },
            shape={"source": moe.shape_of(source_cfg), "target": moe.shape_of(target_cfg)},
            timings=timings,
        )
        store.write_text(tmp / REPORT_FILE, json.dumps(report, indent=2))
    return report


def _should_stream(source_dir: Path) -> bool:
    return streaming.should_stream(source_dir, torch.float32)


def _prune_to(source_dir, parsed: Target, tokens, spec, scores, out: Path, timings, policy):
    t = time.perf_counter()
    model, _ = models.load_model(str(source_dir), policy=policy)
    timings["load_s"] = time.perf_counter() - t
    pruned, scores, kept, details = _prune(model, parsed, tokens, spec, scores)
    t = time.perf_counter()
    dtype = save_dtype(spec.save_dtype, source_dir, model.config)
    models.write_model(pruned.to(getattr(torch, dtype)), None, out, source=str(source_dir))
    timings["save_s"] = time.perf_counter() - t
    return scores, kept, details


def _stream_to(source_dir, parsed: Target, tokens, spec, scores, out: Path, timings, policy):
    t = time.perf_counter()
    config = models.load_config(str(source_dir), policy)
    steps = text_config(config).num_hidden_layers
    family = arch.family_of(config)
    mode = reconstruction.resolve(spec.reconstruct, family)
    select = resolve_select(spec.select, mode, family)
    what = f"streaming calibration ({spec.importance})"
    if mode != "none":
        steps, what = (
            steps + parsed.shape["num_hidden_layers"],
            f"{what} and reconstruction ({mode}, {select} selection)",
        )
    with Progress(what, steps) as bar:
        keep, _, scores, rebuilt = streaming.prune_streaming(
            source_dir, out, parsed, spec, tokens, scores=scores, progress=bar.advance, refit_progress=bar.advance
        )
    timings["stream_s"] = time.perf_counter() - t
    tie = {"init": keep.tie, "kl": None} if keep.tie else None  # KL needs the whole teacher in memory
    details = {"path": "streaming", "tie": tie, "rope": spec.rope}
    if mode != "none":
        details["select"] = select
    return scores, kept_report(keep), details if rebuilt is None else {**details, "reconstruct": rebuilt}
