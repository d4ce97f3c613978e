"""Sliding window of progressive predictions: the trainer's live metrics and promotion evidence."""

from __future__ import annotations

from collections import deque

import numpy as np

from models.metrics import auc, calibration, gauc, logloss


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
        return {
            "auc": auc(p, y),
            "gauc": gauc(p, y, np.fromiter(self._u, np.int64)),
            "logloss": logloss(p, y),
            "calibration": calibration(p, y),
            "ctr": float(y.mean()),
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
            return auc(all_p, np.fromiter(self._y, float)), float("nan"), 0
        return auc(p, y), auc(c[keep], y), n

    def state(self) -> dict[str, list[float] | list[int]]:
        return {"p": list(self._p), "y": list(self._y), "u": list(self._u), "c": list(self._c)}

    def load_state(self, st: dict[str, list[float] | list[int]]) -> None:
        self._p.extend(st["p"])
        self._y.extend(st["y"])
        self._u.extend(st["u"])  # type: ignore[arg-type]
        self._c.extend(st["c"])

    def reset_champion(self) -> None:
        self._c = deque([float("nan")] * len(self._c), maxlen=self.size)
