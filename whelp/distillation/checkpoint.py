"""Training checkpoints: sharded model and optimizer state (torch.distributed.checkpoint), run state and RNG.

Why DCP: gathering a 3B student's weights and AdamW moments (~38 GB) through rank 0 at every save takes that rank's
memory and one process's write speed. With ``torch.distributed.checkpoint`` every rank writes only its own FSDP2
shards, in parallel, and a load maps the saved slices onto whatever shards the loading run has: a run stopped on N
processes resumes on M (``whelp.distillation.run`` keeps its global batch).

A checkpoint is a directory ``step-NNNNNNNN/`` (NNNNNNNN: optimizer steps done) holding

* ``shard-RRRRR-model-00001-of-00001.safetensors``, one per writing rank (DCP's ``HuggingFaceStorageWriter``): that
  rank's slices of ``model/FQN`` (the fp32 master weights; a tied lm_head is stored once, as the embedding) and
  ``optim/FQN/{step,exp_avg,exp_avg_sq}`` (AdamW), each slice's offset in its tensor kept in the safetensors
  header (JSON). DCP's default writer would add a pickled ``.metadata``; this layout holds no pickle at all.
* ``rng.safetensors``: each rank's CPU (and CUDA) generator state, ``rng/RANK/{cpu,cuda}``. Everything the loop
  reads is a function of (seed, step), so only dropout draws from it; resumed on another number of processes,
  rank r takes old rank r % old world's.
* ``state.json``, a sealed record: format, step, AdamW param_groups, scheduler, world size, tokens seen, data
  position, and the sha256 of every file above; ``whelp.json``, whelp's marker.

Complete or absent: every rank writes into one temporary sibling that rank 0 creates and names to the others (its
host and PID in the name, so ``list_checkpoints`` removes a dead writer's); rank 0 renames it into place once every
rank's files are written and hashed. The newest ``keep_last`` are kept. Checkpoints of whelp before this layout
(a gathered ``model.safetensors`` + ``optimizer.safetensors``) are refused, not read.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from whelp import store
from whelp.errors import WhelpError

PREFIX = "step-"
STATE = "state.json"
RNG = "rng.safetensors"
FORMAT = 2  # state.json's "format"; the gathered checkpoints before it had none


def _world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order (small JSON-like objects and tensors)."""
    world = _world()[1]
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


@contextlib.contextmanager
def _quiet():
    """DCP warns at every save and load without a process group that it assumes one process: here it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (final names only), oldest first; dead writers' temporaries are removed."""
    if not ckpt_dir.is_dir():
        return []
    store.clean_stale(ckpt_dir)
    return sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir())


def discard_from(ckpt_dir: Path, step: int) -> Path | None:
    """Remove the checkpoints of ``step`` optimizer steps or more (rank 0; every rank may call it alike) and return
    the newest left, or None: the divergence guard condemned the weights from ``step`` on, and a re-run resumes
    from the newest checkpoint, which must be a good one."""
    found = list_checkpoints(ckpt_dir)
    kept = [path for path in found if int(path.name.removeprefix(PREFIX)) < step]
    if _world()[0] == 0:
        for path in found[len(kept) :]:
            shutil.rmtree(path)
    return kept[-1] if kept else None


def _state(module, optimizer) -> tuple[dict, dict, dict]:
    """``(flat, model, optim)``: the sharded model and optimizer state dicts (DTensors under FSDP2, plain tensors on
    one process) and the one flat dict of their tensors that DCP writes or loads into, in place."""
    model = get_model_state_dict(module)
    optim = get_optimizer_state_dict(module, optimizer)
    first: dict[int, str] = {}  # a tied parameter's later names: safetensors refuses aliases
    tied = {
        name
        for name, param in module.named_parameters(remove_duplicate=False)
        if first.setdefault(id(param), name) != name
    }
    flat = {f"model/{fqn}": v for fqn, v in model.items() if fqn not in tied}
    flat.update({f"optim/{fqn}/{k}": v for fqn, s in optim["state"].items() for k, v in s.items()})
    return flat, model, optim


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def _staging(final: Path):
    """The one temporary sibling of ``final`` that every rank writes into: rank 0 makes it (``store.atomic_dir``)
    and names it to the others; leaving the block on rank 0 renames it into place (or removes it on failure)."""
    rank, world = _world()
    if rank:
        name = [None]
        dist.broadcast_object_list(name, src=0)
        yield Path(name[0])
        return
    with store.atomic_dir(final, force=True, kind="checkpoint") as tmp:
        if world > 1:
            dist.broadcast_object_list([str(tmp)], src=0)
        yield tmp


def save_checkpoint(ckpt_dir: Path, step: int, module, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    """Write the checkpoint of optimizer ``step`` (collective: every rank calls it, and writes its own shards);
    returns its path.

    ``module`` is the (possibly FSDP2-sharded) model; ``state`` is JSON-serialisable run state (data position,
    tokens seen, ...). Keeps the newest ``keep_last`` checkpoints.
    """
    rank, world = _world()
    flat, _, optim = _state(module, optimizer)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    with _staging(final) as tmp:
        with _quiet():
            dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        mine = [p.name for p in tmp.glob(f"shard-{rank + 1:05d}-*.safetensors")]  # DCP's name for rank r's file
        gathered = _gather({"rng": _rng_state(), "sha256": {name: store.sha256_file(tmp / name) for name in mine}})
        if rank == 0:
            save_file({f"rng/{r}/{k}": v for r, g in enumerate(gathered) for k, v in g["rng"].items()}, tmp / RNG)
            digests = {RNG: store.sha256_file(tmp / RNG)}
            for g in gathered:
                digests.update(g["sha256"])
            store.write_record(
                tmp / STATE,
                {
                    "format": FORMAT,
                    "step": step,
                    "param_groups": optim["param_groups"],
                    "scheduler": scheduler.state_dict(),
                    "world_size": world,
                    **state,
                    "sha256": digests,
                },
            )
    if rank == 0:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()
    return final


def _verify(path: Path, digests: dict[str, str], fix: str) -> None:
    """Every file's sha256, the files split over the ranks (weights damaged on disk would train on silently)."""
    rank, world = _world()
    bad = [
        name
        for name in sorted(digests)[rank::world]
        if not (path / name).is_file() or store.sha256_file(path / name) != digests[name]
    ]
    bad = sorted(name for names in _gather(bad) for name in names)
    if bad:
        raise WhelpError(f"checkpoint file {path / bad[0]} is missing or corrupted (sha256 differs); {fix}")


def load_checkpoint(path: Path, module, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path`` (collective), whatever number of
    processes wrote it; returns ``state.json``."""
    fix = f"delete {path} to resume from the checkpoint before it"
    meta = store.read_record(path / STATE, fix)
    if meta.get("format") != FORMAT:
        raise WhelpError(
            f"checkpoint {path} was written by an earlier whelp (one gathered model.safetensors and "
            "optimizer.safetensors); checkpoints are sharded now and that format is not read: pass "
            "--force to start the run over"
        )
    _verify(path, meta["sha256"], fix)
    flat, model, optim = _state(module, optimizer)
    with _quiet():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    set_model_state_dict(module, model)
    set_optimizer_state_dict(module, optimizer, {"state": optim["state"], "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    old = _world()[0] % meta["world_size"]
    with safe_open(path / RNG, framework="pt") as rng:
        torch.set_rng_state(rng.get_tensor(f"rng/{old}/cpu"))
        if torch.cuda.is_available() and f"rng/{old}/cuda" in rng.keys():
            torch.cuda.set_rng_state(rng.get_tensor(f"rng/{old}/cuda"))
    return meta
