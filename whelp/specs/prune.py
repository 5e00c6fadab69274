"""How to prune one given shape (``PruneSpec``) and how ``whelp search`` chooses the shape (``SearchSpec``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from whelp.schema import check_types
from whelp.specs.base import (
    IMPORTANCE,
    LAYER_IMPORTANCE,
    MAX_STEPS,
    RECONSTRUCT,
    ROPE,
    SAVE_DTYPES,
    SELECT,
    TIE,
    _at_most,
    _choice,
    _positive,
    _require,
    opt,
)
from whelp.specs.data import Mixture, as_mixtures


@dataclass(frozen=True)
class PruneSpec:
    """How to prune: importance method, calibration data, tie init, RoPE policy, execution path."""

    importance: Literal["activation", "magnitude", "taylor", "random"] = opt(
        "activation", "Neuron/head/channel importance: activation | magnitude | taylor | random"
    )
    layer_importance: Literal["block", "loss"] = opt("block", "Layer importance: block (1 - cos) | loss (skip a layer)")
    calib: Mixture = opt(
        Mixture.parse("pydoc:calib"), "Calibration data (store, file, dir, pydoc:calib, hf:..., a:0.7,b:0.3)"
    )
    calib_samples: int = opt(16, "Calibration blocks")
    refit_samples: int | None = opt(
        None,
        "Calibration blocks the reconstruction refits on, the first of them (default: all): its host memory "
        "grows with them (whelp plan prices it), importance needs more",
    )
    seq_len: int = opt(256, "Tokens per calibration block")
    batch_size: int = opt(4, "Calibration blocks per forward")
    tie: Literal["embedding", "lm_head", "mean"] = opt(
        "embedding", "Init of the shared matrix when an untied teacher becomes tied: embedding | lm_head | mean"
    )
    rope: Literal["auto", "teacher", "target"] = opt(
        "auto",
        "RoPE of the pruned model: auto (a preset's or config.json target's own, else the teacher's) | "
        "teacher | target",
    )
    reconstruct: Literal["auto", "none", "lsq", "span", "span_attn", "bias"] = opt(
        "auto",
        "Refit the kept weights on the calibration data, layer by layer on the student's own inputs: auto "
        "(span_attn where the family allows, else lsq) | none | lsq (o_proj, down_proj match the unpruned layer) | "
        "span (as lsq; down_proj matches the teacher's state after the layers it replaces) | span_attn (as span; "
        "o_proj matches the teacher's state after its attention) | bias (FLAP's bias compensation); an MoE's "
        "experts are refit together towards their block's target",
    )
    select: Literal["auto", "importance", "obs"] = opt(
        "auto",
        "How each layer's MLP neurons are chosen: auto (obs where a refit, lsq or span, follows on a plain gated MLP, "
        "else importance) | importance (the top by --importance) | obs (layer by layer, the neurons whose refit "
        "leaves the least calibration error: structured OBS, ZipLM; needs --reconstruct lsq, span or span_attn)",
    )
    stream: bool | None = opt(
        None, "Prune from the shards layer by layer (default: only when the teacher does not fit in memory)"
    )
    scores: str | None = opt(None, "Reuse saved scores (a pruned model's scores/importance.safetensors)")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the written weights: auto (what the source model stores) | float32 | bfloat16 | float16"
    )
    seed: int = opt(0, "Seed of the calibration blocks and of random importance")

    def __post_init__(self):
        as_mixtures(self, ("calib",))
        check_types(self)
        _require(
            [
                _choice("importance", self.importance, IMPORTANCE),
                _choice("layer importance", self.layer_importance, LAYER_IMPORTANCE),
                _choice("tie", self.tie, TIE),
                _choice("rope", self.rope, ROPE),
                _choice("reconstruct", self.reconstruct, RECONSTRUCT),
                _choice("select", self.select, SELECT),
                _choice("save_dtype", self.save_dtype, SAVE_DTYPES),
                *_positive(self, ("calib_samples", "batch_size", "refit_samples")),
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
                (
                    self.refit_samples is None or self.refit_samples <= self.calib_samples,
                    f"refit_samples={self.refit_samples} is more than calib_samples={self.calib_samples}: the refit "
                    "reads the first of the calibration blocks; lower it or raise calib_samples",
                ),
            ]
        )

    @property
    def refit_blocks(self) -> int:
        """How many of the calibration blocks the reconstruction reads (the first ones)."""
        return self.calib_samples if self.refit_samples is None else self.refit_samples


SEARCH_AXES = ("layers", "hidden", "mlp", "heads", "kv_heads", "head_dim", "experts")  # experts: MoE teachers


@dataclass(frozen=True)
class SearchSpec:
    """How ``whelp search`` looks for a student shape: the budget, the space of shapes, and how hard it tries each
    (one-shot KL for a pool, then short distillation for the best K: ModelOpt's and DarwinLM's two-step ranking)."""

    budget: str = opt(
        "",
        "params=N | non_embedding=N | active=N (MoE: params per token) | memory=BYTES | latency=MS, "
        "comma-separated; N as 60M, 1.2B or 50% (of the teacher's), BYTES as 300MB or 2GiB, MS as 20ms",
    )
    axes: str = opt(
        "layers,hidden,mlp,heads",
        "Axes the search may shrink, of " + ",".join(SEARCH_AXES) + "; the "
        "others keep the teacher's size (default: Minitron's depth and width axes; KV heads and head_dim "
        "are opt-in)",
    )
    tolerance: float = opt(0.05, "Size budgets are met from below, within this fraction of them")
    multiple: int = opt(64, "hidden and MLP sizes are multiples of this (hardware-friendly)")
    context: int = opt(2048, "memory budget: KV-cache tokens (batch 1, bf16) counted beside the bf16 weights")
    pool: int = opt(16, "Candidates pruned one-shot and scored by their KL to the teacher")
    candidates: int = opt(4, "The best K of the pool, each distilled --score-steps steps and ranked after")
    score_steps: int = opt(8, "Distillation steps per candidate")
    calib: Mixture = opt(Mixture.parse("pydoc:calib"), "Calibration data of the one importance pass")
    calib_samples: int = opt(16, "Calibration blocks")
    data: Mixture = opt(
        Mixture.parse("pydoc:train"), "Distillation data of the short runs (the same tokens for every candidate)"
    )
    eval_data: Mixture = opt(Mixture.parse("pydoc:eval"), "Held-out data of the one-shot and post-training scores")
    eval_blocks: int = opt(8, "Held-out blocks scored per candidate")
    seq_len: int = opt(256, "Tokens per block")
    batch_size: int = opt(4, "Blocks per calibration forward and per distillation step")
    lr: float = opt(1e-4, "Peak learning rate of the short runs")
    importance: Literal["activation", "magnitude", "taylor", "random"] = opt(
        "activation", "Neuron/head/channel importance: activation | magnitude | taylor | random"
    )
    layer_importance: Literal["block", "loss"] = opt("block", "Layer importance: block (1 - cos) | loss (skip a layer)")
    seed: int = opt(0, "Seed of calibration, data order and ties")

    def __post_init__(self):
        as_mixtures(self, ("calib", "data", "eval_data"))
        check_types(self)
        _require(
            [
                (
                    bool(self.budget.strip()),
                    "give a budget: --budget params=N, non_embedding=N, memory=BYTES or "
                    "latency=MS (comma-separated to combine)",
                ),
                (0 < self.tolerance < 1, f"tolerance is a fraction in (0, 1), got {self.tolerance}"),
                *_positive(
                    self,
                    (
                        "multiple",
                        "context",
                        "pool",
                        "candidates",
                        "score_steps",
                        "calib_samples",
                        "eval_blocks",
                        "batch_size",
                    ),
                ),
                *_at_most(self, ("score_steps",), MAX_STEPS),
                (
                    self.candidates <= self.pool,
                    f"candidates ({self.candidates}) are the best of the pool, so at most --pool ({self.pool})",
                ),
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                _choice("importance", self.importance, IMPORTANCE),
                _choice("layer importance", self.layer_importance, LAYER_IMPORTANCE),
            ]
        )
        for axis in self.axes.split(","):
            _require([_choice("search axis", axis.strip(), SEARCH_AXES)])
