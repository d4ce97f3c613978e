/* kafka-python's consumer fast path: the records of one uncompressed (or already decompressed)
 * message-format-v2 record batch, bytes to ConsumerRecord tuples, in C.
 *
 * kafka-python parses every record in Python (a varint at a time, a DefaultRecord object, then a
 * ConsumerRecord): about 10 us per record here, the whole of its consume cost. This does the same
 * parse, with the same results and the same refusals, at well under a microsecond. It reads only
 * the records section; the caller (pipeline._kafka_fast) keeps everything else of kafka-python's
 * own loop: CRC check of the batch, decompression, control and aborted batches, offsets.
 *
 * parse_v2(buffer, pos, count, base_offset, timestamp, ts_is_log_append, ts_type, topic, partition,
 *          leader_epoch, record_type) -> (records: list, end_pos: int, bytes_read: int)
 *   buffer: the batch (bytes-like); pos: where its records start; count: the header's record count
 *   timestamp: first_timestamp, or max_timestamp when ts_is_log_append (LOG_APPEND_TIME)
 *   record_type: kafka-python's ConsumerRecord (a namedtuple: a tuple subclass of 13 fields)
 *   bytes_read: the sum of the records' sizes (their Length fields), as kafka-python counts them
 * Raises ValueError on a record whose structure is wrong, or on bytes left over after `count`
 * records (kafka-python raises CorruptRecordError in both cases; the caller converts).
 *
 * parse_v2_columns(buffer, pos, count, base_offset) -> (offsets, keys, values): the same parse as columns
 *   (below), for the kafka-python fetch process's batches (pipeline._fetch_process).
 *
 * build_v2(keys, values, timestamp_ms) -> bytearray: the producer side, one uncompressed v2 batch
 * (see its comment below); pipeline._kafka_fast.BatchingSender hands it to kafka-python's sender.
 *
 * message_columns(messages, error, partition, offset, value) -> None | (partitions, offsets, values)
 *   confluent-kafka's side (pipeline._confluent): a consumed batch of Message objects as the worker's
 *   columns, calling the given accessors (Message.error, .partition, .offset, .value) on each message
 *   in one C loop. partitions, offsets: native int64 per message (bytes); values: a list. None when
 *   any message carries an error or event (the caller filters those in Python, as before).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const unsigned char *p, *end;
} cur_t;

/* A zigzag varint; 0 on truncation or on an encoding beyond 64 bits (kafka-python refuses more
 * than 10 bytes; a 10th byte above 1 it would decode to an int outside int64, which no broker writes:
 * refused here too). */
static inline int read_varint(cur_t *c, int64_t *out) {
    uint64_t r = 0;
    int shift = 0;
    while (c->p < c->end) {
        unsigned char b = *c->p++;
        if (shift == 63 && (b & 0x7e)) return 0;
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = (int64_t)(r >> 1) ^ -(int64_t)(r & 1);
            return 1;
        }
        shift += 7;
        if (shift >= 64) return 0;
    }
    return 0;
}

static PyObject *corrupt(const char *what, Py_ssize_t i) {
    PyErr_Format(PyExc_ValueError, "record %zd of the batch: %s", i, what);
    return NULL;
}

/* A record's length and its fields up to the key (attributes read and ignored); 0, with the
 * ValueError for record i set, when they are truncated or the length runs past the buffer. */
typedef struct {
    int64_t length, ts_delta, off_delta, klen;
    const unsigned char *start; /* where the record's Length counts from */
} rec_head_t;

static inline int read_head(cur_t *c, Py_ssize_t i, rec_head_t *h) {
    int64_t attrs;
    if (!read_varint(c, &h->length)) { corrupt("truncated length", i); return 0; }
    h->start = c->p;
    if (h->length < 0 || h->length > c->end - c->p) { corrupt("length out of range", i); return 0; }
    if (!read_varint(c, &attrs) || !read_varint(c, &h->ts_delta) || !read_varint(c, &h->off_delta)
        || !read_varint(c, &h->klen)) { corrupt("truncated header", i); return 0; }
    return 1;
}

/* bytes or None from a nullable-bytes field of length n (negative: null, as kafka-python reads it);
 * NULL with an exception set when the field runs past the buffer (`what`, record i) or on no memory */
static inline PyObject *take_bytes(cur_t *c, int64_t n, const char *what, Py_ssize_t i) {
    if (n < 0) Py_RETURN_NONE;
    if (n > c->end - c->p) return corrupt(what, i);
    PyObject *b = PyBytes_FromStringAndSize((const char *)c->p, (Py_ssize_t)n);
    c->p += n;
    return b;
}

/* a + b as a Python int, exact even where int64 would overflow (a hostile delta) */
static PyObject *add_ll(long long a, long long b) {
    long long r;
    if (!__builtin_add_overflow(a, b, &r)) return PyLong_FromLongLong(r);
    PyObject *x = PyLong_FromLongLong(a), *y = PyLong_FromLongLong(b), *s = NULL;
    if (x && y) s = PyNumber_Add(x, y);
    Py_XDECREF(x);
    Py_XDECREF(y);
    return s;
}

static PyObject *parse_v2(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, count;
    long long base_offset, timestamp;
    int ts_is_log_append;
    PyObject *ts_type, *topic, *partition, *leader_epoch, *rtype;
    if (!PyArg_ParseTuple(args, "y*nnLLpOOOOO", &view, &pos, &count, &base_offset, &timestamp,
                          &ts_is_log_append, &ts_type, &topic, &partition, &leader_epoch, &rtype))
        return NULL;
    PyObject *out = NULL, *records = NULL;
    if (!PyType_Check(rtype) || !PyType_IsSubtype((PyTypeObject *)rtype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "record_type must be a tuple subclass (ConsumerRecord)");
        goto done;
    }
    if (count < 0) count = 0; /* as kafka-python: no records, and any bytes are left over */
    if (pos < 0 || pos > view.len) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        goto done;
    }
    PyTypeObject *rt = (PyTypeObject *)rtype;
    records = PyList_New(0);
    if (!records) goto done;
    cur_t c = {(const unsigned char *)view.buf + pos, (const unsigned char *)view.buf + view.len};
    long long bytes_read = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        rec_head_t h;
        int64_t vlen, nh;
        if (!read_head(&c, i, &h)) goto fail;
        PyObject *key = take_bytes(&c, h.klen, "bad key length", i);
        if (!key) goto fail;
        if (!read_varint(&c, &vlen)) { Py_DECREF(key); corrupt("truncated value length", i); goto fail; }
        PyObject *value = take_bytes(&c, vlen, "bad value length", i);
        if (!value) { Py_DECREF(key); goto fail; }
        PyObject *headers = PyList_New(0);
        if (!headers) { Py_DECREF(key); Py_DECREF(value); goto fail; }
        long long header_size = -1;
        if (!read_varint(&c, &nh) || nh < 0) { corrupt("bad header count", i); goto fail_rec; }
        if (nh > 0) header_size = 0;
        for (int64_t h = 0; h < nh; h++) {
            int64_t hk, hv;
            if (!read_varint(&c, &hk) || hk < 0 || hk > c.end - c.p) { corrupt("bad header key", i); goto fail_rec; }
            PyObject *hkey = PyUnicode_DecodeUTF8((const char *)c.p, (Py_ssize_t)hk, "strict");
            if (!hkey) {
                PyErr_Clear();
                corrupt("header key is not UTF-8", i);
                goto fail_rec;
            }
            c.p += hk;
            if (!read_varint(&c, &hv)) { Py_DECREF(hkey); corrupt("truncated header value", i); goto fail_rec; }
            PyObject *hval = take_bytes(&c, hv, "bad header value length", i);
            if (!hval) { Py_DECREF(hkey); goto fail_rec; }
            header_size += hk + (hv >= 0 ? hv : 0);
            PyObject *pair = PyTuple_Pack(2, hkey, hval);
            Py_DECREF(hkey);
            Py_DECREF(hval);
            if (!pair || PyList_Append(headers, pair) < 0) { Py_XDECREF(pair); goto fail_rec; }
            Py_DECREF(pair);
        }
        if (c.p - h.start != h.length) { corrupt("record size does not match its length", i); goto fail_rec; }
        bytes_read += h.length;

        PyObject *rec = rt->tp_alloc(rt, 13);
        if (!rec) goto fail_rec;
        PyObject *off = add_ll(base_offset, h.off_delta);
        PyObject *ts = ts_is_log_append ? PyLong_FromLongLong(timestamp) : add_ll(timestamp, h.ts_delta);
        PyObject *ks = PyLong_FromLongLong(h.klen >= 0 ? h.klen : -1);
        PyObject *vs = PyLong_FromLongLong(vlen >= 0 ? vlen : -1);
        PyObject *hs = PyLong_FromLongLong(header_size);
        if (!off || !ts || !ks || !vs || !hs) {
            Py_XDECREF(off); Py_XDECREF(ts); Py_XDECREF(ks); Py_XDECREF(vs); Py_XDECREF(hs);
            Py_DECREF(rec);
            goto fail_rec;
        }
        /* the field order of kafka-python's ConsumerRecord */
        Py_INCREF(topic); PyTuple_SET_ITEM(rec, 0, topic);
        Py_INCREF(partition); PyTuple_SET_ITEM(rec, 1, partition);
        Py_INCREF(leader_epoch); PyTuple_SET_ITEM(rec, 2, leader_epoch);
        PyTuple_SET_ITEM(rec, 3, off);
        PyTuple_SET_ITEM(rec, 4, ts);
        Py_INCREF(ts_type); PyTuple_SET_ITEM(rec, 5, ts_type);
        PyTuple_SET_ITEM(rec, 6, key);
        PyTuple_SET_ITEM(rec, 7, value);
        PyTuple_SET_ITEM(rec, 8, headers);
        Py_INCREF(Py_None); PyTuple_SET_ITEM(rec, 9, Py_None);  /* checksum: none in format v2 */
        PyTuple_SET_ITEM(rec, 10, ks);
        PyTuple_SET_ITEM(rec, 11, vs);
        PyTuple_SET_ITEM(rec, 12, hs);
        int r = PyList_Append(records, rec);
        Py_DECREF(rec);
        if (r < 0) goto fail;
        continue;
    fail_rec:
        Py_DECREF(key);
        Py_DECREF(value);
        Py_DECREF(headers);
        goto fail;
    }
    if (c.p != c.end) {
        PyErr_Format(PyExc_ValueError, "%zd unconsumed bytes after all records consumed",
                     (Py_ssize_t)(c.end - c.p));
        goto fail;
    }
    out = Py_BuildValue("(OnL)", records, (Py_ssize_t)(c.p - (const unsigned char *)view.buf), bytes_read);
fail:
    Py_XDECREF(records);
done:
    PyBuffer_Release(&view);
    return out;
}

/* parse_v2_columns(buffer, pos, count, base_offset) -> (offsets: bytes, keys: list, values: list)
 * The same walk and the same refusals as parse_v2 (headers are checked, not kept), for a caller that wants columns, not ConsumerRecords: the fetch process's
 * batches (pipeline._fetch_process). offsets: native int64 per record; an offset beyond int64 is
 * refused as corrupt (parse_v2 would build a Python int). */
static PyObject *parse_v2_columns(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, count;
    long long base_offset;
    if (!PyArg_ParseTuple(args, "y*nnL", &view, &pos, &count, &base_offset)) return NULL;
    PyObject *out = NULL, *offs = NULL, *keys = NULL, *vals = NULL;
    if (count < 0) count = 0;
    if (pos < 0 || pos > view.len) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        goto done;
    }
    /* every record takes at least 7 bytes: a count beyond that is refused before allocating */
    if (count > (view.len - pos) / 7 + 1) {
        corrupt("record count larger than the batch", 0);
        goto done;
    }
    offs = PyBytes_FromStringAndSize(NULL, count * 8);
    keys = PyList_New(count);
    vals = PyList_New(count);
    if (!offs || !keys || !vals) goto done;
    int64_t *op = (int64_t *)PyBytes_AS_STRING(offs);
    cur_t c = {(const unsigned char *)view.buf + pos, (const unsigned char *)view.buf + view.len};
    for (Py_ssize_t i = 0; i < count; i++) {
        rec_head_t h;
        int64_t vlen, nh;
        if (!read_head(&c, i, &h)) goto done;
        long long off;
        if (__builtin_add_overflow(base_offset, h.off_delta, &off)) { corrupt("offset beyond int64", i); goto done; }
        PyObject *key = take_bytes(&c, h.klen, "bad key length", i);
        if (!key) goto done;
        PyList_SET_ITEM(keys, i, key);  /* steals; an unset tail stays NULL, which list_dealloc skips */
        if (!read_varint(&c, &vlen)) { corrupt("truncated value length", i); goto done; }
        PyObject *value = take_bytes(&c, vlen, "bad value length", i);
        if (!value) goto done;
        PyList_SET_ITEM(vals, i, value);
        if (!read_varint(&c, &nh) || nh < 0) { corrupt("bad header count", i); goto done; }
        for (int64_t h = 0; h < nh; h++) {
            int64_t hk, hv;
            if (!read_varint(&c, &hk) || hk < 0 || hk > c.end - c.p) { corrupt("bad header key", i); goto done; }
            PyObject *hkey = PyUnicode_DecodeUTF8((const char *)c.p, (Py_ssize_t)hk, "strict");
            if (!hkey) {  /* refused as parse_v2 refuses it (rare: headers are not on the worker's path) */
                PyErr_Clear();
                corrupt("header key is not UTF-8", i);
                goto done;
            }
            Py_DECREF(hkey);
            c.p += hk;
            if (!read_varint(&c, &hv)) { corrupt("truncated header value", i); goto done; }
            if (hv > c.end - c.p) { corrupt("bad header value length", i); goto done; }
            if (hv > 0) c.p += hv;
        }
        if (c.p - h.start != h.length) { corrupt("record size does not match its length", i); goto done; }
        op[i] = off;
    }
    if (c.p != c.end) {
        PyErr_Format(PyExc_ValueError, "%zd unconsumed bytes after all records consumed",
                     (Py_ssize_t)(c.end - c.p));
        goto done;
    }
    out = PyTuple_Pack(3, offs, keys, vals);
done:
    Py_XDECREF(offs);
    Py_XDECREF(keys);
    Py_XDECREF(vals);
    PyBuffer_Release(&view);
    return out;
}

/* ---- build: a record batch from keys and values (the producer side) ---- */

static inline Py_ssize_t varint_size(int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    Py_ssize_t n = 1;
    while (z >= 0x80) { z >>= 7; n++; }
    return n;
}

static inline unsigned char *put_varint(unsigned char *p, int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    while (z >= 0x80) { *p++ = (unsigned char)(z | 0x80); z >>= 7; }
    *p++ = (unsigned char)z;
    return p;
}

static inline unsigned char *put_be(unsigned char *p, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--) *p++ = (unsigned char)(v >> (8 * i));
    return p;
}

#define V2_HEADER 61

/* build_v2(keys: list[bytes | None], values: list[bytes | None], timestamp_ms: int) -> bytearray
 * One uncompressed v2 record batch, every record with `timestamp_ms` (CreateTime), no headers, no
 * producer id (not idempotent), base offset 0 (the broker assigns it). The CRC field is left 0: the
 * caller computes CRC-32C over bytes 21.. and writes it at byte 17. */
static PyObject *build_v2(PyObject *self, PyObject *args) {
    PyObject *keys, *values;
    long long ts;
    if (!PyArg_ParseTuple(args, "O!O!L", &PyList_Type, &keys, &PyList_Type, &values, &ts)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (n != PyList_GET_SIZE(values) || n == 0 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "keys and values: equal, non-empty lengths");
        return NULL;
    }
    /* sizes first, so the buffer is allocated once */
    Py_ssize_t total = V2_HEADER;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i), *v = PyList_GET_ITEM(values, i);
        if ((k != Py_None && !PyBytes_Check(k)) || (v != Py_None && !PyBytes_Check(v))) {
            PyErr_Format(PyExc_TypeError, "record %zd: key and value must be bytes or None", i);
            return NULL;
        }
        int64_t kl = k == Py_None ? -1 : (int64_t)PyBytes_GET_SIZE(k);
        int64_t vl = v == Py_None ? -1 : (int64_t)PyBytes_GET_SIZE(v);
        int64_t body = 1 + 1 + varint_size(i) + varint_size(kl) + (kl > 0 ? kl : 0) + varint_size(vl)
                       + (vl > 0 ? vl : 0) + 1;
        total += varint_size(body) + body;
    }
    PyObject *out = PyByteArray_FromStringAndSize(NULL, total);
    if (!out) return NULL;
    unsigned char *b = (unsigned char *)PyByteArray_AS_STRING(out), *p = b;
    p = put_be(p, 0, 8);                            /* base offset: the broker's */
    p = put_be(p, (uint64_t)(total - 12), 4);       /* length of the rest */
    p = put_be(p, 0, 4);                            /* partition leader epoch: the broker's */
    *p++ = 2;                                       /* magic */
    p = put_be(p, 0, 4);                            /* CRC: the caller's */
    p = put_be(p, 0, 2);                            /* attributes: no compression, CreateTime */
    p = put_be(p, (uint64_t)(n - 1), 4);            /* last offset delta */
    p = put_be(p, (uint64_t)ts, 8);                 /* first timestamp */
    p = put_be(p, (uint64_t)ts, 8);                 /* max timestamp */
    p = put_be(p, (uint64_t)-1, 8);                 /* producer id: none */
    p = put_be(p, (uint64_t)-1, 2);                 /* producer epoch: none */
    p = put_be(p, (uint64_t)-1, 4);                 /* base sequence: none */
    p = put_be(p, (uint64_t)n, 4);                  /* record count */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i), *v = PyList_GET_ITEM(values, i);
        int64_t kl = k == Py_None ? -1 : (int64_t)PyBytes_GET_SIZE(k);
        int64_t vl = v == Py_None ? -1 : (int64_t)PyBytes_GET_SIZE(v);
        int64_t body = 1 + 1 + varint_size(i) + varint_size(kl) + (kl > 0 ? kl : 0) + varint_size(vl)
                       + (vl > 0 ? vl : 0) + 1;
        p = put_varint(p, body);
        *p++ = 0;                                   /* record attributes */
        *p++ = 0;                                   /* timestamp delta: 0 (one varint byte) */
        p = put_varint(p, i);                       /* offset delta */
        p = put_varint(p, kl);
        if (kl > 0) { memcpy(p, PyBytes_AS_STRING(k), (size_t)kl); p += kl; }
        p = put_varint(p, vl);
        if (vl > 0) { memcpy(p, PyBytes_AS_STRING(v), (size_t)vl); p += vl; }
        *p++ = 0;                                   /* header count: 0 (one varint byte) */
    }
    if (p - b != total) {  /* cannot happen: the sizes above are the sizes written */
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "build_v2: size mismatch");
        return NULL;
    }
    return out;
}

/* one accessor call: a new reference, NULL with an exception */
static inline PyObject *call1(PyObject *f, PyObject *m) { return PyObject_Vectorcall(f, &m, 1, NULL); }

static inline int call_ll(PyObject *f, PyObject *m, long long *out) {
    PyObject *r = call1(f, m);
    if (!r) return -1;
    *out = PyLong_AsLongLong(r);
    Py_DECREF(r);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *message_columns(PyObject *self, PyObject *args) {
    PyObject *msgs, *f_err, *f_part, *f_off, *f_val;
    if (!PyArg_ParseTuple(args, "O!OOOO", &PyList_Type, &msgs, &f_err, &f_part, &f_off, &f_val)) return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(msgs);
    PyObject *parts = PyBytes_FromStringAndSize(NULL, n * 8), *offs = PyBytes_FromStringAndSize(NULL, n * 8);
    PyObject *vals = PyList_New(n), *result = NULL;
    if (!parts || !offs || !vals) goto done;
    int64_t *pp = (int64_t *)PyBytes_AS_STRING(parts), *op = (int64_t *)PyBytes_AS_STRING(offs);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_SIZE(msgs) != n) {  /* only an accessor written in Python could do it */
            PyErr_SetString(PyExc_RuntimeError, "the message list changed size during message_columns");
            goto done;
        }
        PyObject *m = PyList_GET_ITEM(msgs, i);
        Py_INCREF(m);  /* held through the calls, whatever they do to the list */
        PyObject *e = call1(f_err, m);
        const int failed = e != NULL && e != Py_None;
        Py_XDECREF(e);
        long long p = 0, o = 0;
        PyObject *v = e == NULL || failed || call_ll(f_part, m, &p) < 0 || call_ll(f_off, m, &o) < 0 ? NULL
                                                                                                : call1(f_val, m);
        Py_DECREF(m);
        if (failed) { result = Py_None; Py_INCREF(result); goto done; }
        if (!v) goto done;
        pp[i] = p;
        op[i] = o;
        PyList_SET_ITEM(vals, i, v);  /* steals; the unset tail stays NULL, which list_dealloc skips */
    }
    result = PyTuple_Pack(3, parts, offs, vals);
done:
    Py_XDECREF(parts);
    Py_XDECREF(offs);
    Py_XDECREF(vals);
    return result;
}

static PyMethodDef methods[] = {
    {"message_columns", message_columns, METH_VARARGS,
     "confluent-kafka Messages as (partitions, offsets, values) columns, or None when one carries an error."},
    {"parse_v2", parse_v2, METH_VARARGS, "Records of a v2 record batch as ConsumerRecord tuples."},
    {"parse_v2_columns", parse_v2_columns, METH_VARARGS,
     "Records of a v2 record batch as (offsets, keys, values) columns."},
    {"build_v2", build_v2, METH_VARARGS, "An uncompressed v2 record batch from keys and values (CRC left 0)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kafkarecords", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kafkarecords(void) { return PyModule_Create(&module); }
