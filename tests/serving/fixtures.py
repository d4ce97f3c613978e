"""Factories for the serving tests: stores, rankers, model folders, servers and clients.

Rankers are the real ``models`` rankers (``build_ranker``) when the package exports them; the tiny
stand-in below has the same API (``config.features``, ``encode``, ``forward(batch, encoded=)``,
``extend_encoding``) and is used for behaviour the real models cannot be asked for: being slow
(overload, deadlines) or failing (INTERNAL).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from models.features import Batch, FeatureSpec
from pipeline.events import hash_id
from pipeline.state import Behaviors, SequenceStore, StateDelta, open_store
from serving.client import ScorerClient, TlsConfig
from serving.config import ServerConfig
from serving.model_source import DirectoryModelSource
from serving.server import ScorerServer, ServerThread

SPEC = FeatureSpec(seq_len=64, item_buckets=1024, category_buckets=128)  # small tables, short window


def real_models() -> Any | None:
    """The ``models`` package if it exports the ranker API, else None."""
    try:
        import models
    except ImportError:  # pragma: no cover
        return None
    needed = ("build_ranker", "save_ranker", "load_ranker")
    return models if all(hasattr(models, n) for n in needed) else None


# ---- a stand-in ranker with the models API ----------------------------------------------------


@dataclass(frozen=True)
class TinyConfig:
    features: FeatureSpec = SPEC
    preset: str = "tiny"
    long_kind: str = "din"  # per-column encoding: extension stays exact when the window slides
    dim: int = 8
    seed: int = 0


class TinyRanker(nn.Module):
    """Masked mean of behavior embeddings, concatenated with the candidate, through a 2-layer MLP.

    ``delay_s`` sleeps in every forward (a slow model); ``fail`` raises in every forward.
    """

    def __init__(self, config: TinyConfig = TinyConfig(), delay_s: float = 0.0, fail: bool = False) -> None:
        super().__init__()
        self.config = config
        self.delay_s = delay_s
        self.fail = fail
        g = torch.Generator().manual_seed(config.seed)
        f, d = config.features, config.dim
        self.item = nn.Parameter(torch.randn(f.item_buckets, d, generator=g))
        self.cat = nn.Parameter(torch.randn(f.category_buckets, d, generator=g))
        self.w1 = nn.Parameter(torch.randn(3 * d, 16, generator=g) / 4)
        self.w2 = nn.Parameter(torch.randn(16, generator=g) / 4)

    def _emb(self, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        return self.item[items] + self.cat[cats]

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"emb": self._emb(batch.hist_item, batch.hist_cat), "mask": batch.hist_mask}

    def extend_encoding(self, enc: dict[str, torch.Tensor], new: Batch) -> dict[str, torch.Tensor]:
        emb = torch.cat([self._emb(new.hist_item, new.hist_cat), enc["emb"]], dim=1)
        mask = torch.cat([new.hist_mask, enc["mask"]], dim=1)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : self.config.features.seq_len]
        emb = torch.gather(emb, 1, order.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        return {"emb": emb, "mask": torch.gather(mask, 1, order)}

    def forward(self, batch: Batch, encoded: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("tiny ranker asked to fail")
        if self.delay_s:
            time.sleep(self.delay_s)
        enc = self.encode(batch) if encoded is None else encoded
        m = enc["mask"].unsqueeze(-1).float()
        user = (enc["emb"] * m).sum(1) / m.sum(1).clamp(min=1.0)  # (U, d)
        cand = self._emb(batch.cand_item, batch.cand_cat)  # (B, d)
        u = user.index_select(0, batch.user_index)
        x = torch.cat([cand, u, cand * u], dim=-1)
        return torch.tanh(x @ self.w1) @ self.w2


def tiny_save(ranker: TinyRanker, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ranker.config
    (path / "config.json").write_text(json.dumps({"features": cfg.features.to_dict(), "seed": cfg.seed,
                                                  "delay_s": ranker.delay_s, "fail": ranker.fail}))
    torch.save(ranker.state_dict(), path / "state_dict.pt")


def tiny_load(path: str | Path) -> TinyRanker:
    path = Path(path)
    d = json.loads((path / "config.json").read_text())
    r = TinyRanker(TinyConfig(features=FeatureSpec.from_dict(d["features"]), seed=d["seed"]),
                   delay_s=d["delay_s"], fail=d["fail"])
    r.load_state_dict(torch.load(path / "state_dict.pt", weights_only=True))
    return r.eval()


def build_test_ranker(preset: str = "din", seed: int = 0) -> Any:
    """A real ranker of ``preset`` (SPEC features) when ``models`` has them, else a TinyRanker."""
    models = real_models()
    if models is None or preset == "tiny":
        return TinyRanker(TinyConfig(seed=seed)).eval()
    return models.build_ranker(preset, SPEC, seed=seed).eval()


def save_test_ranker(ranker: Any, path: Path) -> None:
    if isinstance(ranker, TinyRanker):
        tiny_save(ranker, path)
    else:
        real_models().save_ranker(ranker, path)  # type: ignore[union-attr]


def load_test_ranker(path: str) -> Any:
    if json.loads((Path(path) / "config.json").read_text()).get("delay_s") is not None:
        return tiny_load(path)
    return real_models().load_ranker(path)  # type: ignore[union-attr]


# ---- stores ---------------------------------------------------------------------------------


def behaviors(n: int, seed: int = 0, n_items: int = 500, n_cats: int = 20) -> Behaviors:
    rng = np.random.default_rng(seed)
    items = np.array([hash_id(f"i{k}") for k in rng.integers(0, n_items, n)], dtype=np.int64)
    cats = np.array([hash_id(f"c{k}") for k in rng.integers(0, n_cats, n)], dtype=np.int64)
    return Behaviors(items, cats, rng.integers(1, 4, n).astype(np.uint8), np.arange(n, dtype=np.int64) * 1000)


def fill_store(store: SequenceStore, lengths: dict[str, int]) -> SequenceStore:
    appends = {hash_id(u): behaviors(n, seed=i) for i, (u, n) in enumerate(lengths.items()) if n}
    store.commit(StateDelta("test", appends=appends))
    return store


@pytest.fixture
def make_store() -> Callable[..., SequenceStore]:
    def make(lengths: dict[str, int] | None = None, uri: str = "memory://") -> SequenceStore:
        return fill_store(open_store(uri), lengths if lengths is not None else {"alice": 40, "bob": 200})

    return make


# ---- model folders --------------------------------------------------------------------------


@dataclass
class ModelDir:
    source: DirectoryModelSource
    root: Path

    def publish(self, ranker: Any, version: str, set_alias: bool = True) -> None:
        save_test_ranker(ranker, self.root / version)
        if set_alias:
            self.source.set_alias(version)


@pytest.fixture
def model_dir(tmp_path: Path) -> ModelDir:
    root = tmp_path / "models"
    root.mkdir()
    return ModelDir(DirectoryModelSource(root, name="ctr", loader=load_test_ranker), root)


# ---- servers and clients ---------------------------------------------------------------------


@dataclass
class Running:
    server: ScorerServer
    thread: ServerThread
    port: int
    clients: list[ScorerClient] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, token: str | None = None, tls: TlsConfig | None = None) -> ScorerClient:
        c = ScorerClient(self.target, token=token, tls=tls)
        self.clients.append(c)
        return c


@pytest.fixture
def start_server() -> Iterator[Callable[..., Running]]:
    """``start_server(store=, source=, wait_ready=10.0, store_uri="memory://", **ServerConfig overrides)``:
    a server on 127.0.0.1 with an ephemeral port; ``store=None`` makes it open ``store_uri`` itself.
    Stopped at teardown."""
    running: list[Running] = []

    def start(store: SequenceStore | None = None, source: Any = None, wait_ready: float | None = 10.0,
              store_uri: str = "memory://", **overrides: Any) -> Running:
        settings: dict[str, Any] = {"store": store_uri, "model_dir": "unused", "port": 0,
                                    "poll_interval_s": 0.2, "grace_s": 1.0, **overrides}
        server = ScorerServer(ServerConfig(**settings), store=store, source=source)
        thread = ServerThread(server)
        port = thread.start(wait_ready=wait_ready)
        r = Running(server, thread, port)
        running.append(r)
        return r

    yield start
    for r in running:
        for c in r.clients:
            c.close()
        r.thread.stop(grace=0.5)
