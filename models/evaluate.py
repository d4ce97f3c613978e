"""``ctrstream evaluate``: offline, time-ordered comparison of several rankers on one dataset.

Protocol (DESIGN.md §7, docs/models.md):

1. **Replay.** The dataset's events (``pipeline.produce.iter_dataset``: synthetic, movielens,
   taobao, amazon or a path) are replayed in order with the stream worker's semantics: behaviors
   and clicks append to the user's sequence, an impression becomes a sample whose history is the
   sequence *as of the impression* (``seq_pos``), and a click labels its impression when it
   arrives within the attribution window. No future behavior can reach a sample's history.
2. **Split by time.** Samples are ordered by impression time; the earliest ``train_frac`` train,
   the rest test.
3. **Train** each model on the training samples (``epochs`` passes, mini-batches drawn in time
   order, each pass reshuffled *within* the training part) through :class:`RankerTrain` with Adam,
   building every batch with the one :func:`build_batch`.
4. **Evaluate** on the test samples: AUC (global), GAUC (grouped by user, impression-weighted),
   logloss, calibration (mean prediction / positive rate). On the synthetic stream the
   generator's Bayes-optimal AUC on the same test samples is reported as the ceiling.
5. **Cost.** ``train_samples_per_s``: training samples per second of model time (forward,
   backward, optimizer step; batch building excluded and reported separately).
   ``infer_ms_per_1k``: wall ms to score 1,000 candidates for one user whose history has
   ``infer_seq_len`` behaviors (encode once + score, eval mode, one process, ``torch`` threads as
   set), the median of a few repetitions, measured on a ranker of the same config whose window is
   ``infer_seq_len``.

Output: ``results.json`` (``{"dataset", "settings", "results": [one object per model]}``) and
``results.md`` (a Markdown table with the metric definitions) in ``out_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.features import FeatureSpec, build_batch
from models.losses import RankerTrain
from models.metrics import auc, summary
from models.ranker import PRESETS, SHORT_LEN, Ranker, build_ranker
from pipeline.events import ACTIONS, hash_id
from pipeline.state.base import Behaviors

__all__ = [
    "EvalSettings",
    "Replay",
    "add_evaluate_arguments",
    "evaluate_command",
    "replay_events",
    "run_evaluation",
]

_CLICK = ACTIONS["click"]


@dataclass(frozen=True)
class EvalSettings:
    """Knobs of one evaluation run (defaults: the synthetic long-range comparison)."""

    seq_len: int = 1000  # long-sequence window of every long preset (din always reads 50)
    train_frac: float = 0.8  # earliest share of samples (by impression time) used for training
    epochs: int = 2  # passes over the training samples (more overfits the item ids on small data)
    batch_size: int = 256  # samples per training step
    lr: float = 1e-3  # Adam learning rate
    embed_dim: int = 16  # item/category embedding width (a behavior is 2x this)
    infer_seq_len: int = 10_000  # history length for the inference-cost measurement
    infer_candidates: int = 1000  # candidates per inference-cost measurement
    attribution_ms: int = 30 * 60 * 1000  # a click labels its impression within this window
    seed: int = 0  # model init and batch order

    def __post_init__(self) -> None:
        if not 0 < self.train_frac < 1:
            raise ValueError("train_frac must be in (0, 1)")
        for name in ("seq_len", "epochs", "batch_size", "embed_dim", "infer_seq_len", "infer_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class Replay:
    """Samples with point-in-time histories, as the worker would emit them."""

    seq_item: dict[int, np.ndarray]  # user -> (n,) int64 hashed item ids, arrival order
    seq_cat: dict[int, np.ndarray]
    seq_action: dict[int, np.ndarray]  # (n,) uint8
    user: np.ndarray  # (S,) int64 hashed user of each sample
    item: np.ndarray  # (S,) int64 hashed candidate item
    cat: np.ndarray  # (S,) int64 hashed candidate category
    ts: np.ndarray  # (S,) int64 impression time, ms
    seq_pos: np.ndarray  # (S,) int64 history length at impression time
    label: np.ndarray  # (S,) int8
    keys: list[tuple[str, str]]  # (request_id, raw item id) of each sample

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def histories(self, rows: np.ndarray, max_len: int) -> list[Behaviors]:
        """Each sample's history as of its impression, the last ``max_len`` behaviors."""
        out = []
        for r in rows:
            u, end = int(self.user[r]), int(self.seq_pos[r])
            start = max(0, end - max_len)
            z = np.zeros(0, dtype=np.int64)
            if u not in self.seq_item:
                out.append(Behaviors(z, z, np.zeros(0, np.uint8), z))
                continue
            out.append(Behaviors(self.seq_item[u][start:end], self.seq_cat[u][start:end],
                                 self.seq_action[u][start:end], np.zeros(end - start, np.int64), start))
        return out


def replay_events(events: Iterable[dict[str, Any]], attribution_ms: int = 30 * 60 * 1000) -> Replay:
    """Replay events with the stream worker's semantics (see the module docstring)."""
    seqs: dict[int, tuple[list[int], list[int], list[int]]] = {}
    rows: list[tuple[int, int, int, int, int]] = []
    keys: list[tuple[str, str]] = []
    index: dict[tuple[str, str], int] = {}
    labels: list[int] = []
    for ev in events:
        kind = ev["type"]
        user = hash_id(ev["user_id"])
        if kind == "impression":
            key = (str(ev["request_id"]), str(ev["item_id"]))
            if key in index:
                continue  # duplicate impression: the worker ignores it too
            seq = seqs.get(user)
            index[key] = len(rows)
            keys.append(key)
            rows.append((user, hash_id(ev["item_id"]), hash_id(ev.get("category_id", "")), int(ev["ts"]),
                         0 if seq is None else len(seq[0])))
            labels.append(0)
            continue
        if kind == "click":
            key = (str(ev.get("request_id")), str(ev["item_id"]))
            r = index.get(key)
            if r is not None and 0 <= int(ev["ts"]) - rows[r][3] <= attribution_ms:
                labels[r] = 1
        cat = ev.get("category_id")
        action = _CLICK if kind == "click" else ACTIONS.get(str(ev.get("action", "view")), ACTIONS["other"])
        seq = seqs.setdefault(user, ([], [], []))
        seq[0].append(hash_id(ev["item_id"]))
        seq[1].append(hash_id(cat) if cat is not None else 0)
        seq[2].append(action)
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return Replay(
        {u: np.array(s[0], np.int64) for u, s in seqs.items()},
        {u: np.array(s[1], np.int64) for u, s in seqs.items()},
        {u: np.array(s[2], np.uint8) for u, s in seqs.items()},
        arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4], np.array(labels, np.int8), keys,
    )


def _buckets(n: int) -> int:
    """Table rows for ``n`` distinct ids: a power of two >= 2n (few fold collisions), 1k..1M."""
    return int(min(1 << 20, max(1 << 10, 1 << math.ceil(math.log2(max(2 * n, 2))))))


def _spec_for(preset: str, seq_len: int, items: int, cats: int) -> FeatureSpec:
    return FeatureSpec(seq_len=SHORT_LEN if preset == "din" else seq_len, item_buckets=items,
                       category_buckets=cats)


def _batches(rep: Replay, rows: np.ndarray, spec: FeatureSpec, size: int) -> Iterable[tuple[Any, torch.Tensor]]:
    for i in range(0, len(rows), size):
        r = rows[i:i + size]
        batch = build_batch(rep.histories(r, spec.seq_len), rep.item[r], rep.cat[r], spec)
        yield batch, torch.from_numpy(rep.label[r].astype(np.float32))


def _train(ranker: Ranker, rep: Replay, rows: np.ndarray, s: EvalSettings) -> dict[str, float]:
    train = RankerTrain(ranker).train()
    opt = torch.optim.Adam(ranker.parameters(), lr=s.lr)
    rng = np.random.default_rng(s.seed)
    model_s = data_s = 0.0
    n = 0
    for epoch in range(s.epochs):
        order = rows if epoch == 0 else rows[rng.permutation(len(rows))]  # first pass: time order
        t0 = time.perf_counter()
        for batch, labels in _batches(rep, order, ranker.config.features, s.batch_size):
            t1 = time.perf_counter()
            data_s += t1 - t0
            loss, _ = train(batch, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t0 = time.perf_counter()
            model_s += t0 - t1
            n += len(labels)
    return {"train_samples_per_s": n / model_s if model_s else float("nan"),
            "data_samples_per_s": n / data_s if data_s else float("nan"), "train_s": model_s + data_s}


@torch.inference_mode()
def _predict(ranker: Ranker, rep: Replay, rows: np.ndarray, size: int) -> np.ndarray:
    ranker.eval()
    out = [torch.sigmoid(ranker(batch)).numpy() for batch, _ in _batches(rep, rows, ranker.config.features, size)]
    return np.concatenate(out) if out else np.zeros(0)


def infer_ms_per_1k(ranker: Ranker, seq_len: int, candidates: int = 1000, repeats: int = 3,
                    chunk: int | None = None) -> float:
    """Median wall ms to encode one user with ``seq_len`` behaviors and score ``candidates``
    (scaled to 1,000). ``chunk`` scores the candidates in slices (bounds din_long's memory)."""
    cfg = ranker.config
    spec = dataclasses.replace(cfg.features, seq_len=seq_len if cfg.long is not None else cfg.features.seq_len)
    # built outside inference mode: parameters created under it are inference tensors, which
    # cannot be used where a version counter is read (the scorer's per-model caches do)
    timed = ranker.eval() if spec == cfg.features else Ranker(dataclasses.replace(cfg, features=spec)).eval()
    rng = np.random.default_rng(0)
    n = spec.seq_len
    hist = Behaviors(rng.integers(1, 1 << 40, n), rng.integers(1, 1 << 20, n), np.ones(n, np.uint8),
                     np.zeros(n, np.int64))
    ci, cc = rng.integers(1, 1 << 40, candidates), rng.integers(1, 1 << 20, candidates)
    chunk = chunk or candidates
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run warms up allocators and lazy inits
            t0 = time.perf_counter()
            user = build_batch([hist], ci[:0], cc[:0], spec, user_index=np.zeros(0, np.int64))
            enc = timed.encode(user)
            for i in range(0, candidates, chunk):
                cands = build_batch([hist.tail(0)], ci[i:i + chunk], cc[i:i + chunk], spec,
                                    user_index=np.zeros(len(ci[i:i + chunk]), np.int64))
                timed(cands, encoded=enc)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]) * 1000.0 * 1000.0 / candidates)


def _load(dataset: str, seed: int, options: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[tuple[str, str], float]]:
    """Events of a dataset, plus the synthetic generator's true click probabilities."""
    if dataset == "synthetic":
        from pipeline.datasets.synthetic import SyntheticConfig, generate

        stream = generate(SyntheticConfig(seed=seed, **options))
        probs = {(req, str(item)): p for (req, item), p in stream.click_prob.items()}
        return stream.events, probs
    from pipeline.produce import iter_dataset

    return list(iter_dataset(dataset, seed=seed, **options)), {}


def _markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        f"# Offline evaluation: {doc['dataset']}",
        "",
        f"{doc['train_samples']} training / {doc['test_samples']} test samples (split by impression time, "
        f"train_frac {s['train_frac']}); test positive rate {doc['test_ctr']:.3f}; long window "
        f"{s['seq_len']} behaviors (din: the last {SHORT_LEN}); {s['epochs']} epochs, batch {s['batch_size']}, "
        f"Adam lr {s['lr']}; embed_dim {s['embed_dim']}.",
    ]
    if doc.get("bayes_auc") is not None:
        lines.append(f"Bayes-optimal AUC of the generator on the same test samples: {doc['bayes_auc']:.4f}.")
    lines += [
        "",
        f"| model | AUC | GAUC | logloss | calibration | train samples/s | infer ms / 1k cand. @ L={s['infer_seq_len']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        lines.append(f"| {r['model']} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} | "
                     f"{r['calibration']:.3f} | {r['train_samples_per_s']:.0f} | {r['infer_ms_per_1k']:.1f} |")
    lines += [
        "",
        "AUC: global ROC AUC over all test samples. GAUC: impression-weighted mean of per-user AUC over "
        "users with both labels. logloss: mean binary cross-entropy. calibration: mean prediction / "
        "observed positive rate. train samples/s: training samples per second of model time "
        "(forward + backward + Adam step). infer ms / 1k cand.: wall ms to encode one user with L "
        "behaviors and score 1,000 candidates (CPU, eval mode, median of 3).",
        "",
    ]
    return "\n".join(lines)


def run_evaluation(dataset: str, models: Sequence[str], out_dir: str | Path,
                   settings: EvalSettings | None = None, dataset_options: dict[str, Any] | None = None,
                   progress: Any = print) -> dict[str, Any]:
    """Replay ``dataset``, train and evaluate each preset in ``models``, write results; returns them."""
    s = settings or EvalSettings()
    for m in models:
        if m not in PRESETS:
            raise ValueError(f"unknown model {m!r}; choose from {PRESETS}")
    events, probs = _load(dataset, s.seed, dict(dataset_options or {}))
    rep = replay_events(events, s.attribution_ms)
    del events
    if len(rep) < 10:
        raise ValueError(f"{dataset}: only {len(rep)} samples after replay")
    order = np.argsort(rep.ts, kind="stable")
    cut = int(len(order) * s.train_frac)
    train_rows, test_rows = order[:cut], order[cut:]
    items = _buckets(len(np.unique(np.concatenate([rep.item, *rep.seq_item.values()]))))
    cats = _buckets(len(np.unique(np.concatenate([rep.cat, *rep.seq_cat.values()]))))
    y_test = rep.label[test_rows]
    users_test = rep.user[test_rows]
    doc: dict[str, Any] = {
        "dataset": dataset, "settings": dataclasses.asdict(s), "dataset_options": dataset_options or {},
        "train_samples": int(len(train_rows)), "test_samples": int(len(test_rows)),
        "test_ctr": float(y_test.mean()), "item_buckets": items, "category_buckets": cats,
        "bayes_auc": None, "results": [],
    }
    if probs:
        true_p = np.array([probs.get(rep.keys[r], np.nan) for r in test_rows])
        doc["bayes_auc"] = auc(true_p, y_test)
    progress(f"{dataset}: {len(train_rows)} train / {len(test_rows)} test samples, "
             f"test CTR {y_test.mean():.3f}" + (f", Bayes AUC {doc['bayes_auc']:.4f}" if probs else ""))
    for name in models:
        torch.manual_seed(s.seed)
        ranker = build_ranker(name, _spec_for(name, s.seq_len, items, cats), embed_dim=s.embed_dim, seed=s.seed)
        cost = _train(ranker, rep, train_rows, s)
        pred = _predict(ranker, rep, test_rows, 512)
        chunk = max(1, min(s.infer_candidates, 2_000_000 // max(1, s.infer_seq_len)))
        result = {"model": name, **summary(pred, y_test, users_test), **cost,
                  "infer_ms_per_1k": infer_ms_per_1k(ranker, s.infer_seq_len, s.infer_candidates,
                                                     chunk=chunk if name == "din_long" else None),
                  "infer_seq_len": s.infer_seq_len if name != "din" else SHORT_LEN,
                  "seq_len": ranker.config.features.seq_len,
                  "parameters": int(sum(p.numel() for p in ranker.parameters()))}
        doc["results"].append(result)
        progress(f"  {name:9s} AUC {result['auc']:.4f}  GAUC {result['gauc']:.4f}  logloss "
                 f"{result['logloss']:.4f}  train {result['train_samples_per_s']:.0f}/s  "
                 f"infer {result['infer_ms_per_1k']:.1f} ms/1k")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float))
    (out / "results.md").write_text(_markdown(doc))
    return doc


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ctrstream evaluate`` (defaults from :class:`EvalSettings`)."""
    d = EvalSettings()
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic, movielens, taobao, amazon, or a path to a dataset file")
    parser.add_argument("--models", default=",".join(PRESETS), help=f"comma-separated presets from {PRESETS}")
    parser.add_argument("--out", default="eval-results", help="output folder for results.json / results.md")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="long-sequence window of long presets")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--embed-dim", type=int, default=d.embed_dim)
    parser.add_argument("--train-frac", type=float, default=d.train_frac)
    parser.add_argument("--infer-seq-len", type=int, default=d.infer_seq_len,
                        help="history length of the inference-cost measurement")
    parser.add_argument("--infer-candidates", type=int, default=d.infer_candidates)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--option", "-o", action="append", type=_option, default=[], metavar="KEY=VALUE",
                        help="dataset option, repeatable (e.g. -o users=300 for synthetic, -o path=... )")


def evaluate_command(args: argparse.Namespace) -> int:
    """Run :func:`run_evaluation` from parsed ``ctrstream evaluate`` flags; prints the table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(seq_len=args.seq_len, train_frac=args.train_frac, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, embed_dim=args.embed_dim,
                            infer_seq_len=args.infer_seq_len, infer_candidates=args.infer_candidates,
                            seed=args.seed)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    doc = run_evaluation(args.dataset, models, args.out, settings, dict(args.option))
    print(_markdown(doc))
    return 0
