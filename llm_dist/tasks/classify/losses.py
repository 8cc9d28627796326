"""Losses for class imbalance: class weights (inverse, effective number), focal loss and logit adjustment."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(counts: np.ndarray, kind: str | None, beta: float = 0.999) -> torch.Tensor | None:
    """Per-class loss weights, normalised to mean 1: 'inverse' (1 / n_c) or 'effective'
    ((1 - β) / (1 - β^n_c), Cui et al. 2019)."""
    if kind is None:
        return None
    counts = np.maximum(counts.astype(np.float64), 1.0)
    w = 1.0 / counts if kind == "inverse" else (1.0 - beta) / (1.0 - np.power(beta, counts))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                     focal_gamma: float = 0.0, log_prior: torch.Tensor | None = None,
                     logit_adjustment: float = 0.0) -> torch.Tensor:
    """Each example's loss (a vector). Logit adjustment adds τ·log π_y to the logits (Menon et al. 2021);
    focal loss scales CE by (1 - p_y)^γ (Lin et al. 2017); class weights scale each example by w_y."""
    logits = logits.float()
    if logit_adjustment and log_prior is not None:
        logits = logits + logit_adjustment * log_prior.to(logits.device)
    logp = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    loss = -logp
    if focal_gamma > 0:
        loss = loss * (1.0 - logp.exp()).pow(focal_gamma)
    if weights is not None:
        loss = loss * weights.to(logits.device)[labels]
    return loss


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                        focal_gamma: float = 0.0, log_prior: torch.Tensor | None = None,
                        logit_adjustment: float = 0.0) -> torch.Tensor:
    """The summed loss of a batch (see `per_example_loss`)."""
    return per_example_loss(logits, labels, weights, focal_gamma, log_prior, logit_adjustment).sum()
