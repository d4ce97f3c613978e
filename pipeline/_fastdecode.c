/* The worker's decode fast path: a whole poll batch of plain events, JSON bytes to columns, in C.
 *
 * What it accepts is a strict subset of what pipeline.events._PlainEvent (msgspec) accepts, and for
 * that subset it returns the same values: a flat JSON object whose keys are the seven event fields
 * (no duplicates, no escapes), whose strings are printable ASCII without escapes, and whose numbers
 * are plain integers of at most 18 digits. On anything else, a single record anywhere in the batch,
 * it returns None and the caller takes the msgspec path, which decides (and words the dead letter)
 * exactly as before. So this file never has to reproduce JSON's corner cases (escapes, UTF-8,
 * floats, huge integers): it only has to recognise the common shape and give up on the rest.
 * tests/pipeline/test_events.py compares it with the one-record reference over hostile and
 * arbitrary records, and checks that it does not give up on the benchmark's stream.
 *
 * decode_plain(values, max_bytes, max_id_chars, max_action_chars, min_ts, max_ts) ->
 *     None | (kind, users: list, users_int: bytes | None, items: list, items_int: bytes | None,
 *             ts, cats: list, cats_int: bytes | None, action, rids: list)
 *   (kind, ts, action: bytearrays, so that numpy views of them are writable)
 *   kind: one byte per record, 0 behavior / 1 impression / 2 click
 *   users/items/cats: the ids as decoded (str or int; cats None when absent or null)
 *   *_int: the ids as native int64, when every id of the column is an integer (else None)
 *   ts: native int64 per record
 *   action: one byte per record: 1..5 the known names, 6 any other name, 0 absent
 *   rids: request ids (str, or None when absent or null)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { F_TYPE, F_USER, F_ITEM, F_TS, F_CAT, F_ACTION, F_RID, N_FIELDS };

typedef struct {
    long long max_bytes, max_id, max_action, min_ts, max_ts;
} limits_t;

typedef struct {
    const char *p, *end;
} cursor_t;

static inline void skip_ws(cursor_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

/* A string of printable ASCII with no escape: *s, *len; 0 when the value is anything else. */
static inline int scan_plain_string(cursor_t *c, const char **s, Py_ssize_t *len) {
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *q = ++c->p;
    while (q < c->end) {
        unsigned char ch = (unsigned char)*q;
        if (ch == '"') break;
        if (ch < 0x20 || ch > 0x7e || ch == '\\') return 0;
        q++;
    }
    if (q >= c->end) return 0;
    *s = c->p;
    *len = q - c->p;
    c->p = q + 1;
    return 1;
}

/* A JSON integer of at most 18 digits (so within int64), followed by a delimiter; 0 otherwise
 * (leading zeros, a fraction or exponent, more digits: all left to the full decoder). */
static inline int scan_int(cursor_t *c, long long *out) {
    const char *q = c->p;
    int neg = 0;
    if (q < c->end && *q == '-') { neg = 1; q++; }
    if (q >= c->end || *q < '0' || *q > '9') return 0;
    const char *d0 = q;
    long long v = 0;
    while (q < c->end && *q >= '0' && *q <= '9') {
        if (q - d0 == 18) return 0;  /* a 19th digit: declined before it is added (it could overflow) */
        v = v * 10 + (*q - '0');
        q++;
    }
    if (*d0 == '0' && q - d0 > 1) return 0;
    if (q < c->end && (*q == '.' || *q == 'e' || *q == 'E')) return 0;
    *out = neg ? -v : v;
    c->p = q;
    return 1;
}

static inline int scan_null(cursor_t *c) {
    if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) { c->p += 4; return 1; }
    return 0;
}

static int field_of(const char *s, Py_ssize_t n) {
    switch (n) {
        case 2: return memcmp(s, "ts", 2) == 0 ? F_TS : -1;
        case 4: return memcmp(s, "type", 4) == 0 ? F_TYPE : -1;
        case 6: return memcmp(s, "action", 6) == 0 ? F_ACTION : -1;
        case 7: return memcmp(s, "user_id", 7) == 0 ? F_USER : memcmp(s, "item_id", 7) == 0 ? F_ITEM : -1;
        case 10: return memcmp(s, "request_id", 10) == 0 ? F_RID : -1;
        case 11: return memcmp(s, "category_id", 11) == 0 ? F_CAT : -1;
        default: return -1;
    }
}

static int kind_of(const char *s, Py_ssize_t n) {
    if (n == 8 && memcmp(s, "behavior", 8) == 0) return 0;
    if (n == 10 && memcmp(s, "impression", 10) == 0) return 1;
    if (n == 5 && memcmp(s, "click", 5) == 0) return 2;
    return -1;
}

static int action_of(const char *s, Py_ssize_t n) {  /* pipeline.events.ACTIONS; any other name: "other" */
    if (n == 4 && memcmp(s, "view", 4) == 0) return 1;
    if (n == 5 && memcmp(s, "click", 5) == 0) return 2;
    if (n == 4 && memcmp(s, "cart", 4) == 0) return 3;
    if (n == 3 && memcmp(s, "fav", 3) == 0) return 4;
    if (n == 3 && memcmp(s, "buy", 3) == 0) return 5;
    return 6;
}

static PyObject *ascii_str(const char *s, Py_ssize_t n) {
    PyObject *o = PyUnicode_New(n, 127);
    if (o) memcpy(PyUnicode_1BYTE_DATA(o), s, (size_t)n);
    return o;
}

/* An id: a plain string of 1..max_id characters, or an integer. *obj gets a new reference;
 * *iv the integer and *is_int 1 for an integer. 0: not in the accepted subset. -1: Python error. */
static int scan_id(cursor_t *c, const limits_t *lim, PyObject **obj, long long *iv, int *is_int) {
    const char *s;
    Py_ssize_t n;
    if (c->p < c->end && *c->p == '"') {
        if (!scan_plain_string(c, &s, &n) || n < 1 || n > lim->max_id) return 0;
        *obj = ascii_str(s, n);
        *is_int = 0;
    } else {
        if (!scan_int(c, iv)) return 0;
        *obj = PyLong_FromLongLong(*iv);
        *is_int = 1;
    }
    return *obj ? 1 : -1;
}

typedef struct {
    int kind, action;
    long long ts, iv[N_FIELDS];
    int is_int[N_FIELDS];
    PyObject *obj[N_FIELDS];  /* user, item, cat, rid: new references, or NULL */
} event_t;

static void event_clear(event_t *e) {
    for (int i = 0; i < N_FIELDS; i++) Py_CLEAR(e->obj[i]);
}

/* One record. 1: decoded into *e; 0: not in the accepted subset; -1: Python error. */
static int parse_event(const char *buf, Py_ssize_t len, const limits_t *lim, event_t *e) {
    cursor_t c = {buf, buf + len};
    unsigned seen = 0;
    const char *s;
    Py_ssize_t n;
    int r;
    memset(e, 0, sizeof *e);
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') return 0;
    c.p++;
    for (;;) {
        skip_ws(&c);
        if (!scan_plain_string(&c, &s, &n)) return 0;
        int f = field_of(s, n);
        if (f < 0 || (seen & (1u << f))) return 0;  /* unknown or repeated field */
        seen |= 1u << f;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':') return 0;
        c.p++;
        skip_ws(&c);
        switch (f) {
            case F_TYPE:
                if (!scan_plain_string(&c, &s, &n) || (e->kind = kind_of(s, n)) < 0) return 0;
                break;
            case F_TS:
                if (!scan_int(&c, &e->ts) || e->ts < lim->min_ts || e->ts >= lim->max_ts) return 0;
                break;
            case F_ACTION:
                if (!scan_plain_string(&c, &s, &n) || n > lim->max_action) return 0;
                e->action = action_of(s, n);
                break;
            case F_RID:
                if (scan_null(&c)) break;
                if (!scan_plain_string(&c, &s, &n) || n < 1 || n > lim->max_id) return 0;
                if (!(e->obj[F_RID] = ascii_str(s, n))) return -1;
                break;
            case F_CAT:
                if (scan_null(&c)) break;
                /* fall through */
            default:  /* F_USER, F_ITEM, F_CAT */
                r = scan_id(&c, lim, &e->obj[f], &e->iv[f], &e->is_int[f]);
                if (r <= 0) return r;
        }
        skip_ws(&c);
        if (c.p >= c.end) return 0;
        if (*c.p == ',') { c.p++; continue; }
        if (*c.p != '}') return 0;
        c.p++;
        break;
    }
    skip_ws(&c);
    if (c.p != c.end) return 0;
    const unsigned required = (1u << F_TYPE) | (1u << F_USER) | (1u << F_ITEM) | (1u << F_TS);
    return (seen & required) == required;
}

static PyObject *decode_plain(PyObject *self, PyObject *args) {
    PyObject *values;
    limits_t lim;
    if (!PyArg_ParseTuple(args, "O!LLLLL", &PyList_Type, &values, &lim.max_bytes, &lim.max_id, &lim.max_action,
                          &lim.min_ts, &lim.max_ts))
        return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(values);
    /* bytearrays: numpy views of them are writable */
    PyObject *kind = PyByteArray_FromStringAndSize(NULL, n), *action = PyByteArray_FromStringAndSize(NULL, n);
    PyObject *ts = PyByteArray_FromStringAndSize(NULL, n * 8);
    PyObject *ids_int[3] = {PyBytes_FromStringAndSize(NULL, n * 8), PyBytes_FromStringAndSize(NULL, n * 8),
                            PyBytes_FromStringAndSize(NULL, n * 8)};
    PyObject *lists[4] = {PyList_New(n), PyList_New(n), PyList_New(n), PyList_New(n)};  /* user item cat rid */
    static const int list_field[4] = {F_USER, F_ITEM, F_CAT, F_RID};
    int all_int[3] = {1, 1, 1};
    PyObject *result = NULL;
    if (!kind || !action || !ts || !ids_int[0] || !ids_int[1] || !ids_int[2] || !lists[0] || !lists[1] ||
        !lists[2] || !lists[3])
        goto done;
    char *kind_p = PyByteArray_AS_STRING(kind), *action_p = PyByteArray_AS_STRING(action);
    char *ts_p = PyByteArray_AS_STRING(ts);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        if (!PyBytes_CheckExact(v) || PyBytes_GET_SIZE(v) > lim.max_bytes) { result = Py_None; goto done; }
        event_t e;
        int r = parse_event(PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), &lim, &e);
        if (r <= 0) {
            event_clear(&e);
            if (r == 0) result = Py_None;
            goto done;
        }
        kind_p[i] = (char)e.kind;
        action_p[i] = (char)e.action;
        memcpy(ts_p + 8 * i, &e.ts, 8);
        for (int j = 0; j < 4; j++) {
            const int f = list_field[j];
            PyObject *o = e.obj[f];
            if (o == NULL) { Py_INCREF(Py_None); o = Py_None; }
            e.obj[f] = NULL;
            PyList_SET_ITEM(lists[j], i, o);  /* steals */
            if (j < 3) {
                if (e.is_int[f]) memcpy((int64_t *)PyBytes_AS_STRING(ids_int[j]) + i, &e.iv[f], 8);
                else all_int[j] = 0;
            }
        }
    }
    for (int j = 0; j < 3; j++)
        if (!all_int[j]) { Py_INCREF(Py_None); Py_SETREF(ids_int[j], Py_None); }
    result = Py_BuildValue("(OOOOOOOOOO)", kind, lists[0], ids_int[0], lists[1], ids_int[1], ts, lists[2],
                           ids_int[2], action, lists[3]);
done:
    if (result == Py_None) Py_INCREF(Py_None);
    Py_XDECREF(kind);
    Py_XDECREF(action);
    Py_XDECREF(ts);
    for (int j = 0; j < 3; j++) Py_XDECREF(ids_int[j]);
    for (int j = 0; j < 4; j++) Py_XDECREF(lists[j]);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_plain", decode_plain, METH_VARARGS,
     "decode_plain(values, max_bytes, max_id_chars, max_action_chars, min_ts, max_ts): a batch of plain "
     "events as columns, or None when any record is outside the accepted subset (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastdecode",
                                    "The worker's decode fast path (see pipeline/_fastdecode.c).", -1, methods};

PyMODINIT_FUNC PyInit__fastdecode(void) { return PyModule_Create(&module); }
