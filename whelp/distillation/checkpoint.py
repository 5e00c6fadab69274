"""Training checkpoints: full (gathered) model and optimizer state, scheduler, RNG and data position.

A checkpoint is a directory ``step-NNNNNNNN/`` holding ``model.safetensors``, ``optimizer.safetensors``
and ``state.json``. It is written by rank 0 into a temporary sibling and renamed, so a directory with
the final name is always complete; the newest K are kept. Model and optimizer states are gathered to
full tensors with ``torch.distributed.checkpoint.state_dict`` (a no-op gather on one process), so the
files are the same whether the run used one process or FSDP2 over many.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from whelp import store
from whelp.errors import WhelpError

PREFIX = "step-"
STATE = "state.json"
FILES = ("model.safetensors", "optimizer.safetensors")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (final names only), oldest first; dead writers' temporaries are removed."""
    if not ckpt_dir.is_dir():
        return []
    store.clean_stale(ckpt_dir)
    return sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir())


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys sharing storage with an earlier key (tied embeddings): safetensors refuses aliases."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = tensor.contiguous()
    return kept, aliases


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(ckpt_dir: Path, step: int, module, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    """Write the checkpoint of optimizer ``step`` (collective: every rank calls it); returns its path.

    ``module`` is the (possibly FSDP2-sharded) model; ``state`` is JSON-serialisable run state
    (data position, tokens seen, ...). Keeps the newest ``keep_last`` checkpoints.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(module, options=options)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=options)
    rng = [None] * dist.get_world_size() if _distributed() else None
    if _distributed():
        dist.all_gather_object(rng, _rng_state())
    else:
        rng = [_rng_state()]
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    if _rank() == 0:
        with store.atomic_dir(final, force=True, kind="checkpoint") as tmp:
            weights, aliases = _dedupe(model_sd)
            save_file(weights, tmp / "model.safetensors")
            flat = {f"{fqn}/{k}": v for fqn, s in optim_sd["state"].items() for k, v in s.items()}
            flat.update({f"rng/{r}/{k}": v for r, states in enumerate(rng) for k, v in states.items()})
            save_file({k: v.contiguous() for k, v in flat.items()}, tmp / "optimizer.safetensors")
            meta = {"step": step, "aliases": aliases, "param_groups": optim_sd["param_groups"],
                    "scheduler": scheduler.state_dict(), "world_size": len(rng), **state,
                    "sha256": {name: store.sha256_file(tmp / name) for name in FILES}}
            store.write_record(tmp / STATE, meta)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old)
    if _distributed():
        dist.barrier()
    return final


def load_checkpoint(path: Path, module, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns ``state.json``."""
    fix = f"delete {path} to resume from the checkpoint before it"
    meta = store.read_record(path / STATE, fix)
    for name, digest in meta["sha256"].items():  # weights damaged on disk would train on silently
        if not (path / name).is_file() or store.sha256_file(path / name) != digest:
            raise WhelpError(f"checkpoint file {path / name} is missing or corrupted (sha256 differs); {fix}")
    world = dist.get_world_size() if _distributed() else 1
    if meta["world_size"] != world:
        raise WhelpError(f"checkpoint {path} was written by {meta['world_size']} processes, this run has {world}: "
                         "the global batch would change; relaunch with the same --nproc_per_node")
    weights = load_file(path / "model.safetensors")
    weights.update({name: weights[target] for name, target in meta["aliases"].items()})
    flat = load_file(path / "optimizer.safetensors")
    optim_state: dict[str, dict] = {}
    for key, value in flat.items():
        if not key.startswith("rng/"):
            fqn, _, name = key.rpartition("/")
            optim_state.setdefault(fqn, {})[name] = value
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(module, weights, options=options)
    set_optimizer_state_dict(module, optimizer, {"state": optim_state, "param_groups": meta["param_groups"]},
                             options=options)
    scheduler.load_state_dict(meta["scheduler"])
    rank = _rank()
    torch.set_rng_state(flat[f"rng/{rank}/cpu"])
    if torch.cuda.is_available() and f"rng/{rank}/cuda" in flat:
        torch.cuda.set_rng_state(flat[f"rng/{rank}/cuda"])
    return meta
