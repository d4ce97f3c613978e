"""Dataset loaders (pipeline/datasets: taobao, movielens, amazon) and their shared protocol."""

from __future__ import annotations

import gzip
import json
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.datasets import amazon, movielens, taobao
from pipeline.datasets.taobao import ProtocolConfig, interactions_to_events, time_sorted
from pipeline.events import MIN_TS_MS

DATA = Path(__file__).resolve().parents[1] / "data"
TAOBAO = DATA / "taobao_userbehavior_sample.csv"


def check_protocol(events: list[dict], negatives: int) -> dict[str, int]:
    """Invariants every loader's stream must satisfy; returns counts per event type."""
    counts: dict[str, int] = defaultdict(int)
    last_ts = 0
    seen_items: dict[str, set] = defaultdict(set)  # the user's items so far
    last_second: dict[str, int] = {}  # second of the user's latest behavior/click so far
    requests: dict[str, list[dict]] = defaultdict(list)
    for ev in events:
        counts[ev["type"]] += 1
        assert ev["ts"] >= last_ts and ev["ts"] >= MIN_TS_MS, "events must be in time order, in range"
        last_ts = ev["ts"]
        u = ev["user_id"]
        if ev["type"] == "impression":
            # same-second rule: nothing of this user in this second is in the history yet
            assert last_second.get(u, -1) < ev["ts"] // 1000
            requests[ev["request_id"]].append(ev)
            continue
        if ev["type"] == "click":
            shown = requests[ev["request_id"]]
            assert shown and shown[0]["item_id"] == ev["item_id"], "a click follows its positive impression"
            for neg in shown[1:]:
                assert neg["item_id"] not in seen_items[u] and neg["item_id"] != ev["item_id"]
            assert len(shown) <= 1 + negatives
        seen_items[u].add(ev["item_id"])
        last_second[u] = ev["ts"] // 1000
    return dict(counts)


def test_taobao_fixture_follows_the_protocol():
    events = list(taobao.iter_events(TAOBAO, negatives=2))
    counts = check_protocol(events, 2)
    assert counts["click"] > 1000 and counts["impression"] > 2.5 * counts["click"]
    rows = sum(1 for _ in open(TAOBAO))
    assert counts["click"] + counts["behavior"] <= rows  # one behavior or click per valid row
    kinds = {e.get("action") for e in events if e["type"] == "behavior"}
    assert kinds <= {"view", "cart", "fav", "buy"}


def test_taobao_external_sort_spills_and_matches_in_memory(tmp_path):
    small = list(taobao.iter_events(TAOBAO, max_buffered=97))  # forces many spills
    assert small == list(taobao.iter_events(TAOBAO))
    rows = [(5000, "u", "a", "c", "view", True), (1000, "u", "b", "c", "view", False),
            (5000, "v", "x", "c", "view", True), (1000, "w", "y", "c", "cart", False)]
    out = list(time_sorted(iter(rows), bucket_ms=2000, max_buffered=1, tmp_dir=str(tmp_path)))
    assert out == [rows[1], rows[3], rows[0], rows[2]]  # stable for equal timestamps
    assert list(tmp_path.iterdir()) == []  # spill files are removed


def test_taobao_target_rate_and_seed_are_deterministic():
    a = list(taobao.iter_events(TAOBAO, target_rate=0.3, seed=1))
    assert a == list(taobao.iter_events(TAOBAO, target_rate=0.3, seed=1))
    full = sum(e["type"] == "click" for e in taobao.iter_events(TAOBAO))
    assert 0.2 * full < sum(e["type"] == "click" for e in a) < 0.4 * full
    with pytest.raises(FileNotFoundError):
        next(taobao.iter_events(None))


def test_protocol_same_second_events_never_see_each_other():
    t = MIN_TS_MS + 10_000
    inter = [(t - 5000, "u", "i0", "c", "view", False)] * 1 + [(t + k, "u", f"i{k}", "c", "view", True)
                                                               for k in range(1, 4)]
    ev = list(interactions_to_events(inter, ProtocolConfig(min_pool=1, negatives=0)))
    kinds = [e["type"] for e in ev]
    assert kinds == ["behavior", "impression", "impression", "impression", "click", "click", "click"]


def test_protocol_negatives_come_from_popular_items():
    t = MIN_TS_MS
    inter = [(t + k * 1000, f"u{k % 50}", "hot" if k % 2 else f"cold{k}", "c", "view", False) for k in range(400)]
    inter.append((t + 10**6, "new", "target", "c", "view", True))
    inter.insert(0, (t - 1000, "new", "first", "c", "view", False))
    many = [e["item_id"] for s in range(40) for e in interactions_to_events(
        inter, ProtocolConfig(negatives=1, min_pool=10, seed=s)) if e["type"] == "impression" and e["item_id"] != "target"]
    assert 0.3 < many.count("hot") / len(many) < 0.7  # half of the pool is one hot item


def _write_grouplens(tmp_path: Path, fmt: str) -> Path:
    d = tmp_path / fmt
    d.mkdir()
    ratings = [("1", "10", "5", "978300760"), ("1", "11", "3", "978300761"), ("2", "10", "4", "978300762"),
               ("2", "12", "4.5", "978300900"), ("3", "11", "5", "978301000"), ("1", "12", "5", "978302000")]
    if fmt == "csv":
        (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(",".join(r) + "\n" for r in ratings))
        (d / "movies.csv").write_text('movieId,title,genres\n10,"A, the",Comedy|Drama\n11,B,Action\n'
                                      "12,C,(no genres listed)\n")
    else:
        (d / "ratings.dat").write_text("".join("::".join(r) + "\n" for r in ratings))
        (d / "movies.dat").write_text("10::A::Comedy|Drama\n11::B::Action\n12::C::Horror\n")
    return d


@pytest.mark.parametrize("fmt", ["csv", "dat"])
def test_movielens_grouplens_formats(tmp_path, fmt):
    d = _write_grouplens(tmp_path, fmt)
    rows, genres = movielens.load_ratings(d)
    assert len(rows) == 6 and genres["10"] == "Comedy"
    assert genres["12"] == ("none" if fmt == "csv" else "Horror")
    ev = list(movielens.iter_events(d, min_pool=1, negatives=1))
    check_protocol(ev, 1)
    clicks = [(e["user_id"], e["item_id"]) for e in ev if e["type"] == "click"]
    assert ("1", "11") not in clicks  # rating 3 < 4: a plain behavior
    assert ("2", "12") in clicks and ev[0]["ts"] == 978300760_000  # after 2000: no shift


def test_movielens_100k_from_a_recbole_wheel_without_installing_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "recbole").mkdir(parents=True)
    with zipfile.ZipFile(cache / "recbole" / "recbole-9.9.9-py3-none-any.whl", "w") as z:
        z.writestr(movielens.RECBOLE_PREFIX + "ml-100k.inter", "user_id:token\titem_id:token\trating:float\t"
                   "timestamp:float\n196\t242\t3\t881250949\n186\t302\t4\t891717742\n196\t302\t5\t881250950\n")
        z.writestr(movielens.RECBOLE_PREFIX + "ml-100k.item", "item_id:token\tmovie_title:token_seq\t"
                   "release_year:token\tclass:token_seq\n242\tKolya\t1996\tComedy\n302\tL.A.\t1997\tCrime Film-Noir\n")
    monkeypatch.setenv("CTRSTREAM_CACHE", str(cache))
    rows, genres = movielens.load_ratings(None)
    assert len(rows) == 3 and genres == {"242": "Comedy", "302": "Crime"}
    ev = list(movielens.iter_events(min_pool=1, negatives=0))
    assert ev[0]["ts"] >= MIN_TS_MS  # 1997 shifted into the contract's range by whole days
    assert (ev[0]["ts"] - 881250949_000) % 86_400_000 == 0
    assert [e["ts"] for e in ev] == sorted(e["ts"] for e in ev)


def test_movielens_unknown_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        movielens.load_ratings(tmp_path)


def test_amazon_reviews_and_2014_metadata(tmp_path):
    reviews, meta = DATA / "amazon_reviews_sample.json", DATA / "amazon_meta_2014_sample.json"
    cats = amazon.load_categories(meta)
    assert cats["B000000000"] == "Laptops"  # the leaf of the last category path
    assert len(cats) == 36  # the malformed line is skipped
    ev = list(amazon.iter_events(reviews, meta, min_pool=5))
    counts = check_protocol(ev, 2)
    assert counts["click"] > 50
    assert all(e["user_id"] != "AOLD" for e in ev)  # the 1998 review is dropped
    assert {e["category_id"] for e in ev} <= {"Laptops", "Lenses", "Science Fiction", "Knives", "none"}
    gz = tmp_path / "r.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write(reviews.read_text())
    meta18 = tmp_path / "meta.json"
    meta18.write_text(json.dumps({"asin": "B000000001", "category": ["Books", "Poetry"]}) + "\n")
    assert amazon.load_categories(meta18) == {"B000000001": "Poetry"}
    assert list(amazon.iter_events(gz, meta, min_pool=5, max_buffered=7)) == ev
