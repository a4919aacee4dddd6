"""Laser's losses (LASER_SPEC.md §2.4): item-item contrastive (IIC) and Switch-style load balancing."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cosine_scores(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[B, n_items]`` cosine similarities."""
    return F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T


def iic_loss(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Softmax cross-entropy over ALL catalogue items of ``cos(h_u, h_i) / tau``; positive = the next item."""
    return F.cross_entropy(cosine_scores(users, items) / tau, targets)


def load_balancing_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``K * sum_j f_j * P_j`` over the batch's real history positions.

    ``probs [B, N, K]`` router softmax per position, ``mask [B, N]`` real positions. ``f_j`` = share of positions
    whose argmax is expert j; ``P_j`` = mean router probability of expert j. Equals 1 for a perfectly uniform
    router and K when everything goes to one expert (as HF's ``load_balancing_loss_func`` with top-1)."""
    K = probs.shape[-1]
    p = probs[mask.bool()]  # [M, K]
    if p.shape[0] == 0:
        return probs.sum() * 0.0
    f = F.one_hot(p.argmax(dim=-1), K).to(p.dtype).mean(0)  # [K]
    P = p.mean(0)
    return K * (f * P).sum()
