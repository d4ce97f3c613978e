"""The impression/click join and labeling of one partition: the Python reference, and the C loop
the worker runs when it is built (pipeline/_joincore.c).

Both take the same arguments and change the same Python structures, a partition's
``pipeline.worker._PartitionState``:

* ``pending``: dict ``(request_id, item_hash) -> pending impression``, a list laid out as
  ``P_*`` below (a list, so that the C loop makes one cheaply and the store's encoding is the
  list's JSON);
* ``orphans``: dict ``(request_id, item_hash) -> click ts`` of clicks still waiting for their
  impression;
* ``heap`` and ``orphan_heap``: heapq lists of ``(ts, request_id, item_hash)`` (lazy: an entry whose
  key was labeled, claimed or superseded is skipped when it comes out);
* ``touched`` and ``touched_orphans``: the keys changed since the last commit.

``join(st, batch, rows, wm_before, seq_pos, watermark, window, lateness, out)`` applies the
impressions and clicks ``rows`` of a decoded batch, in arrival order, and returns
``(watermark, emitted, positives, unmatched, duplicates)``; ``emit_ready(st, limit, window, drain,
out)`` labels every pending impression whose window closed under ``limit`` (the watermark minus
the allowed lateness; every one when ``drain``) and returns ``(emitted, positives, unmatched)``.
Samples go to ``out`` as ``(user key bytes, sample JSON bytes)``, in labeling order; the caller
produces them. The rules themselves are documented in :mod:`pipeline.worker`.

Why C: this loop runs once per impression and click and once per sample, and in Python it was the
largest part of the worker's own cost (about 40% of its CPU on the benchmark stream). The tests
(``tests/pipeline/test_joins.py``) run the worker on both over hypothesis-generated streams and
require the same state, samples and counters; ``CTRSTREAM_JOIN_CORE=0`` switches the C loop off.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from pipeline.events import CLICK, id_str

log = logging.getLogger(__name__)

# a pending impression: [user, user_raw, item, item_raw, cat, cat_raw, ts, seq_pos, request_id, clicked]
P_USER, P_USER_RAW, P_ITEM, P_ITEM_RAW, P_CAT, P_CAT_RAW, P_TS, P_SEQ_POS, P_RID, P_CLICKED = range(10)

_q: Callable[[str], str] = json.encoder.encode_basestring_ascii  # the C string quoter json.dumps uses


def sample_id(request_id: str, item_hash: int) -> str:
    """Deterministic sample id: the same impression always gets the same id (replays dedupe)."""
    return f"{request_id}:{item_hash:x}"


def sample_json_ref(p: list[Any]) -> bytes:
    """A sample as published on the samples topic: byte-identical to ``json.dumps(dict,
    separators=(",", ":"))`` (tested)."""
    return (f'{{"sample_id":{_q(sample_id(p[P_RID], p[P_ITEM]))},"user_id":{_q(p[P_USER_RAW])},'
            f'"item_id":{_q(p[P_ITEM_RAW])},"category_id":{_q(p[P_CAT_RAW])},"ts":{p[P_TS]},'
            f'"seq_pos":{p[P_SEQ_POS]},"label":{int(p[P_CLICKED])},"user_hash":{p[P_USER]},'
            f'"item_hash":{p[P_ITEM]},"category_hash":{p[P_CAT]}}}').encode()


def encode_pending(p: list[Any]) -> bytes:
    """A pending impression as stored: byte-identical to ``json.dumps(p)`` (tested), without the
    generic encoder's overhead."""
    return (f"[{p[P_USER]}, {_q(p[P_USER_RAW])}, {p[P_ITEM]}, {_q(p[P_ITEM_RAW])}, {p[P_CAT]}, "
            f"{_q(p[P_CAT_RAW])}, {p[P_TS]}, {p[P_SEQ_POS]}, {_q(p[P_RID])}, "
            f"{'true' if p[P_CLICKED] else 'false'}]").encode()


def decode_pending(b: bytes) -> list[Any]:
    p = json.loads(b)
    if not isinstance(p, list) or len(p) != 10:
        raise ValueError(f"a stored pending impression must be a list of 10 fields, got {b[:80]!r}")
    return p


def emit_ready_ref(st: Any, limit: int, window: int, drain: bool, out: list[tuple[bytes, bytes]]) -> tuple[int, int, int]:
    """Label pending impressions whose window closed under ``limit`` (the reference of the C loop)."""
    heap, pending, touched = st.heap, st.pending, st.touched
    n = positives = unmatched = 0
    while heap and (drain or heap[0][0] + window < limit):
        _, rid, item = heapq.heappop(heap)
        key = (rid, item)
        p = pending.pop(key, None)
        if p is None:
            continue  # labeled already: the heap keeps stale entries
        out.append((p[P_USER_RAW].encode(), sample_json_ref(p)))
        n += 1
        positives += bool(p[P_CLICKED])
        touched.add(key)
    # orphan clicks whose window closed can no longer label anything
    orphan_heap, orphans = st.orphan_heap, st.orphans
    while orphan_heap and (drain or orphan_heap[0][0] + window < limit):
        cts, rid, item = heapq.heappop(orphan_heap)
        key = (rid, item)
        if orphans.get(key) != cts:
            continue  # claimed by an impression, or superseded by a later click
        del orphans[key]
        unmatched += 1
        st.touched_orphans.add(key)
    return n, positives, unmatched


def join_ref(st: Any, batch: Any, rows: Any, wm_before: Any, seq_pos: Any, watermark: int, window: int,
             lateness: int, out: list[tuple[bytes, bytes]]) -> tuple[int, int, int, int, int]:
    """The impressions and clicks ``rows`` of one partition, one by one in arrival order (the
    joins need it); the reference of the C loop."""
    heap, orphan_heap, pending, orphans = st.heap, st.orphan_heap, st.pending, st.orphans
    touched, touched_orphans = st.touched, st.touched_orphans
    idx = rows.tolist()
    emitted = positives = unmatched = duplicates = 0
    wm = watermark
    for r, kd, u, it, ct, t, wm_b, sp in zip(
            idx, batch.kind[rows].tolist(), batch.user[rows].tolist(), batch.item[rows].tolist(),
            batch.category[rows].tolist(), batch.ts[rows].tolist(), wm_before.tolist(), seq_pos.tolist(),
            strict=True):
        if wm_b > wm:
            wm = wm_b
        # label what the earlier events closed, even when this event did not move the watermark:
        # an impression that arrived already past it is labeled before the next impression/click
        # (as with a batch cut right after it), never later
        limit = wm - lateness - window
        if (heap and heap[0][0] < limit) or (orphan_heap and orphan_heap[0][0] < limit):
            e, pos, um = emit_ready_ref(st, wm - lateness, window, False, out)
            emitted += e
            positives += pos
            unmatched += um
        rid = batch.request_id[r]
        key = (rid, it)
        if kd == CLICK:
            p = pending.get(key)
            if p is not None:
                if 0 <= t - p[P_TS] <= window and not p[P_CLICKED]:
                    p[P_CLICKED] = True
                    touched.add(key)
            else:
                # impression not seen yet (out of order), or already labeled (late click)
                orphans[key] = t
                heapq.heappush(orphan_heap, (t, rid, it))
                touched_orphans.add(key)
            continue
        if key in pending:
            duplicates += 1
            continue
        p = [u, id_str(batch.user_id[r]), it, id_str(batch.item_id[r]), ct, id_str(batch.category_id[r]), t, sp,
             rid, False]
        cts = orphans.pop(key, None)
        if cts is not None:
            touched_orphans.add(key)
            if 0 <= cts - t <= window:
                p[P_CLICKED] = True
        pending[key] = p
        heapq.heappush(heap, (t, rid, it))
        touched.add(key)
    return wm, emitted, positives, unmatched, duplicates


#: an orphan click's stored value: its ts, a signed big-endian i64
CLICK_TS = struct.Struct(">q")
_U64 = struct.Struct(">Q")


def pending_key(prefix: bytes, kind: bytes, rid: str, item: int) -> bytes:
    """A pending key as stored: ``prefix + kind + request_id (UTF-8) + b"\\x00" + item_hash (u64 BE)``."""
    return b"".join((prefix, kind, rid.encode(), b"\x00", _U64.pack(item)))


def parse_pending_key(k: bytes, plen: int) -> tuple[bytes, tuple[str, int]]:
    """``(kind, (request_id, item_hash))`` of a stored pending key whose prefix is ``plen`` bytes."""
    return k[plen:plen + 1], (k[plen + 1:-9].decode(), _U64.unpack(k[-8:])[0])


def stage_ref(touched: set[tuple[str, int]], live: dict[tuple[str, int], Any], stored: set[tuple[str, int]],
              prefix: bytes, kind: bytes, put: dict[bytes, bytes], dele: set[bytes]) -> None:
    """Stage the keys ``touched`` since the last commit, of one kind of a partition's pending state,
    into a commit's edits: a put of the current value, or a delete of a key the store holds
    (``stored``, kept up to date). ``kind`` is ``b"I"`` (``live`` = ``pending``, a value stored as
    :func:`encode_pending`) or ``b"C"`` (``live`` = ``orphans``, a click ts stored as a signed
    big-endian i64). Keys are stored as :func:`pending_key` writes them. ``touched`` is emptied."""
    if kind not in (b"I", b"C"):
        raise ValueError(f"kind must be b'I' or b'C', got {kind!r}")
    encode = encode_pending if kind == b"I" else CLICK_TS.pack
    for key in touched:
        value = live.get(key)
        if value is not None:
            put[pending_key(prefix, kind, *key)] = encode(value)
            stored.add(key)
        elif key in stored:
            dele.add(pending_key(prefix, kind, *key))
            stored.discard(key)
    touched.clear()


class JoinImpl(NamedTuple):
    name: str
    join: Callable[..., tuple[int, int, int, int, int]]
    emit_ready: Callable[..., tuple[int, int, int]]
    sample_json: Callable[[list[Any]], bytes]
    stage: Callable[..., None]


REFERENCE = JoinImpl("python", join_ref, emit_ready_ref, sample_json_ref, stage_ref)


def _load_c() -> JoinImpl | None:
    if os.environ.get("CTRSTREAM_JOIN_CORE", "1") == "0":
        log.info("CTRSTREAM_JOIN_CORE=0: the worker joins in Python")
        return None
    try:
        from pipeline import _joincore
    except ImportError:
        log.info("pipeline._joincore is not built: the worker joins in Python (same results, slower)")
        return None
    return JoinImpl("c", _joincore.join, _joincore.emit_ready, _joincore.sample_json, _joincore.stage)


#: what the worker uses: the C loop when built and not switched off, else the reference
DEFAULT: JoinImpl = _load_c() or REFERENCE
