/* Reading a link's UDP socket many datagrams at a time (included by _fastpath.c; called by
 * tunnel/ice.py's socket hook through accel.fastpath.recv_many).
 *
 * Why: a TURN server sends every datagram on its own (sendto per datagram), so on a relayed
 * path UDP GRO rarely glues anything and the receiving worker read one datagram per
 * recvmsg: a system call, an address tuple (inet_ntop's sprintf), a bytes object and four
 * Python calls per datagram, 10 us of a core each (perf, docs/benchmarks.md). Here one
 * recvmmsg reads up to 16 datagrams, the sender's address tuple is built once per run of
 * datagrams from one address, and single data packets from one sender are laid back to
 * back into one buffer, as GRO would have glued them (ice.py's _Batch rules exactly: equal
 * sizes, a shorter one ends the run, at most 64 KiB, a different sender ends it), so the
 * Python receive loop and the C loop run once per run instead of once per datagram.
 *
 * recv_many(fd, channels=None, max=64) -> list of (kind, data, seg, addr), in arrival order:
 *   kind 0: a run of data packets (first byte 0xE3, at least DATA_MIN bytes) from `addr`,
 *           each `seg` bytes but the last;
 *   host mode (channels None), kind 1: anything else as read: a UDP GRO buffer (`seg` <
 *           len(data), the kernel's segment size) or a single datagram that is not a data
 *           packet (STUN, handshake, ...);
 *   TURN mode (channels: the TURN client's {channel number: peer address}), reading our
 *   allocation's socket: ChannelData of a bound channel is unwrapped (a data packet joins a
 *   run from that peer; anything else is kind 1, with `addr` the peer); every other piece
 *   (the server's STUN messages, Data indications) is kind 2 with the server's address.
 *   ChannelData of an unbound channel, or claiming more bytes than it has, is dropped, as
 *   aioice's TURN client drops it.
 * An empty list: nothing was waiting. OSError: the socket's error (e.g. ECONNREFUSED from
 * an ICMP), raised only when nothing was read before it (else the next call reports it).
 *
 * Nothing from the wire is trusted: every length is checked against what was read before
 * a copy, and a datagram truncated to the slot (MSG_TRUNC) is dropped.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define RM_SLOTS 16             /* datagrams per recvmmsg */
#define RM_SLOT 65536           /* one GRO buffer fits (at most 65535 bytes) */
#define RM_MAX 64               /* datagrams per call by default: the other links get their turn */
#define RM_RUN 65536            /* ice.BATCH_BYTES */
#define RM_DATA_MIN 32          /* codec.DATA_MIN_LEN: header 16 + tag 16 */
#define RM_SOL_UDP 17
#define RM_UDP_GRO 104

static uint8_t *rm_slots;       /* RM_SLOTS x RM_SLOT, made on first use; pages fault in as used */
static uint8_t rm_run[RM_RUN];

typedef struct {
    PyObject *out;              /* the list being returned */
    PyObject *addr;             /* the open run's sender (a reference), NULL if no run */
    Py_ssize_t len;             /* bytes in rm_run */
    Py_ssize_t seg;
} RmRun;

/* The address tuple Python's socket module would give for `sa` (same types, same text). */
static PyObject *rm_addr(const struct sockaddr_storage *sa) {
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        if (!inet_ntop(AF_INET, &a->sin_addr, host, sizeof host)) return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        if (!inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host)) return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo), a->sin6_scope_id);
    }
    PyErr_Format(PyExc_OSError, "recv_many: address family %d", (int)sa->ss_family);
    return NULL;
}

static int rm_emit(RmRun *r, int kind, const uint8_t *p, Py_ssize_t n, Py_ssize_t seg, PyObject *addr) {
    PyObject *t = Py_BuildValue("(iy#nO)", kind, (const char *)p, n, seg, addr);
    if (!t) return -1;
    int rc = PyList_Append(r->out, t);
    Py_DECREF(t);
    return rc;
}

static int rm_end(RmRun *r) {
    if (!r->len) return 0;
    int rc = rm_emit(r, 0, rm_run, r->len, r->seg, r->addr);
    Py_CLEAR(r->addr);
    r->len = 0;
    return rc;
}

/* One data packet from `addr` joins the open run (ice._Batch.add). */
static int rm_glue(RmRun *r, const uint8_t *p, Py_ssize_t n, PyObject *addr) {
    if (r->len && (n > r->seg || addr != r->addr || r->len + n > RM_RUN) && rm_end(r) < 0) return -1;
    if (!r->len) {
        r->seg = n;
        Py_INCREF(addr);
        r->addr = addr;
    }
    memcpy(rm_run + r->len, p, (size_t)n);
    r->len += n;
    return n < r->seg ? rm_end(r) : 0;
}

/* One piece of what our allocation's socket read (a datagram, or one of a GRO buffer). */
static int rm_turn_piece(RmRun *r, const uint8_t *q, Py_ssize_t m, PyObject *channels,
                         PyObject *server, long *last_ch, PyObject **last_peer) {
    if (m >= 4 && q[0] >= 0x40 && q[0] <= 0x7F) {
        long ch = (q[0] << 8) | q[1];
        Py_ssize_t len = (q[2] << 8) | q[3];
        if (ch != *last_ch) {
            PyObject *key = PyLong_FromLong(ch);
            if (!key) return -1;
            PyObject *peer = PyDict_GetItemWithError(channels, key);
            Py_DECREF(key);
            if (!peer && PyErr_Occurred()) return -1;
            Py_XINCREF(peer);
            Py_XSETREF(*last_peer, peer);
            *last_ch = ch;
        }
        if (!*last_peer || len > m - 4) return 0;               /* dropped, as aioice does */
        if (len >= RM_DATA_MIN && q[4] == TYPE_DATA) return rm_glue(r, q + 4, len, *last_peer);
        if (rm_end(r) < 0) return -1;
        return rm_emit(r, 1, q + 4, len, len, *last_peer);
    }
    if (rm_end(r) < 0) return -1;
    return rm_emit(r, 2, q, m, m, server);
}

PyDoc_STRVAR(recv_many_doc,
"recv_many(fd, channels=None, max=64) -> [(kind, data, seg, addr), ...]\n\n"
"Read up to `max` datagrams waiting on the UDP socket `fd` (non-blocking) with recvmmsg;\n"
"single data packets from one sender come glued as one run (kind 0). See _recvmany.h.");

static PyObject *recv_many(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "channels", "max", NULL};
    int fd, maxn = RM_MAX;
    PyObject *channels = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|Oi", kwlist, &fd, &channels, &maxn)) return NULL;
    if (channels != Py_None && !PyDict_Check(channels)) {
        PyErr_SetString(PyExc_TypeError, "recv_many: channels must be a dict or None");
        return NULL;
    }
    if (!rm_slots && !(rm_slots = PyMem_RawMalloc((size_t)RM_SLOTS * RM_SLOT))) return PyErr_NoMemory();
    RmRun r = {PyList_New(0), NULL, 0, 0};
    if (!r.out) return NULL;
    struct mmsghdr msgs[RM_SLOTS];
    struct iovec iov[RM_SLOTS];
    struct sockaddr_storage names[RM_SLOTS];
    char ctl[RM_SLOTS][CMSG_SPACE(sizeof(int))];
    struct sockaddr_storage last_name;
    socklen_t last_len = 0;
    PyObject *last_addr = NULL, *last_peer = NULL;
    long last_ch = -1;
    int total = 0;
    while (total < maxn) {
        int want = maxn - total < RM_SLOTS ? maxn - total : RM_SLOTS;
        for (int i = 0; i < want; i++) {
            iov[i] = (struct iovec){rm_slots + (size_t)i * RM_SLOT, RM_SLOT};
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &names[i], .msg_namelen = sizeof names[i],
                                              .msg_iov = &iov[i], .msg_iovlen = 1,
                                              .msg_control = ctl[i], .msg_controllen = sizeof ctl[i]};
            msgs[i].msg_len = 0;
        }
        int got = recvmmsg(fd, msgs, (unsigned)want, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || total) break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        for (int i = 0; i < got; i++) {
            struct msghdr *h = &msgs[i].msg_hdr;
            const uint8_t *p = iov[i].iov_base;
            Py_ssize_t n = msgs[i].msg_len, seg = 0;
            if (h->msg_flags & MSG_TRUNC) continue;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c))
                if (c->cmsg_level == RM_SOL_UDP && c->cmsg_type == RM_UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                    int v;
                    memcpy(&v, CMSG_DATA(c), sizeof v);
                    seg = v;
                }
            if (seg <= 0 || seg > n) seg = n;
            if (!n) seg = 0;
            if (!last_addr || h->msg_namelen != last_len || memcmp(&names[i], &last_name, h->msg_namelen)) {
                PyObject *a = rm_addr(&names[i]);
                if (!a) goto fail;
                Py_XSETREF(last_addr, a);
                memcpy(&last_name, &names[i], h->msg_namelen);
                last_len = h->msg_namelen;
            }
            if (channels == Py_None) {
                if (seg < n || n < RM_DATA_MIN || p[0] != TYPE_DATA) {
                    if (rm_end(&r) < 0 || rm_emit(&r, 1, p, n, seg, last_addr) < 0) goto fail;
                } else if (rm_glue(&r, p, n, last_addr) < 0) goto fail;
            } else {
                for (Py_ssize_t o = 0; o < n; o += seg) {
                    Py_ssize_t m = n - o < seg ? n - o : seg;
                    if (rm_turn_piece(&r, p + o, m, channels, last_addr, &last_ch, &last_peer) < 0) goto fail;
                }
            }
        }
        total += got;
        if (got < want) break;
    }
    if (rm_end(&r) < 0) goto fail;
    Py_XDECREF(last_addr);
    Py_XDECREF(last_peer);
    return r.out;
fail:
    Py_XDECREF(r.addr);
    Py_XDECREF(last_addr);
    Py_XDECREF(last_peer);
    Py_DECREF(r.out);
    return NULL;
}

static PyMethodDef recvmany_methods[] = {
    {"recv_many", (PyCFunction)(void (*)(void))recv_many, METH_VARARGS | METH_KEYWORDS, recv_many_doc},
    {NULL}
};
