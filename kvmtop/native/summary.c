/* kvmtop.native._summary: a batch of exit records grouped in one pass, for the aggregate to merge per
 * key instead of per exit. An executor, never a decider.
 *
 *   summarize(records, base_ns, recent_per_vcpu) -> the summary tuple kvmtop/aggregate/batch_summary.py
 *                 documents, value for value (that file is the reference this one is tested
 *                 against): counts, guest and handling log2 histograms and per-second counts
 *                 per (vcpu, reason, errno), IO and MMIO key counts, the exits with a RIP
 *                 record per (group, rip, linear, cpl) with their handling, and per vCPU what
 *                 the aggregate needs across batches plus the records of its last exits.
 *
 * It owns no state between calls and no label, no rate, no top table: Python keeps those. The
 * records (docs/recording-format.md) are read with the GIL released; it hands back with
 * ValueError on a record that is no part of an exit, MemoryError when out of memory.
 * Times are computed in 128 bits, so no record can overflow them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the records' kinds, flags and field offsets (docs/recording-format.md) and KVM's exit numbers:
   written at build time from the Python declarations (kvmtop/abi/c_header.py) */
#include "kvmtop_abi.h"

/* kvmtop/aggregate/batch_summary.py: bucket_of */
#define SUB_BITS 3
#define OCTAVES 40
#define BUCKETS ((OCTAVES - SUB_BITS + 1) << SUB_BITS)
#define NS_PER_S 1000000000

typedef __int128 i128;

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) { return (uint32_t)le16(p) | (uint32_t)le16(p + 2) << 16; }
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

struct hist {
    uint64_t count;
    i128 total, low, high;
    uint64_t buckets[BUCKETS];
};

/* ns itself below 16, then 8 linear buckets per power of two; 2**40 ns and above in the last */
static unsigned bucket_of(i128 ns) {
    if (ns < (2 << SUB_BITS)) return (unsigned)ns;
    if (ns >> OCTAVES) return BUCKETS - 1;
    uint64_t v = (uint64_t)ns;
    unsigned octave = 63 - (unsigned)__builtin_clzll(v);
    return ((octave - SUB_BITS + 1) << SUB_BITS) + (unsigned)(v >> (octave - SUB_BITS)) -
           (1u << SUB_BITS);
}

static void hist_add(struct hist *h, i128 ns) {
    if (ns < 0) ns = 0;
    if (h->count == 0 || ns < h->low) h->low = ns;
    if (ns > h->high) h->high = ns;
    h->count++;
    h->total += ns;
    h->buckets[bucket_of(ns)]++;
}

/* An insertion-ordered hash table of fixed-size entries, each beginning with its 3-word key.
 * Growing moves the entries: hold indices, not pointers, across table_get calls. */
struct key {
    uint64_t k[3];
};

struct table {
    size_t entry_size, n, cap;
    char *entries;
    uint32_t *slots; /* entry index + 1; 0: empty */
    size_t nslots;   /* a power of two, more than twice n */
};

static uint64_t key_hash(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t h = a * 0x9E3779B97F4A7C15ull ^ b * 0xC2B2AE3D27D4EB4Full ^ c * 0x165667B19E3779F9ull;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    return h ^ (h >> 29);
}

static void *table_at(struct table *t, size_t i) { return t->entries + i * t->entry_size; }

static int table_rehash(struct table *t, size_t nslots) {
    uint32_t *slots = calloc(nslots, sizeof *slots);
    if (!slots) return -1;
    for (size_t i = 0; i < t->n; i++) {
        const struct key *k = table_at(t, i);
        size_t s = key_hash(k->k[0], k->k[1], k->k[2]) & (nslots - 1);
        while (slots[s]) s = (s + 1) & (nslots - 1);
        slots[s] = (uint32_t)(i + 1);
    }
    free(t->slots);
    t->slots = slots;
    t->nslots = nslots;
    return 0;
}

/* The index of the entry for (a, b, c), or -1 with *slot where it would go. */
static long table_find(const struct table *t, uint64_t a, uint64_t b, uint64_t c, size_t *slot) {
    if (!t->nslots) return -1;
    size_t s = key_hash(a, b, c) & (t->nslots - 1);
    for (; t->slots[s]; s = (s + 1) & (t->nslots - 1)) {
        const struct key *k = table_at((struct table *)t, t->slots[s] - 1);
        if (k->k[0] == a && k->k[1] == b && k->k[2] == c) return (long)(t->slots[s] - 1);
    }
    *slot = s;
    return -1;
}

/* The index of the entry for (a, b, c), a new zeroed one if there was none; -1: no memory. */
static long table_get(struct table *t, uint64_t a, uint64_t b, uint64_t c) {
    size_t s = 0;
    long found = table_find(t, a, b, c, &s);
    if (found >= 0) return found;
    if (2 * (t->n + 1) >= t->nslots) {
        if (table_rehash(t, t->nslots ? 2 * t->nslots : 64) < 0) return -1;
        table_find(t, a, b, c, &s);
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 16;
        char *entries = realloc(t->entries, cap * t->entry_size);
        if (!entries) return -1;
        t->entries = entries;
        t->cap = cap;
    }
    struct key *k = table_at(t, t->n);
    memset(k, 0, t->entry_size);
    k->k[0] = a;
    k->k[1] = b;
    k->k[2] = c;
    t->slots[s] = (uint32_t)(t->n + 1);
    return (long)t->n++;
}

static void table_free(struct table *t) {
    free(t->entries);
    free(t->slots);
}

struct group { /* key: vcpu, reason, errno */
    struct key key;
    struct hist guest, handling, net; /* net: handling less the time the tracer held it */
    i128 net_low, net_high; /* handling less the most and the least that time was, on average */
};

/* A HELD record's time stopped for the tracer (summary.held_times): estimated, least, most;
   -1: no HELD record (and for most: no most). */
struct held {
    int64_t estimate, least, most;
};

struct count { /* key: group index and second, IO or MMIO site */
    struct key key;
    uint64_t n;
};

struct vcpu { /* key: vcpu */
    struct key key;
    uint64_t exits;
    i128 first_entry, last_exit;
    unsigned first_flags;
    struct held first_held; /* its first exit's (for the pair across batches) */
    uint32_t last_reason, last_errno;
    size_t last_group;
    long last_rip; /* the RIP entry of its last exit; -1: that exit had no RIP record */
    size_t want, taken, span0; /* its recent exits: how many, found so far, first in spans */
};

struct rip_site { /* key: group index | (cpl + 1) << 48, rip, linear */
    struct key key;
    uint64_t count, handlings;
    i128 handling_total; /* each handling cut at 0 */
};

#define RIP_CPL_SHIFT 48

struct span {
    size_t start, end; /* records start..end-1: an exit with its LONG and DATA records */
};

struct pass {
    const uint8_t *buf;
    size_t nrec, recent;
    i128 base;
    struct table groups, seconds, io, mmio, vcpus, rips;
    struct span *spans;
    uint64_t exits;
    i128 first_exit, last_exit;
    size_t bad_record; /* with err = 2 */
    int err;           /* 1: no memory, 2: a record of another kind */
};

static i128 floor_div(i128 v, i128 d) {
    i128 q = v / d;
    return (v % d < 0) ? q - 1 : q;
}

static int count_add(struct table *t, uint64_t a, uint64_t b, uint64_t c) {
    long i = table_get(t, a, b, c);
    if (i < 0) return -1;
    ((struct count *)table_at(t, (size_t)i))->n++;
    return 0;
}

/* One exit: r its EXIT record, rip its RIP record (NULL: none). */
static int add_exit(struct pass *p, const uint8_t *r, uint64_t guest, struct held held,
                    const uint8_t *rip) {
    unsigned flags = r[EXIT_AT_FLAGS];
    uint16_t vcpu_id = le16(r + EXIT_AT_VCPU);
    uint32_t reason = le32(r + EXIT_AT_REASON), b = le32(r + EXIT_AT_B), run_errno = 0;
    uint64_t a = le64(r + EXIT_AT_A), write = flags & F_WRITE;
    if (flags & F_FAILED) { /* b holds the errno; the details of a failed run mean nothing */
        run_errno = b;
        a = b = 0;
        write = 0;
    } else if ((flags & F_CYCLE) && reason == 0) { /* one-stop: KVM_RUN's return not seen */
        run_errno = RUN_UNSEEN;
    }
    i128 exit_ns = p->base + (int64_t)le64(r + EXIT_AT_T_EXIT), entry_ns = exit_ns - (i128)guest;

    long gi = table_get(&p->groups, vcpu_id, reason, run_errno);
    if (gi < 0) return -1;
    hist_add(&((struct group *)table_at(&p->groups, (size_t)gi))->guest, (i128)guest);
    size_t known = p->vcpus.n;
    long vi = table_get(&p->vcpus, vcpu_id, 0, 0);
    if (vi < 0) return -1;
    struct vcpu *v = table_at(&p->vcpus, (size_t)vi);
    if (p->vcpus.n > known) {
        v->first_entry = entry_ns;
        v->first_flags = flags;
        v->first_held = held;
        v->last_rip = -1;
    } else if (!(flags & F_CYCLE)) { /* one-stop: the run and the handling are not told apart */
        struct group *last = table_at(&p->groups, v->last_group);
        i128 handling = entry_ns - v->last_exit;
        hist_add(&last->handling, handling);
        if (held.estimate >= 0) {
            hist_add(&last->net, handling - held.estimate);
            last->net_low += held.most >= 0 ? handling - held.most : 0; /* no most: at least 0 */
            last->net_high += handling - held.least;
        }
        if (v->last_rip >= 0) {
            struct rip_site *site = table_at(&p->rips, (size_t)v->last_rip);
            site->handlings++;
            site->handling_total += handling < 0 ? 0 : handling;
        }
    }
    v->exits++;
    v->last_exit = exit_ns;
    v->last_group = (size_t)gi;
    v->last_reason = reason;
    v->last_errno = run_errno;
    v->last_rip = -1;
    if (rip) {
        int cpl = rip[RIP_AT_FLAGS] & R_SEGMENTS ? rip[RIP_AT_CPL] : -1;
        long ri = table_get(&p->rips, (uint64_t)gi | (uint64_t)(cpl + 1) << RIP_CPL_SHIFT,
                            le64(rip + RIP_AT_RIP), le64(rip + RIP_AT_LINEAR));
        if (ri < 0) return -1;
        ((struct rip_site *)table_at(&p->rips, (size_t)ri))->count++;
        v->last_rip = ri;
    }

    int64_t second = (int64_t)floor_div(exit_ns, NS_PER_S);
    if (count_add(&p->seconds, (uint64_t)gi, (uint64_t)second, 0) < 0) return -1;
    if (run_errno == 0 && reason == KVM_EXIT_IO) {
        if (count_add(&p->io, vcpu_id, a, write << 8 | (b & 0xFF)) < 0) return -1;
    } else if (run_errno == 0 && reason == KVM_EXIT_MMIO) {
        if (count_add(&p->mmio, vcpu_id, a, write << 32 | b) < 0) return -1;
    }
    if (p->exits == 0) p->first_exit = exit_ns;
    p->last_exit = exit_ns;
    p->exits++;
    return 0;
}

/* The first pass: everything but the recent exits. */
static void group_records(struct pass *p) {
    const uint8_t *buf = p->buf;
    for (size_t i = 0; i < p->nrec;) {
        unsigned kind = buf[i * RECORD_SIZE];
        if (kind == KIND_LONG || kind == KIND_DATA || kind == KIND_HELD || kind == KIND_RIP) {
            /* a part before any EXIT */
            i++;
            continue;
        }
        if (kind != KIND_EXIT) {
            p->err = 2;
            p->bad_record = i;
            return;
        }
        uint64_t guest = le32(buf + i * RECORD_SIZE + EXIT_AT_GUEST_NS);
        struct held held = {-1, -1, -1};
        const uint8_t *rip = NULL;
        size_t j = i + 1;
        for (; j < p->nrec; j++) {
            const uint8_t *part = buf + j * RECORD_SIZE;
            if (part[0] == KIND_LONG) {
                guest = le64(part + LONG_AT_GUEST_NS);
            } else if (part[0] == KIND_HELD) {
                int64_t seen = (int64_t)le64(part + HELD_AT_SEEN_NS);
                int64_t high = (int64_t)le64(part + HELD_AT_UNSEEN_HIGH_NS);
                held.estimate = seen + (int64_t)le64(part + HELD_AT_UNSEEN_NS);
                held.least = seen + (int64_t)le32(part + HELD_AT_UNSEEN_LOW_NS);
                held.most = high ? seen + high : -1;
            } else if (part[0] == KIND_RIP) {
                rip = part;
            } else if (part[0] != KIND_DATA) {
                break;
            }
        }
        if (add_exit(p, buf + i * RECORD_SIZE, guest, held, rip) < 0) {
            p->err = 1;
            return;
        }
        i = j;
    }
}

/* The second pass, from the end: the spans of each vCPU's last `recent` exits. */
static void find_recent(struct pass *p) {
    size_t total = 0;
    for (size_t i = 0; i < p->vcpus.n; i++) {
        struct vcpu *v = table_at(&p->vcpus, i);
        v->want = v->exits < p->recent ? (size_t)v->exits : p->recent;
        v->span0 = total;
        total += v->want;
    }
    if (total == 0) return;
    p->spans = malloc(total * sizeof *p->spans);
    if (!p->spans) {
        p->err = 1;
        return;
    }
    size_t end = p->nrec, left = total;
    for (size_t i = p->nrec; i-- > 0 && left;) {
        const uint8_t *r = p->buf + i * RECORD_SIZE;
        if (r[0] != KIND_EXIT) continue; /* a LONG or DATA record of the exit before it */
        size_t unused;
        long vi = table_find(&p->vcpus, le16(r + EXIT_AT_VCPU), 0, 0, &unused); /* every one is known */
        struct vcpu *v = table_at(&p->vcpus, (size_t)vi);
        if (v->taken < v->want) {
            v->taken++;
            p->spans[v->span0 + v->want - v->taken] = (struct span){i, end};
            left--;
        }
        end = i;
    }
}

static PyObject *long_from_i128(i128 v) {
    if (v >= INT64_MIN && v <= INT64_MAX) return PyLong_FromLongLong((long long)v);
    unsigned char bytes[16];
    for (int i = 0; i < 16; i++) bytes[i] = (unsigned char)((unsigned __int128)v >> (8 * i));
    return _PyLong_FromByteArray(bytes, 16, 1, 1);
}

/* The buckets not empty as a flat tuple of (bucket, count) pairs, in bucket order. */
static PyObject *buckets_tuple(const uint64_t *buckets) {
    Py_ssize_t used = 0;
    for (int i = 0; i < BUCKETS; i++) used += buckets[i] != 0;
    PyObject *t = PyTuple_New(2 * used);
    Py_ssize_t at = 0;
    for (int i = 0; t && i < BUCKETS; i++) {
        if (!buckets[i]) continue;
        PyObject *b = PyLong_FromLong(i), *n = PyLong_FromUnsignedLongLong(buckets[i]);
        if (!b || !n) {
            Py_XDECREF(b);
            Py_XDECREF(n);
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, at++, b);
        PyTuple_SET_ITEM(t, at++, n);
    }
    return t;
}

#define HIST_FORMAT "KNNNN"
#define HIST_VALUES(h)                                                                           \
    (unsigned long long)(h).count, long_from_i128((h).total), long_from_i128((h).low),         \
        long_from_i128((h).high), buckets_tuple((h).buckets)

/* Append a new item (NULL: an error is set) to list, dropping the reference; -1 on error. */
static int append(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *vcpu_recent(const struct pass *p, const struct vcpu *v) {
    size_t size = 0;
    for (size_t s = v->span0; s < v->span0 + v->want; s++)
        size += (p->spans[s].end - p->spans[s].start) * RECORD_SIZE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out) return NULL;
    char *at = PyBytes_AS_STRING(out);
    for (size_t s = v->span0; s < v->span0 + v->want; s++) {
        size_t n = (p->spans[s].end - p->spans[s].start) * RECORD_SIZE;
        memcpy(at, p->buf + p->spans[s].start * RECORD_SIZE, n);
        at += n;
    }
    return out;
}

/* The named tuple types kvmtop/aggregate/batch_summary.py declares (name_types): the summary,
   a group, a second, an IO port, an MMIO address, a vCPU, a RIP. Unset: plain tuples. */
enum { T_SUMMARY, T_GROUP, T_SECOND, T_IO, T_MMIO, T_VCPU, T_RIP, T_COUNT };
static PyTypeObject *named_types[T_COUNT];

/* ``tuple`` as an instance of the named tuple type ``which`` (a tuple subclass, built as
   tuple.__new__ builds one), dropping the reference to ``tuple``; NULL passes through. */
static PyObject *named(PyObject *tuple, int which) {
    PyTypeObject *type = named_types[which];
    if (!tuple || !type) return tuple;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    PyObject *out = type->tp_alloc(type, n);
    if (out) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PyTuple_GET_ITEM(tuple, i);
            Py_INCREF(item);
            PyTuple_SET_ITEM(out, i, item);
        }
    }
    Py_DECREF(tuple);
    return out;
}

static PyObject *name_types(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *types[T_COUNT];
    if (!PyArg_ParseTuple(args, "OOOOOOO:name_types", &types[0], &types[1], &types[2],
                          &types[3], &types[4], &types[5], &types[6]))
        return NULL;
    for (int i = 0; i < T_COUNT; i++)
        if (!PyType_Check(types[i]) || !PyType_IsSubtype((PyTypeObject *)types[i], &PyTuple_Type))
            return PyErr_Format(PyExc_TypeError, "name_types: argument %d is no tuple type", i + 1);
    for (int i = 0; i < T_COUNT; i++) {
        Py_INCREF(types[i]);
        Py_XSETREF(named_types[i], (PyTypeObject *)types[i]);
    }
    Py_RETURN_NONE;
}

static PyObject *summary_value(const struct pass *p) {
    PyObject *groups = PyList_New(0), *seconds = PyList_New(0), *io = PyList_New(0);
    PyObject *mmio = PyList_New(0), *vcpus = PyList_New(0), *rips = PyList_New(0);
    if (!groups || !seconds || !io || !mmio || !vcpus || !rips) goto fail;
    for (size_t i = 0; i < p->groups.n; i++) {
        const struct group *g = table_at((struct table *)&p->groups, i);
        if (append(groups, named(Py_BuildValue("(kkk" HIST_FORMAT HIST_FORMAT HIST_FORMAT "NN)",
                                         (unsigned long)g->key.k[0], (unsigned long)g->key.k[1],
                                         (unsigned long)g->key.k[2], HIST_VALUES(g->guest),
                                         HIST_VALUES(g->handling), HIST_VALUES(g->net),
                                         long_from_i128(g->net_low),
                                         long_from_i128(g->net_high)), T_GROUP)) < 0)
            goto fail;
    }
    for (size_t i = 0; i < p->seconds.n; i++) {
        const struct count *c = table_at((struct table *)&p->seconds, i);
        if (append(seconds, named(Py_BuildValue("(KLK)", (unsigned long long)c->key.k[0],
                                                (long long)(int64_t)c->key.k[1],
                                                (unsigned long long)c->n), T_SECOND)) < 0)
            goto fail;
    }
    for (size_t i = 0; i < p->io.n; i++) {
        const struct count *c = table_at((struct table *)&p->io, i);
        if (append(io, named(Py_BuildValue("(kKNkK)", (unsigned long)c->key.k[0],
                                           (unsigned long long)c->key.k[1],
                                           PyBool_FromLong((long)(c->key.k[2] >> 8)),
                                           (unsigned long)(c->key.k[2] & 0xFF),
                                           (unsigned long long)c->n), T_IO)) < 0)
            goto fail;
    }
    for (size_t i = 0; i < p->mmio.n; i++) {
        const struct count *c = table_at((struct table *)&p->mmio, i);
        if (append(mmio, named(Py_BuildValue("(kKkNK)", (unsigned long)c->key.k[0],
                                             (unsigned long long)c->key.k[1],
                                             (unsigned long)(c->key.k[2] & 0xFFFFFFFF),
                                             PyBool_FromLong((long)(c->key.k[2] >> 32)),
                                             (unsigned long long)c->n), T_MMIO)) < 0)
            goto fail;
    }
    for (size_t i = 0; i < p->vcpus.n; i++) {
        const struct vcpu *v = table_at((struct table *)&p->vcpus, i);
        if (append(vcpus, named(Py_BuildValue("(kKNINkkNnLLLl)", (unsigned long)v->key.k[0],
                                        (unsigned long long)v->exits,
                                        long_from_i128(v->first_entry), v->first_flags,
                                        long_from_i128(v->last_exit),
                                        (unsigned long)v->last_reason,
                                        (unsigned long)v->last_errno, vcpu_recent(p, v),
                                        (Py_ssize_t)v->want, (long long)v->first_held.estimate,
                                        (long long)v->first_held.least,
                                        (long long)v->first_held.most, v->last_rip), T_VCPU)) < 0)
            goto fail;
    }
    for (size_t i = 0; i < p->rips.n; i++) {
        const struct rip_site *r = table_at((struct table *)&p->rips, i);
        uint64_t k0 = r->key.k[0];
        if (append(rips, named(Py_BuildValue("(KKKiKKN)", (unsigned long long)(k0 & ((1ull << RIP_CPL_SHIFT) - 1)),
                                             (unsigned long long)r->key.k[1],
                                             (unsigned long long)r->key.k[2],
                                             (int)(k0 >> RIP_CPL_SHIFT) - 1,
                                             (unsigned long long)r->count,
                                             (unsigned long long)r->handlings,
                                             long_from_i128(r->handling_total)), T_RIP)) < 0)
            goto fail;
    }
    PyObject *first = Py_None, *last = Py_None;
    if (p->exits) {
        first = long_from_i128(p->first_exit);
        last = long_from_i128(p->last_exit);
        if (!first || !last) {
            Py_XDECREF(first);
            Py_XDECREF(last);
            goto fail;
        }
    } else {
        Py_INCREF(first);
        Py_INCREF(last);
    }
    return named(Py_BuildValue("(KNNNNNNNN)", (unsigned long long)p->exits, first, last, groups,
                               seconds, io, mmio, vcpus, rips), T_SUMMARY);
fail:
    Py_XDECREF(groups);
    Py_XDECREF(seconds);
    Py_XDECREF(io);
    Py_XDECREF(mmio);
    Py_XDECREF(vcpus);
    Py_XDECREF(rips);
    return NULL;
}

static PyObject *summarize(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer records;
    long long base_ns;
    Py_ssize_t recent;
    if (!PyArg_ParseTuple(args, "y*Ln:summarize", &records, &base_ns, &recent)) return NULL;
    if (records.len % RECORD_SIZE) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not a whole number of records",
                     records.len);
        PyBuffer_Release(&records);
        return NULL;
    }
    struct pass p = {
        .buf = records.buf,
        .nrec = (size_t)records.len / RECORD_SIZE,
        .recent = recent > 0 ? (size_t)recent : 0,
        .base = base_ns,
        .groups = {.entry_size = sizeof(struct group)},
        .seconds = {.entry_size = sizeof(struct count)},
        .io = {.entry_size = sizeof(struct count)},
        .mmio = {.entry_size = sizeof(struct count)},
        .vcpus = {.entry_size = sizeof(struct vcpu)},
        .rips = {.entry_size = sizeof(struct rip_site)},
    };
    Py_BEGIN_ALLOW_THREADS
    group_records(&p);
    if (!p.err) find_recent(&p);
    Py_END_ALLOW_THREADS
    PyObject *out = NULL;
    if (p.err == 1) PyErr_NoMemory();
    else if (p.err == 2)
        PyErr_Format(PyExc_ValueError, "record %zu has kind %u: not an exit record", p.bad_record,
                     (unsigned)p.buf[p.bad_record * RECORD_SIZE]);
    else out = summary_value(&p);
    free(p.spans);
    table_free(&p.groups);
    table_free(&p.seconds);
    table_free(&p.io);
    table_free(&p.mmio);
    table_free(&p.vcpus);
    table_free(&p.rips);
    PyBuffer_Release(&records);
    return out;
}

static PyMethodDef methods[] = {
    {"summarize", summarize, METH_VARARGS,
     "summarize(records, base_ns, recent_per_vcpu) -> summary (see kvmtop/aggregate/batch_summary.py)"},
    {"name_types", name_types, METH_VARARGS,
     "name_types(summary, group, second, io, mmio, vcpu, rip): the named tuple types summarize returns"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmtop.native._summary",
    .m_doc = "A batch of exit records grouped in one pass.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__summary(void) { return PyModule_Create(&module); }
