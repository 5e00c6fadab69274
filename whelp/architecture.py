"""What a model config says, without weights: the one shape vocabulary of whelp (``SHAPE_KEYS``, ``shape``), exact
parameter counts (``count_params``, on the meta device), the architecture's identity (``config_hash``), its position
limit, and what a family's forward does around its layers and head (``layer_output``, ``logit_transform``,
``kv_cache_name``). Nothing here reads a checkpoint: ``whelp.models`` loads and saves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from inspect import signature

from whelp.errors import WhelpError
from whelp.specs import LoadPolicy
from whelp.store import content_id

SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class LogitTransform:
    """What a family's forward applies to ``lm_head(hidden)``, elementwise on fp32 logits: a multiplication by
    ``scale``, then soft-capping ``cap * tanh(z / cap)`` where ``cap`` is set (``logit_transform``)."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.cap

    def __call__(self, logits):
        """The transformed logits, a new tensor (differentiable)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        return (logits / self.cap).tanh() * self.cap if self.cap else logits

    def apply_(self, logits):
        """``self(logits)`` in place (the same values): no second [N, V] tensor."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        return logits.div_(self.cap).tanh_().mul_(self.cap) if self.cap else logits

    def grad_(self, out, dz):
        """d loss / d raw logits from ``dz`` = d loss / d ``out``, where ``out`` = ``self(raw)``, in place in
        ``dz``; the derivative in closed form from ``out`` alone: ``scale * (1 - (out / cap)^2)`` (a constant
        without a cap, when ``out`` may be None). ``out`` is overwritten."""
        if self.cap:
            dz.mul_(out.div_(self.cap).square_().neg_().add_(1))
        return dz.mul_(self.scale) if self.scale != 1.0 else dz


def logit_transform(config) -> LogitTransform:
    """What the family's forward applies to ``lm_head(hidden)`` (fp32 [N, V] -> [N, V]): Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2/3 soft-cap at ``final_logit_softcapping``
    (cap * tanh(z / cap)). Fused losses and logit capture need the real logits, not the matmul alone."""
    text = config.get_text_config()
    divide = getattr(text, "logits_scaling", None) or 1.0
    multiply = getattr(text, "logit_scale", None) or 1.0
    return LogitTransform(scale=multiply / divide, cap=getattr(text, "final_logit_softcapping", None) or None)


# Other spellings of the shape keys in HF configs without an ``attribute_map`` for them (OPT, GPT-2, Falcon, ...).
SHAPE_ALIASES = {"intermediate_size": ("ffn_dim", "n_inner"), "num_key_value_heads": ("num_kv_heads",)}


def layer_output(out):
    """A decoder layer's output hidden states [B, T, H]: families return a tensor or a tuple led by one (attention
    weights, router logits, a cache after it)."""
    return out[0] if isinstance(out, tuple) else out


def shape(config) -> dict:
    """The shape of a decoder config under the HF key names of SHAPE_KEYS: the one shape vocabulary of whelp.

    Families that spell an axis otherwise (``SHAPE_ALIASES``) or leave it implicit are mapped to these names: no
    KV-head count means one KV head per query head, no head_dim means hidden / heads, and GPT-2's MLP width
    ``n_inner=None`` means 4 x hidden.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = {key: getattr(text, key, None) for key in SHAPE_KEYS}
    for key, aliases in SHAPE_ALIASES.items():
        for alias in aliases:
            if out[key] is None and getattr(text, alias, None) is not None:
                out[key] = getattr(text, alias)
    if out["intermediate_size"] is None and text.model_type == "gpt2":
        out["intermediate_size"] = 4 * text.hidden_size
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = text.num_attention_heads
    if out["head_dim"] is None:
        out["head_dim"] = text.hidden_size // text.num_attention_heads
    return out


def config_hash(config) -> str:
    """sha256 of a model config without bookkeeping keys (paths, versions, dtype): the architecture's identity."""
    skip = {"transformers_version", "dtype", "torch_dtype", "architectures"}
    return content_id({k: v for k, v in config.to_dict().items() if k not in skip and not k.startswith("_")})


def check_positions(config, tokens: int, what: str) -> None:
    """Refuse sequences longer than the model has positions for (its RoPE scaling and masks end there)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if limit is not None and tokens > limit:
        raise WhelpError(
            f"{what} {tokens} is longer than the model's {limit} positions (max_position_embeddings); "
            f"use at most {limit}"
        )


def count_params(config, policy: LoadPolicy = LoadPolicy(), active: bool = False) -> tuple[int, ...]:
    """``(total, non_embedding)`` parameters of the model a config describes, without any weights; with ``active``,
    ``(total, non_embedding, active)``: the parameters one token runs through, i.e. all but the experts a
    mixture-of-experts router leaves out (E - k of each MoE layer, k = ``num_experts_per_tok``; the total for a
    dense model), which FLOPs are priced at.

    The model is built on the meta device, so the count is exact for every architecture
    transformers knows (biases, q/k norms, ...) and costs no memory; a tied lm_head is counted
    once. Non-embedding excludes the token embedding and an untied lm_head (Kaplan et al. 2020).
    Experts are found as transformers 5 holds them: a module's ``experts`` with fused ``gate_up_proj`` [E, 2I, H].
    """
    import torch  # noqa: PLC0415 - heavy: reading shapes from a config needs no torch
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - heavy: shapes need no transformers models

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=policy.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    if not active:
        return total, total - sum(embedding.values())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    idle = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and hasattr(experts, "gate_up_proj"):
            n = experts.gate_up_proj.shape[0]
            idle += (n - text.num_experts_per_tok) * (sum(p.numel() for p in experts.parameters()) // n)
    return total, total - sum(embedding.values()), total - idle


def kv_cache_name(fn) -> str:
    """The KV-cache argument (and output field) name: ``cache`` since transformers 5.x renamed it, formerly
    ``past_key_values`` (the old name still works there, with a deprecation warning per call)."""
    return "cache" if "cache" in signature(fn).parameters else "past_key_values"
