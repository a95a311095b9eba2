/* kvmtop.native._sampler: reads every watched vCPU's struct kvm_run at a steady, jittered rate, in one
 * thread of its own, and counts what it sees. An executor, never a decider.
 *
 *   Sampler(rate_hz, seed[, held])  a sampler, not yet running; held: the exit reasons whose
 *                               looks wait for the vCPU's next (see below)
 *   add(buffer[, stats_fd, blocking_at, exits_at]) -> index
 *                               a vCPU's kvm_run: kvmtop's own read-only mapping (held until
 *                               the sampler is dropped), and the vCPU's KVM stats fd with the
 *                               data offset of its `blocking` counter, if kvmtop holds one;
 *                               before start() only
 *   start() / stop()            the sampling thread (no GIL, no syscall but its sleep and the
 *                               pread below)
 *   rip(index)                  from now on also the guest's RIP of the exits this vCPU's looks
 *                               see (watch --rip: Python has set its kvm_valid_regs, through a
 *                               mapping of its own); any time
 *   take() -> (ns, ticks, vcpus, cpu_ns)  the counts since the last take, then zeroed: for
 *                               each vCPU (samples, in_run, ((reason, key, count), ...), stale,
 *                               code, ((reason, cpu_ns), ...)) with code None, or (looks,
 *                               unstable, ((reason, rip, linear, cpl, count), ...), live);
 *                               cpu_ns: the sampling thread's CPU time (see below)
 *
 * A read sees exit_reason 0 while the vCPU is in KVM_RUN (the kernel resets it at entry), else the
 * reason of the exit the VMM is handling, with its key: IO port | out << 16, MMIO address |
 * is_write << 63 (a guest-physical address has at most 52 bits), 0 for
 * others; a read the VMM's next entry raced (the reason changed under it) keeps the reason with
 * key TORN. A reason alone is not trusted: KVM resets it in vcpu_run(), and a vCPU that blocks
 * before that (an AP waiting for its SIPI, re-entered after a signal) shows the last exit's reason
 * (KVM_EXIT_INTR) for as long as it waits. So a look that sees a reason reads the vCPU's
 * `blocking` counter (one pread, ~0.3 µs, only when the reason is non-zero): blocked in KVM_RUN
 * counts as in KVM_RUN, and as stale. Nor is a reason of `held` (Python's choice: those after
 * which a VMM does not run the vCPU again, which KVM may write and run the guest on): such a
 * look is held until the vCPU's next look, and counts as in KVM_RUN (stale) if the vCPU's
 * `exits` counter moved meanwhile: the guest ran.
 * Python turns counts into shares; this file decides nothing.
 *
 * The sampler's own CPU time: a look that shares a CPU with the vCPU's thread keeps the VMM off it
 * for as long as the sampling thread runs, in whatever state the look saw, and no look sees that
 * stretch (the sampler is busy). So the thread's CPU time from one wake to the next (one clock
 * read a look) is added up, in all (cpu_ns) and per vCPU by the reason its look saw (0: none):
 * the most the looks may have stretched each reason's time (Python bounds the shares by it).
 *
 * Guest code (after rip(index)): a look that sees the VMM handling an exit reads the registers KVM
 * synced at that exit's return (guest_rip.h), then exit_reason and RIP again, and keeps the
 * sample only if both are the same (stable; else `unstable`). s.regs of the exit under way when
 * kvm_valid_regs was set predates it (KVM syncs at KVM_RUN's return): so a vCPU's RIPs count only
 * from the first look that shows a KVM_RUN since rip() (`live`): one inside KVM_RUN, or one whose
 * exit_reason or synced registers differ from those the page held at rip() (a vCPU whose
 * registers at every exit are those it already held waits for a look inside KVM_RUN); `looks`
 * counts every look from then on but the unstable ones (the shares' denominator).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "entry_cost.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <time.h>

/* KVM's exit numbers and kvm_run offsets: written at build time from the Python declarations
   (kvmtop/abi/c_header.py) */
#include "kvmtop_abi.h"
#include "guest_rip.h"

#define MAX_VCPUS 512
#define MAX_HELD 8
#define SLOTS 256 /* (reason, key) counters per vCPU, power of two; more keys go to OTHER */
#define KEY_TORN 0xFFFFFFFFFFFFFFFEull
#define KEY_OTHER 0xFFFFFFFFFFFFFFFFull
#define STRETCH_REASONS 64 /* reasons whose stretch is kept apart; higher ones share the last */

typedef struct {
    uint32_t reason;
    uint32_t used;
    uint64_t key, n;
} Slot;

typedef struct {
    uint32_t reason, used;
    int32_t cpl;
    uint64_t rip, linear, n;
} CodeSlot;

enum { RIP_OFF, RIP_WAIT, RIP_LIVE }; /* rip(): not asked, waiting for a look inside KVM_RUN, counted */

typedef struct {
    Py_buffer view;
    const volatile uint8_t *run;
    int stats_fd;       /* the vCPU's KVM stats fd (the caller's, held while it holds us), or -1 */
    off_t blocking_at;  /* the data offset of its `blocking` counter (1 inside kvm_vcpu_block) */
    off_t exits_at;     /* ...and of its `exits` counter (every exit to KVM), or -1 */
    uint64_t samples, in_run, stale;
    uint32_t held;      /* a look's reason, held until the next look (0: none) */
    uint64_t held_exits; /* `exits` at that look */
    Slot slots[SLOTS];
    int rip;
    uint32_t first_reason; /* RIP_WAIT: what the page held at rip() */
    uint8_t first_regs[SYNC_REGS_SIZE];
    uint64_t code_looks, unstable;
    CodeSlot code[SLOTS];
    uint32_t seen;                    /* the reason its last look counted as the VMM's (0: none) */
    uint64_t stretch[STRETCH_REASONS]; /* the sampler's CPU ns after looks that saw each reason */
} Vcpu;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_t thread;
    int running, stopping, n, nheld;
    uint32_t held[MAX_HELD]; /* exit reasons whose looks wait for the next (Sampler's held) */
    double interval_ns;
    uint64_t rng, ticks;
    int64_t since_ns;
    uint64_t cpu_ns;   /* the sampling thread's CPU time since the last take */
    int64_t cycle_at;  /* its CPU clock at the last wake (0: none yet) */
    Vcpu *vcpus[MAX_VCPUS];
} Sampler;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static uint64_t next_random(uint64_t *s) { /* xorshift64*: jitter, not secrets */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static uint32_t load32(const volatile uint8_t *p) {
    uint32_t v;
    memcpy(&v, (const void *)p, 4);
    return v;
}

static uint64_t load64(const volatile uint8_t *p) {
    uint64_t v;
    memcpy(&v, (const void *)p, 8);
    return v;
}

static void count(Vcpu *v, uint32_t reason, uint64_t key) {
    uint64_t h = (key * 0x9E3779B97F4A7C15ull) ^ reason;
    for (unsigned i = 0, s = (unsigned)(h >> 56) & (SLOTS - 1); i < SLOTS; i++, s = (s + 1) & (SLOTS - 1)) {
        Slot *slot = &v->slots[s];
        if (!slot->used) {
            *slot = (Slot){reason, 1, key, 1};
            return;
        }
        if (slot->reason == reason && slot->key == key) {
            slot->n++;
            return;
        }
    }
    if (key != KEY_OTHER) count(v, reason, KEY_OTHER); /* full: the table keeps its reasons */
}

static void count_code(Vcpu *v, uint32_t reason, const struct guest_rip *g) {
    uint64_t h = (g->linear * 0x9E3779B97F4A7C15ull) ^ reason;
    for (unsigned i = 0, s = (unsigned)(h >> 56) & (SLOTS - 1); i < SLOTS; i++, s = (s + 1) & (SLOTS - 1)) {
        CodeSlot *slot = &v->code[s];
        if (!slot->used) {
            *slot = (CodeSlot){reason, 1, g->cpl, g->rip, g->linear, 1};
            return;
        }
        if (slot->reason == reason && slot->rip == g->rip && slot->linear == g->linear && slot->cpl == g->cpl) {
            slot->n++;
            return;
        }
    }
    if (g->rip != KEY_OTHER) { /* full: the table keeps its reasons */
        struct guest_rip other = {KEY_OTHER, KEY_OTHER, -1};
        count_code(v, reason, &other);
    }
}

static int read_stat(const Vcpu *v, off_t at, uint64_t *value) {
    return pread(v->stats_fd, value, sizeof *value, at) == sizeof *value;
}

/* A look held at a reason after which a VMM does not run the vCPU again: in KVM_RUN (stale) if
   the guest ran since (its `exits` counter moved), else the VMM's. One pread. */
static void settle_held(Vcpu *v) {
    uint64_t exits = 0;
    v->samples++;
    if (read_stat(v, v->exits_at, &exits) && exits != v->held_exits) {
        v->in_run++;
        v->stale++;
        if (v->rip == RIP_LIVE) v->code_looks++;
    } else {
        count(v, v->held, 0);
        if (v->rip == RIP_LIVE) v->unstable++; /* its RIP was not read */
    }
    v->held = 0;
}

/* One look at one vCPU: a few loads from the mapping; a pread where a reason needs one. Lock
   held. */
static void look(const Sampler *s, Vcpu *v) {
    const volatile uint8_t *run = v->run;
    if (v->held) settle_held(v);
    v->seen = 0;
    uint32_t reason = load32(run + RUN_EXIT_REASON);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (reason != 0 && v->stats_fd >= 0 && v->exits_at >= 0) {
        for (int i = 0; i < s->nheld; i++) {
            if (s->held[i] == reason && read_stat(v, v->exits_at, &v->held_exits)) {
                v->held = v->seen = reason; /* counted at the next look */
                return;
            }
        }
    }
    v->samples++;
    if (reason == 0) {
        v->in_run++;
        if (v->rip == RIP_WAIT) v->rip = RIP_LIVE; /* entered KVM_RUN since: s.regs is synced */
        if (v->rip == RIP_LIVE) v->code_looks++;
        return;
    }
    uint64_t blocking = 0;
    if (v->stats_fd >= 0 && read_stat(v, v->blocking_at, &blocking) && blocking) {
        v->in_run++; /* a stale reason: the vCPU waits inside KVM_RUN */
        v->stale++;
        if (v->rip == RIP_WAIT) v->rip = RIP_LIVE;
        if (v->rip == RIP_LIVE) v->code_looks++;
        return;
    }
    if (v->rip == RIP_WAIT) { /* a KVM_RUN since rip(): a new exit, or new registers synced */
        uint8_t regs[SYNC_REGS_SIZE];
        memcpy(regs, (const void *)(run + SYNC_REGS), sizeof regs);
        if (reason != v->first_reason || memcmp(regs, v->first_regs, sizeof regs)) v->rip = RIP_LIVE;
    }
    uint64_t key = 0;
    if (reason == KVM_EXIT_IO) /* direction u8 @0 (1: out), size u8, port u16 @2 */
        key = (uint64_t)(load32(run + RUN_UNION) >> 16) | (uint64_t)(run[RUN_UNION] != 0) << 16;
    else if (reason == KVM_EXIT_MMIO) /* phys_addr u64 @0, data[8], len u32, is_write u8 @20 */
        key = load64(run + RUN_UNION) | (uint64_t)(run[RUN_UNION + 20] != 0) << 63;
    struct guest_rip g;
    int synced = v->rip == RIP_LIVE && guest_rip(run, &g);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint32_t again = load32(run + RUN_EXIT_REASON);
    if (again != reason) key = KEY_TORN; /* the VMM ran the vCPU again */
    count(v, reason, key);
    v->seen = reason;
    if (v->rip != RIP_LIVE) return;
    if (synced && again == reason && load64(run + SYNC_RIP) == g.rip) {
        v->code_looks++;
        count_code(v, reason, &g);
    } else {
        v->unstable++; /* the two reads differ (or the field was cleared): not kept */
    }
}

static void *sample_loop(void *arg) {
    Sampler *s = arg;
    prctl(PR_SET_TIMERSLACK, 1UL); /* the default 50 µs slack would pace a 10 kHz rate */
    struct timespec at;
    int64_t next = now_ns();
    for (;;) {
        /* the next look after 0.5..1.5 intervals: a mean of one, and no lock-step with the
           guest's timers */
        double jitter = 0.5 + (double)(next_random(&s->rng) >> 11) / 9007199254740992.0;
        next += (int64_t)(s->interval_ns * jitter);
        int64_t now = now_ns();
        if (next < now) next = now; /* late (the host was busy): no burst to catch up */
        at.tv_sec = next / 1000000000;
        at.tv_nsec = next % 1000000000;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR) {
        }
        pthread_mutex_lock(&s->lock);
        if (s->stopping) {
            pthread_mutex_unlock(&s->lock);
            return NULL;
        }
        struct timespec cpu;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
        int64_t cpu_at = (int64_t)cpu.tv_sec * 1000000000 + cpu.tv_nsec;
        if (s->cycle_at) { /* the last cycle: its look, its sleep, this wake */
            uint64_t cycle = (uint64_t)(cpu_at - s->cycle_at);
            s->cpu_ns += cycle;
            for (int i = 0; i < s->n; i++) {
                Vcpu *v = s->vcpus[i];
                if (v->seen) v->stretch[v->seen < STRETCH_REASONS ? v->seen : STRETCH_REASONS - 1] += cycle;
            }
        }
        s->cycle_at = cpu_at;
        for (int i = 0; i < s->n; i++) look(s, s->vcpus[i]);
        s->ticks++;
        pthread_mutex_unlock(&s->lock);
    }
}

static int Sampler_init(Sampler *s, PyObject *args, PyObject *kw) {
    (void)kw;
    double rate;
    unsigned long long seed;
    PyObject *held = NULL;
    if (!PyArg_ParseTuple(args, "dK|O", &rate, &seed, &held)) return -1;
    if (held) {
        PyObject *seq = PySequence_Fast(held, "held must be a sequence of exit reasons");
        if (!seq) return -1;
        if (PySequence_Fast_GET_SIZE(seq) > MAX_HELD) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "at most %d held exit reasons", MAX_HELD);
            return -1;
        }
        s->nheld = 0;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            unsigned long reason = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
            if (PyErr_Occurred()) return Py_DECREF(seq), -1;
            s->held[s->nheld++] = (uint32_t)reason;
        }
        Py_DECREF(seq);
    }
    if (!(rate > 0 && rate <= 100000)) {
        PyErr_SetString(PyExc_ValueError, "the rate must be above 0 and at most 100000 Hz");
        return -1;
    }
    s->interval_ns = 1e9 / rate;
    s->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    return 0;
}

static PyObject *Sampler_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    (void)args;
    (void)kw;
    Sampler *s = (Sampler *)type->tp_alloc(type, 0);
    if (s) pthread_mutex_init(&s->lock, NULL);
    return (PyObject *)s;
}

static void stop_thread(Sampler *s) {
    if (!s->running) return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_mutex_unlock(&s->lock);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(s->thread, NULL);
    Py_END_ALLOW_THREADS
    s->running = 0;
}

static void Sampler_dealloc(Sampler *s) {
    stop_thread(s);
    for (int i = 0; i < s->n; i++) {
        PyBuffer_Release(&s->vcpus[i]->view);
        PyMem_Free(s->vcpus[i]);
    }
    pthread_mutex_destroy(&s->lock);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Sampler_add(Sampler *s, PyObject *args) {
    PyObject *obj;
    int stats_fd = -1;
    long long blocking_at = 0, exits_at = -1;
    if (!PyArg_ParseTuple(args, "O|iLL", &obj, &stats_fd, &blocking_at, &exits_at)) return NULL;
    if (s->running) return PyErr_Format(PyExc_RuntimeError, "add before start"), NULL;
    if (s->n >= MAX_VCPUS) return PyErr_Format(PyExc_OSError, "more than %d vCPUs", MAX_VCPUS), NULL;
    Vcpu *v = PyMem_Calloc(1, sizeof *v);
    if (!v) return PyErr_NoMemory();
    if (PyObject_GetBuffer(obj, &v->view, PyBUF_SIMPLE) < 0) {
        PyMem_Free(v);
        return NULL;
    }
    if (v->view.len < RUN_UNION + 24) {
        PyBuffer_Release(&v->view);
        PyMem_Free(v);
        return PyErr_Format(PyExc_ValueError, "a kvm_run mapping is at least %d bytes", RUN_UNION + 24), NULL;
    }
    v->run = v->view.buf;
    v->stats_fd = stats_fd;
    v->blocking_at = (off_t)blocking_at;
    v->exits_at = (off_t)exits_at;
    s->vcpus[s->n] = v;
    return PyLong_FromLong(s->n++);
}

static PyObject *Sampler_start(Sampler *s, PyObject *unused) {
    (void)unused;
    if (s->running) Py_RETURN_NONE;
    s->stopping = 0;
    s->since_ns = now_ns();
    int rc = pthread_create(&s->thread, NULL, sample_loop, s);
    if (rc) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    s->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Sampler_rip(Sampler *s, PyObject *args) {
    int i;
    if (!PyArg_ParseTuple(args, "i", &i)) return NULL;
    if (i < 0 || i >= s->n) return PyErr_Format(PyExc_IndexError, "no vCPU %d", i), NULL;
    if (s->vcpus[i]->view.len < SYNC_CR0 + 8) /* the synced registers lie beyond the exit */
        return PyErr_Format(PyExc_ValueError, "a kvm_run mapping with its registers is at least %d bytes", SYNC_CR0 + 8), NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    Vcpu *v = s->vcpus[i];
    if (v->rip == RIP_OFF) {
        v->rip = RIP_WAIT;
        v->first_reason = load32(v->run + RUN_EXIT_REASON);
        memcpy(v->first_regs, (const void *)(v->run + SYNC_REGS), sizeof v->first_regs);
    }
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Sampler_stop(Sampler *s, PyObject *unused) {
    (void)unused;
    stop_thread(s);
    Py_RETURN_NONE;
}

static PyObject *code_counts(Vcpu *v) {
    if (v->rip == RIP_OFF) Py_RETURN_NONE;
    PyObject *rips = PyList_New(0);
    if (!rips) return NULL;
    for (int i = 0; i < SLOTS; i++) {
        CodeSlot *slot = &v->code[i];
        if (!slot->used) continue;
        PyObject *item = Py_BuildValue("(kKKiK)", (unsigned long)slot->reason, (unsigned long long)slot->rip,
                                       (unsigned long long)slot->linear, (int)slot->cpl, (unsigned long long)slot->n);
        if (!item || PyList_Append(rips, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(rips);
            return NULL;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(KKNO)", (unsigned long long)v->code_looks, (unsigned long long)v->unstable, rips,
                         v->rip == RIP_LIVE ? Py_True : Py_False);
}

static PyObject *stretch_counts(const Vcpu *v) {
    PyObject *out = PyList_New(0);
    for (int r = 0; out && r < STRETCH_REASONS; r++) {
        if (!v->stretch[r]) continue;
        PyObject *item = Py_BuildValue("(iK)", r, (unsigned long long)v->stretch[r]);
        if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    return out;
}

static PyObject *vcpu_counts(Vcpu *v) {
    PyObject *keys = PyList_New(0);
    if (!keys) return NULL;
    for (int i = 0; i < SLOTS; i++) {
        Slot *slot = &v->slots[i];
        if (!slot->used) continue;
        PyObject *item = Py_BuildValue("(kKK)", (unsigned long)slot->reason,
                                       (unsigned long long)slot->key, (unsigned long long)slot->n);
        if (!item || PyList_Append(keys, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(keys);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *code = code_counts(v);
    if (!code) {
        Py_DECREF(keys);
        return NULL;
    }
    PyObject *stretch = stretch_counts(v);
    if (!stretch) {
        Py_DECREF(keys);
        Py_DECREF(code);
        return NULL;
    }
    return Py_BuildValue("(KKNKNN)", (unsigned long long)v->samples, (unsigned long long)v->in_run,
                         keys, (unsigned long long)v->stale, code, stretch);
}

static PyObject *Sampler_take(Sampler *s, PyObject *unused) {
    (void)unused;
    int n = s->n;
    Vcpu *copies = PyMem_Malloc(sizeof(Vcpu) * (size_t)(n ? n : 1));
    if (!copies) return PyErr_NoMemory();
    int64_t since, now;
    uint64_t ticks, cpu_ns;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    now = now_ns();
    since = s->since_ns;
    ticks = s->ticks;
    cpu_ns = s->cpu_ns;
    for (int i = 0; i < n; i++) {
        Vcpu *v = s->vcpus[i];
        copies[i].samples = v->samples;
        copies[i].in_run = v->in_run;
        copies[i].stale = v->stale;
        memcpy(copies[i].slots, v->slots, sizeof v->slots);
        copies[i].rip = v->rip;
        copies[i].code_looks = v->code_looks;
        copies[i].unstable = v->unstable;
        memcpy(copies[i].code, v->code, sizeof v->code);
        memcpy(copies[i].stretch, v->stretch, sizeof v->stretch);
        memset(v->stretch, 0, sizeof v->stretch);
        v->samples = v->in_run = v->stale = v->code_looks = v->unstable = 0;
        memset(v->slots, 0, sizeof v->slots);
        memset(v->code, 0, sizeof v->code);
    }
    s->ticks = 0;
    s->cpu_ns = 0;
    s->since_ns = now;
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS
    PyObject *vcpus = PyList_New(n);
    for (int i = 0; vcpus && i < n; i++) {
        PyObject *item = vcpu_counts(&copies[i]);
        if (!item) {
            Py_CLEAR(vcpus);
            break;
        }
        PyList_SET_ITEM(vcpus, i, item);
    }
    PyMem_Free(copies);
    if (!vcpus) return NULL;
    return Py_BuildValue("(LKNK)", (long long)(now - since), (unsigned long long)ticks, vcpus,
                         (unsigned long long)cpu_ns);
}

static PyMethodDef Sampler_methods[] = {
    {"add", (PyCFunction)Sampler_add, METH_VARARGS, "add(buffer[, stats_fd, blocking_at, exits_at]) -> index: a vCPU's kvm_run"},
    {"start", (PyCFunction)Sampler_start, METH_NOARGS, "start the sampling thread"},
    {"stop", (PyCFunction)Sampler_stop, METH_NOARGS, "stop it (and join it)"},
    {"rip", (PyCFunction)Sampler_rip, METH_VARARGS, "rip(index): the guest's RIP at this vCPU's exits too"},
    {"take", (PyCFunction)Sampler_take, METH_NOARGS, "take() -> (ns, ticks, vcpus, cpu_ns), zeroed"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvmtop.native._sampler.Sampler",
    .tp_basicsize = sizeof(Sampler),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Sampler_new,
    .tp_init = (initproc)Sampler_init,
    .tp_dealloc = (destructor)Sampler_dealloc,
    .tp_methods = Sampler_methods,
    .tp_doc = "Samples every vCPU's kvm_run at a jittered rate in a thread of its own.",
};

static PyMethodDef functions[] = {
    {"entry_cost", entry_cost, METH_VARARGS,
     "entry_cost(runs) -> (heads, tails, run_ns): see entry_cost.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvmtop.native._sampler",
                                    "kvm_run sampling off the GIL.", -1, functions};

PyMODINIT_FUNC PyInit__sampler(void) {
    if (PyType_Ready(&SamplerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&SamplerType);
    if (PyModule_AddObject(m, "Sampler", (PyObject *)&SamplerType) < 0) {
        Py_DECREF(&SamplerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
