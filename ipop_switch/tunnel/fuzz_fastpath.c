/* libFuzzer harness for the datapath's C loops (_fastpath.c), built and run by
 * `ipop-switch bench --fuzz MINUTES` (ipop_switch/bench/fuzz.py), never by setup.py.
 *
 * Why this shape: _fastpath.c is a CPython extension, so the harness includes it whole
 * (one translation unit, every line instrumented by -fsanitize=address,undefined,fuzzer),
 * registers it as a built-in module and embeds the interpreter (Py_Initialize). Each input
 * is then driven through the extension's Python-facing methods, exactly as
 * tunnel/receive.py and tunnel/send.py call them. Python's allocator is switched to plain
 * malloc so that ASan sees every bytes object the C code writes into.
 *
 * The receive loop only looks past the AEAD tag of an authenticated packet, so the
 * harness *seals* the fuzzer's plaintexts with the session key: the fuzzer controls every
 * byte a hostile authenticated peer controls (format, csum_start, counter order, the
 * decrypted Ethernet/IP/TCP frame) and, per packet, can forge the tag, the receiver index
 * or the type byte instead. Input layout (anything shorter simply ends the input):
 *
 *   byte 0 (low 4 bits): mode. 0..5 receive (FastRx.open_burst over one or more GRO
 *           bursts; 9..15 too, as (mode - 9) % 6), 6 send (TxKey.seal_tcp with fuzzed
 *           layout arguments), 7 replay window (RxState.update/check with fuzzed counters
 *           and size), 8 the socket reader (recv_many over loopback; see fuzz_recv).
 *   receive: records [ctl u8][hlen u8][plen u16 BE][hlen bytes]: a plaintext of those
 *            hlen header bytes and plen bytes of filler (the C code copies payload, never
 *            reads it: inputs stay small while frames reach 64 KiB; plen below 0xF000 is
 *            taken modulo 2048, to keep most inputs MSS-sized and fast). The first record's
 *            length is the burst's segment size, later ones are cut or zero-padded to it
 *            but the last of a burst. ctl bits: 0-1 format (SEG, CONT_SEG, SEG with a
 *            csum_start from the plaintext's first bytes, CSUM only), 2 same counter again
 *            (replay), 3 counter jumps 4096 ahead, 4 forged tag, 5 other session's index,
 *            6 wrong type byte, 7 this record starts a new burst.
 *
 * Invariants checked beyond the sanitizers (abort() = a crash the bench reports): the
 * loop's returned offset stays within the burst, it never authenticates more packets than
 * it was given, and every frame it emits is a (10-byte vnet header, frame of at most
 * 14 + 65535 bytes) pair whose GSO fields describe the frame.
 */
#include "_fastpath.c"

#include <stdio.h>
#include <stdlib.h>

static PyObject *txkey_type, *rxstate_type, *fastrx_type, *recv_many_fn;
static PyObject *key_a, *key_b, *idx_a, *idx_b;
static EVP_CIPHER_CTX *seal_a, *seal_b;

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "fuzz_fastpath: invariant failed: %s (line %d)\n", #cond, __LINE__); abort(); } } while (0)

static EVP_CIPHER_CTX *enc_ctx(const uint8_t key[32]) {
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c || EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, NULL) != 1) abort();
    return c;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;         /* every object a plain malloc: ASan-checked */
    if (PyStatus_Exception(Py_PreInitialize(&pre))) abort();
    if (PyImport_AppendInittab("_fastpath", PyInit__fastpath) < 0) abort();
    PyConfig cfg;
    PyConfig_InitIsolatedConfig(&cfg);
    cfg.site_import = 0;
    cfg.install_signal_handlers = 0;                 /* libFuzzer's handlers stay */
    if (PyStatus_Exception(Py_InitializeFromConfig(&cfg))) abort();
    PyConfig_Clear(&cfg);
    PyObject *m = PyImport_ImportModule("_fastpath");
    if (!m) { PyErr_Print(); abort(); }
    txkey_type = PyObject_GetAttrString(m, "TxKey");
    rxstate_type = PyObject_GetAttrString(m, "RxState");
    fastrx_type = PyObject_GetAttrString(m, "FastRx");
    recv_many_fn = PyObject_GetAttrString(m, "recv_many");
    uint8_t ka[32], kb[32];
    for (int i = 0; i < 32; i++) { ka[i] = (uint8_t)(i * 7 + 1); kb[i] = (uint8_t)(i * 13 + 5); }
    key_a = PyBytes_FromStringAndSize((const char *)ka, 32);
    key_b = PyBytes_FromStringAndSize((const char *)kb, 32);
    idx_a = PyBytes_FromStringAndSize("\x11\x22\x33\x44", 4);
    idx_b = PyBytes_FromStringAndSize("\x55\x66\x77\x88", 4);
    seal_a = enc_ctx(ka);
    seal_b = enc_ctx(kb);
    if (!txkey_type || !rxstate_type || !fastrx_type || !recv_many_fn || !key_a || !key_b || !idx_a || !idx_b) abort();
    return 0;
}

/* A Python exception from the extension is a refusal, not a crash: clear it. */
static void clear(PyObject *r) {
    Py_XDECREF(r);
    if (PyErr_Occurred()) PyErr_Clear();
}

static void check_out(PyObject *out) {
    Py_ssize_t k = PyList_GET_SIZE(out);
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *pair = PyList_GET_ITEM(out, i);
        CHECK(PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2);
        PyObject *vh = PyTuple_GET_ITEM(pair, 0), *fr = PyTuple_GET_ITEM(pair, 1);
        CHECK(PyBytes_Check(vh) && PyBytes_GET_SIZE(vh) == 10 && PyBytes_Check(fr));
        const uint8_t *v = (const uint8_t *)PyBytes_AS_STRING(vh);
        Py_ssize_t flen = PyBytes_GET_SIZE(fr);
        int hdr = v[2] | v[3] << 8, gso = v[4] | v[5] << 8, cs = v[6] | v[7] << 8;
        CHECK(flen >= ETH_LEN + 40 && flen <= RUN_CAP);
        CHECK(v[0] == VNET_NEEDS_CSUM && v[8] == 16 && cs + 20 <= flen);
        if (v[1]) {
            CHECK(v[1] == GSO_TCPV4 || v[1] == GSO_TCPV6);
            CHECK(gso > 0 && hdr >= cs + 20 && hdr < flen && flen - hdr > gso);
        }
    }
}

/* Seal plaintext p[0:n] as a data packet at w (header + ciphertext + tag). */
static void put_packet(uint8_t *w, uint8_t ctl, int other, uint64_t counter, int cs,
                       const uint8_t *p, int n) {
    static const uint8_t fmts[4] = {FMT_SEG, FMT_CONT_SEG, FMT_SEG, 0x01};
    w[0] = ctl & 0x40 ? 0xE2 : TYPE_DATA;
    w[1] = fmts[ctl & 3];
    put16(w + 2, (uint32_t)cs);
    memcpy(w + 4, PyBytes_AS_STRING((ctl & 0x20) ^ (other << 5) ? idx_b : idx_a), 4);
    put64(w + 8, counter);
    if (!seal_one((ctl & 0x20) ^ (other << 5) ? seal_b : seal_a, counter, w, p, n, NULL, 0)) abort();
    if (ctl & 0x10) w[HDR + n] ^= 0x5A;            /* a forged tag */
}

/* csum_start as an honest sender computes it for the frame p[0:n]. */
static int csum_start(const uint8_t *p, int n) {
    if (n >= ETH_LEN + 1 && get16(p + 12) == ETH_IPV4) return ETH_LEN + (p[14] & 0xF) * 4;
    return ETH_LEN + 40;
}

#define MAX_BURST (512 * 1024)

/* One GRO burst of `count` packets (`seg` bytes but the last) through open_burst, as
 * receive.Receiver.receive drives it: at a stop, Python takes that one packet. */
static void run_burst(PyObject *fx, PyObject *rx, PyObject *idx, const uint8_t *burst,
                      Py_ssize_t n, Py_ssize_t seg, int count, PyObject *out) {
    PyObject *data = PyBytes_FromStringAndSize((const char *)burst, n);
    if (!data) abort();
    Py_ssize_t o = 0;
    int total = 0;
    while (o < n) {
        PyObject *r = PyObject_CallMethod(fx, "open_burst", "OOOnnO", rx, idx, data, o, seg, out);
        if (!r) { PyErr_Clear(); break; }
        Py_ssize_t o2, got, bad;
        PyObject *plain;
        int pfmt, pcs;
        CHECK(PyArg_ParseTuple(r, "nnOiin", &o2, &got, &plain, &pfmt, &pcs, &bad));
        CHECK(o2 >= o && o2 <= n && got >= 0 && bad >= 0);
        total += (int)(got + bad);
        CHECK(total <= count);
        if (plain != Py_None) {
            CHECK(PyBytes_Check(plain) && PyBytes_GET_SIZE(plain) + HDR + TAG <= seg);
            CHECK(pfmt == FMT_SEG || pfmt == FMT_CONT_SEG);
            o = o2;                         /* Python writes it, ending the run first */
            clear(PyObject_CallMethod(fx, "end_run", "O", out));
        } else if (o2 == o) {
            o = o + seg < n ? o + seg : n;  /* Python handles (drops) that one packet */
        } else {
            o = o2;
        }
        Py_DECREF(r);
        clear(PyObject_GetAttrString(fx, "has_run"));
    }
    Py_DECREF(data);
    PyObject *h = PyObject_GetAttrString(rx, "highest");
    CHECK(h && PyLong_Check(h));
    Py_DECREF(h);
}

static void fuzz_receive(const uint8_t *d, size_t size, int mode) {
    PyObject *rx_a = PyObject_CallFunction(rxstate_type, "O", key_a);
    PyObject *rx_b = PyObject_CallFunction(rxstate_type, "Oi", key_b, 64 + mode * 300);
    PyObject *fx = PyObject_CallNoArgs(fastrx_type);
    PyObject *out = PyList_New(0);
    static uint8_t burst[MAX_BURST], p[RUN_CAP + 256];   /* copied into bytes objects for the calls */
    if (!rx_a || !rx_b || !fx || !out) abort();
    size_t i = 1;
    uint64_t counter = (uint64_t)mode << 20;
    int other = 0, count = 0, seg = 0;
    Py_ssize_t n = 0;
    while (i + 4 <= size) {
        uint8_t ctl = d[i];
        int hlen = d[i + 1], plen = get16(d + i + 2);
        if (plen < 0xF000) plen %= 2048;    /* mostly MSS-sized; 0xF000.. for runs near 64 KiB */
        i += 4;
        if ((size_t)hlen > size - i) hlen = (int)(size - i);
        memcpy(p, d + i, (size_t)hlen);
        i += (size_t)hlen;
        int len = hlen + plen;
        for (int k = hlen; k < len; k++) p[k] = (uint8_t)(k * 31 + 7);
        if (ctl & 0x80 && count) {          /* a new burst, maybe for the other session */
            run_burst(fx, other ? rx_b : rx_a, other ? idx_b : idx_a, burst, n, seg, count, out);
            check_out(out);
            other ^= (ctl >> 2) & 1;
            n = 0; count = 0;
        }
        if (!count) seg = len + HDR + TAG;
        int clen = count ? seg - HDR - TAG : len;
        if (count && len < clen && i + 4 > size) clen = len;  /* the burst's last may be short */
        if (n + clen + HDR + TAG > MAX_BURST) break;
        if (clen > len) memset(p + len, 0, (size_t)(clen - len));
        if (ctl & 0x04) { if (counter) counter--; }
        else if (ctl & 0x08) counter += 4096;
        int cs = csum_start(p, clen);
        if ((ctl & 3) == 2 && clen >= 2) cs = get16(p);  /* a hostile csum_start */
        put_packet(burst + n, ctl, other, counter, cs, p, clen);
        counter++;
        n += clen + HDR + TAG;
        count++;
    }
    if (count) run_burst(fx, other ? rx_b : rx_a, other ? idx_b : idx_a, burst, n, seg, count, out);
    clear(PyObject_CallMethod(fx, "end_run", "O", out));
    check_out(out);
    Py_DECREF(out); Py_DECREF(fx); Py_DECREF(rx_a); Py_DECREF(rx_b);
}

/* seal_tcp with a fuzzed frame and layout: refused (ValueError) or written in bounds. */
static void fuzz_send(const uint8_t *d, size_t size) {
    if (size < 17) return;
    Py_ssize_t po = d[1], t = d[2], gso = get16(d + 3), i0 = d[5] % 8, i1 = d[6] % 64;
    unsigned long long counter0 = get64(d + 7);
    Py_ssize_t outlen = (Py_ssize_t)get16(d + 15) * 4;
    PyObject *tx = PyObject_CallFunction(txkey_type, "O", key_a);
    PyObject *frame = PyBytes_FromStringAndSize((const char *)d + 17, (Py_ssize_t)size - 17);
    PyObject *buf = PyByteArray_FromStringAndSize(NULL, outlen);
    if (!tx || !frame || !buf) abort();
    static const char pre[8] = {(char)0xE3, 0x03, 0x00, 0x22, 0x11, 0x22, 0x33, 0x44};
    static const char pnx[8] = {(char)0xE3, 0x07, 0x00, 0x22, 0x11, 0x22, 0x33, 0x44};
    PyObject *r = PyObject_CallMethod(tx, "seal_tcp", "OnnnnnKy#y#O", frame, po, t, gso, i0, i1, counter0,
                                      pre, (Py_ssize_t)8, pnx, (Py_ssize_t)8, buf);
    if (r) CHECK(PyLong_AsSsize_t(r) <= outlen);
    clear(r);
    Py_DECREF(buf); Py_DECREF(frame); Py_DECREF(tx);
}

/* The replay window: a counter update() took once is refused by check() and update(). */
static void fuzz_window(const uint8_t *d, size_t size) {
    if (size < 3) return;
    long wsize = 1 + (long)get16(d + 1) % 5000;
    PyObject *rx = PyObject_CallFunction(rxstate_type, "Ol", key_a, wsize);
    if (!rx) abort();
    for (size_t i = 3; i + 8 <= size; i += 8) {
        uint64_t c = get64(d + i);
        if (d[i] < 0xF0) c &= 0xFFFFF;          /* most near each other, some anywhere */
        PyObject *pc = PyLong_FromUnsignedLongLong(c);
        PyObject *r = PyObject_CallMethod(rx, "update", "O", pc);
        CHECK(r != NULL);
        if (r == Py_True) {
            PyObject *again = PyObject_CallMethod(rx, "check", "O", pc);
            CHECK(again == Py_False);
            Py_DECREF(again);
        }
        Py_DECREF(r);
        Py_DECREF(pc);
    }
    Py_DECREF(rx);
}

/* The socket reader: datagrams from the input over loopback, then recv_many in host or TURN
 * mode. Layout: byte 1 flags (bit 0 TURN mode, bit 1 a second sender, bits 2-7 `max`),
 * then records [len u16 BE][len bytes] (len taken modulo 1600), each one datagram; a record
 * whose first length byte has bit 7 set (and len > 0) goes out as a UDP GSO send of four
 * copies. Invariants: only (kind 0..2, bytes, seg, addr) tuples, 0 < seg <= len for a run,
 * no more bytes out than went in (ChannelData headers are removed, never added), and the
 * socket drained in a bounded number of calls before the next input. */
static int rx_sock = -1, tx_sock[2] = {-1, -1};
static struct sockaddr_in rx_addr;

static void udp_pair(void) {
    rx_sock = socket(AF_INET, SOCK_DGRAM, 0);
    rx_addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof rx_addr;
    int big = 8 << 20, on = 1;
    if (rx_sock < 0 || bind(rx_sock, (struct sockaddr *)&rx_addr, l) || getsockname(rx_sock, (struct sockaddr *)&rx_addr, &l))
        abort();
    setsockopt(rx_sock, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(rx_sock, RM_SOL_UDP, RM_UDP_GRO, &on, sizeof on);
    for (int i = 0; i < 2; i++)
        if ((tx_sock[i] = socket(AF_INET, SOCK_DGRAM, 0)) < 0) abort();
}

static void fuzz_recv(const uint8_t *d, size_t size) {
    if (size < 2) return;
    if (rx_sock < 0) udp_pair();
    int turn = d[1] & 1, maxn = 1 + (d[1] >> 2);
    static uint8_t gso_buf[4 * 1600];
    size_t sent = 0;
    for (size_t i = 2; i + 2 <= size;) {
        size_t len = get16(d + i) % 1600;
        int gso = (d[i] & 0x80) && len;
        const uint8_t *p = d + i + 2;
        i += 2;
        if (len > size - i) len = size - i;
        i += len;
        int who = (d[1] & 2) && (len & 1);
        if (gso) {
            for (int k = 0; k < 4; k++) memcpy(gso_buf + k * len, p, len);
            char ctl[CMSG_SPACE(sizeof(uint16_t))] = {0};
            struct iovec iov = {gso_buf, 4 * len};
            struct msghdr h = {.msg_name = &rx_addr, .msg_namelen = sizeof rx_addr, .msg_iov = &iov, .msg_iovlen = 1,
                               .msg_control = ctl, .msg_controllen = sizeof ctl};
            struct cmsghdr *c = CMSG_FIRSTHDR(&h);
            uint16_t seg = (uint16_t)len;
            c->cmsg_level = RM_SOL_UDP; c->cmsg_type = 103; c->cmsg_len = CMSG_LEN(sizeof seg);
            memcpy(CMSG_DATA(c), &seg, sizeof seg);
            if (sendmsg(tx_sock[who], &h, 0) == (ssize_t)(4 * len)) sent += 4 * len;
        } else if (sendto(tx_sock[who], p, len, 0, (struct sockaddr *)&rx_addr, sizeof rx_addr) == (ssize_t)len) {
            sent += len;
        }
    }
    PyObject *chans = turn ? Py_BuildValue("{i(si)i(si)}", 0x4000, "198.18.0.9", 4000, 0x7FFF, "198.18.0.10", 1)
                           : (Py_INCREF(Py_None), Py_None);
    CHECK(chans != NULL);
    size_t got = 0;
    for (int round = 0; round < 100000; round++) {
        PyObject *out = PyObject_CallFunction(recv_many_fn, "iOi", rx_sock, chans, maxn);
        CHECK(out != NULL && PyList_Check(out));
        Py_ssize_t k = PyList_GET_SIZE(out);
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject *t = PyList_GET_ITEM(out, j);
            CHECK(PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 4);
            long kind = PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
            PyObject *data = PyTuple_GET_ITEM(t, 1);
            Py_ssize_t seg = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 2)), n = PyBytes_Size(data);
            CHECK(kind >= 0 && kind <= (turn ? 2 : 1) && PyBytes_Check(data) && PyTuple_Check(PyTuple_GET_ITEM(t, 3)));
            CHECK(n <= RM_RUN && seg >= 0 && seg <= n && (kind || (seg > 0 && n >= RM_DATA_MIN)));
            got += (size_t)n;
        }
        Py_DECREF(out);
        uint8_t b;                  /* drained? ([] also when every datagram read was dropped) */
        if (recv(rx_sock, &b, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        CHECK(round < 99999);
    }
    CHECK(got <= sent);
    Py_DECREF(chans);
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size) {
    if (size < 1) return 0;
    int mode = d[0] & 15;
    if (mode < 6) fuzz_receive(d, size, mode);
    else if (mode == 6) fuzz_send(d, size);
    else if (mode == 7) fuzz_window(d, size);
    else if (mode == 8) fuzz_recv(d, size);
    else fuzz_receive(d, size, (mode - 9) % 6);
    if (PyErr_Occurred()) PyErr_Clear();
    return 0;
}
