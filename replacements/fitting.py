"""Least-squares fits shared by the replacements' teacher-derived starts (``init_from_teacher`` hooks)."""

from __future__ import annotations

import torch


def least_squares(features: torch.Tensor, goal: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """[weights; bias] minimising |[features, 1] @ solution - goal|^2 (+ ridge), and the error.

    Example:
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> solution, error = least_squares(x, x @ torch.ones(3, 1, dtype=torch.float64) + 2, 1e-9)
        >>> round(float(solution[-1]), 3), error < 1e-6
        (2.0, True)
    """
    a = torch.cat([features, torch.ones(features.shape[0], 1, dtype=features.dtype)], dim=1)
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram, a.T @ goal)
    return solution, float((a @ solution - goal).pow(2).sum())


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real tokens of ``x`` [B, N, C] as rows [tokens, C] (all of them without a mask)."""
    if mask is not None:
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1])
