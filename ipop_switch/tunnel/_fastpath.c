/* The datapath's per-segment loops in C (optional: ipop_switch/tunnel/accel.py).
 *
 * Python pays ~1.6 us per sent and ~2.4 us per received MSS segment in interpreter
 * overhead around one AES-GCM call (docs/benchmarks.md, "What limits the datapath").
 * This module does the same work per *group* of segments, with the same bytes on the
 * wire and the same frames written to the TAP as the Python code it replaces
 * (tests/test_fastpath.py checks that, one against the other):
 *
 *  - TxKey.seal_tcp: cut a TSO super-frame into MSS segments and seal each as a data
 *    packet (header | AES-256-GCM ciphertext | tag), back to back, laid out for one UDP
 *    GSO send (send.Sender._send_super's Python loop).
 *  - RxState: a session's receive key and its replay window (codec.ReplayWindow's
 *    semantics exactly: a counter is taken at most once, nothing `size` or more behind
 *    the highest).
 *  - FastRx.open_burst: open consecutive TCP-segment data packets of one session from a
 *    UDP GRO buffer and coalesce contiguous ones into one GSO frame (gso.Coalescer's
 *    rules; a segment the sender marked FMT_CONT with the next counter is decrypted
 *    straight behind the run's payload). A packet whose tag fails is consumed and
 *    reported (`bad`, counted as an `auth` drop by the caller: a forgery costs one
 *    decryption, not two). It stops, consuming nothing, at anything else (another
 *    session, another format, a replay): the Python path then handles that packet and
 *    counts the drop. A segment it authenticated but cannot coalesce (a pure ACK,
 *    SYN/RST/URG, a bad layout) is handed back to Python.
 *
 *  - recv_many (_recvmany.h): read a link's UDP socket with recvmmsg, single data packets
 *    of one sender glued into one run as UDP GRO would have (a relay sends one by one).
 *
 *  Objects made with __new__ alone, or whose __init__ failed, raise RuntimeError
 *  from every method instead of using a missing key or window.
 *
 * Nothing here trusts the peer beyond the AEAD: lengths are checked before every copy,
 * and merged frames are validated again by gso.check_vnet before a TAP write.
 * AES-GCM is OpenSSL's (libcrypto, the same library the `cryptography` package wraps).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <string.h>

#define TYPE_DATA 0xE3
#define FMT_SEG 0x03            /* CSUM | TCP */
#define FMT_CONT_SEG 0x07       /* CSUM | TCP | CONT */
#define HDR 16
#define TAG 16
#define ETH_LEN 14
#define ETH_IPV4 0x0800
#define ETH_IPV6 0x86DD
#define MAX_IP 65535
#define RUN_CAP (ETH_LEN + MAX_IP)
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_URG 0x20
#define TCP_CWR 0x80
#define MERGE_STOP (TCP_SYN | TCP_RST | TCP_URG)
#define PSH_FIN (TCP_PSH | TCP_FIN)
#define KEY_FLAGS_MASK ((uint8_t)~(TCP_PSH | TCP_FIN | TCP_CWR))
#define JOIN_FLAGS_MASK ((uint8_t)(KEY_FLAGS_MASK | TCP_CWR))

#include "_recvmany.h"          /* recv_many: a socket's datagrams, single data packets glued */

#define VNET_NEEDS_CSUM 1
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define REJECT_AFTER (UINT64_MAX - (1ULL << 13))   /* codec.REJECT_AFTER_MESSAGES: 2^64 - 2^13 - 1 */

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }
static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

/* gso._sum_words: the big-endian 16-bit words summed modulo 0xFFFF (odd tail padded). */
static uint32_t sum_words(const uint8_t *p, size_t n) {
    uint64_t s = 0;
    for (; n > 1; p += 2, n -= 2) s += get16(p);
    if (n) s += (uint32_t)p[0] << 8;
    return (uint32_t)(s % 0xFFFF);
}
static inline uint32_t fold(uint64_t s) {
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;
}
static inline void nonce_of(uint8_t iv[12], uint64_t counter) { memset(iv, 0, 4); put64(iv + 4, counter); }

/* ---- TxKey -------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
} TxKey;

static EVP_CIPHER_CTX *new_ctx(PyObject *key, int enc) {
    Py_buffer k;
    if (PyObject_GetBuffer(key, &k, PyBUF_SIMPLE) < 0) return NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    if (k.len != 32) {
        PyErr_SetString(PyExc_ValueError, "AES-256-GCM needs a 32-byte key");
    } else if (!(ctx = EVP_CIPHER_CTX_new()) ||
               EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, k.buf, NULL, enc) != 1) {
        if (ctx) EVP_CIPHER_CTX_free(ctx);
        ctx = NULL;
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL: AES-256-GCM set-up failed");
    }
    PyBuffer_Release(&k);
    return ctx;
}

/* A failed __init__ (also a second one) leaves the object as it was; methods of an object
 * never initialised (TxKey.__new__(TxKey)) raise instead of touching a NULL context. */
static int TxKey_init(TxKey *self, PyObject *args, PyObject *kw) {
    PyObject *key;
    if (!PyArg_ParseTuple(args, "O", &key)) return -1;
    EVP_CIPHER_CTX *ctx = new_ctx(key, 1);
    if (!ctx) return -1;
    if (self->ctx) EVP_CIPHER_CTX_free(self->ctx);
    self->ctx = ctx;
    return 0;
}

static int not_ready(const void *ptr, const char *what) {
    if (ptr) return 0;
    PyErr_Format(PyExc_RuntimeError, "%s: not initialised (call __init__ with a key)", what);
    return 1;
}

static void TxKey_dealloc(TxKey *self) {
    if (self->ctx) EVP_CIPHER_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One data packet: out = aad(16) | ciphertext of (a[0:na] + b[0:nb]) | tag. */
static int seal_one(EVP_CIPHER_CTX *ctx, uint64_t counter, uint8_t *out,
                    const uint8_t *a, int na, const uint8_t *b, int nb) {
    uint8_t iv[12];
    int l;
    nonce_of(iv, counter);
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1) return 0;
    if (EVP_EncryptUpdate(ctx, NULL, &l, out, HDR) != 1) return 0;
    if (EVP_EncryptUpdate(ctx, out + HDR, &l, a, na) != 1) return 0;
    if (nb && EVP_EncryptUpdate(ctx, out + HDR + na, &l, b, nb) != 1) return 0;
    if (EVP_EncryptFinal_ex(ctx, out + HDR + na + nb, &l) != 1) return 0;
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, out + HDR + na + nb) == 1;
}

PyDoc_STRVAR(seal_tcp_doc,
"seal_tcp(frame, po, t, gso_size, i0, i1, counter0, prefix, prefix_next, out, channel=-1) -> int\n\n"
"Segments i0..i1-1 of the TCP super-frame `frame` (Ethernet | IPv4/IPv6 | TCP at `t` |\n"
"payload at `po`, cut every `gso_size` bytes), each sealed with counter counter0 + i\n"
"behind the 8-byte `prefix` (segment 0) or `prefix_next` (the others), written back to\n"
"back into `out`. With `channel` 0x4000..0x7FFF each datagram is preceded by its TURN\n"
"ChannelData header (channel, length: 4 bytes, big-endian; no padding over UDP).\n"
"Returns the bytes written. Same output as gso.segment + Session.seal.");

static PyObject *TxKey_seal_tcp(TxKey *self, PyObject *args) {
    Py_buffer fr, pre, pnx, out;
    Py_ssize_t po, t, gso, i0, i1;
    unsigned long long counter0;
    int chan = -1;
    PyObject *res = NULL;
    if (not_ready(self->ctx, "TxKey")) return NULL;
    if (!PyArg_ParseTuple(args, "y*nnnnnKy*y*w*|i", &fr, &po, &t, &gso, &i0, &i1, &counter0,
                          &pre, &pnx, &out, &chan))
        return NULL;
    const int ch = chan >= 0 ? 4 : 0;           /* ChannelData header per datagram */
    const uint8_t *f = fr.buf;
    Py_ssize_t flen = fr.len, plen = flen - po;
    int v4 = flen >= ETH_LEN && get16(f + 12) == ETH_IPV4;
    if (pre.len != 8 || pnx.len != 8 || gso <= 0 || t < ETH_LEN + 20 || po < t + 20 || po > flen ||
        po > 255 || (!v4 && t != ETH_LEN + 40) || (chan >= 0 && (chan < 0x4000 || chan > 0x7FFF))) {
        PyErr_SetString(PyExc_ValueError, "seal_tcp: bad layout");
        goto done;
    }
    Py_ssize_t n = plen > 0 ? (plen + gso - 1) / gso : 1;
    if (i0 < 0 || i1 > n || i0 >= i1) {
        PyErr_SetString(PyExc_ValueError, "seal_tcp: bad segment range");
        goto done;
    }
    Py_ssize_t need = 0;
    for (Py_ssize_t i = i0; i < i1; i++)
        need += ch + HDR + TAG + po + (i == n - 1 ? plen - i * gso : gso);
    if (need > out.len) {
        PyErr_SetString(PyExc_ValueError, "seal_tcp: output buffer too small");
        goto done;
    }
    uint8_t h[256];
    memcpy(h, f, (size_t)po);
    const int ip = ETH_LEN, ip_hlen = (int)(t - ETH_LEN), tcp_hlen = (int)(po - t);
    uint32_t seq0 = get32(f + t + 4), id0 = 0, base = 0, addr;
    uint8_t flags0 = f[t + 13];
    if (v4) {
        id0 = get16(f + ip + 4);
        put16(h + ip + 2, 0); put16(h + ip + 4, 0); put16(h + ip + 10, 0);
        base = sum_words(h + ip, (size_t)ip_hlen);
        addr = sum_words(f + ip + 12, 8);
    } else {
        addr = sum_words(f + ip + 8, 32);
    }
    uint8_t f_mid = flags0 & (uint8_t)~(TCP_FIN | TCP_PSH | TCP_CWR);
    uint8_t f_first = f_mid | (flags0 & TCP_CWR);
    uint8_t f_last = n == 1 ? flags0 : (uint8_t)(f_mid | (flags0 & PSH_FIN));
    uint8_t *o = out.buf;
    for (Py_ssize_t i = i0; i < i1; i++) {
        int clen = (int)(i == n - 1 ? plen - i * gso : gso);
        uint32_t tcp_len = (uint32_t)(tcp_hlen + clen);
        if (v4) {
            uint32_t total = (uint32_t)ip_hlen + tcp_len, id = (id0 + (uint32_t)i) & 0xFFFF;
            put16(h + ip + 2, total);
            put16(h + ip + 4, id);
            put16(h + ip + 10, ~fold((uint64_t)base + total + id) & 0xFFFF);
        } else {
            put16(h + ip + 4, tcp_len);
        }
        put32(h + t + 4, seq0 + (uint32_t)(i * gso));
        h[t + 13] = i == n - 1 ? f_last : (i ? f_mid : f_first);
        put16(h + t + 16, fold((uint64_t)addr + 6 + tcp_len));
        if (ch) {
            put16(o, (uint32_t)chan);
            put16(o + 2, (uint32_t)(HDR + TAG + po + clen));
            o += ch;
        }
        memcpy(o, i ? pnx.buf : pre.buf, 8);
        put64(o + 8, counter0 + (uint64_t)i);
        if (!seal_one(self->ctx, counter0 + (uint64_t)i, o, h, (int)po, f + po + i * gso, clen)) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL: AES-GCM encryption failed");
            goto done;
        }
        o += HDR + TAG + po + clen;
    }
    res = PyLong_FromSsize_t(need);
done:
    PyBuffer_Release(&fr); PyBuffer_Release(&pre); PyBuffer_Release(&pnx); PyBuffer_Release(&out);
    return res;
}

static PyMethodDef TxKey_methods[] = {
    {"seal_tcp", (PyCFunction)TxKey_seal_tcp, METH_VARARGS, seal_tcp_doc},
    {NULL}
};

static PyTypeObject TxKeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipop_switch.tunnel._fastpath.TxKey",
    .tp_doc = PyDoc_STR("TxKey(key): a session's AES-256-GCM send key."),
    .tp_basicsize = sizeof(TxKey),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)TxKey_init,
    .tp_dealloc = (destructor)TxKey_dealloc,
    .tp_methods = TxKey_methods,
};

/* ---- RxState: receive key + replay window ---------------------------------------- */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    uint64_t highest;
    int any;                    /* something was received (Python: highest >= 0) */
    uint32_t size, nbits;       /* window size; ring bits (size rounded up to 64) */
    uint64_t *bits;             /* bit (c % nbits): counter c was received */
} RxState;

static int RxState_init(RxState *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"key", "size", NULL};
    PyObject *key;
    long size = 2048;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|l", kwlist, &key, &size)) return -1;
    if (size < 1 || size > (1L << 20)) {
        PyErr_SetString(PyExc_ValueError, "replay window size must be 1 .. 2^20");
        return -1;
    }
    /* everything new is made first: a failed (second) __init__ leaves the old state */
    uint32_t nbits = (uint32_t)((size + 63) / 64 * 64);
    EVP_CIPHER_CTX *ctx = new_ctx(key, 0);
    if (!ctx) return -1;
    uint64_t *bits = PyMem_Calloc(nbits / 64, 8);
    if (!bits) { EVP_CIPHER_CTX_free(ctx); PyErr_NoMemory(); return -1; }
    if (self->ctx) EVP_CIPHER_CTX_free(self->ctx);
    PyMem_Free(self->bits);
    self->ctx = ctx;
    self->bits = bits;
    self->size = (uint32_t)size;
    self->nbits = nbits;
    self->highest = 0;
    self->any = 0;
    return 0;
}

/* RxState.__new__(RxState) has no key and no window (nbits 0: a division by zero). */
static inline int rx_not_ready(RxState *self) { return not_ready(self->bits, "RxState"); }

static void RxState_dealloc(RxState *self) {
    if (self->ctx) EVP_CIPHER_CTX_free(self->ctx);
    PyMem_Free(self->bits);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int bit_get(RxState *w, uint64_t c) {
    uint64_t i = c % w->nbits;
    return (int)(w->bits[i >> 6] >> (i & 63) & 1);
}
static inline void bit_set(RxState *w, uint64_t c) {
    uint64_t i = c % w->nbits;
    w->bits[i >> 6] |= 1ULL << (i & 63);
}
static inline void bit_clear(RxState *w, uint64_t c) {
    uint64_t i = c % w->nbits;
    w->bits[i >> 6] &= ~(1ULL << (i & 63));
}

static inline int win_check(RxState *w, uint64_t c) {
    if (c > REJECT_AFTER) return 0;
    if (!w->any || c > w->highest) return 1;
    uint64_t off = w->highest - c;
    return off < w->size && !bit_get(w, c);
}

/* Only after win_check and a verified tag (a forged packet never moves the window). */
static inline void win_update(RxState *w, uint64_t c) {
    if (!w->any || c > w->highest) {
        uint64_t shift = w->any ? c - w->highest : UINT64_MAX;
        if (shift >= w->nbits) {
            memset(w->bits, 0, w->nbits / 8);
        } else {
            for (uint64_t x = w->highest + 1; x != c; x++) bit_clear(w, x);
        }
        w->highest = c;
        w->any = 1;
    }
    bit_set(w, c);
}

static int counter_arg(PyObject *o, uint64_t *c) {
    if (!PyLong_Check(o)) { PyErr_SetString(PyExc_TypeError, "counter must be an int"); return -1; }
    if (_PyLong_Sign(o) < 0) { *c = UINT64_MAX; return 1; }      /* negative: never valid */
    *c = PyLong_AsUnsignedLongLong(o);
    if (*c == (uint64_t)-1 && PyErr_Occurred()) { PyErr_Clear(); *c = UINT64_MAX; }
    return 0;
}

static PyObject *RxState_check(RxState *self, PyObject *o) {
    uint64_t c;
    if (rx_not_ready(self)) return NULL;
    int r = counter_arg(o, &c);
    if (r < 0) return NULL;
    return PyBool_FromLong(win_check(self, c));
}

static PyObject *RxState_update(RxState *self, PyObject *o) {
    uint64_t c;
    if (rx_not_ready(self)) return NULL;
    int r = counter_arg(o, &c);
    if (r < 0) return NULL;
    if (!win_check(self, c)) Py_RETURN_FALSE;
    win_update(self, c);
    Py_RETURN_TRUE;
}

static PyObject *RxState_highest(RxState *self, void *closure) {
    if (!self->any) return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLongLong(self->highest);
}
static PyObject *RxState_size(RxState *self, void *closure) { return PyLong_FromUnsignedLong(self->size); }

static PyMethodDef RxState_methods[] = {
    {"check", (PyCFunction)RxState_check, METH_O, "True if the counter may still be accepted."},
    {"update", (PyCFunction)RxState_update, METH_O, "Record the counter; False (no change) for a replay."},
    {NULL}
};
static PyGetSetDef RxState_getset[] = {
    {"highest", (getter)RxState_highest, NULL, "highest counter received, -1 for none", NULL},
    {"size", (getter)RxState_size, NULL, "window size", NULL},
    {NULL}
};

static PyTypeObject RxStateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipop_switch.tunnel._fastpath.RxState",
    .tp_doc = PyDoc_STR("RxState(key, size=2048): a session's receive key and replay window "
                        "(codec.ReplayWindow's check/update)."),
    .tp_basicsize = sizeof(RxState),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RxState_init,
    .tp_dealloc = (destructor)RxState_dealloc,
    .tp_methods = RxState_methods,
    .tp_getset = RxState_getset,
};

/* Decrypt a data packet (aad = its 16-byte header) whose plaintext goes to a[0:na] and
 * b[0:nb]; 1 if the tag verified. On failure the outputs hold garbage (callers only
 * write where nothing is committed yet). */
static int open_one(EVP_CIPHER_CTX *ctx, uint64_t counter, const uint8_t *pkt, Py_ssize_t clen,
                    uint8_t *a, int na, uint8_t *b) {
    uint8_t iv[12], tag[TAG];
    int l, nb = (int)clen - na;
    nonce_of(iv, counter);
    memcpy(tag, pkt + HDR + clen, TAG);
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1) return 0;
    if (EVP_DecryptUpdate(ctx, NULL, &l, pkt, HDR) != 1) return 0;
    if (na && EVP_DecryptUpdate(ctx, a, &l, pkt + HDR, na) != 1) return 0;
    if (nb && EVP_DecryptUpdate(ctx, b, &l, pkt + HDR + na, nb) != 1) return 0;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, tag) != 1) return 0;
    return EVP_DecryptFinal_ex(ctx, tag, &l) == 1;
}

/* ---- FastRx: open + coalesce ----------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *run;              /* bytes of RUN_CAP being filled (the open run), or NULL */
    PyObject *spare;            /* bytes of RUN_CAP to decrypt the next run start into */
    PyObject *run_rx;           /* the session the run's last segment came from */
    Py_ssize_t len;             /* bytes of the run so far */
    int nseg, t, po, v4, mss, room, open;
    uint8_t kflags, last_flags;
    uint32_t next_seq;
    uint64_t next_counter;
} FastRx;

static void FastRx_dealloc(FastRx *self) {
    Py_XDECREF(self->run); Py_XDECREF(self->spare); Py_XDECREF(self->run_rx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *vnet_hdr(uint8_t gso_type, int hdr_len, int gso_size, int cs) {
    uint8_t v[10] = {VNET_NEEDS_CSUM, gso_type, (uint8_t)hdr_len, (uint8_t)(hdr_len >> 8),
                     (uint8_t)gso_size, (uint8_t)(gso_size >> 8), (uint8_t)cs, (uint8_t)(cs >> 8), 16, 0};
    return PyBytes_FromStringAndSize((const char *)v, 10);
}

/* End the open run: append (vnet header, frame) to `out`, as gso.Coalescer._end_run. */
static int end_run(FastRx *self, PyObject *out) {
    if (!self->run) return 0;
    PyObject *frame = self->run, *vh;
    self->run = NULL;
    self->open = 0;
    Py_CLEAR(self->run_rx);
    uint8_t *f = (uint8_t *)PyBytes_AS_STRING(frame);
    int t = self->t, len = (int)self->len;
    if (self->nseg == 1) {
        vh = vnet_hdr(0, 0, 0, t);
    } else {
        f[t + 13] = f[t + 13] | (self->last_flags & PSH_FIN);
        uint32_t addr;
        if (self->v4) {
            put16(f + ETH_LEN + 2, (uint32_t)(len - ETH_LEN));
            uint32_t s = sum_words(f + ETH_LEN, (size_t)(t - ETH_LEN));   /* gso.ipv4_header_checksum */
            uint32_t v = s + 0xFFFF - get16(f + ETH_LEN + 10);
            put16(f + ETH_LEN + 10, ~fold(v) & 0xFFFF);
            addr = sum_words(f + ETH_LEN + 12, 8);
        } else {
            put16(f + ETH_LEN + 4, (uint32_t)(len - t));
            addr = sum_words(f + ETH_LEN + 8, 32);
        }
        put16(f + t + 16, fold((uint64_t)addr + 6 + (uint32_t)(len - t)));
        vh = vnet_hdr(self->v4 ? GSO_TCPV4 : GSO_TCPV6, self->po, self->mss, t);
    }
    if (!vh || _PyBytes_Resize(&frame, len) < 0) { Py_XDECREF(vh); Py_XDECREF(frame); return -1; }
    PyObject *pair = PyTuple_Pack(2, vh, frame);
    Py_DECREF(vh); Py_DECREF(frame);
    if (!pair) return -1;
    int r = PyList_Append(out, pair);
    Py_DECREF(pair);
    return r;
}

/* The key bytes two segments of one run share (gso._run_structs): all of the headers but
 * IP length/id/checksum, TCP seq/flags/checksum. Equal keys imply an equal layout. */
static int same_key(const uint8_t *a, const uint8_t *b, int v4, int t, int po) {
    if (v4) {
        if (memcmp(a, b, 16) || memcmp(a + 20, b + 20, 4) || memcmp(a + 26, b + 26, (size_t)(t + 4 - 26)))
            return 0;
    } else if (memcmp(a, b, 18) || memcmp(a + 20, b + 20, (size_t)(t + 4 - 20))) {
        return 0;
    }
    return !memcmp(a + t + 8, b + t + 8, 5) && !memcmp(a + t + 14, b + t + 14, 2) &&
           !memcmp(a + t + 18, b + t + 18, (size_t)(po - t - 18));
}

/* The run took a segment of `plen` payload bytes with `flags` (already copied behind it). */
static inline void grow(FastRx *self, int plen, uint8_t flags) {
    self->len += plen;
    self->nseg++;
    self->room -= plen;
    self->open = plen == self->mss && !(flags & PSH_FIN);
    self->last_flags = flags;
    self->next_seq += (uint32_t)plen;
}

/* A decrypted segment p[0:n] (in self->spare) that starts no run of the one open: join it
 * (1), start a run with it (2), or leave it for Python (0: not a segment we coalesce). */
static int place(FastRx *self, const uint8_t *p, int n, int cs, PyObject *out) {
    if (n < ETH_LEN + 40) return 0;
    int et = get16(p + 12), t, v4, ip_ok;
    if (et == ETH_IPV4) {
        int ihl = (p[14] & 0xF) * 4;
        if (p[14] >> 4 != 4 || ihl < 20 || p[23] != 6) return 0;
        t = ETH_LEN + ihl; v4 = 1;
        ip_ok = get16(p + 16) == n - ETH_LEN;
    } else if (et == ETH_IPV6) {
        if (p[20] != 6) return 0;
        t = ETH_LEN + 40; v4 = 0;
        ip_ok = get16(p + 18) == n - t;
    } else {
        return 0;
    }
    if (n < t + 20) return 0;
    int po = t + (p[t + 12] >> 4) * 4;
    if (po < t + 20 || n < po || cs != t) return 0;
    int plen = n - po;
    uint8_t flags = p[t + 13];
    if (plen == 0 || flags & MERGE_STOP || !ip_ok) return 0;
    uint32_t seq = get32(p + t + 4);
    if (self->open && self->t == t && self->po == po && seq == self->next_seq && plen <= self->mss &&
        plen <= self->room && (flags & JOIN_FLAGS_MASK) == self->kflags &&
        same_key((const uint8_t *)PyBytes_AS_STRING(self->run), p, v4, t, po)) {
        memcpy(PyBytes_AS_STRING(self->run) + self->len, p + po, (size_t)plen);
        grow(self, plen, flags);
        return 1;
    }
    if (end_run(self, out) < 0) return -1;
    self->run = self->spare;            /* p lives in spare: it becomes the run */
    self->spare = NULL;
    self->len = n; self->nseg = 1;
    self->t = t; self->po = po; self->v4 = v4; self->mss = plen;
    self->room = MAX_IP - (po - ETH_LEN + plen);
    self->kflags = flags & KEY_FLAGS_MASK;
    self->last_flags = flags;
    self->open = !(flags & PSH_FIN);
    self->next_seq = seq + (uint32_t)plen;
    return 2;
}

PyDoc_STRVAR(open_burst_doc,
"open_burst(rx, key, data, o, seg, out) -> (o, got, plain, fmt, cs, bad)\n\n"
"Open the data packets of session `rx` (receiver index bytes `key`) in `data` from\n"
"offset `o`, each `seg` bytes but the last, while they are TCP segments (FMT_SEG or\n"
"FMT_CONT_SEG) with a fresh counter and a valid tag; coalesce them, ending runs into\n"
"`out` as (vnet header, frame). Returns where it stopped, how many it authenticated,\n"
"and, when the last one authenticated is not a segment it coalesces, that plaintext\n"
"with its format and csum_start for the Python path (plain is None otherwise); the run\n"
"stays open, for gso.Coalescer (whose `fast` this is) to end if it writes that one.\n"
"`bad`: packets whose tag failed, consumed here (decrypted once; the caller counts them\n"
"as `auth` drops).");

static PyObject *FastRx_open_burst(FastRx *self, PyObject *args) {
    PyObject *rxo, *out;
    Py_buffer key, d;
    Py_ssize_t o, seg;
    if (!PyArg_ParseTuple(args, "O!y*y*nnO!", &RxStateType, &rxo, &key, &d, &o, &seg, &PyList_Type, &out))
        return NULL;
    RxState *rx = (RxState *)rxo;
    const uint8_t *data = d.buf;
    Py_ssize_t n = d.len, got = 0, bad = 0;
    PyObject *plain = NULL;
    int pfmt = 0, pcs = 0, err = 0;
    if (rx_not_ready(rx)) {
        err = 1;
        goto done;
    }
    if (key.len != 4 || seg <= 0 || o < 0) {
        PyErr_SetString(PyExc_ValueError, "open_burst: bad arguments");
        err = 1;
        goto done;
    }
    while (o < n) {
        Py_ssize_t e = o + seg < n ? o + seg : n, L = e - o;
        const uint8_t *pk = data + o;
        if (L < HDR + TAG || pk[0] != TYPE_DATA) break;
        int fmt = pk[1];
        if ((fmt != FMT_SEG && fmt != FMT_CONT_SEG) || memcmp(pk + 4, key.buf, 4)) break;
        uint64_t counter = get64(pk + 8);
        if (!win_check(rx, counter)) break;
        int cs = get16(pk + 2), clen = (int)(L - HDR - TAG), r;
        if (clen > RUN_CAP) break;
        /* where a segment that starts a run (or goes back to Python) is assembled */
        if (!self->spare && !(self->spare = PyBytes_FromStringAndSize(NULL, RUN_CAP))) { err = 1; break; }
        uint8_t *sp = (uint8_t *)PyBytes_AS_STRING(self->spare);
        if (fmt == FMT_CONT_SEG && self->open && self->run_rx == rxo && counter == self->next_counter &&
            clen > self->po && clen - self->po <= self->mss && clen - self->po <= self->room) {
            /* the marked next segment: headers to a scratch, payload straight behind the run */
            uint8_t h[256];
            int po = self->po, plen = clen - po;
            uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(self->run) + self->len;
            if (!open_one(rx->ctx, counter, pk, clen, h, po, dst)) {    /* garbage past len: not committed */
                bad++;
                o = e;
                continue;
            }
            win_update(rx, counter);
            got++;
            o = e;
            uint8_t flags = h[self->t + 13];
            if ((flags & JOIN_FLAGS_MASK) == self->kflags) {
                grow(self, plen, flags);
                self->next_counter = counter + 1;
                continue;
            }
            /* authenticated, but its flags do not join: the whole segment goes on alone */
            memcpy(sp, h, (size_t)po);
            memcpy(sp + po, dst, (size_t)plen);
            r = place(self, sp, clen, cs, out);
        } else {
            if (!open_one(rx->ctx, counter, pk, clen, sp, clen, NULL)) {
                bad++;
                o = e;
                continue;
            }
            win_update(rx, counter);
            got++;
            o = e;
            r = place(self, sp, clen, cs, out);
        }
        if (r < 0) { err = 1; break; }
        if (r) {
            if (self->run_rx != rxo) { Py_XINCREF(rxo); Py_XSETREF(self->run_rx, rxo); }
            self->next_counter = counter + 1;
            continue;
        }
        /* the open run stays open: Python ends it only if it writes this one (as gso.Coalescer) */
        plain = PyBytes_FromStringAndSize((const char *)sp, clen);
        pfmt = fmt; pcs = cs;
        break;
    }
done:
    PyBuffer_Release(&key); PyBuffer_Release(&d);
    if (err || (pfmt && !plain)) { Py_XDECREF(plain); return NULL; }
    if (!plain) return Py_BuildValue("nnOiin", o, got, Py_None, 0, 0, bad);
    return Py_BuildValue("nnNiin", o, got, plain, pfmt, pcs, bad);
}

static PyObject *FastRx_end_run(FastRx *self, PyObject *out) {
    if (!PyList_Check(out)) { PyErr_SetString(PyExc_TypeError, "end_run(out): out must be a list"); return NULL; }
    if (end_run(self, out) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *FastRx_has_run(FastRx *self, void *closure) { return PyBool_FromLong(self->run != NULL); }

static PyMethodDef FastRx_methods[] = {
    {"open_burst", (PyCFunction)FastRx_open_burst, METH_VARARGS, open_burst_doc},
    {"end_run", (PyCFunction)FastRx_end_run, METH_O, "Append the open run (if any) to the list `out`."},
    {NULL}
};
static PyGetSetDef FastRx_getset[] = {
    {"has_run", (getter)FastRx_has_run, NULL, "a run is open (not yet in an out list)", NULL},
    {NULL}
};

static PyTypeObject FastRxType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipop_switch.tunnel._fastpath.FastRx",
    .tp_doc = PyDoc_STR("FastRx(): one datapath's receive loop for TCP segments (see open_burst)."),
    .tp_basicsize = sizeof(FastRx),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)FastRx_dealloc,
    .tp_methods = FastRx_methods,
    .tp_getset = FastRx_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "The datapath's per-segment loops in C (see ipop_switch/tunnel/accel.py).", -1, recvmany_methods
};

PyMODINIT_FUNC PyInit__fastpath(void) {
#ifdef __GLIBC__
    /* Every coalesced run is a fresh 64 KiB frame, freed after its TAP write. With glibc's
     * default trim threshold (128 KiB) the heap's top is given back and the next run's pages
     * fault in again: ~8 % of a receiving worker's time (perf). Keep up to 4 MiB of free
     * heap instead (in the processes that import this: the workers, the agent). */
    mallopt(M_TRIM_THRESHOLD, 4 << 20);
#endif
    if (PyType_Ready(&TxKeyType) < 0 || PyType_Ready(&RxStateType) < 0 || PyType_Ready(&FastRxType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&TxKeyType); Py_INCREF(&RxStateType); Py_INCREF(&FastRxType);
    if (PyModule_AddObject(m, "TxKey", (PyObject *)&TxKeyType) < 0 ||
        PyModule_AddObject(m, "RxState", (PyObject *)&RxStateType) < 0 ||
        PyModule_AddObject(m, "FastRx", (PyObject *)&FastRxType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
