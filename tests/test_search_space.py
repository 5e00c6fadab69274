"""whelp.search.space: exact closed-form counts, the budget grammar, and enumeration checked against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
from conftest import tiny_config

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.pruning import arch, surgery, targets
from whelp.search import space
from whelp.search.budget import Budget, parse_budget
from whelp.search.space import Counter
from whelp.specs import SEARCH_AXES

DENSE_AXES = tuple(a for a in SEARCH_AXES if a != "experts")  # experts: tests/test_search_moe.py

KEYS = architecture.SHAPE_KEYS[:6]


def exact_count(cfg, shape: dict) -> tuple[int, int]:
    """The reference count: a meta-device model of the config pruning ``cfg`` to ``shape`` would produce."""
    return architecture.count_params(surgery.target_config(cfg, targets.first_keep(cfg, shape)))


def with_(base: dict, **axes) -> dict:
    return {**base, **{space.AXIS_KEYS[axis]: value for axis, value in axes.items()}}


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("mistral", {}),
    ],
)
def test_counter_equals_count_params(family, overrides):
    cfg = tiny_config(family, **overrides)
    counter, teacher = Counter(cfg), architecture.shape(cfg)
    shapes = [
        with_(teacher, layers=layers, hidden=hidden, mlp=mlp, heads=heads, kv_heads=kv, head_dim=head_dim)
        for (layers, hidden, mlp), (heads, kv), head_dim in itertools.product(
            ((1, 32, 48), (2, 64, 128), (2, 32, 128)), ((4, 2), (2, 2), (1, 1)), (16, 4)
        )
    ]
    if not teacher["tie_word_embeddings"]:
        shapes.append({**with_(teacher, hidden=32, mlp=64), "tie_word_embeddings": True})  # untied -> tied
    for shape in shapes:
        assert counter.params(shape) == exact_count(cfg, shape), shape


def test_counter_refuses_family_outside_the_table():
    with pytest.raises(WhelpError) as err:
        Counter(tiny_config("gpt2"))
    assert str(err.value) == (
        f"whelp search supports the {', '.join(arch.FAMILIES)} families, not gpt2; "
        "prune this model to a fixed --target instead"
    )


def test_memory_is_bf16_weights_plus_kv_cache():
    cfg = tiny_config()
    counter, shape = Counter(cfg), architecture.shape(cfg)
    assert counter.memory(shape, 100) == 2 * counter.params(shape)[0] + 2 * 2 * 2 * 16 * 100 * 2


# The brute-force grid: 6 query heads in 2 KV groups over hidden 48, so hidden 16 and 32 are not divisible by
# every head count (transformers' Llama config refuses 3 and 6 heads there), head_dim 8 (RoPE-exact: 2, 4, 8).
BRUTE = dict(hidden_size=48, intermediate_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
MULTIPLE = 16


@pytest.fixture(scope="module")
def brute():
    """(config, {shape tuple: (total, non_embedding, memory)}) over every combination of integer axis values that
    the grid rules allow (multiples of MULTIPLE or the teacher's value) and parse_target accepts."""
    cfg = tiny_config(**BRUTE)
    widths = [n for n in range(1, 49) if n % MULTIPLE == 0 or n == 48]
    sizes = {}
    for hidden, layers, mlp, heads, kv, head_dim in itertools.product(
        widths, (1, 2), widths, range(1, 7), (1, 2), range(1, 9)
    ):
        spec = ",".join(f"{k}={v}" for k, v in zip(KEYS, (hidden, layers, mlp, heads, kv, head_dim)))
        try:
            shape = targets.parse_target(cfg, spec).shape
        except WhelpError:
            continue
        total, non_embedding = exact_count(cfg, shape)
        kv_cache = 2 * layers * kv * head_dim * 64 * 2
        sizes[tuple(shape[k] for k in KEYS)] = (total, non_embedding, 2 * total + kv_cache)
    # 3 hidden x 2 layers x 3 mlp x 6 (heads, kv) pairs x 3 head_dim, less 3 and 6 heads at hidden 16 and 32
    assert len(sizes) == 3 * 2 * 3 * 6 * 3 - 2 * 2 * 2 * 3 * 3
    return cfg, sizes


def expected(sizes: dict, budget: dict, tolerance: float) -> list[tuple]:
    column = {"params": 0, "non_embedding": 1, "memory": 2}
    hits = [s for s, v in sizes.items() if all((1 - tolerance) * b <= v[column[key]] <= b for key, b in budget.items())]
    return sorted(hits, key=lambda s: (-sizes[s][1], s))


@pytest.mark.parametrize(
    "fractions", [{"params": 0.5}, {"non_embedding": 0.4}, {"memory": 0.6}, {"params": 0.7, "memory": 0.7}]
)
def test_enumerate_equals_brute_force(brute, fractions):
    cfg, sizes = brute
    top = {
        "params": max(v[0] for v in sizes.values()),
        "non_embedding": max(v[1] for v in sizes.values()),
        "memory": max(v[2] for v in sizes.values()),
    }
    budget = {key: int(f * top[key]) for key, f in fractions.items()}
    want = expected(sizes, budget, 0.25)
    assert want
    got = space.enumerate_shapes(cfg, Budget(**budget), DENSE_AXES, 0.25, MULTIPLE, 64)
    assert [tuple(s[k] for k in KEYS) for s in got] == want
    for shape in got:
        assert shape["vocab_size"] == 512 and shape["tie_word_embeddings"] is False
        spec = ",".join(f"{k}={shape[k]}" for k in KEYS)
        assert targets.parse_target(cfg, spec).shape == shape


def test_enumerate_nothing_in_range_says_what_is():
    cfg = tiny_config()
    counter, teacher = Counter(cfg), architecture.shape(cfg)
    low = counter.params(with_(teacher, layers=1, mlp=32))[1]
    high = counter.params(teacher)[1]
    with pytest.raises(WhelpError) as err:
        space.enumerate_shapes(cfg, Budget(non_embedding=1000), ("layers", "mlp"), 0.02, 32, 64)
    assert str(err.value) == (
        f"no shape over axes layers,mlp has non_embedding within 2% below 1,000: they range "
        f"from {low:,} (layers=1, mlp=32) to {high:,}; raise the budget, widen --tolerance "
        "or allow more --axes"
    )


def test_enumerate_budget_in_a_gap_of_the_grid():
    cfg = tiny_config()
    counter, teacher = Counter(cfg), architecture.shape(cfg)
    low, high = counter.params(with_(teacher, layers=1))[1], counter.params(teacher)[1]
    budget = (low + high) // 2
    with pytest.raises(WhelpError) as err:
        space.enumerate_shapes(cfg, Budget(non_embedding=budget), ("layers",), 0.02, 32, 64)
    assert str(err.value) == (
        f"no shape over axes layers has non_embedding within 2% below {budget:,}: they range "
        f"from {low:,} (layers=1) to {high:,}; widen --tolerance or allow more --axes"
    )


def test_enumerate_contradicting_budgets():
    cfg = tiny_config()
    counter, teacher = Counter(cfg), architecture.shape(cfg)
    params = counter.params(with_(teacher, layers=1, mlp=32))[0]
    memory = counter.memory(with_(teacher, layers=2, mlp=96), 64)
    with pytest.raises(WhelpError) as err:
        space.enumerate_shapes(cfg, Budget(params=params, memory=memory), ("layers", "mlp"), 0.02, 32, 64)
    assert str(err.value) == (
        f"the budgets params={params:,}, memory={memory:,} contradict: each is met by some "
        "shape over axes layers,mlp, but none meets all within 2% below; drop or loosen one "
        "of them, or widen --tolerance"
    )


def test_enumerate_8b_against_brute_force_over_depth_and_mlp():
    """At Llama-3.1-8B scale (multiple 128, non_embedding 1.0B within 2%): the grid has 76,492 such shapes; the ones
    that keep the teacher's widths (hidden, heads, KV heads, head_dim) are exactly the brute-force list over every
    (layers, intermediate_size) pair, in the same order, and so is an enumeration over those two axes alone."""
    cfg = models.load_config("llama-3.1-8b")
    counter, teacher = Counter(cfg), architecture.shape(cfg)
    budget = Budget(non_embedding=1_000_000_000)
    mlp_grid = sorted({*range(128, teacher["intermediate_size"] + 1, 128), teacher["intermediate_size"]})
    brute = [
        with_(teacher, layers=layers, mlp=mlp)
        for layers in range(1, teacher["num_hidden_layers"] + 1)
        for mlp in mlp_grid
        if 0.98e9 <= counter.params(with_(teacher, layers=layers, mlp=mlp))[1] <= 1e9
    ]
    brute.sort(key=lambda shape: (-counter.params(shape)[1], tuple(shape[k] for k in KEYS)))
    assert len(brute) == 22
    assert space.enumerate_shapes(cfg, budget, ("layers", "mlp"), 0.02, 128, 2048) == brute

    shapes = space.enumerate_shapes(cfg, budget, DENSE_AXES, 0.02, 128, 2048)
    assert len(shapes) == 76_492
    widths = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert [s for s in shapes if all(s[k] == teacher[k] for k in widths)] == brute
    sample = shapes[:: len(shapes) // 50]
    sizes = [counter.params(shape)[1] for shape in sample]
    assert all(0.98e9 <= n <= 1e9 for n in sizes) and sizes == sorted(sizes, reverse=True)
    for shape in sample:
        assert shape["hidden_size"] % shape["num_attention_heads"] == 0 and shape["hidden_size"] % 128 == 0


def test_axis_values():
    teacher = architecture.shape(tiny_config(**BRUTE))
    assert space.axis_values(teacher, DENSE_AXES, 32) == {
        "layers": [1, 2],
        "hidden": [32, 48],
        "mlp": [32, 48],
        "heads": [1, 2, 3, 4, 6],
        "kv_heads": [1, 2],
        "head_dim": [2, 4, 8],
    }
    # heads kept at the teacher's 6: only 2 KV heads keep 3 query heads per group, so kv_heads cannot shrink
    assert space.axis_values(teacher, ("kv_heads", "mlp"), 20) == {
        "layers": [2],
        "hidden": [48],
        "mlp": [20, 40, 48],
        "heads": [6],
        "kv_heads": [2],
        "head_dim": [8],
    }


def test_parse_axes():
    assert space.parse_axes(" mlp,layers ") == ("layers", "mlp")
    for text, message in [
        ("mlp,depth", "unknown search axis 'depth'; choose from " + ", ".join(SEARCH_AXES)),
        ("mlp,mlp", "search axis 'mlp' is given twice in 'mlp,mlp'; give each axis once"),
        (" , ", "give at least one search axis of " + ", ".join(SEARCH_AXES)),
    ]:
        with pytest.raises(WhelpError) as err:
            space.parse_axes(text)
        assert str(err.value) == message


# Llama 3.1 8B: 8,030,261,248 params, 6,979,588,096 non-embedding, 16,328,957,952 bytes at 2048 tokens.
@pytest.fixture(scope="module")
def big():
    cfg = models.load_config("llama-3.1-8b")
    return architecture.shape(cfg), Counter(cfg)


@pytest.mark.parametrize(
    "text, budget",
    [
        ("params=60M", Budget(params=60_000_000)),
        ("params=1.2B", Budget(params=1_200_000_000)),
        ("params=1.5G", Budget(params=1_500_000_000)),
        ("non_embedding=500k", Budget(non_embedding=500_000)),
        ("non_embedding=2K", Budget(non_embedding=2000)),
        ("params=123456789", Budget(params=123_456_789)),
        ("non_embedding=50%", Budget(non_embedding=3_489_794_048)),
        ("params=12.5%", Budget(params=1_003_782_656)),
        ("memory=300MB", Budget(memory=300_000_000)),
        ("memory=2GiB", Budget(memory=2**31)),
        ("memory=5GB", Budget(memory=5 * 10**9)),
        ("memory=512MiB", Budget(memory=2**29)),
        ("memory=64KB", Budget(memory=64_000)),
        ("memory=3KiB", Budget(memory=3072)),
        ("memory=1000B", Budget(memory=1000)),
        ("memory=4096", Budget(memory=4096)),
        ("memory=50%", Budget(memory=8_164_478_976)),
        ("non_embedding=1B, latency=20ms", Budget(non_embedding=10**9, latency_ms=20.0)),
        ("latency=0.02s,params=1B", Budget(params=10**9, latency_ms=20.0)),
        ("params=1B,latency=7.5", Budget(params=10**9, latency_ms=7.5)),
    ],
)
def test_parse_budget(big, text, budget):
    teacher, counter = big
    assert parse_budget(text, teacher, counter) == budget


def test_parse_budget_memory_percent_counts_the_given_context(big):
    teacher, counter = big
    assert parse_budget("memory=50%", teacher, counter, context=0) == Budget(memory=8_030_261_248)


COUNT = "a count as 60000000, 60M or 1.2B (units k, M, B/G) or 50% (of the teacher's)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("size=1B", "unknown budget key 'size'; valid keys: params, non_embedding, active, memory, latency"),
        ("params=1B,params=2B", "budget key 'params' is given twice in 'params=1B,params=2B'; give each key once"),
        ("params", "budget item 'params' is not key=value; write e.g. non_embedding=50%,latency=20ms"),
        ("params=lots", f"budget params=lots is not a valid number; write {COUNT}"),
        ("params=5X", f"budget params=5X is not a valid number; write {COUNT}"),
        (
            "memory=3mb",
            "budget memory=3mb is not a valid number; write bytes as 300000000, 300MB or 2GiB (units B, KB, "
            "MB, GB, KiB, MiB, GiB) or 50% (of the teacher's)",
        ),
        (
            "latency=fast,params=1B",
            "budget latency=fast is not a valid number; write milliseconds per decoded token as 20ms or 0.02s",
        ),
        ("params=0", "budget params=0 must be > 0"),
        ("non_embedding=-5M", "budget non_embedding=-5M must be > 0"),
        (
            "params=9B",
            "budget params=9B (9,000,000,000) is one the teacher already meets: the teacher itself has "
            "8,030,261,248; a search shrinks — give less than 8,030,261,248",
        ),
        (
            "non_embedding=100%",
            "budget non_embedding=100% (6,979,588,096) is one the teacher already meets: the teacher "
            "itself has 6,979,588,096; a search shrinks — give less than 6,979,588,096",
        ),
        (
            "latency=50%,params=1B",
            "budget latency=50%: latency is measured, not known beforehand, so it cannot be a "
            "percentage of the teacher's; write milliseconds per decoded token as 20ms or 0.02s",
        ),
        (
            "latency=20ms",
            "budget latency alone cannot be searched: shapes are enumerated by size, then filtered by "
            "measured latency; add params=, non_embedding= or memory= (e.g. non_embedding=50%,latency=20ms)",
        ),
        (
            " , ",
            "give a budget: params=N, non_embedding=N, active=N (MoE), memory=BYTES or latency=MS, comma-separated",
        ),
    ],
)
def test_parse_budget_refuses(big, text, message):
    teacher, counter = big
    with pytest.raises(WhelpError) as err:
        parse_budget(text, teacher, counter)
    assert str(err.value) == message and "\n" not in message


def test_proxy_pool_spreads_over_depths():
    shapes = [
        {"num_hidden_layers": layers, "mlp": mlp}
        for layers, mlp in [(2, 9), (3, 8), (2, 7), (1, 6), (3, 5), (3, 4), (1, 3)]
    ]
    pool = space.proxy_pool(shapes, 5)
    # turn 1: each depth's largest; turn 2: 2 more, at the deepest and shallowest depths still holding shapes
    assert pool == [shapes[1], shapes[0], shapes[3], shapes[4], shapes[6]]
    ten = [{"num_hidden_layers": layers, "mlp": 1} for layers in range(10, 0, -1)]
    assert [s["num_hidden_layers"] for s in space.proxy_pool(ten, 3)] == [10, 6, 1]  # spans the depths
    assert space.proxy_pool(shapes, 5) == pool  # deterministic
    assert sorted(map(id, space.proxy_pool(shapes, 50))) == sorted(map(id, shapes))  # all when n >= len
    assert space.proxy_pool([], 3) == []


def test_spearman():
    # ranks of b with the tie at 7 averaged: 1, 2, 3.5, 5, 3.5 -> rho = 8 / sqrt(10 * 9.5)
    assert space.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert space.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert space.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(space.spearman([1.0], [2.0]))
    assert math.isnan(space.spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError):
        space.spearman([1, 2], [1])
