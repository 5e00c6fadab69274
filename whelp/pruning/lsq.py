"""The closed-form refits of reconstruction after pruning (reconstruct.py walks the layers): pure functions on tensors.

For a linear map whose target output is ``y = W h`` (``W`` [out, n]; ``h`` [n] the unpruned layer's input to it, or
``W`` the identity and ``h`` a residual-stream target) and whose student computes ``y' = V x + b`` from its own,
narrower input ``x`` [k], the refit minimises ``sum_t ||W h_t - V x_t||^2`` over the calibration tokens (SlimGPT,
Ling et al. NeurIPS 2024; ZipLM; structured OBS) with a ridge term that pulls ``V`` towards the sliced weights ``V0``:

    V = (W C + lam V0) (S + lam I)^-1,   C = sum h x^T [n, k],  S = sum x x^T [k, k],  lam = damp * mean(diag S)

accumulated and solved in float64. When ``x`` is the kept slice ``h_K`` this is the DESIGN brief's
``W Sigma[:, K] (Sigma[K, K] + lam I)^-1`` with the prior added; the cross-covariance form also covers kept units that
change themselves (a pruned head_dim). Pulling towards ``V0`` rather than zero matters: on the demo shape a ridge
towards zero at damp 1 left general-English perplexity worse than no refit, towards ``V0`` better than any damp
towards zero (bench/RESULTS.md, "Reconstruction and one-shot baselines"). A refit is kept only where it lowers the
calibration error. ``flap_bias`` is FLAP's compensation (An et al., AAAI 2024): ``V0`` stays and
``b = mean(W h - V0 x)`` adds back the removed units' mean contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from whelp.errors import WhelpError

DAMP = 0.1  # lam as a fraction of mean(diag S); 0.01 and 1 measured beside it on the demo shape (bench/RESULTS.md)


def _times(weight: Tensor | None, t: Tensor) -> Tensor:
    """``W @ t`` in float64; ``weight`` None is the identity."""
    return t if weight is None else weight.double() @ t


@dataclass
class Moments:
    """Sums over calibration tokens for one map, float64: ``cross`` [n, k] = sum h x^T, ``gram`` [k, k] = sum x x^T,
    ``h_sum`` [n], ``x_sum`` [k], ``target_sq`` = sum ||W h||^2 (the scale of the relative errors), ``count``."""

    cross: Tensor
    gram: Tensor
    h_sum: Tensor
    x_sum: Tensor
    target_sq: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls, n: int, k: int) -> Moments:
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64)

        return cls(zeros(n, k), zeros(k, k), zeros(n), zeros(k))

    def add(self, h: Tensor, x: Tensor, weight: Tensor | None) -> None:
        """Add tokens: ``h`` [..., n] the target's input, ``x`` [..., k] the student's, ``weight`` W [out, n] or
        None (the identity: ``h`` is the target itself)."""
        h, x = h.detach().reshape(-1, h.shape[-1]).double(), x.detach().reshape(-1, x.shape[-1]).double()
        self.cross += h.T @ x
        self.gram += x.T @ x
        self.h_sum += h.sum(0)
        self.x_sum += x.sum(0)
        target = h if weight is None else h @ weight.detach().double().T
        self.target_sq += float(target.square().sum())
        self.count += len(h)


def error(weight: Tensor | None, v: Tensor, m: Moments, bias: Tensor | None = None) -> float:
    """``sum_t ||W h_t - V x_t - b||^2`` from the moments alone: ``v`` [out, k], ``bias`` [out] or None."""
    v = v.double()
    err = m.target_sq - 2 * float((_times(weight, m.cross) * v).sum()) + float(((v @ m.gram) * v).sum())
    if bias is not None:
        b = bias.double()
        err += -2 * float(b @ (_times(weight, m.h_sum) - v @ m.x_sum)) + m.count * float(b @ b)
    return err


def lsq(weight: Tensor | None, m: Moments, damp: float = DAMP, prior: Tensor | None = None) -> Tensor:
    """The ridge refit ``V = (W C + lam V0) (S + lam I)^-1`` [out, k] (float64); ``prior`` V0, zero when None."""
    lam = damp * m.gram.diagonal().mean()
    gram = m.gram + lam * torch.eye(len(m.gram), dtype=m.gram.dtype)
    rhs = _times(weight, m.cross)  # [out, k]
    if prior is not None:
        rhs = rhs + lam * prior.double()
    return torch.linalg.solve(gram, rhs.T).T  # gram is symmetric


def flap_bias(weight: Tensor | None, v: Tensor, m: Moments) -> Tensor:
    """FLAP's bias [out]: the mean of what the student misses, ``W mean(h) - V mean(x)``."""
    return (_times(weight, m.h_sum) - v.double() @ m.x_sum) / max(m.count, 1)


def refit(weight: Tensor | None, current: Tensor, m: Moments, mode: str, damp: float = DAMP):
    """``(V, b, report)`` for one map: ``weight`` W [out, n] (None: the identity), ``current`` V0 [out, k] the
    student's sliced weight. ``lsq``: the refit where it lowers the calibration error, else V0 (so it never raises
    it); ``bias``: V0 and FLAP's bias. ``report``: the relative error before and after (share of sum ||W h||^2)."""
    before = error(weight, current, m)
    if mode == "lsq":
        fitted = lsq(weight, m, damp, current)
        after = error(weight, fitted, m)
        v, b = (fitted, None) if after < before else (current.double(), None)
    elif mode == "bias":
        v, b = current.double(), flap_bias(weight, current, m)
        after = error(weight, v, m, b)
    else:
        raise WhelpError(f"unknown refit '{mode}'; choose lsq or bias")
    scale = max(m.target_sq, 1e-30)
    report = {"before": before / scale, "after": min(after, before) / scale}
    return v.to(current.dtype), None if b is None else b.to(current.dtype), report
