"""Sliding window of progressive predictions: the trainer's live metrics and promotion evidence."""

from __future__ import annotations

from collections import deque

import numpy as np

from pipeline.datasets.synthetic import roc_auc


def gauc(pred: np.ndarray, y: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users with both labels."""
    order = np.argsort(users, kind="stable")
    u, p, t = users[order], pred[order], y[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    num = den = 0.0
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(u)], strict=True):
        yy = t[lo:hi]
        if 0 < yy.sum() < len(yy):
            num += (hi - lo) * roc_auc(p[lo:hi], yy)
            den += hi - lo
    return num / den if den else float("nan")


class MetricWindow:
    """The last ``size`` samples: live predictions, labels, users, and the champion's shadow predictions."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._p: deque[float] = deque(maxlen=size)
        self._y: deque[float] = deque(maxlen=size)
        self._u: deque[int] = deque(maxlen=size)
        self._c: deque[float] = deque(maxlen=size)  # NaN where no champion scored the sample

    def add(self, pred: np.ndarray, y: np.ndarray, users: np.ndarray, champ: np.ndarray | None) -> None:
        self._p.extend(pred.tolist())
        self._y.extend(y.tolist())
        self._u.extend(users.tolist())
        self._c.extend(champ.tolist() if champ is not None else [float("nan")] * len(pred))

    def metrics(self) -> dict[str, float]:
        if not self._p:
            return {}
        p = np.fromiter(self._p, float)
        y = np.fromiter(self._y, float)
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        rate = y.mean()
        return {
            "auc": roc_auc(p, y),
            "gauc": gauc(p, y, np.fromiter(self._u, np.int64)),
            "logloss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))),
            "calibration": float(p.mean() / rate) if rate > 0 else float("nan"),
            "ctr": float(rate),
        }

    def compare(self) -> tuple[float, float, int]:
        """(challenger AUC, champion AUC, n) on the window samples the champion also scored."""
        c = np.fromiter(self._c, float)
        keep = ~np.isnan(c)
        n = int(keep.sum())
        p = np.fromiter(self._p, float)[keep]
        y = np.fromiter(self._y, float)[keep]
        if n == 0:
            all_p = np.fromiter(self._p, float)
            return roc_auc(all_p, np.fromiter(self._y, float)), float("nan"), 0
        return roc_auc(p, y), roc_auc(c[keep], y), n

    def reset_champion(self) -> None:
        self._c = deque([float("nan")] * len(self._c), maxlen=self.size)
