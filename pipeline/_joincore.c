/* The worker's impression/click join and labeling loop (pipeline.joins), in C.
 *
 * pipeline/joins.py holds the reference: the same two functions in Python, with the same
 * signatures, on the same Python structures (dicts, sets and heapq lists of one partition's
 * _PartitionState), so either can run any batch and the other go on from the state it left. The
 * tests run the worker with both over hypothesis-generated streams (duplicates, late and early
 * clicks, any batch cuts) and require the same state, samples and counters
 * (tests/pipeline/test_joins.py). This is what the worker uses when it is built.
 *
 * join(st, batch, rows, wm_before, seq_pos, watermark, window, lateness, out)
 *     -> (watermark, emitted, positives, unmatched, duplicates)
 * emit_ready(st, limit, window, drain, out) -> (emitted, positives, unmatched)
 * sample_json(pending) -> bytes
 * stage(touched, live, stored, prefix, kind, put, dele) -> None
 *
 * st: has pending (dict (rid, item) -> pending list), orphans (dict (rid, item) -> click ts), heap
 * and orphan_heap (heapq lists of (ts, rid, item)), touched and touched_orphans (sets of keys).
 * batch: has the columns kind (uint8), user, item, category, ts (int64), and the sequences
 * request_id, user_id, item_id, category_id. rows, wm_before, seq_pos: int64 arrays of the
 * impressions and clicks to apply, in arrival order. A labeled sample goes to `out` as
 * (user key bytes, sample JSON bytes). A pending impression is the list
 * [user, user_raw, item, item_raw, cat, cat_raw, ts, seq_pos, request_id, clicked].
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { P_USER, P_USER_RAW, P_ITEM, P_ITEM_RAW, P_CAT, P_CAT_RAW, P_TS, P_SEQ_POS, P_RID, P_CLICKED, P_LEN };
enum { IMPRESSION = 1, CLICK = 2 };  /* pipeline.events.EVENT_TYPES */

/* Keys, heap entries and pending lists hold only ints, strs and bools: they cannot be part of a
 * reference cycle, so the cyclic collector need not traverse them (it untracks such tuples itself,
 * but only after traversing them once; lists never). A partition holds thousands of each. */
static inline PyObject *untracked(PyObject *o) {
    if (o && PyObject_GC_IsTracked(o)) PyObject_GC_UnTrack(o);
    return o;
}

/* ---- heapq on a list, the same algorithm as CPython's (Modules/_heapqmodule.c) ---------------- */
/* Entries are (ts, rid, item) tuples: comparing them runs no Python code, so the list cannot change
 * under a comparison, and moving pointers around keeps every reference count as it is. */

/* a < b as Python orders (ts, rid, item) tuples: entries whose ts differ (nearly every comparison)
 * are ordered by ts as C integers; a tie, or anything but two such tuples of exact ints, is left to
 * PyObject_RichCompareBool. The same answers as heapq's comparisons, so the same heap, without the
 * two Python-level int comparisons and the bool object each tuple comparison costs. */
static int entry_lt(PyObject *a, PyObject *b) {
    if (PyTuple_CheckExact(a) && PyTuple_CheckExact(b) && PyTuple_GET_SIZE(a) == 3 && PyTuple_GET_SIZE(b) == 3) {
        PyObject *x = PyTuple_GET_ITEM(a, 0), *y = PyTuple_GET_ITEM(b, 0);
        if (PyLong_CheckExact(x) && PyLong_CheckExact(y)) {
            int ox, oy;
            long long tx = PyLong_AsLongLongAndOverflow(x, &ox), ty = PyLong_AsLongLongAndOverflow(y, &oy);
            if (!ox && !oy && tx != ty) return tx < ty;
        }
    }
    return PyObject_RichCompareBool(a, b, Py_LT);
}

static int sift_down(PyObject *heap, Py_ssize_t start, Py_ssize_t pos) {
    PyObject **a = ((PyListObject *)heap)->ob_item;
    PyObject *item = a[pos];
    while (pos > start) {
        Py_ssize_t parent = (pos - 1) >> 1;
        int lt = entry_lt(item, a[parent]);
        if (lt < 0) return -1;
        if (!lt) break;
        a[pos] = a[parent];
        pos = parent;
    }
    a[pos] = item;
    return 0;
}

static int sift_up(PyObject *heap, Py_ssize_t pos) {
    PyObject **a = ((PyListObject *)heap)->ob_item;
    Py_ssize_t end = PyList_GET_SIZE(heap), start = pos, child = 2 * pos + 1;
    PyObject *item = a[pos];
    while (child < end) {
        Py_ssize_t right = child + 1;
        if (right < end) {
            int lt = entry_lt(a[child], a[right]);
            if (lt < 0) return -1;
            if (!lt) child = right;
        }
        a[pos] = a[child];
        pos = child;
        child = 2 * pos + 1;
    }
    a[pos] = item;
    return sift_down(heap, start, pos);
}

static int heap_push(PyObject *heap, PyObject *item) {  /* steals nothing */
    if (PyList_Append(heap, item) < 0) return -1;
    return sift_down(heap, 0, PyList_GET_SIZE(heap) - 1);
}

/* pops the smallest entry: a new reference */
static PyObject *heap_pop(PyObject *heap) {
    Py_ssize_t n = PyList_GET_SIZE(heap);
    PyObject *last = PyList_GET_ITEM(heap, n - 1);
    Py_INCREF(last);
    if (PyList_SetSlice(heap, n - 1, n, NULL) < 0) { Py_DECREF(last); return NULL; }
    if (n == 1) return last;
    PyObject *top = PyList_GET_ITEM(heap, 0);
    PyList_SET_ITEM(heap, 0, last);  /* the list's reference to top moves to the caller */
    if (sift_up(heap, 0) < 0) { Py_DECREF(top); return NULL; }
    return top;
}

/* whether the heap's smallest entry is due: its window closed under `limit` (ts + window < limit),
   or `drain`. 1 due, 0 not (or the heap is empty), -1 and an error */
static int heap_due(PyObject *heap, long long limit, long long window, int drain) {
    if (!PyList_Check(heap)) { PyErr_SetString(PyExc_TypeError, "a heap must be a list"); return -1; }
    if (PyList_GET_SIZE(heap) == 0) return 0;
    PyObject *e = PyList_GET_ITEM(heap, 0);
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3) {
        PyErr_SetString(PyExc_TypeError, "a heap entry must be a (ts, rid, item) tuple");
        return -1;
    }
    long long ts = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 0));
    if (ts == -1 && PyErr_Occurred()) return -1;
    return drain || ts + window < limit;
}

/* ---- sample JSON ---------------------------------------------------------------------------------- */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} buf_t;

static int buf_reserve(buf_t *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(buf_t *b, const char *s, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static int buf_lit(buf_t *b, const char *s) { return buf_put(b, s, (Py_ssize_t)strlen(s)); }

static int buf_ll(buf_t *b, long long v) {  /* as str(int) writes it; snprintf was 5% of the join */
    char tmp[24], *e = tmp + sizeof tmp, *q = e;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { *--q = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) *--q = '-';
    return buf_put(b, q, e - q);
}

static const char HEX[] = "0123456789abcdef";

/* The characters of s as json.dumps writes them in a string (ensure_ascii: what
 * json.encoder.encode_basestring_ascii does), without the quotes. */
static int buf_json_chars(buf_t *b, PyObject *s) {
    if (!PyUnicode_Check(s)) { PyErr_SetString(PyExc_TypeError, "a sample's id fields must be str"); return -1; }
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (buf_reserve(b, n * 12) < 0) return -1;  /* worst case: a surrogate pair, 12 bytes */
    char *o = b->p + b->len;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= ' ' && c <= '~' && c != '\\' && c != '"') { *o++ = (char)c; continue; }
        *o++ = '\\';
        switch (c) {
            case '\\': *o++ = '\\'; continue;
            case '"': *o++ = '"'; continue;
            case '\b': *o++ = 'b'; continue;
            case '\f': *o++ = 'f'; continue;
            case '\n': *o++ = 'n'; continue;
            case '\r': *o++ = 'r'; continue;
            case '\t': *o++ = 't'; continue;
            default: break;
        }
        if (c >= 0x10000) {
            Py_UCS4 v = c - 0x10000, hi = 0xd800 | ((v >> 10) & 0x3ff);
            *o++ = 'u';
            *o++ = HEX[(hi >> 12) & 0xf]; *o++ = HEX[(hi >> 8) & 0xf]; *o++ = HEX[(hi >> 4) & 0xf]; *o++ = HEX[hi & 0xf];
            *o++ = '\\';
            c = 0xdc00 | (v & 0x3ff);
        }
        *o++ = 'u';
        *o++ = HEX[(c >> 12) & 0xf]; *o++ = HEX[(c >> 8) & 0xf]; *o++ = HEX[(c >> 4) & 0xf]; *o++ = HEX[c & 0xf];
    }
    b->len = o - b->p;
    return 0;
}

static int buf_json_str(buf_t *b, PyObject *s) {
    return (buf_put(b, "\"", 1) < 0 || buf_json_chars(b, s) < 0 || buf_put(b, "\"", 1) < 0) ? -1 : 0;
}

static int check_pending(PyObject *p) {
    if (PyList_Check(p) && PyList_GET_SIZE(p) == P_LEN) return 0;
    PyErr_SetString(PyExc_TypeError, "a pending impression must be a list of 10 fields");
    return -1;
}

static int field_ll(PyObject *p, int i, long long *v) {
    *v = PyLong_AsLongLong(PyList_GET_ITEM(p, i));
    return (*v == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* the numeric fields of a pending impression, checked (its strings are read where they are written) */
typedef struct {
    long long user, item, cat, ts, seq_pos;
    int clicked;
} pending_nums_t;

static int pending_nums(PyObject *p, pending_nums_t *f) {
    if (check_pending(p) < 0 || field_ll(p, P_USER, &f->user) < 0 || field_ll(p, P_ITEM, &f->item) < 0 ||
        field_ll(p, P_CAT, &f->cat) < 0 || field_ll(p, P_TS, &f->ts) < 0 || field_ll(p, P_SEQ_POS, &f->seq_pos) < 0)
        return -1;
    f->clicked = PyObject_IsTrue(PyList_GET_ITEM(p, P_CLICKED));
    return f->clicked < 0 ? -1 : 0;
}

/* pipeline.joins.sample_json_ref, byte for byte (tested against json.dumps): b is reset first */
static int build_sample(buf_t *b, PyObject *p) {
    pending_nums_t f;
    if (pending_nums(p, &f) < 0) return -1;
    char hex[24], *hex_end = hex + sizeof hex, *h = hex_end;  /* as f"{item:x}" writes it */
    unsigned long long ux = f.item < 0 ? 0ULL - (unsigned long long)f.item : (unsigned long long)f.item;
    do { *--h = HEX[ux & 0xf]; ux >>= 4; } while (ux);
    if (f.item < 0) *--h = '-';  /* hashes are never negative, but the form is Python's */
    b->len = 0;
    if (buf_lit(b, "{\"sample_id\":\"") < 0 || buf_json_chars(b, PyList_GET_ITEM(p, P_RID)) < 0 ||
        buf_put(b, ":", 1) < 0 || buf_put(b, h, hex_end - h) < 0 ||
        buf_lit(b, "\",\"user_id\":") < 0 || buf_json_str(b, PyList_GET_ITEM(p, P_USER_RAW)) < 0 ||
        buf_lit(b, ",\"item_id\":") < 0 || buf_json_str(b, PyList_GET_ITEM(p, P_ITEM_RAW)) < 0 ||
        buf_lit(b, ",\"category_id\":") < 0 || buf_json_str(b, PyList_GET_ITEM(p, P_CAT_RAW)) < 0 ||
        buf_lit(b, ",\"ts\":") < 0 || buf_ll(b, f.ts) < 0 || buf_lit(b, ",\"seq_pos\":") < 0 || buf_ll(b, f.seq_pos) < 0 ||
        buf_lit(b, f.clicked ? ",\"label\":1" : ",\"label\":0") < 0 || buf_lit(b, ",\"user_hash\":") < 0 ||
        buf_ll(b, f.user) < 0 || buf_lit(b, ",\"item_hash\":") < 0 || buf_ll(b, f.item) < 0 ||
        buf_lit(b, ",\"category_hash\":") < 0 || buf_ll(b, f.cat) < 0 || buf_put(b, "}", 1) < 0)
        return -1;
    return 0;
}

static PyObject *sample_json(PyObject *self, PyObject *p) {
    buf_t b = {0};
    PyObject *r = build_sample(&b, p) < 0 ? NULL : PyBytes_FromStringAndSize(b.p, b.len);
    PyMem_Free(b.p);
    return r;
}

/* ---- one partition's state --------------------------------------------------------------------- */

typedef struct {
    PyObject *pending, *orphans, *heap, *orphan_heap, *touched, *touched_orphans;  /* new references */
} state_t;

static void state_clear(state_t *s) {
    Py_CLEAR(s->pending); Py_CLEAR(s->orphans); Py_CLEAR(s->heap);
    Py_CLEAR(s->orphan_heap); Py_CLEAR(s->touched); Py_CLEAR(s->touched_orphans);
}

static int state_get(PyObject *st, state_t *s) {
    memset(s, 0, sizeof *s);
    if (!(s->pending = PyObject_GetAttrString(st, "pending")) || !(s->orphans = PyObject_GetAttrString(st, "orphans")) ||
        !(s->heap = PyObject_GetAttrString(st, "heap")) || !(s->orphan_heap = PyObject_GetAttrString(st, "orphan_heap")) ||
        !(s->touched = PyObject_GetAttrString(st, "touched")) ||
        !(s->touched_orphans = PyObject_GetAttrString(st, "touched_orphans")))
        goto fail;
    if (!PyDict_Check(s->pending) || !PyDict_Check(s->orphans) || !PyList_Check(s->heap) ||
        !PyList_Check(s->orphan_heap) || !PySet_Check(s->touched) || !PySet_Check(s->touched_orphans)) {
        PyErr_SetString(PyExc_TypeError, "partition state: pending and orphans must be dicts, heaps lists, "
                                         "touched sets");
        goto fail;
    }
    return 0;
fail:
    state_clear(s);
    return -1;
}

typedef struct {
    long long emitted, positives, unmatched;
} counts_t;

/* pipeline.joins.emit_ready_ref: label what the watermark closed (every pending one when drain) */
static int emit(state_t *s, long long limit, long long window, int drain, PyObject *out, buf_t *b, counts_t *c) {
    int due;
    while ((due = heap_due(s->heap, limit, window, drain)) > 0) {
        PyObject *e = heap_pop(s->heap);
        if (!e) return -1;
        PyObject *key = PyTuple_GetSlice(e, 1, 3);  /* (rid, item) */
        Py_DECREF(e);
        if (!key) return -1;
        PyObject *p = PyDict_GetItemWithError(s->pending, key);  /* borrowed */
        if (!p) {
            Py_DECREF(key);
            if (PyErr_Occurred()) return -1;
            continue;  /* labeled already: the heap keeps stale entries */
        }
        Py_INCREF(p);
        int ok = build_sample(b, p) == 0 && PyDict_DelItem(s->pending, key) == 0 && PySet_Add(s->touched, key) == 0;
        Py_DECREF(key);
        if (!ok) { Py_DECREF(p); return -1; }
        PyObject *user_key = PyUnicode_AsUTF8String(PyList_GET_ITEM(p, P_USER_RAW));
        int clicked = PyObject_IsTrue(PyList_GET_ITEM(p, P_CLICKED));
        Py_DECREF(p);
        if (!user_key || clicked < 0) { Py_XDECREF(user_key); return -1; }
        PyObject *value = PyBytes_FromStringAndSize(b->p, b->len);
        PyObject *pair = value ? PyTuple_Pack(2, user_key, value) : NULL;
        Py_DECREF(user_key);
        Py_XDECREF(value);
        if (!pair || PyList_Append(out, pair) < 0) { Py_XDECREF(pair); return -1; }
        Py_DECREF(pair);
        c->emitted++;
        c->positives += clicked;
    }
    if (due < 0) return -1;
    /* orphan clicks whose window closed can no longer label anything */
    while ((due = heap_due(s->orphan_heap, limit, window, drain)) > 0) {
        PyObject *e = heap_pop(s->orphan_heap);
        if (!e) return -1;
        PyObject *key = PyTuple_GetSlice(e, 1, 3);
        if (!key) { Py_DECREF(e); return -1; }
        PyObject *cts = PyDict_GetItemWithError(s->orphans, key);
        int same = cts ? PyObject_RichCompareBool(cts, PyTuple_GET_ITEM(e, 0), Py_EQ) : (PyErr_Occurred() ? -1 : 0);
        Py_DECREF(e);
        if (same < 0) { Py_DECREF(key); return -1; }
        if (same) {  /* else claimed by an impression, or superseded by a later click */
            if (PyDict_DelItem(s->orphans, key) < 0 || PySet_Add(s->touched_orphans, key) < 0) {
                Py_DECREF(key);
                return -1;
            }
            c->unmatched++;
        }
        Py_DECREF(key);
    }
    return due < 0 ? -1 : 0;
}

static PyObject *emit_ready(PyObject *self, PyObject *args) {
    PyObject *st, *out;
    long long limit, window;
    int drain;
    if (!PyArg_ParseTuple(args, "OLLpO!:emit_ready", &st, &limit, &window, &drain, &PyList_Type, &out)) return NULL;
    state_t s;
    if (state_get(st, &s) < 0) return NULL;
    buf_t b = {0};
    counts_t c = {0};
    int rc = emit(&s, limit, window, drain, out, &b, &c);
    PyMem_Free(b.p);
    state_clear(&s);
    if (rc < 0) return NULL;
    return Py_BuildValue("(LLL)", c.emitted, c.positives, c.unmatched);
}

/* ---- the join ------------------------------------------------------------------------------------ */

typedef struct {
    Py_buffer view;
    int held;
} col_t;

/* a C-contiguous array of `itemsize`-byte numbers: exactly `n` of them, or at least `n` when !exact */
static int arr_get(PyObject *arr, const char *name, Py_ssize_t itemsize, Py_ssize_t n, int exact, col_t *c) {
    if (PyObject_GetBuffer(arr, &c->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    c->held = 1;
    Py_ssize_t len = c->view.len / itemsize;
    if (c->view.itemsize != itemsize || (exact ? len != n : len < n)) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s%zd values of %zd bytes", name, exact ? "" : "at least ", n,
                     itemsize);
        return -1;
    }
    return 0;
}

/* the batch's column `name` (an attribute), at least `n` values */
static int col_get(PyObject *batch, const char *name, Py_ssize_t itemsize, Py_ssize_t n, col_t *c) {
    PyObject *arr = PyObject_GetAttrString(batch, name);
    if (!arr) return -1;
    int rc = arr_get(arr, name, itemsize, n, 0, c);
    Py_DECREF(arr);
    return rc;
}

static void col_release(col_t *c) {
    if (c->held) PyBuffer_Release(&c->view);
    c->held = 0;
}

/* a column's row as its string form (pipeline.events.id_str): a new reference */
static PyObject *id_str_at(PyObject *seq, Py_ssize_t i) {
    PyObject *v = PySequence_GetItem(seq, i);
    if (!v || PyUnicode_CheckExact(v)) return v;
    PyObject *s = v == Py_None ? PyUnicode_FromStringAndSize("", 0) : PyObject_Str(v);
    Py_DECREF(v);
    return s;
}

enum { C_KIND, C_USER, C_ITEM, C_CAT, C_TS, C_ROWS, C_WMB, C_SP, N_COLS };

static PyObject *join(PyObject *self, PyObject *args) {
    PyObject *st, *batch, *rows_o, *wmb_o, *sp_o, *out;
    long long wm, window, lateness;
    if (!PyArg_ParseTuple(args, "OOOOOLLLO!:join", &st, &batch, &rows_o, &wmb_o, &sp_o, &wm, &window, &lateness,
                          &PyList_Type, &out))
        return NULL;
    state_t s;
    if (state_get(st, &s) < 0) return NULL;
    col_t col[N_COLS];
    memset(col, 0, sizeof col);
    PyObject *rid_seq = NULL, *user_seq = NULL, *item_seq = NULL, *cat_seq = NULL, *result = NULL;
    buf_t b = {0};
    counts_t c = {0};
    long long duplicates = 0;
    Py_ssize_t n = PyObject_Length(rows_o);
    if (n < 0) goto done;
    if (arr_get(rows_o, "rows", 8, n, 1, &col[C_ROWS]) < 0 || arr_get(wmb_o, "wm_before", 8, n, 1, &col[C_WMB]) < 0 ||
        arr_get(sp_o, "seq_pos", 8, n, 1, &col[C_SP]) < 0)
        goto done;
    Py_ssize_t nb = PyObject_Length(batch);
    if (nb < 0 || col_get(batch, "kind", 1, nb, &col[C_KIND]) < 0 || col_get(batch, "user", 8, nb, &col[C_USER]) < 0 ||
        col_get(batch, "item", 8, nb, &col[C_ITEM]) < 0 || col_get(batch, "category", 8, nb, &col[C_CAT]) < 0 ||
        col_get(batch, "ts", 8, nb, &col[C_TS]) < 0)
        goto done;
    if (!(rid_seq = PyObject_GetAttrString(batch, "request_id")) || !(user_seq = PyObject_GetAttrString(batch, "user_id")) ||
        !(item_seq = PyObject_GetAttrString(batch, "item_id")) ||
        !(cat_seq = PyObject_GetAttrString(batch, "category_id")))
        goto done;
    const uint8_t *kind = col[C_KIND].view.buf;
    const int64_t *user = col[C_USER].view.buf, *item = col[C_ITEM].view.buf, *cat = col[C_CAT].view.buf,
                  *ts = col[C_TS].view.buf, *rows = col[C_ROWS].view.buf, *wm_before = col[C_WMB].view.buf,
                  *seq_pos = col[C_SP].view.buf;

    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r = rows[i];
        if (r < 0 || r >= nb) {
            PyErr_Format(PyExc_IndexError, "rows[%zd] = %lld is outside the batch", i, (long long)r);
            goto done;
        }
        if (wm_before[i] > wm) wm = wm_before[i];
        /* label what the earlier events closed, even when this event did not move the watermark */
        int due = heap_due(s.heap, wm - lateness, window, 0);
        if (due == 0) due = heap_due(s.orphan_heap, wm - lateness, window, 0);
        if (due < 0 || (due && emit(&s, wm - lateness, window, 0, out, &b, &c) < 0)) goto done;

        long long t = ts[r];
        PyObject *rid = PySequence_GetItem(rid_seq, r);
        PyObject *it = rid ? PyLong_FromLongLong(item[r]) : NULL;
        PyObject *key = it ? untracked(PyTuple_Pack(2, rid, it)) : NULL;
        PyObject *t_obj = key ? PyLong_FromLongLong(t) : NULL;
        int ok = t_obj != NULL;
        if (ok && kind[r] == CLICK) {
            PyObject *p = PyDict_GetItemWithError(s.pending, key);
            if (p) {
                long long pts;
                if (check_pending(p) < 0 || field_ll(p, P_TS, &pts) < 0) {
                    ok = 0;
                } else if (t - pts >= 0 && t - pts <= window) {
                    int clicked = PyObject_IsTrue(PyList_GET_ITEM(p, P_CLICKED));
                    if (clicked < 0) ok = 0;
                    else if (!clicked) {
                        Py_INCREF(Py_True);
                        PyList_SetItem(p, P_CLICKED, Py_True);
                        ok = PySet_Add(s.touched, key) == 0;
                    }
                }
            } else if (PyErr_Occurred()) {
                ok = 0;
            } else {  /* impression not seen yet (out of order), or already labeled (late click) */
                PyObject *e = untracked(PyTuple_Pack(3, t_obj, rid, it));
                ok = e && PyDict_SetItem(s.orphans, key, t_obj) == 0 && heap_push(s.orphan_heap, e) == 0 &&
                     PySet_Add(s.touched_orphans, key) == 0;
                Py_XDECREF(e);
            }
        } else if (ok) {
            int has = PyDict_Contains(s.pending, key);
            if (has < 0) ok = 0;
            else if (has) duplicates++;
            else {
                PyObject *p = PyList_New(P_LEN), *e = NULL;
                if (!p) ok = 0;
                else {
                    PyObject *u = PyLong_FromLongLong(user[r]), *ct = PyLong_FromLongLong(cat[r]),
                             *sp = PyLong_FromLongLong(seq_pos[i]);
                    /* PyList_SET_ITEM steals; a NULL left in a new list is freed safely */
                    PyList_SET_ITEM(p, P_USER, u);
                    PyList_SET_ITEM(p, P_USER_RAW, id_str_at(user_seq, r));
                    Py_INCREF(it);
                    PyList_SET_ITEM(p, P_ITEM, it);
                    PyList_SET_ITEM(p, P_ITEM_RAW, id_str_at(item_seq, r));
                    PyList_SET_ITEM(p, P_CAT, ct);
                    PyList_SET_ITEM(p, P_CAT_RAW, id_str_at(cat_seq, r));
                    Py_INCREF(t_obj);
                    PyList_SET_ITEM(p, P_TS, t_obj);
                    PyList_SET_ITEM(p, P_SEQ_POS, sp);
                    Py_INCREF(rid);
                    PyList_SET_ITEM(p, P_RID, rid);
                    Py_INCREF(Py_False);
                    PyList_SET_ITEM(p, P_CLICKED, Py_False);
                    for (int f = 0; f < P_LEN; f++)
                        if (!PyList_GET_ITEM(p, f)) ok = 0;
                    if (!ok && !PyErr_Occurred()) PyErr_NoMemory();
                    untracked(p);
                }
                if (ok) {  /* an orphan click of this impression labels it, within the window */
                    PyObject *cts = PyDict_GetItemWithError(s.orphans, key);
                    if (cts) {
                        long long cv = PyLong_AsLongLong(cts);
                        if (cv == -1 && PyErr_Occurred()) ok = 0;
                        else {
                            if (cv - t >= 0 && cv - t <= window) {
                                Py_INCREF(Py_True);
                                PyList_SetItem(p, P_CLICKED, Py_True);
                            }
                            ok = PyDict_DelItem(s.orphans, key) == 0 && PySet_Add(s.touched_orphans, key) == 0;
                        }
                    } else if (PyErr_Occurred()) {
                        ok = 0;
                    }
                }
                ok = ok && PyDict_SetItem(s.pending, key, p) == 0 && (e = untracked(PyTuple_Pack(3, t_obj, rid, it))) != NULL &&
                     heap_push(s.heap, e) == 0 && PySet_Add(s.touched, key) == 0;
                Py_XDECREF(e);
                Py_XDECREF(p);
            }
        }
        Py_XDECREF(t_obj);
        Py_XDECREF(key);
        Py_XDECREF(it);
        Py_XDECREF(rid);
        if (!ok) goto done;
    }
    result = Py_BuildValue("(LLLLL)", wm, c.emitted, c.positives, c.unmatched, duplicates);
done:
    for (int k = 0; k < N_COLS; k++) col_release(&col[k]);
    Py_XDECREF(rid_seq);
    Py_XDECREF(user_seq);
    Py_XDECREF(item_seq);
    Py_XDECREF(cat_seq);
    PyMem_Free(b.p);
    state_clear(&s);
    return result;
}

/* ---- staging a commit's pending edits ---------------------------------------------------------- */

/* pipeline.joins.encode_pending, byte for byte (json.dumps of the list): b is reset first */
static int build_pending(buf_t *b, PyObject *p) {
    pending_nums_t f;
    if (pending_nums(p, &f) < 0) return -1;
    b->len = 0;
    if (buf_put(b, "[", 1) < 0 || buf_ll(b, f.user) < 0 || buf_lit(b, ", ") < 0 ||
        buf_json_str(b, PyList_GET_ITEM(p, P_USER_RAW)) < 0 || buf_lit(b, ", ") < 0 || buf_ll(b, f.item) < 0 ||
        buf_lit(b, ", ") < 0 || buf_json_str(b, PyList_GET_ITEM(p, P_ITEM_RAW)) < 0 || buf_lit(b, ", ") < 0 ||
        buf_ll(b, f.cat) < 0 || buf_lit(b, ", ") < 0 || buf_json_str(b, PyList_GET_ITEM(p, P_CAT_RAW)) < 0 ||
        buf_lit(b, ", ") < 0 || buf_ll(b, f.ts) < 0 || buf_lit(b, ", ") < 0 || buf_ll(b, f.seq_pos) < 0 ||
        buf_lit(b, ", ") < 0 || buf_json_str(b, PyList_GET_ITEM(p, P_RID)) < 0 ||
        buf_lit(b, f.clicked ? ", true]" : ", false]") < 0)
        return -1;
    return 0;
}

static void put_be64(char *o, unsigned long long v) {
    for (int i = 7; i >= 0; i--) { o[i] = (char)(v & 0xff); v >>= 8; }
}

/* prefix + kind + request_id (UTF-8) + NUL + item (u64 BE): a new reference */
static PyObject *pending_key(const char *prefix, Py_ssize_t plen, char kind, PyObject *key) {
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2) {
        PyErr_SetString(PyExc_TypeError, "a pending key must be a (request_id, item) tuple");
        return NULL;
    }
    PyObject *rid = PyTuple_GET_ITEM(key, 0);
    if (!PyUnicode_Check(rid)) { PyErr_SetString(PyExc_TypeError, "a request_id must be str"); return NULL; }
    Py_ssize_t rlen;
    const char *r = PyUnicode_AsUTF8AndSize(rid, &rlen);
    if (!r) return NULL;
    unsigned long long item = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(key, 1));
    if (item == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject *k = PyBytes_FromStringAndSize(NULL, plen + 1 + rlen + 1 + 8);
    if (!k) return NULL;
    char *o = PyBytes_AS_STRING(k);
    memcpy(o, prefix, (size_t)plen);
    o += plen;
    *o++ = kind;
    memcpy(o, r, (size_t)rlen);
    o += rlen;
    *o++ = 0;
    put_be64(o, item);
    return k;
}

/* pipeline.joins.stage_ref */
static PyObject *stage(PyObject *self, PyObject *args) {
    PyObject *touched, *live, *stored, *put, *dele;
    const char *prefix, *kind;
    Py_ssize_t plen, klen;
    if (!PyArg_ParseTuple(args, "O!O!O!y#y#O!O!:stage", &PySet_Type, &touched, &PyDict_Type, &live, &PySet_Type,
                          &stored, &prefix, &plen, &kind, &klen, &PyDict_Type, &put, &PySet_Type, &dele))
        return NULL;
    if (klen != 1 || (kind[0] != 'I' && kind[0] != 'C')) {
        PyErr_SetString(PyExc_ValueError, "kind must be b'I' or b'C'");
        return NULL;
    }
    buf_t b = {0};
    PyObject *it = PyObject_GetIter(touched), *key;
    if (!it) return NULL;
    int ok = 1;
    /* `touched` is not changed while it is walked: only cleared at the end */
    while (ok && (key = PyIter_Next(it))) {
        PyObject *value = PyDict_GetItemWithError(live, key);  /* borrowed */
        if (!value && PyErr_Occurred()) { Py_DECREF(key); ok = 0; break; }
        if (value == Py_None) value = NULL;  /* as live.get(key) is None */
        int has = value ? 1 : PySet_Contains(stored, key);
        if (has <= 0) {
            Py_DECREF(key);
            if (has < 0) ok = 0;
            continue;
        }
        PyObject *k = pending_key(prefix, plen, kind[0], key);
        if (!k) { Py_DECREF(key); ok = 0; break; }
        if (value) {
            PyObject *v = NULL;
            if (kind[0] == 'I') {
                if (build_pending(&b, value) == 0) v = PyBytes_FromStringAndSize(b.p, b.len);
            } else {
                long long cts = PyLong_AsLongLong(value);
                if (!(cts == -1 && PyErr_Occurred())) {
                    char be[8];
                    put_be64(be, (unsigned long long)cts);
                    v = PyBytes_FromStringAndSize(be, 8);
                }
            }
            ok = v && PyDict_SetItem(put, k, v) == 0 && PySet_Add(stored, key) == 0;
            Py_XDECREF(v);
        } else {
            ok = PySet_Add(dele, k) == 0 && PySet_Discard(stored, key) >= 0;
        }
        Py_DECREF(k);
        Py_DECREF(key);
    }
    Py_DECREF(it);
    PyMem_Free(b.p);
    if (!ok || PyErr_Occurred()) return NULL;
    if (PySet_Clear(touched) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"join", join, METH_VARARGS, "Apply one partition's impressions and clicks in arrival order (see pipeline.joins)."},
    {"emit_ready", emit_ready, METH_VARARGS, "Label the pending impressions whose window closed (see pipeline.joins)."},
    {"sample_json", sample_json, METH_O, "A pending impression's sample, as published (see pipeline.joins)."},
    {"stage", stage, METH_VARARGS, "Stage the touched pending keys into a commit's edits (see pipeline.joins)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_joincore", NULL, -1, methods};

PyMODINIT_FUNC PyInit__joincore(void) { return PyModule_Create(&module); }
