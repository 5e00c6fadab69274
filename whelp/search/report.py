"""The outputs of ``whelp search``: the leaderboard (``search.json``, ``search.md``), the plot of one-shot vs
post-training KL (``search.png``), the winner's short-distilled checkpoint (``winner/``) and its shape as an HF
config (``target.json``, which ``whelp prune --target`` and a recipe's ``prune.target`` accept)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from whelp import __version__, store
from whelp.pruning import moe
from whelp.search import space
from whelp.specs import SearchSpec, record


def _dims(shape: dict) -> str:
    experts = next((f" E{shape[k]}" for k in moe.EXPERT_KEYS if k in shape), "")
    ffn = f" I_e{shape['moe_intermediate_size']}" if "moe_intermediate_size" in shape else ""
    return (
        f"L{shape['num_hidden_layers']} H{shape['hidden_size']} I{shape['intermediate_size']}{ffn} "
        f"heads {shape['num_attention_heads']}/{shape['num_key_value_heads']}x{shape['head_dim']}{experts}"
    )


def report(teacher: str, spec: SearchSpec, shapes: list[dict], pool: list[dict], trained: list[dict]) -> dict:
    """The leaderboard: trained candidates ranked by held-out KL after training, each with its one-shot rank; the
    Spearman correlation of the two rankings; the whole one-shot pool; provenance."""
    ranked = sorted(range(len(trained)), key=lambda i: trained[i]["trained"]["kl"])
    board = [{**trained[i], "candidate": i, "rank": r + 1, "one_shot_rank": i + 1} for r, i in enumerate(ranked)]
    rho = space.spearman([c["one_shot"]["kl"] for c in trained], [c["trained"]["kl"] for c in trained])
    return {
        "teacher": teacher,
        "spec": record(spec),
        "enumerated": len(shapes),
        "pool": pool,
        "leaderboard": board,
        "winner": board[0],
        "spearman_one_shot_vs_trained": rho,
        "whelp_version": __version__,
    }


def markdown(result: dict) -> str:
    spec = result["spec"]
    lines = [
        f"# whelp search: {result['teacher']} at {spec['budget']}",
        "",
        f"{result['enumerated']:,} shapes meet the budget (axes {spec['axes']}, tolerance "
        f"{spec['tolerance']:.0%}); {len(result['pool'])} pruned one-shot; the best {spec['candidates']} "
        f"distilled {spec['score_steps']} steps each on {spec['data']} and ranked on {spec['eval_data']}.",
        "",
        "| rank | shape | params | non-embedding | one-shot KL (rank) | KL after training | ppl after |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["leaderboard"]:
        lines.append(
            f"| {c['rank']} | {_dims(c['shape'])} | {c['params'][0]:,} | {c['params'][1]:,} | "
            f"{c['one_shot']['kl']:.4f} ({c['one_shot_rank']}) | {c['trained']['kl']:.4f} | "
            f"{c['trained']['ppl']:.2f} |"
        )
    rho = result["spearman_one_shot_vs_trained"]
    timed = bool(result["pool"]) and "latency_ms" in result["pool"][0]
    lines += [
        "",
        f"Spearman(one-shot rank, post-training rank) = {rho:.2f}"
        + (": the one-shot ranking misled" if rho < 0.5 else ""),
        "",
        "## One-shot pool",
        "",
        "| shape | non-embedding | one-shot KL | ppl |" + (" decode ms/token |" if timed else ""),
        "|---|---|---|---|" + ("---|" if timed else ""),
    ]
    for row in result["pool"]:
        lines.append(
            f"| {_dims(row['shape'])} | {row['params'][1]:,} | {row['one_shot']['kl']:.4f} | "
            f"{row['one_shot']['ppl']:.2f} |" + (f" {row['latency_ms']:.2f} |" if timed else "")
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """One-shot KL (x) against KL after training (y) per trained candidate, labelled with its shape."""
    import matplotlib  # noqa: PLC0415 - heavy (about a second), and only a finished search plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg"), which must come first

    board = result["leaderboard"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([c["one_shot"]["kl"] for c in board], [c["trained"]["kl"] for c in board])
    for c in board:
        ax.annotate(f"#{c['rank']} {_dims(c['shape'])}", (c["one_shot"]["kl"], c["trained"]["kl"]), fontsize=7)
    ax.set_xlabel("one-shot KL to the teacher (nats/token)")
    ax.set_ylabel(f"KL after {result['spec']['score_steps']} distillation steps")
    ax.set_title(f"Spearman {result['spearman_one_shot_vs_trained']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, work: Path, out: Path, force: bool, stage_key: str | None) -> Path:
    """``out`` atomically: search.json, search.md, search.png, winner/ and target.json."""
    winner = work / "candidates" / f"{result['winner']['candidate']:02d}" / "model"
    with store.atomic_dir(out, force, "search", stage_key=stage_key) as tmp:
        (tmp / "search.json").write_text(json.dumps(result, indent=2))
        (tmp / "search.md").write_text(markdown(result))
        plot(result, tmp / "search.png")
        shutil.copytree(winner, tmp / "winner")
        shutil.copyfile(winner / "config.json", tmp / "target.json")
    return out
