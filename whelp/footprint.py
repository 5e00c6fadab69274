"""What a stage computes and holds, before any GPU is chosen: the memory parts of each stage, and the FLOPs of the
prune's calibration passes and of generation, from configs and specs alone (``whelp.pricing`` prices them on N GPUs
of one kind).

Memory per GPU is a sum of parts, each ``replicated`` (every GPU holds it), ``sharded`` (FSDP2 splits it over the
stage's GPUs: bytes / N), ``gathered`` (FSDP2's unsharded working set, held only when N > 1) or ``split`` (tensor
parallel: bytes / its ways). The formulas,
b sequences of s tokens per GPU, hidden size h, L layers, V vocabulary ids, bytes in the activation dtype d:
  training state   16 B/param: fp32 weights 4 + fp32 grads 4 + AdamW's two fp32 moments 8 (the 16 bytes/param of
                   mixed-precision Adam in Rajbhandari et al. 2020, "ZeRO", section 3.1);
  activations      Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
                   section 4.1, eq. 1): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit; flash/SDPA attention keeps
                   no [a, s, s] scores, leaving 34*s*b*h (scaled by d/2). With full recomputation (section 5) each
                   layer keeps only its input, s*b*h*d, and the layer being recomputed holds all 34*s*b*h*d/2. A
                   forward without grad frees each layer's activations as the next runs: at most one layer's;
  loss chunks      ~3 * chunk_size * V * 4 bytes (DistillSpec.kd.chunk_size); for capture the same [chunk, V] fp32
                   logits at the distil step's chunk_size;
  KV cache         2 * L * b * s * kv_heads * head_dim * d bytes (keys and values of every layer: Pope et al. 2022,
                   "Efficiently Scaling Transformer Inference", section 2);
  FSDP2 gathers    the root module's parameters (embeddings, final norm) stay unsharded through forward and
                   backward, and one decoder layer is gathered while the next is prefetched (the ``reshard_after_
                   forward`` and prefetch defaults of torch.distributed.fsdp.fully_shard): (root + 2 layers) params.
"""

from __future__ import annotations

from whelp.architecture import shape
from whelp.pruning.streaming import MEMORY_FACTOR

TRAIN_BYTES_PER_PARAM = 16
CHECKPOINT_BYTES_PER_PARAM = 12  # a DCP checkpoint: fp32 weights 4 + AdamW moments 8
MODEL_BYTES_PER_PARAM = 4  # whelp saves the fp32 weights it pruned or trained
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def part(what: str, nbytes: int, per_gpu: str = "replicated", teacher: str | None = None, ways: int = 1) -> dict:
    """One part of a stage's memory: ``per_gpu`` replicated | sharded (FSDP2: / N) | gathered (only when N > 1) |
    split (tensor parallel: / ``ways``, whatever N); ``teacher`` names the model when the part is a teacher's
    weights."""
    if per_gpu not in ("replicated", "sharded", "gathered", "split"):
        raise ValueError(f"per_gpu {per_gpu!r}")
    return {
        "what": what,
        "bytes": int(nbytes),
        "per_gpu": per_gpu,
        **({"teacher": teacher} if teacher else {}),
        **({"ways": ways} if per_gpu == "split" else {}),
    }


def layer_activation_bytes(tokens: int, hidden: int, dtype_bytes: int) -> int:
    """One decoder layer's activations over ``tokens`` = b * s positions: 34 * s*b*h bytes in 16-bit (Korthikanti
    et al. 2022, eq. 1 without the attention-score term, which flash/SDPA attention never stores)."""
    return 34 * tokens * hidden * dtype_bytes // 2


def training_activation_bytes(tokens: int, hidden: int, layers: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Activations kept for backward: every layer's (34 s*b*h in 16-bit), or with full recomputation each layer's
    input (s*b*h*d) plus the one layer being recomputed (Korthikanti et al. 2022, sections 4.1 and 5)."""
    layer = layer_activation_bytes(tokens, hidden, dtype_bytes)
    return layers * tokens * hidden * dtype_bytes + layer if checkpointing else layers * layer


def loss_chunk_bytes(chunk_size: int, vocab: int) -> int:
    """The chunked loss's [chunk, V] fp32 buffers: ~3 of them (DistillSpec.kd.chunk_size)."""
    return 3 * chunk_size * vocab * 4


def kv_cache_bytes(tokens: int, shape: dict, dtype_bytes: int) -> int:
    """Keys and values of every layer for ``tokens`` = b * s positions (Pope et al. 2022, section 2)."""
    return 2 * shape["num_hidden_layers"] * tokens * shape["num_key_value_heads"] * shape["head_dim"] * dtype_bytes


def gathered_bytes(model: dict, dtype_bytes: int) -> int:
    """FSDP2's unsharded working set of ``model`` ({"config", "params", "non_embedding"}): the root's parameters (all
    but the decoder layers) and two decoder layers (the one running, the next prefetched), a layer counted as the
    non-embedding params / layers."""
    layers = model["config"].num_hidden_layers
    layer = model["non_embedding"] // layers
    return (model["params"] - layers * layer + 2 * layer) * dtype_bytes


# A reconstruction, in teacher forwards per calibration token (whelp.pruning.reconstruct): per layer the student's
# attention four times (span_attn: once more for its o_proj towards the teacher's stream) and its MLP once, the wide
# attention and MLP once, the teacher's span once (3.45 on SmolLM2's layers, attention a quarter of a layer); less
# where an OBS selection's pass gives the layer's output (2.25 on the demo). The larger count, rounded up, stands for
# both: a plan must not promise less than the prune takes.
REFIT_PASSES = 4


def prune_flops(spec, params: int, layers: int, mode: str) -> int:
    """A prune's calibration: a forward (2 N per token) over calib_samples x seq_len tokens, 3 x that for Taylor
    importance (the backward too: 6 N), plus L + 1 forwards (the base and each layer skipped) for
    ``layer_importance: loss`` (none of these when saved ``scores`` are reused), plus REFIT_PASSES forwards over
    the refit's blocks (``refit_samples``, default all) for a reconstruction (``mode``: the one ``auto`` resolved to
    for the teacher, none on the generic path); its k x k solves are small beside them."""
    scoring = (3 if spec.importance == "taylor" else 1) + (layers + 1 if spec.layer_importance == "loss" else 0)
    refit = 0 if mode == "none" else REFIT_PASSES * spec.refit_blocks
    return 2 * params * spec.seq_len * ((0 if spec.scores else scoring * spec.calib_samples) + refit)


def refit_memory(tokens: int, hidden: int, mode: str) -> list[dict]:
    """A reconstruction's calibration hidden states beside the prune's weights (whelp.pruning.reconstruct): fp32
    [tokens, hidden] of the student's layer inputs; for ``span`` the teacher's beside them and, for the layer being
    refit, the teacher's at the span's end (``span_attn``: and after the kept layer's attention), on the student's
    channels but priced at the teacher's width (an upper bound); none for ``none``. They grow with the calibration,
    not the data: 550 GB for span_attn on 1,024 x 8,192 tokens at H = 4,096 (an 8B teacher)."""
    if mode == "none":
        return []
    copies, what = {
        "span": (3, "the student's and 2 of the teacher's"),
        "span_attn": (4, "the student's and 3 of the teacher's"),
    }.get(mode, (1, "the student's"))
    return [part(f"reconstruction: {what} calibration hidden states, tokens x H fp32", 4 * tokens * hidden * copies)]


def select_flops(tokens: int, layers: int, width: int, kept: int) -> int:
    """``--select obs`` on top of the refit (whelp.pruning.obs): per student layer, the float64 Gram of the
    ``width`` MLP neurons over the calibration tokens (2 T n^2) and the greedy removal of ``width - kept`` of them
    by block updates of the n x n inverse (about 4 n^2 per neuron removed): at 8B (n = 14,336 -> 4,096) the removal
    is ~8 TFLOP per layer, beside a 16 x 256-token calibration's gram of ~1.7 TFLOP (``tokens``)."""
    if width == kept:  # nothing to choose (a depth-only prune): no moments are gathered
        return 0
    return layers * (2 * tokens * width * width + 4 * width * width * (width - kept))


def select_memory(width: int, kept: int, tokens: int = 0) -> list[dict]:
    """``--select obs``'s host memory beside the prune's: about four float64 n x n matrices of the ``width`` MLP
    neurons alive at once (the Gram, the damped system, its Cholesky factor, the inverse); 6.6 GB at n = 14,336.
    ``tokens``: calibration tokens whose fp32 activations of every neuron one layer keeps for its output (a ``span``
    refit: whelp.pruning.obs.mlp_moments); 0.9 GB for 16K tokens at n = 14,336."""
    if width == kept:
        return []
    held = [part("OBS selection: one layer's activations, tokens x n fp32", 4 * tokens * width)] if tokens else []
    return [part("OBS selection: 4 x n^2 float64 (Gram, system, factor, inverse)", 32 * width**2), *held]


def prune_memory(params: int) -> list[dict]:
    """Prune runs in one host process in fp32: in memory it holds MEMORY_FACTOR x the weights (teacher, pruned copy,
    calibration activations), else it streams the shards layer by layer (whelp.pruning.streaming)."""
    return [
        part(
            f"host RAM in memory: {MEMORY_FACTOR} x fp32 weights (streams layer by layer when short of it)",
            MEMORY_FACTOR * 4 * params,
        )
    ]


def capture_memory(
    model: dict, dtype: str, positions: int, chunk_size: int, vocab: int, tp_size: int = 1
) -> list[dict]:
    """A capture's GPU: the teacher's weights in ``dtype`` (split over ``tp_size`` GPUs when tensor parallel), one
    layer's activations over ``positions`` = blocks per forward x seq_len (a forward without grad frees each layer's
    as the next runs; counted whole, an upper bound under tensor parallelism), the [chunk, V] fp32 logits."""
    d = DTYPE_BYTES[dtype]
    weights = (
        part(
            f"teacher weights ({dtype}), tensor parallel over {tp_size}",
            d * model["params"],
            "split",
            teacher=model["name"],
            ways=tp_size,
        )
        if tp_size > 1
        else part(f"teacher weights ({dtype})", d * model["params"], teacher=model["name"])
    )
    return [
        weights,
        part(
            f"one layer's activations, {positions:,} positions",
            layer_activation_bytes(positions, model["config"].hidden_size, d),
        ),
        part("logit chunks", loss_chunk_bytes(chunk_size, vocab)),
    ]


def generate_flops_per_token(params: int, spec, template: int, system: int = 0) -> dict[str, float]:
    """FLOPs per stored token of ``whelp generate`` (2 x ``params`` a token through the teacher, prompts included).
    Text: each stored token is sampled or prefilled once. Chat (``spec.chat``): a conversation of ``template`` +
    ``request_tokens`` + ``new_tokens`` tokens at most goes through the teacher ``samples_per_prompt`` (n) times
    (each answer prefills the request and samples its own answer; n - 1 are thrown away), n more when n > 1 (each
    answer scored by one forward), and a self-written request (Magpie, no ``prompts``) is sampled once more before
    it is answered; ``system`` tokens more per answer (``--system``: shown to the teacher, not stored). Priced at
    full lengths, before drops: a store whose manifest drops a share d of its samples costs 1 / (1 - d) times this."""
    if not spec.chat:
        return {"teacher_sampling": 2 * params}
    n = spec.samples_per_prompt
    conversation = template + spec.request_tokens + spec.new_tokens
    shown = (conversation + system) / conversation
    parts = {"teacher_sampling": 2 * params * n * shown}
    if n > 1:
        parts["teacher_scoring"] = 2 * params * n * shown
    if not spec.prompts:
        parts["request_writing"] = 2 * params * (template + spec.request_tokens) / conversation
    return parts


def generate_memory(model: dict, spec, sequence: int) -> list[dict]:
    """One generating process: the model in the GenerateSpec dtype and the KV cache of ``batch_size`` sequences of
    ``sequence`` tokens (prompt and sampled)."""
    d, positions = DTYPE_BYTES[spec.dtype], spec.batch_size * sequence
    return [
        part(f"weights ({spec.dtype})", d * model["params"], teacher=model["name"]),
        part(f"KV cache, {positions:,} positions", kv_cache_bytes(positions, shape(model["config"]), d)),
    ]


def distill_memory(spec, student: dict, live: list[dict]) -> list[dict]:
    """A distil step's GPU: the student's training state sharded by FSDP2, the live teachers replicated (sharded with
    ``shard_teachers``) in the compute dtype, activations, the teachers' final hidden states, the loss chunks.
    ``student`` and each live model are ``{"name", "config", "params", "non_embedding"}``; the teachers run first under
    no_grad and free their activations before the student's forward, so the larger of the two counts."""
    d = DTYPE_BYTES["float32" if spec.compute.dtype == "float32" else "bfloat16"]  # auto: bf16 on GPUs
    cfg, positions = student["config"], spec.batch_size * spec.seq_len
    parts = [
        part("student weights + grads + AdamW (16 B/param)", TRAIN_BYTES_PER_PARAM * student["params"], "sharded"),
        part("student FSDP2 gathers (fp32)", gathered_bytes(student, 4), "gathered"),
    ]  # no MixedPrecisionPolicy
    for m in live:
        parts.append(
            part(
                f"live teacher {m['name']}",
                d * m["params"],
                "sharded" if spec.compute.shard_teachers else "replicated",
                teacher=m["name"],
            )
        )
        if spec.compute.shard_teachers:
            parts.append(part(f"live teacher {m['name']} FSDP2 gathers", gathered_bytes(m, d), "gathered"))
    acts = max(
        [
            training_activation_bytes(
                positions, cfg.hidden_size, cfg.num_hidden_layers, d, spec.compute.grad_checkpointing
            )
        ]
        + [layer_activation_bytes(positions, m["config"].hidden_size, d) for m in live]
    )
    what = "activations" + (" (grad_checkpointing)" if spec.compute.grad_checkpointing else "")
    return (
        parts
        + [
            part(f"{what}, {positions:,} positions", acts),
            part("live teachers' final hidden states", sum(positions * m["config"].hidden_size * d for m in live)),
            part("loss chunks", loss_chunk_bytes(spec.kd.chunk_size, cfg.vocab_size)),
        ]
        + hidden_memory(spec, cfg, live, positions, d)
    )


def hidden_memory(spec, cfg, live: list[dict], positions: int, d: int) -> list[dict]:
    """``--hidden-weight``: the first teacher's states at one layer per student layer (compute dtype), and one layer's
    fp32 loss terms at a time (the masked states, their projection and the difference, [N, Ht] each; each layer's is
    recomputed in backward, whelp.distillation.hidden.hidden_loss)."""
    if not spec.hidden.weight or not live:
        return []
    layers, width = cfg.num_hidden_layers, live[0]["config"].hidden_size
    return [
        part("teacher's hidden states at the mapped layers", layers * positions * width * d),
        part("hidden-state loss terms of one layer (fp32)", 3 * positions * width * 4),
    ]
