/* The LMDB store's append planner (pipeline.state.lmdb), in C: every user of a checkpoint in one call.
 *
 * pipeline/state/lmdb.py holds the reference, append_chunks_many_ref, with the same signature
 * and the same results; tests/pipeline/test_state.py compares the two over random appends (chunk
 * boundaries, lifelong-cap trims, corrupt stores). The per-user Python loop it replaces (two key
 * packs, two gets, four column copies, a chunk join per chunk) was a quarter of the worker's CPU.
 *
 * append_chunks_many(users, bounds, item, category, ts, action, pos_get, seq_get, chunk_rows, cap,
 *                    error) -> (writes, deletes, positions)
 *
 * users: int64 (u,), ascending; bounds: int64 (u + 1,), user i's new rows are [bounds[i], bounds[i+1])
 * of the columns item, category, ts (int64) and action (uint8). pos_get(user_key) -> the stored
 * position record (16 bytes, big-endian u64 start and end) or None; seq_get(seq_key) -> a stored
 * chunk or None. A chunk: u16 n (little-endian), then the columns item, category, ts (n x i64 LE)
 * and action (n x u8). Keys: user_key = u64 BE user; seq_key = user_key + u32 BE chunk index.
 * Returns the chunks to put as (seq_key, chunk) pairs, the seq_keys to delete (lifelong cap) and
 * the new position records as (user_key, record) pairs, in user order. A corrupt store raises
 * `error` (the caller's StoreConfigError) with the reference's message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the chunk columns are copied as native int64: little-endian hosts only (the Python path runs elsewhere)"
#endif

static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)(v & 0xff); v >>= 8; }
}

static uint64_t get_be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static PyObject *seq_key(uint64_t user, uint64_t chunk) {
    unsigned char k[12];
    put_be64(k, user);
    k[8] = (unsigned char)(chunk >> 24); k[9] = (unsigned char)(chunk >> 16);
    k[10] = (unsigned char)(chunk >> 8); k[11] = (unsigned char)chunk;
    return PyBytes_FromStringAndSize((const char *)k, 12);
}

/* (a, b) appended to `list`; steals both (either may be NULL: then nothing is appended, -1) */
static int append_pair(PyObject *list, PyObject *a, PyObject *b) {
    PyObject *t = (a && b) ? PyTuple_Pack(2, a, b) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    int rc = t ? PyList_Append(list, t) : -1;
    Py_XDECREF(t);
    return rc;
}

typedef struct {
    Py_buffer view;
    int held;
} col_t;

static int col_get(PyObject *arr, const char *name, Py_ssize_t itemsize, Py_ssize_t n, col_t *c) {
    if (PyObject_GetBuffer(arr, &c->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    c->held = 1;
    if (c->view.itemsize != itemsize || c->view.len != n * itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd values of %zd bytes", name, n, itemsize);
        return -1;
    }
    return 0;
}

enum { C_USERS, C_BOUNDS, C_ITEM, C_CAT, C_TS, C_ACT, N_COLS };

static PyObject *append_chunks_many(PyObject *self, PyObject *args) {
    PyObject *users_o, *bounds_o, *item_o, *cat_o, *ts_o, *act_o, *pos_get, *seq_get, *error;
    long long chunk_rows, cap;
    if (!PyArg_ParseTuple(args, "OOOOOOOOLLO:append_chunks_many", &users_o, &bounds_o, &item_o, &cat_o, &ts_o,
                          &act_o, &pos_get, &seq_get, &chunk_rows, &cap, &error))
        return NULL;
    if (!PyExceptionClass_Check(error)) {
        PyErr_SetString(PyExc_TypeError, "error must be an exception class");
        return NULL;
    }
    if (chunk_rows <= 0 || chunk_rows > 0xffff || cap <= 0) {
        PyErr_SetString(PyExc_ValueError, "chunk_rows must be in [1, 65535] and cap positive");
        return NULL;
    }
    col_t col[N_COLS];
    memset(col, 0, sizeof col);
    PyObject *writes = PyList_New(0), *deletes = PyList_New(0), *positions = PyList_New(0), *result = NULL;
    PyObject *pos = NULL, *tail = NULL;
    Py_buffer pv = {0}, tv = {0};
    int pv_held = 0, tv_held = 0;
    if (!writes || !deletes || !positions) goto done;
    Py_ssize_t nu = PyObject_Length(users_o), n = PyObject_Length(act_o);
    if (nu < 0 || n < 0 || col_get(users_o, "users", 8, nu, &col[C_USERS]) < 0 ||
        col_get(bounds_o, "bounds", 8, nu + 1, &col[C_BOUNDS]) < 0 || col_get(item_o, "item", 8, n, &col[C_ITEM]) < 0 ||
        col_get(cat_o, "category", 8, n, &col[C_CAT]) < 0 || col_get(ts_o, "ts", 8, n, &col[C_TS]) < 0 ||
        col_get(act_o, "action", 1, n, &col[C_ACT]) < 0)
        goto done;
    const int64_t *users = col[C_USERS].view.buf, *bounds = col[C_BOUNDS].view.buf;
    const char *cols8[3] = {col[C_ITEM].view.buf, col[C_CAT].view.buf, col[C_TS].view.buf};
    const char *act = col[C_ACT].view.buf;
    const uint64_t cr = (uint64_t)chunk_rows;

    for (Py_ssize_t i = 0; i < nu; i++) {
        int64_t a = bounds[i], z = bounds[i + 1];
        if (a < 0 || z < a || z > n) {
            PyErr_Format(PyExc_ValueError, "bounds[%zd:%zd] = [%lld, %lld) is outside the %zd rows", i, i + 2,
                         (long long)a, (long long)z, n);
            goto done;
        }
        if (z == a) continue;  /* as the reference: a user with nothing new is not touched */
        if (users[i] < 0) {
            PyErr_Format(PyExc_OverflowError, "user %lld: a user key is an unsigned 64-bit number", (long long)users[i]);
            goto done;
        }
        uint64_t user = (uint64_t)users[i], n_new = (uint64_t)(z - a);
        unsigned char uk[8];
        put_be64(uk, user);
        PyObject *uk_o = PyBytes_FromStringAndSize((const char *)uk, 8);
        if (!uk_o) goto done;
        pos = PyObject_CallOneArg(pos_get, uk_o);
        if (!pos) { Py_DECREF(uk_o); goto done; }
        uint64_t start = 0, end = 0;
        if (pos != Py_None) {
            if (PyObject_GetBuffer(pos, &pv, PyBUF_SIMPLE) < 0) { Py_DECREF(uk_o); goto done; }
            pv_held = 1;
            if (pv.len != 16) {
                PyErr_Format(error, "store is corrupt: the position record of user %llu has %zd bytes, not 16 "
                                    "(rebuild the store)", (unsigned long long)user, pv.len);
                Py_DECREF(uk_o);
                goto done;
            }
            start = get_be64(pv.buf);
            end = get_be64((const unsigned char *)pv.buf + 8);
            PyBuffer_Release(&pv);
            pv_held = 0;
        }
        Py_CLEAR(pos);
        /* the stored partial tail chunk, whose rows come first in the rewrite */
        const char *tcols[4] = {NULL, NULL, NULL, NULL};
        uint64_t tn = 0, first = end;
        if (end % cr) {
            uint64_t tci = end / cr;
            PyObject *sk = seq_key(user, tci);
            tail = sk ? PyObject_CallOneArg(seq_get, sk) : NULL;
            Py_XDECREF(sk);
            if (!tail) { Py_DECREF(uk_o); goto done; }
            if (tail == Py_None) {
                PyErr_Format(error, "store is corrupt: tail chunk %llu is missing (rebuild the store)",
                             (unsigned long long)tci);
                Py_DECREF(uk_o);
                goto done;
            }
            if (PyObject_GetBuffer(tail, &tv, PyBUF_SIMPLE) < 0) { Py_DECREF(uk_o); goto done; }
            tv_held = 1;
            const unsigned char *t = tv.buf;
            tn = tv.len >= 2 ? (uint64_t)t[0] | ((uint64_t)t[1] << 8) : 0;
            first = tci * cr;
            if (tv.len < 2 || first + tn != end) {
                PyErr_Format(error, "store is corrupt: tail chunk %llu holds %llu rows, position says %llu "
                                    "(rebuild the store)", (unsigned long long)tci, (unsigned long long)tn,
                             (unsigned long long)(end - first));
                Py_DECREF(uk_o);
                goto done;
            }
            if ((uint64_t)tv.len != 2 + 25 * tn) {
                PyErr_Format(error, "store is corrupt: tail chunk %llu has %zd bytes for %llu rows (rebuild the "
                                    "store)", (unsigned long long)tci, tv.len, (unsigned long long)tn);
                Py_DECREF(uk_o);
                goto done;
            }
            for (int c = 0; c < 4; c++) tcols[c] = (const char *)t + 2 + 8 * tn * (uint64_t)c;
        }
        uint64_t new_end = end + n_new, new_start = new_end > (uint64_t)cap ? new_end - (uint64_t)cap : 0;
        if (new_start < start) new_start = start;
        uint64_t keep_from = new_start / cr, total = tn + n_new, p = first, k = 0;
        while (k < total) {
            uint64_t ci = p / cr, take = cr - p % cr;
            if (take > total - k) take = total - k;
            if (ci >= keep_from) {
                PyObject *chunk = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(2 + 25 * take));
                if (!chunk) { Py_DECREF(uk_o); goto done; }
                char *o = PyBytes_AS_STRING(chunk);
                o[0] = (char)(take & 0xff);
                o[1] = (char)(take >> 8);
                o += 2;
                /* rows [k, k + take) of the tail's rows followed by the new ones */
                uint64_t from_tail = k < tn ? (tn - k < take ? tn - k : take) : 0, from_new = take - from_tail;
                uint64_t new_at = (uint64_t)a + (k > tn ? k - tn : 0);
                for (int c = 0; c < 3; c++) {
                    if (from_tail) { memcpy(o, tcols[c] + 8 * k, 8 * from_tail); o += 8 * from_tail; }
                    memcpy(o, cols8[c] + 8 * new_at, 8 * from_new);
                    o += 8 * from_new;
                }
                if (from_tail) { memcpy(o, tcols[3] + k, from_tail); o += from_tail; }
                memcpy(o, act + new_at, from_new);
                if (append_pair(writes, seq_key(user, ci), chunk) < 0) { Py_DECREF(uk_o); goto done; }
            }
            p += take;
            k += take;
        }
        if (tv_held) { PyBuffer_Release(&tv); tv_held = 0; }
        Py_CLEAR(tail);
        for (uint64_t ci = start / cr; ci < keep_from; ci++) {
            PyObject *sk = seq_key(user, ci);
            if (!sk || PyList_Append(deletes, sk) < 0) { Py_XDECREF(sk); Py_DECREF(uk_o); goto done; }
            Py_DECREF(sk);
        }
        unsigned char rec[16];
        put_be64(rec, new_start);
        put_be64(rec + 8, new_end);
        if (append_pair(positions, uk_o, PyBytes_FromStringAndSize((const char *)rec, 16)) < 0) goto done;
    }
    result = PyTuple_Pack(3, writes, deletes, positions);
done:
    if (pv_held) PyBuffer_Release(&pv);
    if (tv_held) PyBuffer_Release(&tv);
    Py_XDECREF(pos);
    Py_XDECREF(tail);
    for (int c = 0; c < N_COLS; c++)
        if (col[c].held) PyBuffer_Release(&col[c].view);
    Py_XDECREF(writes);
    Py_XDECREF(deletes);
    Py_XDECREF(positions);
    return result;
}

static PyMethodDef methods[] = {
    {"append_chunks_many", append_chunks_many, METH_VARARGS,
     "Plan the chunk writes of every user's appends (see pipeline.state.lmdb.append_chunks_many_ref)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_storecore", NULL, -1, methods};

PyMODINIT_FUNC PyInit__storecore(void) { return PyModule_Create(&module); }
