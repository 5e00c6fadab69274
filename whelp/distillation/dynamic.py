"""Dynamic batch loading (``--mixture dynamic``): a data mixture's sources re-weighted as the student learns.

Sheared-LLaMA (Xia et al. 2024, "Sheared LLaMA: Accelerating Language Model Pre-training via Structured Pruning",
Algorithm 1) trains a pruned model on a mixture whose weights move, every m steps, toward the sources where its loss
exceeds a reference model's the most. With ell_i the student's and ell_ref_i the reference's loss on source i's
held-out blocks and w the current weights:

    Delta_i = max(ell_i - ell_ref_i, 0),    alpha_i = w_i * exp(Delta_i),    w <- alpha / sum_j alpha_j.

whelp's reference is the first live teacher, the model the student is distilled toward, measured once on the same
held-out blocks; losses are mean next-token CE in nats per target token. The first re-weighting is at the start of
step K (0-based; after K steps at the given weights), as Algorithm 1's "t mod m = 0" with t counted from 1: the
untrained student's excess would only restate the pruning.

Data: the first ``dev_blocks`` blocks of each source's permutation (``Blocks.perms``) are held out of training. Each
step draws the source of each of its rows from the current weights (multinomial, with replacement, a generator
seeded by (seed, step)); each source is read as a stream of its other blocks, in its permuted order, then in a fresh
seeded order per epoch, so no block repeats before its source is used up. The state is the weights and each source's
position in its stream: a step's rows are a function of (seed, step, weights, positions), the same on every rank
without communication, and a checkpoint stores them in a few numbers.
"""

from __future__ import annotations

import torch

from whelp.errors import WhelpError


def reweight(weights: torch.Tensor, student_loss: torch.Tensor, reference_loss: torch.Tensor) -> torch.Tensor:
    """Sheared-LLaMA's update of the mixture ``weights`` [n] (sum 1) from the student's and the reference's mean CE
    [n] (nats per token) on each source's dev blocks: float64 [n], sum 1. Taken in log space (softmax of
    log w + Delta), which is the same and cannot overflow exp."""
    excess = (student_loss.double() - reference_loss.double()).clamp_min(0)
    return torch.softmax(weights.double().log() + excess, 0)


class Reweighted:
    """A read-only view of the rows of a mixture (``whelp.data.Blocks``) addressed by flat id ``offsets[i] + b``
    (block b of source i), with what the loop reads (``view[ids]``, ``mask``, ``has_mask``, ``seq_len``), each
    source's dev blocks (``dev``) and the rows of a step (``draw``). Refuses data it cannot re-weight, in one line."""

    def __init__(self, blocks, dev_blocks: int, seed: int):
        self.names = [source.name for source in blocks.source.sources]
        repeated = sorted({name for name in self.names if self.names.count(name) > 1})
        if repeated:
            raise WhelpError(
                f"mixture=dynamic weighs each source by its own loss, and the data lists {repeated[0]} twice; "
                "list each source once"
            )
        for name, n in zip(self.names, blocks.n_blocks):
            if n <= dev_blocks:
                raise WhelpError(
                    f"source {name} has {n} blocks of {blocks.seq_len} tokens, and mixture_dev_blocks={dev_blocks} "
                    "of each are held out to measure its loss, leaving none to train on; lower "
                    "--mixture-dev-blocks or give more data (or a larger --max-tokens)"
                )
        self.blocks, self.seq_len, self.seed, self.dev_blocks = blocks, blocks.seq_len, seed, dev_blocks
        self.sizes = torch.tensor(blocks.n_blocks)
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.given = torch.tensor([weight for _, weight in blocks.sources], dtype=torch.float64)
        self._epoch: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (epoch, its order), the latest one

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def _located(self, ids) -> list[tuple[int, int]]:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        source = torch.searchsorted(self.offsets, ids, right=True) - 1
        return list(zip(source.tolist(), (ids - self.offsets[source]).tolist()))

    def __getitem__(self, ids) -> torch.Tensor:
        return self.blocks.read(self._located(ids))

    @property
    def has_mask(self) -> bool:
        return self.blocks.has_mask

    def mask(self, ids) -> torch.Tensor | None:
        return self.blocks.read_mask(self._located(ids)) if self.has_mask else None

    def chat_rows(self, ids) -> torch.Tensor:
        return self.blocks.located_chat(self._located(ids))

    def dev(self, i: int) -> torch.Tensor:
        """Flat ids of source ``i``'s dev blocks: LongTensor [dev_blocks]."""
        return self.offsets[i] + self.blocks.perms[i][: self.dev_blocks]

    def _order(self, i: int, epoch: int) -> torch.Tensor:
        """Source ``i``'s training blocks in the order of ``epoch``: its permutation after the dev blocks, then a
        fresh order seeded by (seed, source, epoch), computed once per epoch (8 bytes a block)."""
        if self._epoch.get(i, (None,))[0] != epoch:
            rest = self.blocks.perms[i][self.dev_blocks :]
            g = torch.Generator().manual_seed((self.seed * 1_000_033 + i) * 7919 + epoch)
            self._epoch[i] = (epoch, rest if epoch == 0 else rest[torch.randperm(len(rest), generator=g)])
        return self._epoch[i][1]

    def draw(
        self, step: int, n: int, weights: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` rows of optimizer ``step`` (flat ids, LongTensor [n]) drawn at ``weights`` [n_sources] from
        each source's stream at ``positions`` [n_sources] (rows read so far), and the positions after them."""
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + step)
        source = torch.multinomial(weights, n, replacement=True, generator=g)
        ids, positions = torch.empty(n, dtype=torch.long), positions.clone()
        for i in range(len(self.names)):
            rows = (source == i).nonzero().flatten()
            drawn, m = positions[i] + torch.arange(len(rows)), int(self.sizes[i]) - self.dev_blocks
            epoch, k = drawn // m, drawn % m
            for e in epoch.unique().tolist():
                ids[rows[epoch == e]] = self.offsets[i] + self._order(i, e)[k[epoch == e]]
            positions[i] += len(rows)
        return ids, positions


def dev_losses(view: Reweighted, score, batch_size: int) -> torch.Tensor:
    """Mean next-token CE (nats per target token) on each source's dev blocks: float64 [n_sources]. ``score(ids)``
    gives the CE sum and the target tokens of the rows ``ids`` (at most ``batch_size``); a source without target
    tokens (chat blocks of prompts only) scores 0."""
    out = []
    for i in range(len(view.names)):
        sums = torch.tensor([score(ids) for ids in view.dev(i).split(batch_size)], dtype=torch.float64)
        out.append(sums[:, 0].sum() / sums[:, 1].sum().clamp_min(1))
    return torch.stack(out)


class Mixing:
    """The state of a dynamic mixture over ``view``: its current ``weights`` (float64 [n], the given ones at first),
    the reference's dev losses ``reference`` (float64 [n], nats per token) and each source's stream ``positions``
    (int64 [n]); re-weighted every ``every`` steps."""

    def __init__(self, view: Reweighted, every: int, reference: torch.Tensor):
        self.view, self.every, self.reference = view, every, reference.double()
        self.weights = view.given / view.given.sum()
        self.positions = torch.zeros(len(view.names), dtype=torch.long)

    def step(self, step: int, n: int, student_loss) -> tuple[torch.Tensor, dict]:
        """The ``n`` rows of optimizer ``step`` (flat ids [n]) and its log fields: ``mixture/SOURCE``, the weights
        the rows were drawn at, and at a re-weighting (``student_loss()``: the student's dev losses [n], called at
        the start of every ``every``-th step but the first) ``excess/SOURCE``, each Delta_i in nats per token."""
        row = {}
        if step and step % self.every == 0:
            loss = student_loss().double()
            row = {f"excess/{name}": float(v) for name, v in zip(self.view.names, (loss - self.reference).clamp_min(0))}
            self.weights = reweight(self.weights, loss, self.reference)
        ids, self.positions = self.view.draw(step, n, self.weights, self.positions)
        return ids, {**{f"mixture/{name}": float(w) for name, w in zip(self.view.names, self.weights)}, **row}

    def state(self) -> dict:
        """What a checkpoint keeps (JSON: float64 values round-trip exactly)."""
        return {
            "weights": self.weights.tolist(),
            "positions": self.positions.tolist(),
            "reference": self.reference.tolist(),
        }

    def restore(self, state: dict) -> None:
        """The state of ``state()``; the reference as first measured, so a resumed run re-weights exactly as an
        unbroken one even where a re-measurement would differ in the last bit (another number of processes)."""
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.positions = torch.tensor(state["positions"], dtype=torch.long)
        self.reference = torch.tensor(state["reference"], dtype=torch.float64)
