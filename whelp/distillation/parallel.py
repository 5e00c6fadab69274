"""Process-group setup and the FSDP2 wrapping of the student for ``torchrun`` launches.

One process (plain ``python``/``whelp``) runs unchanged: no process group, no sharding. Under
``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) the student's decoder layers and the root are
sharded with FSDP2 (``fully_shard``); live teachers are frozen and replicated on every rank, or with
``shard_teachers`` their decoder layers FSDP2-sharded too, forward only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from whelp.architecture import shape
from whelp.distillation import losses
from whelp.distillation.hidden import capture, hidden_loss
from whelp.distillation.losses import backbone, model_transform
from whelp.distillation.onpolicy import positions, sample
from whelp.errors import WhelpError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool  # this run created the process group and destroys it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun process group if launched by torchrun (nccl on CUDA, gloo on CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size == 1:
        return World(0, 1, device, owns_group=False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)


def close_world(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def main_first(world: World, fn):
    """``fn()`` on rank 0, then on the other ranks: work with a shared side effect (tokenizing a source into a
    store every rank then reads) happens once. Every rank learns whether rank 0 failed, so none waits forever."""
    result, failed = None, None
    if world.main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks heard of it
            failed = exc
    if world.size > 1 and all_sum(world, torch.tensor([float(failed is not None)], dtype=torch.float64)).item():
        if failed is None:
            raise WhelpError("rank 0 failed to prepare the run; its message says why")
    if failed is not None:
        raise failed
    return result if world.main else fn()


def tp_mesh(world: World, tp_size: int):
    """The 1-D mesh of this rank's tensor-parallel group (``tp_size`` consecutive ranks), or None for tp_size 1."""
    if tp_size == 1:
        return None
    if world.size % tp_size:
        raise WhelpError(
            f"--tp-size {tp_size} needs a multiple of {tp_size} processes (torchrun --nproc_per_node), "
            f"this run has {world.size}"
        )

    return init_device_mesh(world.device.type, (world.size // tp_size, tp_size), mesh_dim_names=("dp", "tp"))["tp"]


def from_main(world: World, fn):
    """``fn()`` on rank 0 alone, its result (a picklable value) sent to every rank; if it raised, rank 0 re-raises
    and the others raise a WhelpError with its message, so none waits forever."""
    if world.size == 1:
        return fn()
    box: list = [None]
    if world.main:
        try:
            box = [("ok", fn())]
        except WhelpError as exc:
            box = [("failed", str(exc))]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "failed":
        raise WhelpError(value)
    return value


def gather(world: World, value) -> list:
    """Every rank's ``value`` (small, picklable), in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def all_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over ranks (identity on one process)."""
    if world.size > 1:
        values = values.to(world.device)
        dist.all_reduce(values)
    return values.cpu()


class KDStudent(torch.nn.Module):
    """The student whose forward ends in the fused KD loss instead of logits.

    FSDP2 unshards the root's parameters (embeddings, final norm, lm_head) in the root module's
    forward hooks; routing hidden states -> loss through this forward keeps the lm_head weight
    unsharded while ``kd_loss`` uses it and its gradient reduce-scattered afterwards. With
    ``kd=None`` the forward returns the plain HF output (logits), used by held-out perplexity; with
    ``rollout=(new_tokens, vocab, generator, stop_ids)`` the prompts ``input_ids`` continued by the student's
    samples (``whelp.distillation.onpolicy.sample``). ``attention`` [B, L]: left-padded rows (chat prompts).
    ``kd["hidden"]`` (optional): ``(teacher states [B * L, Ht] per student layer, hidden loss, weight)``, which adds
    ``weight`` times the hidden-state loss (whelp.distillation.hidden) to the KD sum.
    """

    def __init__(self, lm, proj: torch.Tensor | None = None):
        super().__init__()
        self.lm = lm
        # hidden-state losses between different widths: the learned student -> teacher map [Ht, Hs] (hidden.py),
        # trained and checkpointed with the student, never saved with it
        self.hidden_proj = None if proj is None else torch.nn.Parameter(proj.to(self.device))

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        kd: dict | None = None,
        rollout: tuple | None = None,
        attention: torch.Tensor | None = None,
    ):
        if rollout is not None:  # on-policy sampling, inside the root's forward so FSDP2 unshards the root once
            return sample(self.lm, input_ids, *rollout, attention=attention)
        if kd is None:
            return self.lm(input_ids=input_ids)

        kd = dict(kd)
        matched = kd.pop("hidden", None)
        layers = decoder_layers(self.lm) if matched is not None else []
        with capture(layers, range(len(layers))) as states:
            body = backbone(self.lm)(input_ids=input_ids, **positions(attention))
        hidden = body.last_hidden_state.flatten(0, 1)  # [N, Hs], autocast dtype
        weight = self.lm.get_output_embeddings().weight
        # the fused loss runs its own chunked matmuls: outside autocast, in the hidden states' dtype (the cast's
        # backward hands the fp32 master weight an fp32 gradient, as autocast would)
        with torch.autocast(hidden.device.type, enabled=False):
            result = losses.kd_loss(hidden, weight.to(hidden.dtype), transform=model_transform(self.lm), **kd)
            total, matched_sum = result.loss, torch.zeros((), dtype=torch.float64)
            if matched is not None:
                teacher_states, kind, w = matched
                student_states = [states[i].flatten(0, 1) for i in range(len(layers))]
                term = hidden_loss(student_states, teacher_states, kind, self.hidden_proj, kd.get("mask"))
                total, matched_sum = total + w * term, term.detach().double().cpu()
        per_teacher = torch.tensor([float(v) for v in result.per_teacher], dtype=torch.float64)
        ce = torch.tensor(0.0 if result.ce is None else float(result.ce), dtype=torch.float64)
        return total, per_teacher, ce, matched_sum


def decoder_layers(lm, what: str = "model") -> torch.nn.ModuleList:
    """The decoder layers FSDP2 shards one by one: the one list of ``num_hidden_layers`` modules directly under the
    model's backbone (``base_model``: Llama ``model.layers``, GPT-2 ``transformer.h``, GPT-NeoX ``gpt_neox.layers``);
    WhelpError naming the family otherwise."""
    n, body = shape(lm.config)["num_hidden_layers"], backbone(lm)
    found = [name for name, m in body.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if body is lm or len(found) != 1:
        raise WhelpError(
            f"{type(lm).__name__} ({lm.config.model_type}): found {len(found) if body is not lm else 'no'}"
            f" list of its {n} decoder layers under its backbone ({type(body).__name__}); FSDP2 sharding "
            f"of the {what} supports backbones holding them in one list (Llama .model.layers, GPT-2 "
            ".transformer.h, GPT-NeoX .gpt_neox.layers); run on one process instead"
        )
    return getattr(body, found[0])


def shard_teacher(teacher, world: World):
    """``--shard-teachers``: FSDP2-shard a frozen teacher's decoder layers over the ranks, forward only. Each rank
    keeps 1/N of the layers' weights and gathers one layer at a time during the forward (resharded after it);
    embeddings, final norm and lm_head (a few % of a 70B, used whole by the fused loss) stay replicated. The
    gathered weights are the original ones, so the teacher computes exactly what a replicated one does."""
    if world.size == 1:
        return teacher

    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in decoder_layers(teacher, "teacher"):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return teacher


def shard_student(student: KDStudent, world: World) -> KDStudent:
    """FSDP2: shard every decoder layer, then the root (which holds embeddings, norm and a tied lm_head)."""
    if world.size == 1:
        return student

    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in decoder_layers(student.lm, "student"):
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student
