"""Target shapes: presets, HF config files and ``key=value`` overrides, validated against the teacher.

A target is the teacher's shape (``architecture.SHAPE_KEYS``) with some axes reduced. Presets hold the
exact Llama 3.2 shapes of docs/design.md section 2 (pruned from Llama 3.1 8B) and two shapes of the demo
teacher SmolLM2-135M with half and a quarter of its 106.2M non-embedding parameters.

One module: presets, config.json targets and key=value overrides all resolve to the one ``Target`` and its checks,
the unit its callers take.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.pruning import arch, moe
from whelp.pruning.arch import WIDTH_KEYS
from whelp.pruning.keep import Keep, rope_exact_dims, text_config
from whelp.pruning.surgery import target_config
from whelp.specs import key_values

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
_SMOL = dict(vocab_size=49152, tie_word_embeddings=True)

PRESETS = {
    "llama-3.2-1b": (
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        _LLAMA3_ROPE,
    ),
    "llama-3.2-3b": (
        dict(
            hidden_size=3072,
            num_hidden_layers=28,
            intermediate_size=8192,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        _LLAMA3_ROPE,
    ),
    # 53,112,384 non-embedding params (50.01% of SmolLM2-135M): depth and MLP only.
    "smollm2-half": (
        dict(
            hidden_size=576,
            num_hidden_layers=24,
            intermediate_size=768,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            **_SMOL,
        ),
        None,
    ),
    # 26,560,896 non-embedding params (25.01%): every axis but the KV groups.
    "smollm2-quarter": (
        dict(
            hidden_size=384,
            num_hidden_layers=24,
            intermediate_size=768,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=32,
            **_SMOL,
        ),
        None,
    ),
}
_AXES = architecture.SHAPE_KEYS[:6]  # the widths and counts a target shrinks (not vocab_size or tie_word_embeddings)


@dataclass(frozen=True)
class Target:
    """A validated target: its shape under ``architecture.SHAPE_KEYS``, the RoPE it asks for (None: the teacher's) and
    whether it names a published model's config (a preset or config.json), whose keys a prune must not add to."""

    name: str
    shape: dict
    rope_parameters: dict | None = None
    published: bool = False


def _parse_value(key: str, text: str):
    if key == "tie_word_embeddings":
        if text.lower() not in ("true", "false"):
            raise WhelpError(f"tie_word_embeddings={text}: write true or false")
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        raise WhelpError(f"{key}={text}: expected a positive integer") from None


def _overrides(spec: str, source_shape: dict, source_cfg) -> dict:
    pairs = key_values(
        spec,
        "target",
        source_shape,
        "intermediate_size=768,num_hidden_layers=24",
        lambda key: moe.canonical_key(key, source_cfg),
    )
    return {**source_shape, **{key: _parse_value(key, value) for key, value in pairs}}


def _from_config_file(path: Path, model_type: str) -> tuple[dict, dict | None]:
    cfg = text_config(models.load_config(str(path)))
    if cfg.model_type != model_type:
        raise WhelpError(
            f"target {path} describes a {cfg.model_type} model but the teacher is {model_type}: pruning "
            "keeps the architecture; give a config.json of the teacher's model_type"
        )
    return moe.shape_of(cfg), getattr(cfg, "rope_parameters", None)


def validate(source: dict, target: dict) -> None:
    """Raise WhelpError naming the first axis of ``target`` that the teacher ``source`` cannot be pruned to."""
    for key in _AXES:
        if not isinstance(target[key], int) or not 1 <= target[key] <= source[key]:
            raise WhelpError(
                f"target {key}={target[key]} is out of range: must be an integer in 1..{source[key]} "
                f"(the teacher's {key} is {source[key]}; pruning only removes)"
            )
    if target["vocab_size"] != source["vocab_size"]:
        raise WhelpError(
            f"target vocab_size={target['vocab_size']} differs from the teacher's {source['vocab_size']}: "
            "whelp does not prune the vocabulary; use a target with the teacher's vocab_size"
        )
    if source["tie_word_embeddings"] and not target["tie_word_embeddings"]:
        raise WhelpError(
            "target tie_word_embeddings=false but the teacher is tied: untying adds parameters; "
            "set tie_word_embeddings=true"
        )
    heads, kv = target["num_attention_heads"], target["num_key_value_heads"]
    if heads % kv:
        raise WhelpError(
            f"target num_attention_heads={heads} is not divisible by num_key_value_heads={kv}: "
            "every KV group keeps the same number of query heads"
        )
    per_group = source["num_attention_heads"] // source["num_key_value_heads"]
    if heads // kv > per_group:
        raise WhelpError(
            f"target keeps {heads // kv} query heads per KV group but the teacher has {per_group}: "
            f"num_attention_heads must be in {kv}..{kv * per_group} for num_key_value_heads={kv}"
        )
    rope_exact_dims(source["head_dim"], target["head_dim"])


def parse_target(source_cfg, spec: str) -> Target:
    """A preset name, a path to an HF ``config.json``, or ``key=value,...`` overrides of the teacher's shape (an MoE
    teacher's shape includes its expert axes, moe.moe_shape)."""
    moe_family = moe.moe_family_of(source_cfg)
    source = moe.shape_of(source_cfg)
    rope = None
    if spec in PRESETS and moe_family is not None:
        n_key = moe_family.experts_key
        raise WhelpError(
            f"preset '{spec}' is a dense Llama shape and this teacher is {moe_family.name} (MoE); give "
            f"key=value targets such as {n_key}={max(1, source[n_key] // 2)} or a config.json of a "
            "smaller model of its type"
        )
    if spec in PRESETS:
        shape, rope = PRESETS[spec]
        shape = dict(shape)
    elif spec.endswith(".json") or Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WhelpError(
                f"target config {spec} does not exist; pass a preset ({', '.join(PRESETS)}), "
                "a config.json path or key=value overrides"
            )
        shape, rope = _from_config_file(path, text_config(source_cfg).model_type)
    elif "=" in spec:
        shape = _overrides(spec, source, source_cfg)
    else:
        raise WhelpError(
            f"unknown target '{spec}': use a preset ({', '.join(PRESETS)}), a config.json path, "
            "or key=value overrides such as intermediate_size=768,num_hidden_layers=24"
        )
    family = arch.family_of(source_cfg)
    if family is None:  # first: it names the axes the generic path (width only) cannot change, and checks the config
        shape = check_target(source_cfg, shape)
    validate(source, shape)
    if moe_family is not None:
        moe.validate_moe(source, shape, moe_family)
    if family is not None:
        _check_rope_head_dim(source_cfg, source, shape)
        _check_config(source_cfg, shape, spec)
    return Target(
        name=spec, shape=shape, rope_parameters=rope, published="=" not in spec or Path(spec).expanduser().is_file()
    )


def _check_rope_head_dim(source_cfg, source: dict, shape: dict) -> None:
    """A smaller head_dim is RoPE-exact (surgery.py) only when RoPE rotates the whole head with one frequency per
    pair: refuse partial rotary (Phi-3 ``partial_rotary_factor``) and longrope's per-pair factor lists."""
    if shape["head_dim"] == source["head_dim"]:
        return
    params = getattr(text_config(source_cfg), "rope_parameters", None) or {}
    for rope in [params] + [v for v in params.values() if isinstance(v, dict)]:  # Gemma 3: one per layer type
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise WhelpError(
                f"target head_dim={shape['head_dim']}: this teacher rotates only part of each head "
                f"(partial_rotary_factor={rope['partial_rotary_factor']}), so head_dim cannot be pruned "
                f"RoPE-exactly; keep head_dim={source['head_dim']}"
            )
        if rope.get("rope_type") == "longrope":
            raise WhelpError(
                f"target head_dim={shape['head_dim']}: this teacher's longrope RoPE has one factor per "
                f"frequency, which whelp does not re-slice; keep head_dim={source['head_dim']}"
            )


def _check_config(source_cfg, shape: dict, spec: str) -> None:
    """Run transformers' own config validation on the target (e.g. Llama needs hidden_size % heads == 0)."""
    cfg = target_config(source_cfg, first_keep(source_cfg, shape))
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except Exception as exc:  # huggingface_hub's strict-dataclass error wraps the ValueError
            cause = str(getattr(exc, "__cause__", None) or exc).strip().splitlines()[-1]
            raise WhelpError(
                f"target '{spec}' is not a valid {cfg.model_type} config: {cause} "
                "Adjust hidden_size or num_attention_heads."
            ) from None


def first_keep(source_cfg, shape: dict, tie: str | None = "embedding") -> Keep:
    """A Keep of ``shape`` taking the first indices of every axis: for configs and counts without scores."""
    src = architecture.shape(source_cfg)
    layers = tuple(range(shape["num_hidden_layers"]))
    kv, per_group = shape["num_key_value_heads"], shape["num_attention_heads"] // shape["num_key_value_heads"]
    untied_to_tied = not src["tie_word_embeddings"] and shape["tie_word_embeddings"]
    return Keep(
        layers=layers,
        hidden=torch.arange(shape["hidden_size"]),
        mlp=tuple(torch.arange(shape["intermediate_size"]) for _ in layers),
        kv_heads=tuple(torch.arange(kv) for _ in layers),
        q_heads=tuple(torch.arange(per_group).repeat(kv, 1) for _ in layers),
        head_dims=rope_exact_dims(src["head_dim"], shape["head_dim"]),
        tie=tie if untied_to_tied else None,
        experts=moe.first_experts(source_cfg, shape) if moe.moe_family_of(source_cfg) else None,
    )


def moe_config(source_cfg, shape: dict):
    """The target HF config of an MoE ``shape`` (``first_keep``'s, as ``whelp plan`` counts it)."""
    return target_config(source_cfg, first_keep(source_cfg, shape))


def target_rope(target: Target, policy: str) -> dict | None:
    """The RoPE parameters the pruned config gets: None (the teacher's) for ``teacher``; the target's for
    ``target`` (refused when it has none) and for ``auto`` when it has one. ``auto`` is the default because a
    preset names the model it stands for: Llama-3.2-1B's llama3 RoPE factor is 32 where its teacher Llama-3.1-8B
    has 8 (Meta's configs), and ``key=value`` targets have no RoPE of their own."""
    if policy == "teacher" or (policy == "auto" and target.rope_parameters is None):
        return None
    if target.rope_parameters is None:
        raise WhelpError(
            f"--rope target takes the RoPE of a preset or config.json target, and '{target.name}' has "
            "none; use --rope auto (the default) or --rope teacher"
        )
    return target.rope_parameters


def rope_summary(config) -> str:
    """The RoPE of a config in one line (``default theta=100000``, ``llama3 theta=500000 factor=32``; Gemma 3:
    one entry per layer type), for plans and tables."""
    params = getattr(text_config(config), "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return "; ".join(f"{kind}: {_rope_line(v)}" for kind, v in params.items())
    return _rope_line(params)


def _rope_line(params: dict) -> str:
    if not params:
        return "none"
    short = {
        "rope_theta": "theta",
        "factor": "factor",
        "low_freq_factor": "low",
        "high_freq_factor": "high",
        "original_max_position_embeddings": "original",
    }
    return " ".join(
        [params.get("rope_type", "default")]
        + [f"{name}={params[key]:g}" for key, name in short.items() if params.get(key) is not None]
    )


def plan_target(source_cfg, target: str, rope: str = "auto") -> dict:
    """Source and target shape + total params (and an MoE's active params per token) of pruning ``source_cfg`` to
    ``target``; no weights loaded."""
    parsed = parse_target(source_cfg, target)
    if arch.family_of(source_cfg) is None:
        cfg = generic_config(source_cfg, parsed.shape)
    else:
        cfg = target_config(source_cfg, first_keep(source_cfg, parsed.shape), target_rope(parsed, rope))
    out = {}
    for side, config in (("source", source_cfg), ("target", cfg)):
        keys = ("params", "non_embedding_params", "active_params")
        if moe.moe_family_of(config) is not None:
            counts = dict(zip(keys, architecture.count_params(config, active=True)))
        else:
            counts = dict(zip(keys[:2], architecture.count_params(config)))
        out[side] = {**moe.shape_of(config), **counts, "rope": rope_summary(config)}
    return out


# ---------------------------------------------------------------- the generic path's targets (generic.py)


def generic_config(config, shape: dict):
    """The HF config of a generic prune of ``config`` to ``shape``; each width goes to the first of its key and its
    ``architecture.SHAPE_ALIASES`` the config sets (OPT: ffn_dim); implicit KV heads stay implicit."""
    new = copy.deepcopy(config)
    text, old = new.get_text_config(), architecture.shape(config)
    if getattr(text, "word_embed_proj_dim", None) == text.hidden_size:  # OPT: no projection when equal
        text.word_embed_proj_dim = shape["hidden_size"]
    for key in WIDTH_KEYS + ("num_key_value_heads",):
        keys = (key,) + architecture.SHAPE_ALIASES.get(key, ())
        name = next((k for k in keys if getattr(text, k, None) is not None), None)
        if name is None and key == "intermediate_size":  # GPT-2's n_inner=None (4 x hidden) becomes explicit
            name = next((k for k in keys if k in text.to_dict()), None)
        if shape[key] != old[key] and name is not None:
            setattr(text, name, shape[key])
    return new


def check_target(config, target: dict) -> dict:
    """The full shape (``architecture.shape`` keys) of a generic prune of ``config`` to ``target`` (any subset; under
    MHA KV heads follow query heads); WhelpError for an axis it cannot change or a shape the config cannot express."""
    source = architecture.shape(config)
    mha = source["num_key_value_heads"] == source["num_attention_heads"]
    want = {**source, **{k: v for k, v in target.items() if v is not None}}
    follow = {"num_key_value_heads": want["num_attention_heads"]} if mha else {}  # MHA: KV heads follow query heads
    if mha and want["num_key_value_heads"] == source["num_key_value_heads"]:
        want.update(follow)
    if other := {k: v for k, v in want.items() if k not in WIDTH_KEYS and v != {**source, **follow}.get(k)}:
        raise WhelpError(
            f"cannot prune {', '.join(f'{k}={v}' for k, v in other.items())}: {config.model_type} is "
            f"outside whelp's family table; its generic pruning path changes only {', '.join(WIDTH_KEYS)}"
            f"{' (num_key_value_heads follows num_attention_heads)' if follow else ''}; drop it"
        )
    for key in WIDTH_KEYS:
        if not isinstance(want[key], int) or not 1 <= want[key] <= source[key]:
            raise WhelpError(f"{key}={want[key]} must be in [1, {source[key]}] (the source's width)")
    got = architecture.shape(new := generic_config(config, want))
    if bad := [f"{k}={got[k]} (not {want[k]})" for k in architecture.SHAPE_KEYS if got[k] != want[k]]:
        raise WhelpError(
            f"{config.model_type} cannot express this pruned shape: its config would give "
            f"{', '.join(bad)} (it ties that width to others, e.g. head_dim = hidden_size / "
            "num_attention_heads); prune fewer axes"
        )
    try:  # transformers validates configs on load (e.g. hidden_size % num_attention_heads == 0)
        type(new).from_dict(new.to_dict())
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises a validation error per rule
        raise WhelpError(
            f"the pruned {config.model_type} config would not load back: "
            f"{str(exc).splitlines()[-1].strip()}; choose widths that satisfy it"
        ) from None
    return want
