"""A planned stage as text: the ``(key, value)`` lines ``whelp plan RECIPE`` prints for it."""

from __future__ import annotations

from whelp import output


def describe_data(d: dict) -> str:
    """``SOURCE: needs N tokens, M available (E epochs)`` (its store's bytes are the stage's disk)."""
    have = (
        "not tokenized yet"
        if d["tokens_available"] is None
        else (f"{d['tokens_available']:,} available ({d['epochs']:.2f} epochs)")
    )
    return f"{d['source']}: needs {d['tokens_needed']:,} tokens, {have}"


def describe(stage: dict) -> list[tuple[str, str]]:
    """A planned stage as ``(key, value)`` lines: what it makes, its params or FLOPs per token, its data and
    memory; a stage planned at the search's largest shape says it is an estimate."""
    lines = _describe(stage)
    return [("estimate", "planned at the largest searched shape")] + lines if stage.get("estimate") else lines


def _dims(shape: dict) -> str:
    return (
        f"L{shape['num_hidden_layers']} H{shape['hidden_size']} I{shape['intermediate_size']} "
        f"heads {shape['num_attention_heads']}/{shape['num_key_value_heads']}x{shape['head_dim']}"
    )


def _giga(flops: float) -> str:
    return f"{flops / 1e9:,.3g} G"


def _describe(stage: dict) -> list[tuple[str, str]]:
    if stage["kind"] == "search":
        parts = stage["flops_parts"]
        return [
            ("shapes", f"{stage['candidates']:,} within {stage['budget']}"),
            (
                "work",
                f"a pool of {len(stage['pool'])} one-shot, the best {stage['scored']} distilled "
                f"{stage['score_steps']} steps each",
            ),
            ("largest", _dims(stage["largest"])),
            (
                "FLOPs parts",
                f"calibration {parts['calibration']:.3g}, one-shot {parts['one_shot']:.3g}, distillation "
                f"{parts['distillation']:.3g} at most",
            ),
            ("data", describe_data(stage["data"])),
        ]
    if stage["kind"] == "generate":
        return [("work", _generated(stage)), ("FLOPs/token", _parts(stage["flops_per_token"]))]
    if stage["kind"] == "prune":
        shape = stage["shape"]
        rope = stage["rope"]["target"] + (
            "" if stage["rope"]["target"] == stage["rope"]["source"] else f" (teacher: {stage['rope']['source']})"
        )
        return [
            ("target", f"{stage['target']}: {_dims(shape)}"),
            ("RoPE", rope),
            ("params", f"{shape['params']:,}"),
            ("data", describe_data(stage["data"])),
        ]
    if stage["kind"] == "capture":
        return [
            (
                "work",
                f"{stage['tokens']:,} tokens of {stage['teacher']} logits ({stage['mode']} {stage['k']}) "
                f"for {stage['for']}",
            ),
            ("FLOPs/token", f"teacher {_giga(2 * stage['params'])}"),
            ("cache", f"{stage['bytes_per_token']} B/token"),
        ]
    flops = stage["flops_per_token"]
    memory = stage["memory_bytes"]
    return [
        ("work", f"{stage['tokens']:,} tokens"),
        (
            "FLOPs/token",
            f"student {_giga(flops['student_train'])}"
            + (f" + on-policy sampling {_giga(flops['student_sampling'])}" if flops["student_sampling"] else "")
            + f", live teachers {_giga(flops['live_teachers'])}",
        ),
        ("data", describe_data(stage["data"])),
        (
            "memory parts",
            f"training {output.size(memory['student_training'])} + live teachers "
            f"{output.size(memory['live_teachers'])}",
        ),
    ]


def _generated(stage: dict) -> str:
    """The generate stage's work: teacher text, or chat conversations and the lengths they are priced at."""
    if not (c := stage["chat"]):
        return f"{stage['tokens']:,} tokens of teacher text (the data source '{stage['name']}')"
    requests = "requests it writes itself (Magpie)" if c["self_instruct"] else "the prompts' requests"
    template = "unknown (teacher not on this machine)" if c["template_tokens"] is None else c["template_tokens"]
    return (
        f"{stage['tokens']:,} tokens of chat (the data source '{stage['name']}'): {requests}, answered "
        f"{c['samples_per_prompt']}x each; priced per conversation at {c['request_tokens']} request + "
        f"{c['new_tokens']} answer + {template} template tokens, before drops"
    )


def _parts(flops: dict) -> str:
    """FLOPs per stored token, part by part (teacher_sampling -> 'teacher sampling 1.2 G')."""
    return ", ".join(f"{name.replace('_', ' ')} {_giga(value)}" for name, value in flops.items())
