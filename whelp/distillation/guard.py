"""The divergence guard: a pure decision, on a step's numbers, whether training is ruined and must stop.

A learning rate far too high does not always give NaN: the student can collapse to a near-uniform model whose loss
is finite, whose gradient is exactly 0 and whose weights are enormous, and a run that only checks finiteness trains
on to the end and writes it. Large runs watch for this and answer the same way: PaLM (Chowdhery et al. 2022, 5.1)
restarted from a checkpoint before each loss spike; OPT-175B (Zhang et al. 2022, 2.5 and its logbook) lowered the
learning rate and restarted from an earlier checkpoint when the loss diverged, a divergence that came with exploding
activation norms. whelp stops at the first sign, keeps the last good checkpoint, and says to resume it with a lower
``--lr``. The signals, each far from where recorded healthy runs go (tests/test_guard.py holds their curves: the
demo's distillation of a pruned SmolLM2-135M, a chat distillation, a block-local stage):

* the loss leaves a sane band: above what a uniform student scores, ``ln V`` (V the student's vocabulary; x T^2
  with ``t2_scale``), by ``MARGIN`` nats and ``SPIKE`` x the run's first loss (a student may start worse than
  uniform: a reverse-KL or on-policy loss); or above ``SPIKE`` x the median of its last ``WINDOW`` steps, once it has
  ``MIN_HISTORY`` of them and it is over half the uniform student's (the median ignores a few noisy steps;
  healthy curves peak at 1.24x theirs; a small KL that triples on one batch is noise, not a divergence). Each
  kind of step is compared with its own kind, the kind being its on-policy tokens: an on-policy loss (the student's
  own samples) is on another scale than a data loss, and runs mix or alternate the two;
* the gradient norm stays below ``GRAD_FLOOR`` for ``FLAT_STEPS`` steps in a row while the loss is not ~0 (above
  ``LOSS_FLOOR``): a plateau no optimizer leaves, as a saturated softmax or dead units give (healthy gradient norms
  are 2.7e-3 and up, the block-local stage's the smallest);
* the weights blow up: their global L2 norm grows ``BLOWUP`` x over its value at the run's first step (distilling
  moves the weights by the learning rate's scale: a random tiny student's grew 1.2x in 100 steps at lr 3e-3, 1.4x
  in 40 at 1e-2, 5x in 20 at 0.1; a diverged AdamW's grow by millions).

Everything the guard remembers is a ``History``, saved in each checkpoint's state (``state()``, plain JSON, floats
exact), so a resumed run decides exactly as an unbroken one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from whelp.errors import WhelpError
from whelp.specs import OptimSpec

WINDOW = 50  # steps whose median is the reference: a few-step excursion cannot move it, a curve's fall can
MIN_HISTORY = 10  # steps of a kind before its median counts: the first (warmup) steps are too few to judge by
SPIKE = 3.0  # x the median (or the first loss): healthy curves stay within 1.24x of their median
MARGIN = 1.0  # nats above the uniform student's loss
FLAT_STEPS = 3  # steps in a row of a vanished gradient: one such step could be chance, three are a plateau
GRAD_FLOOR = 1e-6  # a gradient norm below it has vanished
LOSS_FLOOR = 1e-2  # a loss below it is ~0: no gradient is then expected, and its ratios are noise
BLOWUP = 10.0  # x the weights' norm at the first step
LR_RANGE = (1e-7, 1e-2)  # where AdamW fine-tuning and distillation learning rates live


@dataclass(frozen=True)
class Verdict:
    """Why a step is ruined (``what``, with its numbers) and the first step it implicates (``bad_from``, 0-based:
    the checkpoint of that many optimizer steps holds the weights that step measured, and every later one too)."""

    what: str
    bad_from: int


@dataclass(frozen=True)
class History:
    """What the guard has seen of the run: per kind of step, its first loss and its last ``WINDOW`` losses; the
    current run of vanished gradients; the weights' norm at the first step."""

    first: dict[int, float] = field(default_factory=dict)
    recent: dict[int, tuple[float, ...]] = field(default_factory=dict)
    flat: int = 0
    start_norm: float | None = None

    def state(self) -> dict:
        """Plain JSON for a checkpoint (``of`` reads it back)."""
        return {
            "first": {str(k): v for k, v in self.first.items()},
            "recent": {str(k): list(v) for k, v in self.recent.items()},
            "flat": self.flat,
            "start_norm": self.start_norm,
        }

    @classmethod
    def of(cls, state: dict) -> History:
        """The history a checkpoint's ``state()`` holds, exactly (JSON floats round-trip)."""
        return cls(
            {int(k): v for k, v in state["first"].items()},
            {int(k): tuple(v) for k, v in state["recent"].items()},
            state["flat"],
            state["start_norm"],
        )


def uniform_loss(vocab: int, temperature: float, t2_scale: bool) -> float:
    """The most a uniform student scores on a CE or forward-KL loss, ``ln V``: CE is exactly that, KL(teacher ||
    uniform) = ln V - H(teacher) at most; ``t2_scale`` multiplies the KD term by T^2."""
    return math.log(vocab) * (max(1.0, temperature**2) if t2_scale else 1.0)


def judge(
    h: History, step: int, kind: int, loss: float, grad_norm: float, norm: float, uniform: float
) -> tuple[History, Verdict | None]:
    """The verdict on 0-based ``step``: its mean ``loss`` over its loss tokens, of ``kind`` (its on-policy tokens),
    its gradient norm before clipping and its weights' global ``norm``, with the uniform student's loss ``uniform``;
    and the history that includes it. Weights first: a non-finite loss on ruined weights condemns them too."""
    flat = h.flat + 1 if grad_norm < GRAD_FLOOR and loss > LOSS_FLOOR else 0
    start = h.start_norm if h.start_norm is not None else norm
    verdict = (
        _blowup(step, norm, start)
        or _non_finite(step, loss, grad_norm)
        or _band(h, step, kind, loss, uniform)
        or _spike(h, step, kind, loss, uniform)
        or _flat(step, flat, loss, grad_norm)
    )
    recent = (h.recent.get(kind, ()) + (loss,))[-WINDOW:]
    first = {kind: loss, **h.first}
    return replace(h, first=first, recent={**h.recent, kind: recent}, flat=flat, start_norm=start), verdict


def last_update(h: History, steps: int, norm: float) -> Verdict | None:
    """The verdict on the weights after the run's last update (``steps`` done): blown up or not finite. The
    checkpoint of ``steps`` steps would hold them."""
    start = h.start_norm if h.start_norm is not None else norm
    if not math.isfinite(norm):
        return Verdict(f"the weights are not finite (norm {norm})", steps)
    return _blowup(steps, norm, start)


def _blowup(step: int, norm: float, start: float) -> Verdict | None:
    if norm <= BLOWUP * start:  # False for a NaN norm too
        return None
    return Verdict(
        f"the weights blew up: their norm {norm:.4g} is {norm / start:.3g}x its {start:.4g} at the run's first step",
        step,
    )


def _non_finite(step: int, loss: float, grad_norm: float) -> Verdict | None:
    """On finite weights a NaN may be one bad batch's: the checkpoint of these weights stays."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    return Verdict(
        f"the loss ({loss}) or its gradient norm ({grad_norm}) is not finite (a bad batch can do it too)", step + 1
    )


def _band(h: History, step: int, kind: int, loss: float, uniform: float) -> Verdict | None:
    first = h.first.get(kind, loss)
    if loss <= max(uniform + MARGIN, SPIKE * first):
        return None
    return Verdict(
        f"the loss rose to {loss:.4g}, over {MARGIN:g} nat above a uniform student's {uniform:.4g} (ln of the "
        f"vocabulary) and over {SPIKE:g}x the run's first, {first:.4g}",
        step,
    )


def _spike(h: History, step: int, kind: int, loss: float, uniform: float) -> Verdict | None:
    """Only where the loss is on its way to a uniform student's (over half of it): a small batch of a harder
    source can triple a small KL (0.05 -> 0.16) on a healthy run, which no one should be stopped for."""
    recent = h.recent.get(kind, ())
    if len(recent) < MIN_HISTORY or loss <= uniform / 2:
        return None
    median = statistics.median(recent)
    if loss <= SPIKE * max(median, LOSS_FLOOR):
        return None
    return Verdict(
        f"the loss spiked to {loss:.4g}, over {SPIKE:g}x its median {median:.4g} of the last {len(recent)} steps", step
    )


def _flat(step: int, flat: int, loss: float, grad_norm: float) -> Verdict | None:
    if flat < FLAT_STEPS:
        return None
    return Verdict(
        f"the gradient vanished: its norm was below {GRAD_FLOOR:g} ({grad_norm:.3g} now) for {flat} steps in a "
        f"row, from step {step - flat + 2}, while the loss is {loss:.4g}",
        step - flat + 1,
    )


def unusual_lr(lr: float) -> str | None:
    """A one-line warning for a learning rate far outside ``LR_RANGE`` (0 is refused elsewhere), else None."""
    low, high = LR_RANGE
    if lr == 0 or low <= lr <= high:
        return None
    return (
        f"lr {lr:g} is far outside the usual range of AdamW fine-tuning and distillation ({low:g} to {high:g}; "
        f"whelp's default is {OptimSpec().lr:g}): training may {'diverge' if lr > high else 'not move'}"
    )


class Diverged(WhelpError):
    """Training stopped before the update of ``step`` (0-based) because of ``what``; the checkpoints of
    ``bad_from`` steps or more hold the diverged weights, so the run resumes from ``last_good``, with a tenth of
    ``lr`` (or whelp's default where that is lower still), as OPT's restarts lowered it."""

    def __init__(self, what: str, step: int, bad_from: int, last_good: Path | None, lr: float):
        self.what, self.step, self.bad_from, self.lr = what, step, bad_from, lr
        where = (
            f"re-run with a lower --lr to resume from the last good checkpoint, {last_good}"
            if last_good
            else "start again with a lower --lr"
        )
        super().__init__(f"{what}; stopped without updating; {where}: e.g. --lr {min(lr / 10, OptimSpec().lr):g}")

    def resuming_from(self, last_good: Path | None) -> Diverged:
        """The same stop, resuming from ``last_good``: the newest checkpoint left once the diverged ones are gone."""
        return Diverged(self.what, self.step, self.bad_from, last_good, self.lr)
