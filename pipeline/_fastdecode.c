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
 *     None | (kind, users: list, users_hash: bytes | None, items: list, items_hash: bytes | None,
 *             ts, cats: list, cats_hash: bytes | None, action, rids: list)
 *   (kind, ts, action: bytearrays, so that numpy views of them are writable)
 *   kind: one byte per record, 0 behavior / 1 impression / 2 click
 *   users/items/cats: the ids as decoded (str or int; cats None when absent or null)
 *   *_hash: native int64 per record, pipeline.events.hash_id of the id (xxh3_64 of its string form,
 *     top bit cleared; 0 for an absent category), or None when some id of the column is longer than
 *     XXH3_SHORT_MAX bytes (the caller hashes that column in Python)
 *   ts: native int64 per record
 *   action: one byte per record: 1..5 the known names, 6 any other name, 0 absent
 *   rids: request ids (str, or None when absent or null)
 *
 * xxh3_64(data, len) -> int (len <= XXH3_SHORT_MAX): the hash below, for the parity test with the
 * xxhash package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ---- XXH3-64, seed 0, default secret, inputs of 0..240 bytes --------------------------------------
 * Written from the XXH3 specification (xxHash's doc/xxhash_spec.md, "small" and "medium" inputs):
 * hashing every id here, in the decode loop, replaces the per-batch table lookups and Python hashing
 * of pipeline.events (tests/pipeline/test_events.py checks it against the xxhash package on random
 * inputs of every length it takes). Ids are at most MAX_ID_CHARS (256) characters; the rare one
 * over 240 bytes makes its column fall back to the Python hash. */
#define XXH3_SHORT_MAX 240

static const uint8_t XXH3_SECRET[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P_MX1 0x165667919E3779F9ULL
#define P_MX2 0x9FB21C651E98DF25ULL

/* little-endian reads (memcpy: unaligned-safe; x86-64 and aarch64 Linux are little-endian, the
 * parity test would catch a big-endian build) */
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t avalanche(uint64_t x) {
    x ^= x >> 37;
    x *= P_MX1;
    return x ^ (x >> 32);
}

static inline uint64_t avalanche_xxh64(uint64_t x) {
    x ^= x >> 33;
    x *= P64_2;
    x ^= x >> 29;
    x *= P64_3;
    return x ^ (x >> 32);
}

static inline uint64_t fold128(uint64_t a, uint64_t b) {
    const unsigned __int128 m = (unsigned __int128)a * b;
    return (uint64_t)m ^ (uint64_t)(m >> 64);
}

static inline uint64_t mix16(const uint8_t *d, const uint8_t *sec) {
    return fold128(rd64(d) ^ rd64(sec), rd64(d + 8) ^ rd64(sec + 8));
}

static uint64_t xxh3_64(const uint8_t *d, size_t n) {
    const uint8_t *s = XXH3_SECRET;
    if (n <= 16) {
        if (n > 8) {
            const uint64_t lo = (rd64(s + 24) ^ rd64(s + 32)) ^ rd64(d);
            const uint64_t hi = (rd64(s + 40) ^ rd64(s + 48)) ^ rd64(d + n - 8);
            return avalanche(n + __builtin_bswap64(lo) + hi + fold128(lo, hi));
        }
        if (n >= 4) {
            const uint64_t combined = (uint64_t)rd32(d + n - 4) | ((uint64_t)rd32(d) << 32);
            uint64_t v = (rd64(s + 8) ^ rd64(s + 16)) ^ combined;
            v ^= rotl64(v, 49) ^ rotl64(v, 24);
            v *= P_MX2;
            v ^= (v >> 35) + n;
            v *= P_MX2;
            return v ^ (v >> 28);
        }
        if (n > 0) {
            const uint32_t combined = (uint32_t)d[n - 1] | ((uint32_t)n << 8) | ((uint32_t)d[0] << 16) |
                                      ((uint32_t)d[n >> 1] << 24);
            return avalanche_xxh64((uint64_t)(rd32(s) ^ rd32(s + 4)) ^ combined);
        }
        return avalanche_xxh64(rd64(s + 56) ^ rd64(s + 64));
    }
    uint64_t acc = n * P64_1;
    if (n <= 128) {
        for (int i = (int)((n - 1) >> 5); i >= 0; i--) {
            acc += mix16(d + 16 * i, s + 32 * i);
            acc += mix16(d + n - 16 * i - 16, s + 32 * i + 16);
        }
        return avalanche(acc);
    }
    for (int i = 0; i < 8; i++) acc += mix16(d + 16 * i, s + 16 * i);
    acc = avalanche(acc);
    for (int i = 8; i < (int)(n >> 4); i++) acc += mix16(d + 16 * i, s + 16 * (i - 8) + 3);
    acc += mix16(d + n - 16, s + 119);
    return avalanche(acc);
}

/* pipeline.events.hash_id: xxh3_64 of the id's string form, top bit cleared */
static inline int64_t hash63(const char *s, Py_ssize_t n) {
    return (int64_t)(xxh3_64((const uint8_t *)s, (size_t)n) & 0x7FFFFFFFFFFFFFFFULL);
}

/* hash_id of an integer id: of str(v), its canonical decimal form (so "-0" in the JSON hashes as "0") */
static inline int64_t hash63_int(long long v) {
    char buf[24], *p = buf + sizeof buf;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { *--p = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) *--p = '-';
    return hash63(p, buf + sizeof buf - p);
}

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

/* An id: a plain string of 1..max_id characters, or an integer. *obj gets a new reference; *hash
 * its hash_id, *hashed 0 when it is too long for xxh3_64 here. 0: not in the accepted subset.
 * -1: Python error. */
static int scan_id(cursor_t *c, const limits_t *lim, PyObject **obj, int64_t *hash, int *hashed) {
    const char *s;
    Py_ssize_t n;
    if (c->p < c->end && *c->p == '"') {
        if (!scan_plain_string(c, &s, &n) || n < 1 || n > lim->max_id) return 0;
        *obj = ascii_str(s, n);
        *hashed = n <= XXH3_SHORT_MAX;
        *hash = *hashed ? hash63(s, n) : 0;
    } else {
        long long iv;
        if (!scan_int(c, &iv)) return 0;
        *obj = PyLong_FromLongLong(iv);
        *hash = hash63_int(iv);
        *hashed = 1;
    }
    return *obj ? 1 : -1;
}

typedef struct {
    int kind, action;
    long long ts;
    int64_t hash[N_FIELDS];  /* user, item, cat: hash_id (0 for an absent category) */
    int hashed[N_FIELDS];    /* 1 when hash[] holds it (always, but for ids over XXH3_SHORT_MAX bytes) */
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
    e->hashed[F_CAT] = 1;  /* an absent category hashes to 0 */
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
                r = scan_id(&c, lim, &e->obj[f], &e->hash[f], &e->hashed[f]);
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
    PyObject *hashes[3] = {PyBytes_FromStringAndSize(NULL, n * 8), PyBytes_FromStringAndSize(NULL, n * 8),
                            PyBytes_FromStringAndSize(NULL, n * 8)};
    PyObject *lists[4] = {PyList_New(n), PyList_New(n), PyList_New(n), PyList_New(n)};  /* user item cat rid */
    static const int list_field[4] = {F_USER, F_ITEM, F_CAT, F_RID};
    int all_hashed[3] = {1, 1, 1};
    PyObject *result = NULL;
    if (!kind || !action || !ts || !hashes[0] || !hashes[1] || !hashes[2] || !lists[0] || !lists[1] ||
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
                memcpy((int64_t *)PyBytes_AS_STRING(hashes[j]) + i, &e.hash[f], 8);
                all_hashed[j] &= e.hashed[f];
            }
        }
    }
    for (int j = 0; j < 3; j++)
        if (!all_hashed[j]) { Py_INCREF(Py_None); Py_SETREF(hashes[j], Py_None); }
    result = Py_BuildValue("(OOOOOOOOOO)", kind, lists[0], hashes[0], lists[1], hashes[1], ts, lists[2],
                           hashes[2], action, lists[3]);
done:
    if (result == Py_None) Py_INCREF(Py_None);
    Py_XDECREF(kind);
    Py_XDECREF(action);
    Py_XDECREF(ts);
    for (int j = 0; j < 3; j++) Py_XDECREF(hashes[j]);
    for (int j = 0; j < 4; j++) Py_XDECREF(lists[j]);
    return result;
}

static PyObject *py_xxh3_64(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = NULL;
    if (b.len > XXH3_SHORT_MAX) PyErr_Format(PyExc_ValueError, "xxh3_64 here takes at most %d bytes", XXH3_SHORT_MAX);
    else r = PyLong_FromUnsignedLongLong(xxh3_64((const uint8_t *)b.buf, (size_t)b.len));
    PyBuffer_Release(&b);
    return r;
}

static PyMethodDef methods[] = {
    {"xxh3_64", py_xxh3_64, METH_O, "xxh3_64(data): XXH3-64 (seed 0) of at most 240 bytes, as decode_plain hashes ids."},
    {"decode_plain", decode_plain, METH_VARARGS,
     "decode_plain(values, max_bytes, max_id_chars, max_action_chars, min_ts, max_ts): a batch of plain "
     "events as columns, or None when any record is outside the accepted subset (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastdecode",
                                    "The worker's decode fast path (see pipeline/_fastdecode.c).", -1, methods};

PyMODINIT_FUNC PyInit__fastdecode(void) { return PyModule_Create(&module); }
