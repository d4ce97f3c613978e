"""Offline and online ranking metrics (DESIGN.md §7). Every reported number names its metric.

- :func:`auc`: global ROC AUC over all samples (ties get half credit).
- :func:`gauc`: impression-weighted mean of per-user AUC over users with both labels (the DIN
  paper's "AUC"; papers.md pitfall 1).
- :func:`logloss`: mean binary cross-entropy of the predicted probabilities.
- :func:`calibration`: mean prediction / observed positive rate (1.0 = calibrated).
"""

from __future__ import annotations

import numpy as np

from pipeline.datasets.synthetic import roc_auc

__all__ = ["auc", "calibration", "gauc", "logloss", "summary"]

_EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Global ROC AUC (NaN when only one class is present)."""
    return roc_auc(np.asarray(scores, dtype=np.float64), np.asarray(labels))


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    """Σ_u n_u·AUC_u / Σ_u n_u over users u with both labels (n_u = the user's impressions).

    Vectorised: one lexsort by (user, score); tied scores of a user share their average rank.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    u = np.asarray(users)
    if s.size == 0:
        return float("nan")
    order = np.lexsort((s, u))
    s, y, u = s[order], y[order], u[order]
    n = s.size
    new_user = np.r_[True, u[1:] != u[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    new_tie = new_user | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    pos_in_user = np.arange(n) - user_start + 1.0  # 1-based rank within the user
    tie_sum = np.bincount(tie_id, weights=pos_in_user)
    tie_cnt = np.bincount(tie_id)
    rank = (tie_sum / tie_cnt)[tie_id]  # average rank over ties
    uid = np.cumsum(new_user) - 1
    n_u = np.bincount(uid).astype(np.float64)
    pos_u = np.bincount(uid, weights=y.astype(np.float64))
    neg_u = n_u - pos_u
    rank_pos = np.bincount(uid, weights=np.where(y, rank, 0.0))
    ok = (pos_u > 0) & (neg_u > 0)
    if not ok.any():
        return float("nan")
    auc_u = (rank_pos[ok] - pos_u[ok] * (pos_u[ok] + 1) / 2) / (pos_u[ok] * neg_u[ok])
    return float(np.sum(n_u[ok] * auc_u) / np.sum(n_u[ok]))


def logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-7, 1 − 1e-7])."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean prediction / observed positive rate (NaN without positives)."""
    rate = float(np.mean(labels))
    return float(np.mean(probs)) / rate if rate > 0 else float("nan")


def summary(probs: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """All four metrics of predicted probabilities."""
    return {"auc": auc(probs, labels), "gauc": gauc(probs, labels, users),
            "logloss": logloss(probs, labels), "calibration": calibration(probs, labels)}
