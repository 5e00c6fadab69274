"""The space of ``whelp search``: budgets, per-axis grids, exact closed-form sizes and every shape within budget.

Like NVIDIA ModelOpt's NAS-based pruning and Minitron (Muralidharan et al. 2024, Sreenivas et al. 2024), the
search lists every student shape on a hardware-friendly grid that fits a size budget, prunes a diverse pool of
them one-shot, and ranks those by their distance to the teacher. Everything here is pure: no weights are read;
the teacher is built once on the meta device to learn its tensor list, after which a shape's size is a sum of
products of axis sizes (arch.FAMILIES), cheap enough to evaluate on millions of shapes with numpy.

One module: the candidate grid and its exact closed-form sizes are the one shape space that run and report share.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from whelp.errors import WhelpError
from whelp.pruning import arch, moe, targets
from whelp.pruning.keep import text_config
from whelp.search.budget import Budget
from whelp.specs import SEARCH_AXES

AXIS_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "mlp": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}


class Counter:
    """Exact ``(total, non_embedding)`` parameters and memory of any target shape of one teacher, in closed form.

    The teacher is built once on the meta device; each of its parameters is mapped to its axes by the family table,
    so a shape's count is sum over tensors of prod(axis sizes), layer tensors times num_hidden_layers, with
    q = heads * head_dim and kv = kv_heads * head_dim. The embedding (and an untied lm_head) are counted from the
    shape's ``tie_word_embeddings``, as architecture.count_params does. Every method takes ints or numpy arrays.

    MoE teachers (moe.py): each expert tensor is one more factor, the expert count; the expert FFN width is the mlp
    axis where the family names it ``intermediate_size`` (Mixtral) and the teacher's otherwise (Qwen, whose mlp is
    its dense layers'), so every count stays linear in mlp. ``num_experts_per_tok`` stays the teacher's.
    """

    def __init__(self, teacher_config):
        cfg = text_config(teacher_config)
        family = arch.family_of(cfg)
        if family is None:
            raise WhelpError(
                f"whelp search supports the {', '.join(arch.FAMILIES)} families, not {cfg.model_type}; "
                "prune this model to a fixed --target instead"
            )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        self.teacher, self.family = moe.shape_of(cfg), family
        self.fixed = {
            "vocab": self.teacher["vocab_size"],
            "unit": 1,
            "shared": getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
        }
        if family.experts_key:
            width = self.teacher[family.ffn_key]
            self.fixed.update(expert_ffn=width, expert_gate_up=2 * width)
        layer, rest = collections.Counter(), collections.Counter()
        for name, _ in model.named_parameters():
            try:
                index, suffix, axes = arch.axes_of(name, family)
            except KeyError:
                raise WhelpError(
                    f"tensor '{name}' of this {family.name} config is not in the family table of "
                    "whelp/pruning/arch.py, so its size cannot be counted; add it there"
                ) from None
            if index == 0:
                layer[axes] += 1
            elif index is None and suffix not in (family.embed, family.lm_head):
                rest[axes] += 1
        self.layer_terms, self.global_terms = tuple(layer.items()), tuple(rest.items())
        # the search's axis -> shape key; an MoE teacher without dense layers searches its experts' FFN as mlp
        dense_mlp = any("mlp" in axes for axes, _ in self.layer_terms) or not family.experts_key
        self.keys = {**AXIS_KEYS, "mlp": "intermediate_size" if dense_mlp else family.ffn_key}
        if family.experts_key:
            self.keys["experts"] = family.experts_key
        actual = sum(p.numel() for p in model.parameters())  # architecture.count_params' total: tied lm_head once
        if self.params(self.teacher)[0] != actual:  # the closed form must reproduce the teacher, or the table is off
            raise WhelpError(
                f"closed-form count {self.params(self.teacher)[0]} of the {family.name} teacher differs "
                f"from its model's {actual}: its layers are not uniform or the family table is incomplete"
            )

    @staticmethod
    def _sum(terms, sizes):
        return sum(n * math.prod(sizes[axis] for axis in axes) for axes, n in terms)

    def parts_sizes(self, hidden, mlp, heads, kv_heads, head_dim, experts=None) -> dict:
        """The size of every axis of the family table at these axis values (``experts``: None, the teacher's)."""
        sizes = {
            **self.fixed,
            "hidden": hidden,
            "mlp": mlp,
            "q": heads * head_dim,
            "kv": kv_heads * head_dim,
            "head_dim": head_dim,
            "qkv": (heads + 2 * kv_heads) * head_dim,
            "gate_up": 2 * mlp,
        }  # Phi-3's fused
        if self.family.experts_key:
            sizes["expert"] = self.teacher[self.family.experts_key] if experts is None else experts
            if self.keys["mlp"] == self.family.ffn_key:
                sizes.update(expert_ffn=mlp, expert_gate_up=2 * mlp)
        return sizes

    def parts(self, hidden, mlp, heads, kv_heads, head_dim, experts=None):
        """``(per_layer, non_layer_non_embedding)`` parameters: linear in ``mlp``, as no tensor has two mlp axes
        (``experts``: an MoE teacher's expert count, None: the teacher's)."""
        sizes = self.parts_sizes(hidden, mlp, heads, kv_heads, head_dim, experts)
        return self._sum(self.layer_terms, sizes), self._sum(self.global_terms, sizes)

    def experts_of(self, shape: dict):
        """The expert count of ``shape`` (None for a dense teacher)."""
        return shape[self.family.experts_key] if self.family.experts_key else None

    def per_expert(self, hidden, mlp):
        """Parameters of one expert of one layer (its FFN): linear in ``mlp``."""
        terms = [(axes, n) for axes, n in self.layer_terms if "expert_ffn" in axes or "expert_gate_up" in axes]
        return self._sum(terms, self.parts_sizes(hidden, mlp, 0, 0, 0, 1))

    def idle(self, layers, hidden, mlp, experts):
        """Parameters a token does not run through: the E - k experts its router leaves out, in every layer (the
        teacher's k, ``num_experts_per_tok``); architecture.count_params(..., active=True)'s total - active."""
        if not self.family.experts_key:
            return 0
        return layers * (experts - self.teacher["num_experts_per_tok"]) * self.per_expert(hidden, mlp)

    def active(self, shape: dict) -> int:
        """Parameters per token of ``shape``: all but the idle experts (``params`` for a dense teacher)."""
        return self.params(shape)[0] - self.idle(
            shape["num_hidden_layers"], shape["hidden_size"], shape[self.keys["mlp"]], self.experts_of(shape)
        )

    def embedding(self, hidden, tied: bool):
        """Token embedding parameters, plus the lm_head's when untied."""
        return self.teacher["vocab_size"] * hidden * (1 if tied else 2)

    def params(self, shape: dict) -> tuple[int, int]:
        """``(total, non_embedding)`` of ``shape``: equals architecture.count_params of its pruned config."""
        per_layer, rest = self.parts(
            *(shape[self.keys[a]] for a in ("hidden", "mlp", "heads", "kv_heads", "head_dim")), self.experts_of(shape)
        )
        non_embedding = shape["num_hidden_layers"] * per_layer + rest
        return non_embedding + self.embedding(shape["hidden_size"], shape["tie_word_embeddings"]), non_embedding

    @staticmethod
    def kv_bytes(layers, kv_heads, head_dim, context: int):
        """bf16 KV cache of ``context`` tokens at batch 1: k and v, 2 bytes each."""
        return 2 * layers * kv_heads * head_dim * context * 2

    def memory(self, shape: dict, context: int) -> int:
        """Bytes of bf16 weights plus the KV cache of ``context`` tokens (batch 1, bf16)."""
        return 2 * self.params(shape)[0] + self.kv_bytes(
            shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"], context
        )


def parse_axes(text: str) -> tuple[str, ...]:
    """``"layers,mlp"`` -> ``("layers", "mlp")``, ordered as SEARCH_AXES."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in SEARCH_AXES:
            raise WhelpError(f"unknown search axis '{name}'; choose from {', '.join(SEARCH_AXES)}")
        if names.count(name) > 1:
            raise WhelpError(f"search axis '{name}' is given twice in '{text}'; give each axis once")
    if not names:
        raise WhelpError(f"give at least one search axis of {', '.join(SEARCH_AXES)}")
    return tuple(axis for axis in SEARCH_AXES if axis in names)


def axis_values(
    teacher_shape: dict, axes: tuple[str, ...], multiple: int, keys: dict[str, str] = AXIS_KEYS
) -> dict[str, list[int]]:
    """Allowed values per axis, ascending; an axis not in ``axes`` keeps the teacher's value.

    hidden / mlp: multiples of ``multiple`` (tensor-core friendly, as ModelOpt's channel divisor) and the teacher's.
    head_dim: even divisors d/s, the RoPE-exact ones (keep.rope_exact_dims). heads: kv * g, g query heads per KV
    group up to the teacher's (groups stay even); kv_heads: the counts some heads value pairs with. experts (an MoE
    teacher's, ``keys`` naming its config key, Counter.keys): every count from num_experts_per_tok up.
    """
    if "experts" in axes and "experts" not in keys:
        raise WhelpError(
            "search axis 'experts' needs a mixture-of-experts teacher (mixtral, qwen2_moe, qwen3_moe); "
            "drop it from --axes"
        )
    teacher = {axis: teacher_shape[key] for axis, key in keys.items()}
    per_group = teacher["heads"] // teacher["kv_heads"]
    grid = {
        "layers": list(range(1, teacher["layers"] + 1)),
        "hidden": sorted({*range(multiple, teacher["hidden"] + 1, multiple), teacher["hidden"]}),
        "mlp": sorted({*range(multiple, teacher["mlp"] + 1, multiple), teacher["mlp"]}),
        "head_dim": [d for d in range(2, teacher["head_dim"] + 1, 2) if teacher["head_dim"] % d == 0],
    }
    if "experts" in keys:
        grid["experts"] = list(range(teacher_shape["num_experts_per_tok"], teacher["experts"] + 1))
    values = {axis: grid[axis] if axis in axes else [teacher[axis]] for axis in grid}
    kv = range(1, teacher["kv_heads"] + 1) if "kv_heads" in axes else [teacher["kv_heads"]]
    values["heads"] = (
        sorted({k * g for k in kv for g in range(1, per_group + 1)}) if "heads" in axes else [teacher["heads"]]
    )
    values["kv_heads"] = [k for k in kv if any(_pairs(h, k, per_group) for h in values["heads"])]
    return {axis: values[axis] for axis in SEARCH_AXES if axis in values}


def _pairs(heads: int, kv_heads: int, per_group: int) -> bool:
    return heads % kv_heads == 0 and heads // kv_heads <= per_group


def _widths(teacher_config, teacher: dict, values: dict) -> np.ndarray:
    """Rows (hidden, heads, kv_heads, head_dim) of the grid that targets.validate and transformers' own config
    validation accept (Llama: hidden % heads == 0). The config check runs once per (hidden, heads, kv_heads), at
    the teacher's head_dim: transformers' checks of these families read no other axis."""
    per_group = teacher["num_attention_heads"] // teacher["num_key_value_heads"]
    rows = []
    for hidden in values["hidden"]:
        for kv in values["kv_heads"]:
            for heads in (h for h in values["heads"] if _pairs(h, kv, per_group)):
                probe = {
                    **teacher,
                    "hidden_size": hidden,
                    "num_attention_heads": heads,
                    "num_key_value_heads": kv,
                    "num_hidden_layers": 1,
                }
                try:
                    targets._check_config(teacher_config, probe, "search")
                except WhelpError:
                    continue
                for head_dim in values["head_dim"]:
                    targets.validate(teacher, {**probe, "head_dim": head_dim})  # holds by construction: a bug if not
                    rows.append((hidden, heads, kv, head_dim))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def enumerate_shapes(teacher_config, budget: Budget, axes, tolerance: float, multiple: int, context: int) -> list[dict]:
    """Every grid shape whose size budgets all hold: ``(1 - tolerance) * b <= value <= b`` for each budget b.

    Full shape dicts (moe.shape_of's keys), largest non_embedding first, ties by the shape tuple. Per (widths,
    layers, experts) cell every size is linear in mlp, so numpy solves each budget for an mlp index range instead of
    looping over the mlp grid: memory and time grow with the number of cells, widths x layers x expert counts.
    """
    counter = Counter(teacher_config)
    teacher, sizes = counter.teacher, budget.sizes()
    if not sizes:
        raise WhelpError("enumerating shapes needs a size budget: params=, non_embedding= or memory=")
    values = axis_values(teacher, axes, multiple, counter.keys)
    widths = _widths(teacher_config, teacher, values)
    hidden, heads, kv, head_dim = (widths[:, i, None, None] for i in range(4))
    layers = np.array(values["layers"], dtype=np.int64)[None, :, None]
    experts = np.array(values.get("experts", [0]), dtype=np.int64)[None, None, :]
    mlp = np.array(values["mlp"], dtype=np.int64)
    grid = (len(widths), layers.shape[1], experts.shape[2])
    tied = teacher["tie_word_embeddings"]
    moe_experts = experts if "experts" in values else None
    at0, rest = counter.parts(hidden, 0, heads, kv, head_dim, moe_experts)
    slope = layers * (counter.parts(hidden, 1, heads, kv, head_dim, moe_experts)[0] - at0)  # per mlp unit
    base = layers * at0 + rest  # non_embedding at mlp = 0
    total = base + counter.embedding(hidden, tied)
    idle0 = counter.idle(layers, hidden, 0, experts)
    idle1 = counter.idle(layers, hidden, 1, experts) - idle0  # per mlp unit
    lines = {
        "non_embedding": (base, slope),
        "params": (total, slope),
        "active": (total - idle0, slope - idle1),
        "memory": (2 * total + counter.kv_bytes(layers, kv, head_dim, context), 2 * slope),
    }
    lines = {
        key: (np.broadcast_to(c0, grid).ravel(), np.broadcast_to(c1, grid).ravel()) for key, (c0, c1) in lines.items()
    }

    def hits(keys):
        """(cell, mlp index) of every shape meeting the budgets ``keys``: a float range per cell, then exact."""
        start, end = np.zeros(len(lines["params"][0]), dtype=np.int64), np.full(len(lines["params"][0]), len(mlp))
        for key in keys:
            c0, c1 = lines[key]
            c1 = np.where(c1 > 0, c1, 1)  # a size that mlp does not change: the exact check below decides
            start = np.maximum(start, np.searchsorted(mlp, ((1 - tolerance) * sizes[key] - c0) / c1) - 1)
            end = np.minimum(end, np.searchsorted(mlp, (sizes[key] - c0) / c1, side="right") + 1)
        start, end = np.clip(start, 0, len(mlp)), np.clip(end, 0, len(mlp))
        counts = np.clip(end - start, 0, None)
        cell = np.repeat(np.arange(len(counts)), counts)
        index = start[cell] + np.arange(len(cell)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = np.ones(len(cell), dtype=bool)
        for key in keys:
            value = lines[key][0][cell] + lines[key][1][cell] * mlp[index]
            keep &= ((1 - tolerance) * sizes[key] <= value) & (value <= sizes[key])
        return cell[keep], index[keep]

    cell, index = hits(list(sizes))
    if not len(cell):
        raise WhelpError(_nothing(sizes, hits, lines, widths, values, axes, tolerance, mlp, grid))
    w, layer, expert = np.unravel_index(cell, grid)
    size = lines["non_embedding"][0][cell] + lines["non_embedding"][1][cell] * mlp[index]
    columns = [widths[w, 0], layers[0, layer, 0], mlp[index], widths[w, 1], widths[w, 2], widths[w, 3]]
    if "experts" in values:
        columns.append(experts[0, 0, expert])
    order = np.lexsort(tuple(reversed([-size, *columns])))
    rows = np.stack(columns, axis=1)[order].tolist()
    names = [
        counter.keys[a]
        for a in ("hidden", "layers", "mlp", "heads", "kv_heads", "head_dim", "experts")
        if a in counter.keys
    ]
    return [{**teacher, **dict(zip(names, row))} for row in rows]


def _nothing(sizes, hits, lines, widths, values, axes, tolerance, mlp, grid) -> str:
    """The one line for an empty search: which budget no shape reaches and the range it could, or a contradiction."""
    where = f"over axes {','.join(axes)}"
    for key, bound in sizes.items():
        if len(hits([key])[0]):
            continue
        c0, c1 = lines[key]
        low, high = c0 + c1 * mlp[0], c0 + c1 * mlp[-1]
        w, layer, expert = np.unravel_index(int(np.argmin(low)), grid)
        at = dict(
            zip(("hidden", "heads", "kv_heads", "head_dim"), widths[w].tolist()),
            layers=values["layers"][layer],
            mlp=int(mlp[0]),
            experts=values.get("experts", [0])[expert],
        )
        smallest = ", ".join(f"{axis}={at[axis]}" for axis in axes)
        finer = ", lower --multiple" if {"hidden", "mlp"} & set(axes) else ""  # a gap in the grid, not a floor
        fix = "raise the budget, widen --tolerance" if bound < low.min() else f"widen --tolerance{finer}"
        fix += " or allow more --axes"
        return (
            f"no shape {where} has {key} within {tolerance * 100:g}% below {bound:,}: they range from "
            f"{int(low.min()):,} ({smallest}) to {int(high.max()):,}; {fix}"
        )
    given = ", ".join(f"{key}={bound:,}" for key, bound in sizes.items())
    return (
        f"the budgets {given} contradict: each is met by some shape {where}, but none meets all within "
        f"{tolerance * 100:g}% below; drop or loosen one of them, or widen --tolerance"
    )


def proxy_pool(shapes: list[dict], n: int) -> list[dict]:
    """``n`` shapes to prune one-shot, spread over the depth/width trade-off (Minitron: depth and width prune
    differently): grouped by num_hidden_layers, each turn taking the next shape (in ``shapes``' order,
    enumerate_shapes': largest first) of groups at evenly spaced depths, deepest and shallowest included, so a pool
    smaller than the number of depths still spans them. Deterministic; all if len <= n."""
    groups: dict[int, list[dict]] = {}
    for shape in shapes:
        groups.setdefault(shape["num_hidden_layers"], []).append(shape)
    queues = [groups[depth] for depth in sorted(groups, reverse=True)]
    pool: list[dict] = []
    for turn in range(max(map(len, queues), default=0)):
        live = [queue for queue in queues if turn < len(queue)]
        want = min(len(live), n - len(pool))
        picks = sorted({round(i * (len(live) - 1) / max(1, want - 1)) for i in range(want)})
        pool.extend(live[i][turn] for i in picks)
        if len(pool) >= n:
            break
    return pool[:n]


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the positions they occupy."""
    first, count = {}, collections.Counter(values)
    for position, value in enumerate(sorted(values)):
        first.setdefault(value, position)
    return [first[value] + (count[value] + 1) / 2 for value in values]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties): how well a proxy score (one-shot KL) orders candidates
    as their post-distillation score does. nan for fewer than 2 pairs or a constant side."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs two equally long lists, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else math.nan
