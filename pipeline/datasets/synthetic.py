"""Seeded synthetic event stream with a planted *long-range* signal (DESIGN.md §7).

Each user has a few **lifelong** interests (categories, and favourite items inside them) fixed at the
start, and a drifting **short-term** interest (a category that changes every ``drift_every``
behaviors). Early history is drawn mostly from the lifelong interests and recent history mostly from
the short-term one, so the lifelong interests are plentiful far back and rare in the last 50
behaviors. An impression's click probability rises with the candidate's match to the lifelong
interests (category, and more for a favourite item) and to the current short-term interest, plus
per-impression noise. A model that reads only the last 50 behaviors sees the short-term half of the
signal; a long-sequence model can see both.

The generator knows the true click probability of every impression, so it reports the
**Bayes-optimal AUC** (the AUC of the true probabilities against the sampled labels): the ceiling
any model's AUC on this stream should be read against.

Everything is seeded; the same config yields the same byte-identical stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SyntheticConfig", "SyntheticStream", "generate", "roc_auc"]

BASE_TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and signal strengths of the synthetic stream (defaults: the demo, minutes on 2 cores)."""

    users: int = 100  # number of users
    behaviors_per_user: int = 1500  # lifelong history length per user (before impressions start)
    impressions_per_user: int = 300  # impression requests per user, in the last part of the timeline
    candidates_per_impression: int = 1  # items shown per request (each one a sample)
    categories: int = 300  # category vocabulary
    items_per_category: int = 40  # items inside each category
    lifelong_interests: int = 3  # lifelong categories per user
    favourites_per_interest: int = 3  # favourite items inside each lifelong category
    drift_every: int = 40  # short-term interest changes every this many behaviors
    recent_window: int = 50  # lifelong interests are rare in the last this many behaviors
    days: float = 30.0  # span of the timeline
    attribution_ms: int = 30 * 60 * 1000  # clicks arrive within this window of their impression
    seed: int = 7

    def __post_init__(self) -> None:
        for name in ("users", "behaviors_per_user", "categories", "items_per_category"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lifelong_interests + 2 > self.categories:
            raise ValueError("categories must exceed lifelong_interests + 1")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based AUC with tie handling (NaN when only one class is present)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass
class SyntheticStream:
    """The generated stream: events in event-time order plus the generator's own ground truth."""

    config: SyntheticConfig
    events: list[dict[str, Any]]
    click_prob: dict[tuple[str, int], float]  # (request_id, item_id) -> true click probability
    labels: dict[tuple[str, int], int]  # (request_id, item_id) -> sampled label

    @property
    def bayes_auc(self) -> float:
        keys = list(self.click_prob)
        return roc_auc(np.array([self.click_prob[k] for k in keys]), np.array([self.labels[k] for k in keys]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


def _item_id(cfg: SyntheticConfig, cat: int, k: int) -> int:
    return cat * cfg.items_per_category + k


def generate(cfg: SyntheticConfig | None = None) -> SyntheticStream:
    """Generate the whole stream in memory (the demo's size is ~10^5–10^6 events)."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    span_ms = int(cfg.days * 86_400_000)
    events: list[tuple[int, int, dict[str, Any]]] = []  # (ts, tiebreak, event)
    probs: dict[tuple[str, int], float] = {}
    labels: dict[tuple[str, int], int] = {}
    tiebreak = 0
    n_beh, n_imp = cfg.behaviors_per_user, cfg.impressions_per_user
    for u in range(cfg.users):
        cats = rng.choice(cfg.categories, size=cfg.lifelong_interests + 1, replace=False)
        life = cats[: cfg.lifelong_interests]
        favs = {int(c): rng.choice(cfg.items_per_category, size=cfg.favourites_per_interest, replace=False)
                for c in life}
        total = n_beh + n_imp
        # user timeline: sorted offsets across the span; impressions interleave in the last 25%
        offsets = np.sort(rng.integers(0, span_ms, size=total))
        is_imp = np.zeros(total, dtype=bool)
        tail_start = int(total * 0.75)
        imp_slots = rng.choice(np.arange(tail_start, total), size=n_imp, replace=False)
        is_imp[imp_slots] = True
        short = int(rng.integers(cfg.categories))
        pos = 0  # behaviors emitted so far
        for t in range(total):
            ts = BASE_TS_MS + int(offsets[t])
            if pos % cfg.drift_every == 0 and not is_imp[t]:
                short = int(rng.integers(cfg.categories))
            if not is_imp[t]:
                remaining = n_beh - pos
                # lifelong share falls from 0.85 at the start to ~0.03 over the recent window
                p_life = 0.03 if remaining <= cfg.recent_window else 0.85 * (remaining / n_beh) ** 0.5 + 0.05
                r = rng.random()
                if r < p_life:
                    c = int(rng.choice(life))
                    k = int(rng.choice(favs[c])) if rng.random() < 0.6 else int(rng.integers(cfg.items_per_category))
                elif r < p_life + (1 - p_life) * 0.7:
                    c = short
                    k = int(rng.integers(cfg.items_per_category))
                else:
                    c = int(rng.integers(cfg.categories))
                    k = int(rng.integers(cfg.items_per_category))
                action = "view" if rng.random() < 0.9 else str(rng.choice(["cart", "fav", "buy"]))
                events.append((ts, tiebreak, {"type": "behavior", "user_id": u, "item_id": _item_id(cfg, c, k),
                                              "category_id": c, "action": action, "ts": ts}))
                tiebreak += 1
                pos += 1
                continue
            req = f"r{u}-{t}"
            for j in range(cfg.candidates_per_impression):
                r = rng.random()
                if r < 0.35:
                    c = int(rng.choice(life))
                    k = int(rng.choice(favs[c])) if rng.random() < 0.5 else int(rng.integers(cfg.items_per_category))
                elif r < 0.6:
                    c, k = short, int(rng.integers(cfg.items_per_category))
                else:
                    c, k = int(rng.integers(cfg.categories)), int(rng.integers(cfg.items_per_category))
                item = _item_id(cfg, c, k)
                logit = -2.2 + rng.normal(0.0, 0.3)
                if c in favs:
                    logit += 1.8
                    if k in favs[c]:
                        logit += 1.2
                if c == short:
                    logit += 1.6
                p = float(1.0 / (1.0 + np.exp(-logit)))
                y = int(rng.random() < p)
                probs[(req, item)] = p
                labels[(req, item)] = y
                imp_ts = ts + j
                events.append((imp_ts, tiebreak, {"type": "impression", "user_id": u, "item_id": item,
                                                  "category_id": c, "request_id": req, "ts": imp_ts}))
                tiebreak += 1
                if y:
                    delay = int(rng.integers(1_000, min(cfg.attribution_ms // 2, 600_000)))
                    events.append((imp_ts + delay, tiebreak, {"type": "click", "user_id": u, "item_id": item,
                                                              "category_id": c, "request_id": req,
                                                              "ts": imp_ts + delay}))
                    tiebreak += 1
    events.sort(key=lambda e: (e[0], e[1]))
    return SyntheticStream(cfg, [e[2] for e in events], probs, labels)
