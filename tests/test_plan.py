"""``whelp plan RECIPE``: every stage priced (FLOPs, GPU-hours, wall hours, memory per GPU, disk) from closed forms,
offline for the Llama recipes (shipped configs)."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from conftest import make_chat_teacher, run_cli, save_tiny, tiny_tokenizer

from whelp import architecture, footprint, models, plan, pricing, recipe
from whelp.errors import WhelpError
from whelp.specs import GenerateSpec, PruneSpec

N_70B, N_8B = 70_553_706_496, 8_030_261_248
H100 = 989e12


@pytest.fixture(autouse=True)
def _offline_and_wide(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells at the terminal's width


def _json(*args: str) -> dict:
    done = run_cli("plan", *args, "--json")
    assert done.exit_code == 0, done.stderr
    return json.loads(done.stdout)


def _stage(planned: dict, name: str) -> dict:
    return next(s for s in planned["stages"] if s["stage"] == name)


def _part(stage: dict, what: str) -> dict:
    return next(p for p in stage["memory"] if p["what"].startswith(what))


@pytest.mark.parametrize("name, params", [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824)])
def test_llama_recipes_plan_the_published_sizes_offline(name, params):
    planned = plan.plan_recipe(recipe.load(name))
    assert planned["student"]["params"] == params
    assert planned["teacher"]["shape"]["params"] == N_8B
    assert [s["stage"] for s in planned["stages"]] == ["prune[0]", "capture[0]", "distill[0]"]
    distill = _stage(planned, "distill[0]")
    assert distill["flops_per_token"]["student_train"] == 6 * params
    assert distill["flops_per_token"]["cache_teachers_once"] == 2 * N_70B
    cache = distill["caches"][0]
    assert cache["bytes_per_token"] <= (48 if cache["mode"] == "sample" else 264)
    assert (
        cache["bytes"]
        == cache["bytes_per_token"] * distill["tokens"]
        == _stage(planned, "capture[0]")["disk_bytes"]["cache"]
    )


def test_the_70b_capture_is_priced_at_the_closed_form_on_8_h100():
    """Kaplan et al.'s 2 N per token forward: 2 x 70.6e9 x 20e9 FLOPs at 40% of 989 TFLOP/s is ~1,983 GPU-hours."""
    done = run_cli("plan", "llama-3.2-1b", "--gpus", "8", "--gpu", "h100")
    assert done.exit_code == 0, done.stderr
    capture = done.stdout.split("\ncapture[0]\n")[1].split("\n\n")[0]
    row = next(line for line in capture.splitlines() if line.startswith("  GPU time "))
    printed = float(row.split()[-2].replace(",", ""))
    closed_form = 2 * 70.6e9 * 20e9 / (0.4 * 989e12) / 3600
    assert abs(printed - closed_form) / closed_form < 0.10 and 1900 < closed_form < 2000

    planned = _json("llama-3.2-1b", "--gpus", "8", "--gpu", "h100")
    n_70b = architecture.count_params(models.load_config("llama-3.1-70b"))[0]
    assert n_70b == N_70B
    capture = _stage(planned, "capture[0]")
    assert capture["teacher"] == "meta-llama/Llama-3.1-70B" and capture["for"] == "distill[0].caches[0]"
    assert capture["tokens"] == 20_000_000_000 and capture["flops"] == 2 * n_70b * 20_000_000_000
    assert capture["gpu_hours"] == capture["flops"] / (H100 * 0.4) / 3600
    assert capture["wall_hours"] == capture["gpu_hours"] / 8 and capture["gpus"] == 8
    assert capture["disk_bytes"]["cache"] == capture["bytes_per_token"] * capture["tokens"]
    # the recipe's tp_size 4: each group of 4 GPUs holds one bf16 70B, a quarter of it on each
    assert capture["tp_size"] == 4 and _part(capture, "teacher weights")["per_gpu_bytes"] == -(-2 * n_70b // 4)
    assert capture["fits"] and planned["warnings"] == []
    assert planned["pricing"] == {
        "gpu": "h100",
        "peak_flops": H100,
        "gpu_memory_bytes": 80 * 10**9,
        "gpus": 8,
        "mfu": 0.4,
    }


def test_a_70b_cache_without_tensor_parallelism_is_warned_about_and_tp_size_reaches_the_capture(tmp_path):
    import yaml

    from whelp import recipe

    raw = yaml.safe_load((recipe.RECIPES_DIR / "llama-3.2-1b.yaml").read_text())
    raw["distill"]["caches"][0].pop("tp_size")
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(raw))
    whole = _json(str(tmp_path / "whole.yaml"), "--gpus", "8", "--gpu", "h100")
    assert _stage(whole, "capture[0]")["fits"] is False
    assert any(
        "split it tensor-parallel over at least 4 GPUs (tp_size: 4 on the recipe's cache entry" in w
        for w in whole["warnings"]
    )
    raw["distill"]["caches"][0]["tp_size"] = 2  # still too big: the advice counts the whole teacher, not its half
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(raw))
    half = _json(str(tmp_path / "half.yaml"), "--gpus", "8", "--gpu", "h100")
    assert _stage(half, "capture[0]")["fits"] is False
    assert any("alone is 141.1 GB; split it tensor-parallel over at least 4 GPUs" in w for w in half["warnings"])
    odd = _json("llama-3.2-1b", "--gpus", "6", "--gpu", "h100")
    assert odd["warnings"] == [
        "capture[0]: tp_size 4 needs a multiple of 4 GPUs, not 6 (the run refuses it); price "
        "it with --gpus 4 or another multiple of 4"
    ]
    raw["distill"]["caches"][0]["tp_size"] = 0
    (tmp_path / "zero.yaml").write_text(yaml.safe_dump(raw))
    done = run_cli("plan", str(tmp_path / "zero.yaml"))
    assert done.exit_code == 2 and done.stderr.count("\n") == 1 and "tp_size" in done.stderr
    step = next(r.step for r in recipe.load("llama-3.2-1b").stages() if r.kind == "distill")
    assert step.caches[0].spec(step.options).tp_size == 4  # what the build's capture stage runs with


def test_distill_memory_and_disk_are_the_formulas_sharded_over_n():
    planned = _json("llama-3.2-1b", "--gpus", "8")
    student = planned["student"]["params"]
    distill = _stage(planned, "distill[0]")
    flops = distill["flops_per_token"]
    assert distill["flops"] == (6 * student + 2 * N_8B) * 20_000_000_000
    assert flops["student_train"] + flops["live_teachers"] == 6 * student + 2 * N_8B
    state = _part(distill, "student weights + grads + AdamW")
    assert state["bytes"] == 16 * student and state["per_gpu_bytes"] == math.ceil(16 * student / 8)
    assert _part(distill, "live teacher meta-llama/Llama-3.1-8B")["per_gpu_bytes"] == 2 * N_8B  # replicated bf16
    b, s, h, layers = 4, 8192, 2048, 16  # the recipe's batch_size, seq_len; the 1B's hidden size and layers
    kept = layers * s * b * h * 2 + 34 * s * b * h  # Korthikanti et al. 2022: each layer's input + one layer's all
    teacher_layer = 34 * s * b * 4096  # the 8B's forward under no_grad, done before the student's
    assert _part(distill, "activations (grad_checkpointing)")["bytes"] == max(kept, teacher_layer) == teacher_layer
    assert _part(distill, "loss chunks")["bytes"] == 3 * 1024 * 128_256 * 4
    assert distill["memory_per_gpu_bytes"] == sum(p["per_gpu_bytes"] for p in distill["memory"])
    assert distill["fits"] is True and not any("distill" in w for w in planned["warnings"])  # the 70B is cached
    assert distill["disk_bytes"] == {"store": 4 * 20_000_000_000, "checkpoints": 2 * 12 * student, "model": 4 * student}
    one = _stage(_json("llama-3.2-1b", "--gpus", "1"), "distill[0]")
    assert one["gpu_hours"] == distill["gpu_hours"] and one["wall_hours"] == 8 * distill["wall_hours"]
    assert _part(one, "student FSDP2 gathers")["per_gpu_bytes"] == 0  # one process: nothing is sharded
    assert _part(one, "student weights + grads + AdamW")["per_gpu_bytes"] == 16 * student


def _live_70b(tmp_path, **step) -> str:
    raw = yaml.safe_load((recipe.RECIPES_DIR / "llama-3.2-1b.yaml").read_text())
    raw["distill"]["teachers"].append({"model": "meta-llama/Llama-3.1-70B", "config": "llama-3.1-70b", "weight": 0.5})
    raw["distill"].update(caches=[], **step)
    path = tmp_path / "live-70b.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_live_70b_is_warned_about_on_h100_and_fits_sharded_over_8(tmp_path):
    done = run_cli("plan", _live_70b(tmp_path), "--gpus", "8", "--gpu", "h100")
    assert done.exit_code == 0, done.stderr
    warning = " ".join(done.stdout.split("\nwarning: ")[1].split())  # wrapped at the width: one line again
    for needed in ("meta-llama/Llama-3.1-70B (141.1 GB)", "h100 (80 GB", "caches:", "shard_teachers: true"):
        assert needed in warning, warning
    planned = _json(_live_70b(tmp_path), "--gpus", "8", "--gpu", "h100")
    distill = _stage(planned, "distill[0]")
    assert [s["kind"] for s in planned["stages"]] == ["prune", "distill"] and distill["fits"] is False
    assert planned["warnings"] == [warning]
    assert _part(distill, "live teacher meta-llama/Llama-3.1-70B")["per_gpu_bytes"] == 2 * N_70B
    assert distill["flops_per_token"]["live_teachers"] == 2 * (N_8B + N_70B)

    sharded = _json(_live_70b(tmp_path, shard_teachers=True), "--gpus", "8", "--gpu", "h100")
    distill = _stage(sharded, "distill[0]")
    big = _part(distill, "live teacher meta-llama/Llama-3.1-70B")
    assert big["per_gpu"] == "sharded" and big["per_gpu_bytes"] == math.ceil(2 * N_70B / 8)
    assert _part(distill, "live teacher meta-llama/Llama-3.1-70B FSDP2 gathers")["per_gpu_bytes"] > 0
    assert distill["fits"] is True and distill["memory_per_gpu_bytes"] < 80e9 and sharded["warnings"] == []
    assert (
        run_cli("plan", _live_70b(tmp_path), "--gpu", "h200").stdout.count("warning: ") == 1
    )  # 141 GB: no room for a live 70B either


@pytest.mark.parametrize(
    "args, message",
    [
        (("--gpu", "h1000"), "--gpu 'h1000' is not valid; choose h100, a100, h200, or a GPU's peak dense bf16 FLOP/s"),
        (("--gpu", "989"), "at least 1e9"),
        (("--gpu", "nan"), "choose h100, a100, h200"),
        (("--gpus", "0"), "--gpus must be at least 1, got 0"),
        (("--mfu", "0"), r"--mfu is the model FLOPs utilization, in (0, 1]"),
        (("--mfu", "1.5"), "got 1.5"),
    ],
)
def test_bad_pricing_options_are_one_line_naming_the_valid_values(args, message):
    done = run_cli("plan", "llama-3.2-1b", *args)
    assert done.exit_code == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr


def test_pricing_options_are_refused_for_a_prune_plan_and_a_flops_gpu_skips_the_fit_check():
    done = run_cli("plan", "llama-3.1-8b", "--target", "llama-3.2-1b", "--gpus", "8")
    assert done.exit_code == 2 and "price a recipe" in done.stderr
    planned = _json("llama-3.2-1b", "--gpu", "500e12", "--mfu", "0.5")
    capture = _stage(planned, "capture[0]")
    assert planned["pricing"]["gpu_memory_bytes"] is None and capture["fits"] is None
    assert planned["warnings"] == [
        "capture[0]: tp_size 4 needs a multiple of 4 GPUs, not 1 (the run refuses it); "
        "price it with --gpus 4 or another multiple of 4"
    ]  # the only one: no fit check
    assert capture["gpu_hours"] == capture["flops"] / (500e12 * 0.5) / 3600
    assert "memory unknown: fit not checked" in run_cli("plan", "llama-3.2-1b", "--gpu", "500e12").stdout


def test_the_default_is_today_s_table_plus_a_price_on_one_h100():
    done = run_cli("plan", "llama-3.2-3b")
    assert done.exit_code == 0, done.stderr
    assert "\n  FLOPs/token " in done.stdout and "cost on 1 x h100" in done.stdout
    assert "the default; choose with --gpus N --gpu KIND" in done.stdout
    assert "warning: capture[0]: tp_size 4 needs a multiple of 4 GPUs, not 1" in " ".join(done.stdout.split())
    planned = _json("llama-3.2-3b")
    assert planned["totals"]["gpu_hours"] == sum(s["gpu_hours"] for s in planned["stages"])
    stores = 4 * 10_000_000_000  # calib and train read one source: its store counts once
    assert planned["totals"]["disk_bytes"] == stores + sum(
        b for s in planned["stages"] for k, b in s["disk_bytes"].items() if k != "store"
    )


@pytest.mark.demo  # the tiny recipe's teacher is smollm2-135m
def test_tiny_recipe_prices_every_stage_in_fp32():
    planned = _json("tiny", "--gpu", "a100")
    assert [s["stage"] for s in planned["stages"]] == ["prune[0]", "capture[0]", "distill[0]"]
    teacher, student = planned["teacher"]["shape"]["params"], planned["student"]["params"]
    prune, capture, distill = planned["stages"]
    # calibration, the default reconstruction's refit passes and its OBS selection (30 -> 4 layers, MLP 1536 -> 256)
    selection = footprint.select_flops(4 * 64, 4, 1536, 256)
    assert (
        prune["flops"] == 2 * teacher * 4 * 64 * (1 + footprint.REFIT_PASSES) + selection and prune["device"] == "cpu"
    )
    assert prune["fits"] is None
    assert capture["tokens"] == 1024 and capture["flops"] == 2 * teacher * 1024
    assert distill["flops"] == (6 * student + 2 * teacher) * 1024
    assert _part(distill, "live teacher smollm2-135m")["per_gpu_bytes"] == 4 * teacher  # dtype float32
    assert _part(capture, "teacher weights (float32)")["bytes"] == 4 * teacher
    assert all(s["gpu_hours"] == s["flops"] / (312e12 * 0.4) / 3600 for s in planned["stages"])
    assert planned["warnings"] == [] and capture["fits"] is distill["fits"] is True
    assert pricing.memory_per_gpu(distill["memory"], 1) == distill["memory_per_gpu_bytes"]


def test_rope_follows_the_preset_by_default_and_plan_shows_both(capsys):
    """Llama-3.1-8B -> the llama-3.2-1b preset: Meta's 1B has llama3 factor 32 where the 8B has 8; the default
    (auto) gives the preset's, `teacher` keeps the 8B's, and a key=value target (no RoPE of its own) keeps it too."""
    from whelp.pruning.targets import plan_target

    source = models.load_config("llama-3.1-8b")
    assert source.rope_parameters["factor"] == 8.0
    auto = plan_target(source, "llama-3.2-1b")
    assert auto["source"]["rope"] == "llama3 theta=500000 factor=8 low=1 high=4 original=8192"
    assert auto["target"]["rope"] == "llama3 theta=500000 factor=32 low=1 high=4 original=8192"
    assert plan_target(source, "llama-3.2-1b", "teacher")["target"]["rope"] == auto["source"]["rope"]
    assert plan_target(source, "num_hidden_layers=16")["target"]["rope"] == auto["source"]["rope"]
    with pytest.raises(WhelpError, match="--rope target takes the RoPE of a preset"):
        plan_target(source, "num_hidden_layers=16", "target")
    stage = plan.plan_recipe(recipe.load("llama-3.2-1b"))["stages"][0]
    assert stage["rope"] == {"source": auto["source"]["rope"], "target": auto["target"]["rope"]}
    rope = dict(plan.describe(stage))["RoPE"]
    assert rope.startswith("llama3 theta=500000 factor=32") and "(teacher: llama3 theta=500000 factor=8" in rope


def test_sizes_and_times_print_in_their_unit_with_three_significant_digits():
    from whelp.output import duration, size

    assert [size(b) for b in (0, 40, 16_384, 131_072, 33_554_432, 326e6, 1.95e9, 80e9, 800e9, 919.5e9, 2.7628e12)] == [
        "0 B",
        "40 B",
        "16.4 KB",
        "131 KB",
        "33.6 MB",
        "326 MB",
        "1.95 GB",
        "80.0 GB",
        "800 GB",
        "920 GB",
        "2.76 TB",
    ]
    assert size(999_999) == "1.00 MB" and "e" not in size(1.64e-05 * 1e9)
    assert [duration(h) for h in (1981.6, 1.0, 0.095, 5.6e-3, 2e-4, 1.5e-6)] == [
        "1,981.6 h",
        "1.0 h",
        "5.7 min",
        "20 s",
        "under 1 s",
        "under 1 s",
    ]


@pytest.mark.parametrize(
    "args",
    [("smollm2-demo",), ("llama-3.2-1b", "--gpus", "8", "--gpu", "h100"), ("llama-3.1-8b", "--target", "llama-3.2-1b")],
)
def test_the_plan_fits_80_columns_with_no_wrapped_cells(args, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    done = run_cli("plan", *args)
    assert done.exit_code == 0, done.stderr
    assert max(map(len, done.stdout.splitlines())) <= 80, done.stdout
    assert not any(c in done.stdout for c in "│┃━"), done.stdout  # no table cells to wrap
    assert not re.search(r"\de-\d|\b0\.0\d* s\b", done.stdout), done.stdout  # no 1.64e-05 GB, no 0.0056 s


def test_the_llama_plan_reads_in_hours_and_bytes(monkeypatch):
    """The exact block of a known stage: hours in hours, bytes in MB/GB with three significant digits."""
    monkeypatch.setenv("COLUMNS", "80")
    done = run_cli("plan", "llama-3.2-1b", "--gpus", "8", "--gpu", "h100")
    blocks = done.stdout.split("\n\n")
    assert blocks[0] == "recipe llama-3.2-1b\ncost on 8 x h100 (989 TFLOP/s, 80.0 GB) at MFU 0.4"
    assert "\n".join(next(b for b in blocks if b.startswith("capture[0]\n")).splitlines()[-5:]) == (
        "  FLOPs         2.82e+21\n"
        "  GPU time      1,981.6 h\n"
        "  wall time     247.7 h on 8 GPUs\n"
        "  memory        46.0 GB per GPU\n"
        "  disk          cache 800 GB"
    )
    prune = next(b for b in blocks if b.startswith("prune[0]\n"))
    assert "  GPU time      6.5 min\n" in prune and "  disk          store 33.6 MB, model 4.94 GB" in prune
    assert next(b for b in blocks if b.startswith("total\n")) == (
        "total\n"
        "  FLOPs         3.29e+21\n"
        "  GPU time      2,311.4 h\n"
        "  wall time     289.0 h\n"
        "  memory        46.0 GB per GPU at the peak\n"
        "  disk          920 GB"
    )


def test_the_json_plan_keeps_raw_numbers():
    planned = _json("llama-3.2-1b", "--gpus", "8", "--gpu", "h100")
    capture = _stage(planned, "capture[0]")
    assert isinstance(capture["gpu_hours"], float) and capture["disk_bytes"]["cache"] == 800_000_000_000


def test_chat_generation_is_priced_per_conversation_by_hand():
    """Best of 4 answers to self-written requests: every conversation token passes the teacher 4 times sampling
    and 4 scoring, and the request (with its template) once more before it is answered."""
    spec = GenerateSpec(max_tokens=100, chat=True, samples_per_prompt=4, request_tokens=10, new_tokens=30)
    assert footprint.generate_flops_per_token(1000, spec, 8) == {
        "teacher_sampling": 8000,
        "teacher_scoring": 8000,
        "request_writing": 2000 * 18 / 48,
    }
    assert footprint.generate_flops_per_token(1000, GenerateSpec(max_tokens=1000), 8) == {"teacher_sampling": 2000}
    briefed = footprint.generate_flops_per_token(1000, spec, 8, system=12)  # a system turn shown, not stored
    assert briefed == {"teacher_sampling": 10_000, "teacher_scoring": 10_000, "request_writing": 2000 * 18 / 48}


def test_a_chat_generate_stage_counts_the_teacher_template_and_needs_one(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "teacher"
    save_tiny(path, tiny_tokenizer())
    make_chat_teacher(path, [0])
    text = (
        f"name: c\nteacher: {{model: {path}}}\ndata: {{seq_len: 16, calib: generated, train: generated}}\n"
        "generate: {max_tokens: 800, chat: true, batch_size: 4, request_tokens: 12, new_tokens: 20}\n"
        "prune: {target: num_hidden_layers=1, calib_samples: 2}\ndistill: {steps: 1, batch_size: 1}\n"
    )
    (tmp_path / "c.yaml").write_text(text)
    stage = plan.plan_recipe(recipe.load(str(tmp_path / "c.yaml")))["stages"][0]
    exchange = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    template = len(AutoTokenizer.from_pretrained(path).apply_chat_template(exchange, tokenize=True, return_dict=False))
    assert stage["chat"]["template_tokens"] == template > 0
    sampling, writing = 2 * stage_params(stage), 2 * stage_params(stage) * (template + 12) / (template + 32)
    assert stage["flops_per_token"] == {"teacher_sampling": sampling, "request_writing": writing}
    assert stage["flops"] == round(800 * (sampling + writing))
    assert stage["memory"][1]["what"] == f"KV cache, {4 * (template + 32):,} positions"
    assert stage["store_bytes"] == 800 * 2 + 100  # uint16 ids and one mask bit a token
    system, tok = "Answer briefly.", AutoTokenizer.from_pretrained(path)  # shown to the teacher, not stored
    briefed = plan.plan_recipe(recipe.load(str(tmp_path / "c.yaml"), (f"generate.system={system}",)))["stages"][0]
    shown, plain = (
        tok.apply_chat_template(turns, add_generation_prompt=True, return_dict=False)
        for turns in ([{"role": "system", "content": system}, *exchange[:1]], exchange[:1])
    )
    conversation, extra = template + 32, len(shown) - len(plain)
    assert (
        extra > 0 and briefed["flops_per_token"]["teacher_sampling"] == sampling * (conversation + extra) / conversation
    )
    assert briefed["memory"][1]["what"] == f"KV cache, {4 * (conversation + extra):,} positions"
    assert briefed["chat"]["system_tokens"] == extra and stage["chat"]["system_tokens"] == 0
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {k: v for k, v in json.loads((path / "tokenizer_config.json").read_text()).items() if k != "chat_template"}
        )
    )
    with pytest.raises(WhelpError, match=r"recipe.generate\[0\].chat: the teacher has no chat template"):
        plan.plan_recipe(recipe.load(str(tmp_path / "c.yaml")))


def stage_params(stage: dict) -> int:
    return stage["memory"][0]["bytes"] // 4  # fp32 weights


@pytest.mark.parametrize("mode,copies", [("auto", 4), ("span", 3), ("span_attn", 4), ("lsq", 1), ("none", 0)])
def test_the_prune_stage_prices_the_refits_calibration_states(mode, copies):
    """The reconstruction holds fp32 [tokens, H] states of the student's layer inputs (and the teacher's for span,
    what auto is for a Llama) over the refit's blocks: the llama-3.2-1b recipe's first 32 of its 1,024 x 8,192
    calibration blocks at H = 4,096 (17.2 GB for span_attn, 12.9 GB for span), 550 / 412 GB on all of them; the refit's passes are priced on the
    same blocks, importance's forward on all."""
    for refit, blocks in (("32", 32), ("null", 1024)):
        load = recipe.load("llama-3.2-1b", (f"prune.reconstruct={mode}", f"prune.refit_samples={refit}"))
        prune = _stage(plan.plan_recipe(load), "prune[0]")
        states = [p["bytes"] for p in prune["memory"] if p["what"].startswith("reconstruction:")]
        assert states == ([4 * blocks * 8192 * 4096 * copies] if copies else [])
    passes = 0 if mode == "none" else footprint.REFIT_PASSES
    refit = PruneSpec(calib_samples=8, refit_samples=2, seq_len=16, reconstruct=mode)
    assert footprint.prune_flops(refit, 100, 4, "span_attn" if mode == "auto" else mode) == 2 * 100 * 16 * (
        8 + passes * 2
    )
    assert [p["bytes"] for p in footprint.refit_memory(10, 4, "bias")] == [160]  # the student's states alone


def test_a_refit_the_prune_would_refuse_is_refused_by_the_plan():
    """bias on llama-3.2-1b's published shape (which has no biases) fails the plan, not a build after its capture."""
    with pytest.raises(WhelpError, match=r"^recipe.prune\[0\].reconstruct: --reconstruct bias adds biases"):
        plan.plan_recipe(recipe.load("llama-3.2-1b", ("prune.reconstruct=bias",)))


def test_a_generic_path_teacher_is_priced_without_the_refit_auto_does_not_run(tmp_path):
    """``auto`` is no reconstruction on the generic path (a Llama-like decoder outside the family table): the plan
    prices neither its passes nor its states, the same stage as ``none``; ``lsq`` there is refused."""
    path = tmp_path / "teacher"
    save_tiny(path, tiny_tokenizer(), "ministral", tie_word_embeddings=True)
    text = (
        f"name: g\nteacher: {{model: {path}}}\ndata: {{seq_len: 16, calib: pydoc:calib, train: pydoc:train}}\n"
        "prune: {target: intermediate_size=64, calib_samples: 4, reconstruct: MODE}\ndistill: {steps: 1}\n"
    )
    stages = {}
    for mode in ("auto", "none", "lsq"):
        (tmp_path / f"{mode}.yaml").write_text(text.replace("MODE", mode))
        load = recipe.load(str(tmp_path / f"{mode}.yaml"))
        if mode == "lsq":
            with pytest.raises(WhelpError, match=r"^recipe.prune\[0\].reconstruct: --reconstruct lsq .* generic path"):
                plan.plan_recipe(load)
            continue
        stages[mode] = _stage(plan.plan_recipe(load), "prune[0]")
    assert stages["auto"] == stages["none"]  # before: auto priced 3 refit passes over the 4 blocks that never ran
    assert not [p for p in stages["auto"]["memory"] if p["what"].startswith("reconstruction:")]


def test_the_prune_stage_prices_obs_selection_on_top_of_the_refit():
    """``prune.select: obs`` (what ``auto`` is for a Llama refit) adds footprint.select_flops for the 8B -> 1B MLP
    widths to the stage's FLOPs and footprint.select_memory to its memory; ``importance`` adds nothing."""
    stages = {
        how: _stage(plan.plan_recipe(recipe.load("llama-3.2-1b", (f"prune.select={how}",))), "prune[0]")
        for how in ("importance", "obs", "auto")
    }
    spec = recipe.load("llama-3.2-1b").prune[0].options
    added = footprint.select_flops(spec.refit_blocks * spec.seq_len, 16, 14336, 8192)  # on the refit's blocks
    assert stages["obs"]["flops"] - stages["importance"]["flops"] == added > 0
    assert stages["auto"]["flops"] == stages["obs"]["flops"]
    extra = [p for p in stages["obs"]["memory"] if p not in stages["importance"]["memory"]]
    tokens = spec.refit_blocks * spec.seq_len  # a span refit (auto for Llama) keeps one layer's activations
    assert [p["bytes"] for p in extra] == [32 * 14336**2, 4 * tokens * 14336]  # 6.6 GB of float64 n x n matrices
    # no refit to choose for: the plan refuses --select obs, as the prune would before any weight is read
    with pytest.raises(WhelpError, match=r"^recipe.prune\[0\].reconstruct: --select obs"):
        plan.plan_recipe(recipe.load("llama-3.2-1b", ("prune.select=obs", "prune.reconstruct=none")))
    unrefit = _stage(plan.plan_recipe(recipe.load("llama-3.2-1b", ("prune.reconstruct=none",))), "prune[0]")
    refit = stages["importance"]["flops"] - unrefit["flops"]  # REFIT_PASSES forwards over the refit's blocks
    assert refit * spec.calib_samples == unrefit["flops"] * footprint.REFIT_PASSES * spec.refit_blocks > 0


def test_chat_rows_trained_by_ce_alone_are_priced_without_a_teacher_forward():
    """The demo trains its chat rows (five eighths of the mixture) by CE alone, so the live teacher runs on the
    text rows only (BOS text and pydoc, three eighths); with KD on the chat rows, or hidden-state losses reading the
    teacher everywhere, it runs on every row."""
    demo = _json("smollm2-demo")
    teacher = 2 * demo["teacher"]["shape"]["params"]
    assert _stage(demo, "distill[0]")["flops_per_token"]["live_teachers"] == round(0.375 * teacher)
    for override in ("distill.chat_loss=kd", "distill.hidden_weight=0.5"):
        every = _json("smollm2-demo", "--set", override)
        assert _stage(every, "distill[0]")["flops_per_token"]["live_teachers"] == teacher, override
