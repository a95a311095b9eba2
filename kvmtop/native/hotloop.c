/* kvmtop.native._hotloop: the tracer's per-exit work, in C. An executor, never a decider.
 *
 * It owns the hot state of tracing: the threads being traced (tid -> process, whether it runs
 * vCPUs, its syscall budget, the run it is in), the vCPUs (process, fd -> kvmtop's read-only
 * mapping of that vCPU's struct kvm_run), and a buffer of packed exit records in the
 * recording's 32-byte layout (docs/recording-format.md). Its loops handle only the common case:
 *
 *   run():        waitpid (polling first where that is faster) -> PTRACE_GET_SYSCALL_INFO -> a KVM_RUN entry
 *                 or return, or a seccomp stop, on a vCPU fd it knows -> read the exit from the
 *                 mapping -> append a record -> resume the thread; with the GIL released.
 *   notify_run(): the same for seccomp user notifications: RECV -> read the previous exit of
 *                 that vCPU -> append -> SEND with SECCOMP_USER_NOTIF_FLAG_CONTINUE.
 *
 * Both hand back to Python on anything else: a stop or a notification it does not recognise
 * (an unknown thread or fd, clone/exec/exit events, signals, group stops, a process Python has
 * asked to see every stop of), a full buffer, a deadline. kvmtop/trace/py_engine.py is the same
 * engine in pure Python, the reference these loops are tested against.
 *
 * It never writes a tracee's memory or registers. Two threads may use one engine (the ptrace
 * tracer and the notification listener): a mutex guards the tables, held only between waits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "the exit union is decoded for x86_64 only; kvmtop falls back to pure Python"
#endif

/* include/uapi/linux/ptrace.h */
#define PTRACE_CONT_ 7
#define PTRACE_SYSCALL_ 24
#define PTRACE_GET_SYSCALL_INFO_ 0x420e
#define PTRACE_EVENT_SECCOMP_ 7
#define PTRACE_SYSCALL_INFO_ENTRY 1
#define PTRACE_SYSCALL_INFO_EXIT 2
#define PTRACE_SYSCALL_INFO_SECCOMP 3
#define SYSCALL_STOP_SIG (SIGTRAP | 0x80) /* with PTRACE_O_TRACESYSGOOD */

/* include/uapi/linux/seccomp.h */
#define SECCOMP_IOC_MAGIC '!'
#define SECCOMP_IOCTL_NOTIF_RECV_ _IOWR(SECCOMP_IOC_MAGIC, 0, struct notif)
#define SECCOMP_IOCTL_NOTIF_SEND_ _IOWR(SECCOMP_IOC_MAGIC, 1, struct notif_resp)
#define SECCOMP_USER_NOTIF_FLAG_CONTINUE_ 1

/* KVM's exit numbers, ioctls and kvm_run offsets, the coalesced MMIO ring, and the records'
   kinds, flags and field offsets (docs/recording-format.md): written at build time from the
   Python declarations (kvmtop/abi/c_header.py) */
#include "kvmtop_abi.h"
#include "guest_rip.h"

/* Process modes (kvmtop/trace/engine.py: the same numbers) */
#define MODE_TWO_STOP 0 /* PTRACE_SYSCALL: KVM_RUN's entry and exit stops */
#define MODE_ONE_STOP 1 /* seccomp RET_TRACE on KVM_RUN: one stop, at its entry */
#define MODE_NOTIFY 2   /* seccomp user notification: no ptrace stop per exit */

/* Process flags (set_process) */
#define P_HANDBACK 1  /* run() hands every stop of the process to Python */
#define P_SYSCALLS 2  /* resume its threads with PTRACE_SYSCALL */
#define P_NO_RESUME 4 /* handle() records but does not resume: Python does (a detach) */

#define SYSCALL_BUDGET 256 /* non-KVM syscalls a thread may make before PTRACE_CONT */
#define MAX_BUFFER (256u << 20)

struct syscall_info { /* struct ptrace_syscall_info */
    uint8_t op;
    uint8_t pad[3];
    uint32_t arch;
    uint64_t ip, sp;
    union {
        struct { uint64_t nr, args[6]; } entry; /* also .seccomp's first fields */
        struct { int64_t rval; uint8_t is_error; } exit;
    };
    uint32_t ret_data;
};

struct notif { /* struct seccomp_notif */
    uint64_t id;
    uint32_t pid, flags;
    int32_t nr;
    uint32_t arch;
    uint64_t ip, args[6];
};

struct notif_resp { /* struct seccomp_notif_resp */
    uint64_t id;
    int64_t val;
    int32_t error;
    uint32_t flags;
};

/* Whether a wait polls before it sleeps (kvmtop/trace/stop_wait.py PollChooser, the reference: the
   same numbers and steps). Epochs of each way are timed, alternated, and the faster kept; not
   polling where stops come too far apart, nor on a host whose CPUs are contended. */
#define EPOCH_STOPS 256     /* an epoch: at least this many stops... */
#define EPOCH_NS 4000000    /* ...over at least this long */
#define PROBE_EPOCHS 4      /* a comparison: sleeping, polling, polling, sleeping */
#define EXPLOIT_MIN 4       /* epochs the faster way keeps after a changed choice, */
#define EXPLOIT_MAX 128     /* doubling up to this while comparisons confirm it */
#define MARGIN_EIGHTHS 7    /* polling must be at least 1/8 faster */
#define SPARSE_SHARE 4      /* sparse: fewer than 1 in 4 stops within 2 windows */
#define GAP_MAX_NS 10000000 /* a gap counts for at most this */
#define PRESSURE "/proc/pressure/cpu" /* Documentation/accounting/psi.rst: "some avg10=12.34 ..." */
#define CONTENDED 2500      /* contended: tasks waited for a CPU 25.00% of the last 10 s or more */

struct poll_chooser {
    int64_t max_ns, poll_ns, last_ns; /* poll_ns: the next wait's window (0: sleep at once) */
    int probing, epoch, exploit, chosen;
    int64_t stops, near, spent_ns, since_ns; /* this epoch */
    int64_t way_ns[2], way_stops[2];         /* this comparison: [0] sleeping, [1] polling */
};

static void chooser_init(struct poll_chooser *c, int64_t max_ns) {
    memset(c, 0, sizeof *c);
    c->max_ns = max_ns;
    c->probing = 1; /* the first comparison begins at once */
    c->exploit = EXPLOIT_MIN;
}

/* End a comparison, or a period, with polling chosen: the longer the same choice has held, the
   longer it holds. */
static void chooser_choose(struct poll_chooser *c, int polling) {
    int confirmed = polling == c->chosen;
    c->exploit = confirmed ? (c->exploit * 2 < EXPLOIT_MAX ? c->exploit * 2 : EXPLOIT_MAX)
                           : EXPLOIT_MIN;
    c->chosen = polling;
    c->poll_ns = polling ? c->max_ns : 0;
    c->probing = 0;
    c->epoch = 0;
}

/* 1: call chooser_pressure now */
static int chooser_epoch_done(struct poll_chooser *c, int64_t now) {
    int sparse = c->near * SPARSE_SHARE < c->stops;
    int polling = c->poll_ns != 0;
    if (c->probing) {
        c->way_ns[polling] += c->spent_ns;
        c->way_stops[polling] += c->stops;
    }
    c->stops = c->near = c->spent_ns = 0;
    c->since_ns = now;
    c->epoch++;
    if (sparse) { /* sleep; compare when stops have come close for a period */
        chooser_choose(c, 0);
    } else if (c->probing && c->epoch == PROBE_EPOCHS) {
        chooser_choose(c, c->way_ns[1] * c->way_stops[0] * 8 <
                              c->way_ns[0] * c->way_stops[1] * MARGIN_EIGHTHS);
    } else if (c->probing) {
        c->poll_ns = c->epoch < PROBE_EPOCHS - 1 ? c->max_ns : 0;
    } else if (c->epoch >= c->exploit) {
        c->probing = 1;
        c->epoch = 0;
        c->poll_ns = 0;
        c->way_ns[0] = c->way_ns[1] = c->way_stops[0] = c->way_stops[1] = 0;
        return 1;
    }
    return 0;
}

/* A stop was seen at now: its gap from the one before counts for this epoch. 1: call
   chooser_pressure now. */
static int chooser_seen(struct poll_chooser *c, int64_t now) {
    if (!c->max_ns) return 0;
    int64_t last = c->last_ns;
    c->last_ns = now;
    if (!last) {
        c->since_ns = now;
        return 1; /* the first comparison's start */
    }
    int64_t gap = now - last;
    /* a gap over 10 ms is the VMM's own pause, not a wake-up or a scheduler's stall: capped, so
       that an idle moment in one epoch does not decide the comparison */
    c->spent_ns += gap < GAP_MAX_NS ? gap : GAP_MAX_NS;
    c->near += gap <= 2 * c->max_ns;
    c->stops++;
    if (c->stops >= EPOCH_STOPS && now - c->since_ns >= EPOCH_NS) return chooser_epoch_done(c, now);
    return 0;
}

/* The host's CPU pressure (PSI "some" avg10 in hundredths of a percent; -1: unknown), when
   chooser_seen asked: at a comparison's start. */
static void chooser_pressure(struct poll_chooser *c, int64_t waited) {
    if (c->probing && c->epoch == 0 && waited >= CONTENDED)
        chooser_choose(c, 0); /* contended: polling would take CPU others need */
}

static int64_t read_pressure(void) {
    char line[128];
    int fd = open(PRESSURE, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n <= 0) return -1;
    line[n] = 0;
    char *avg10 = strstr(line, "avg10=");
    if (!avg10) return -1;
    char *end;
    long whole = strtol(avg10 + 6, &end, 10), hundredths = 0;
    if (end == avg10 + 6) return -1;
    if (*end == '.' && end[1] >= '0' && end[1] <= '9') {
        hundredths = (end[1] - '0') * 10;
        if (end[2] >= '0' && end[2] <= '9') hundredths += end[2] - '0';
    }
    return whole * 100 + hundredths;
}

/* Two stops: the time a vCPU thread spends stopped for kvmtop between a KVM_RUN return and its
   next entry (the VMM's handling of that exit): what kvmtop sees of each stop (wait return to
   resume) and, per stop, the round trip it does not see (the stop's and the wake-up's switches):
   its estimate, and the least and the most it costs on average (most 0: no basis). */
struct window {
    int stops;
    int64_t seen_ns, unseen_ns, unseen_low_ns, unseen_high_ns;
};

/* A stop's unseen cost per a block of round trips (docs/engine.md; py_engine.round_trip_costs) */
enum { SLEPT, POLLED }; /* the classes of a stop: kvmtop slept for it, or a poll caught it */
struct stop_costs {
    int64_t least, estimate, most[2]; /* all 0: none measured yet; most per class */
};

typedef struct {
    int used, pid, fd, tid;
    int vcpu;
    const uint8_t *map; /* kvmtop's own mapping, or NULL: read with process_vm_readv */
    uint64_t remote;
    Py_buffer view;
    int64_t open_since; /* one stop / notify: entry of the run not yet accounted for */
    int open_immediate;
    /* two stops, with data: a read's entry and exit, recorded at the vCPU's next entry, where
       the VMM has put the value for the guest */
    int held;
    int64_t held_entry, held_exit;
    struct window held_window; /* ...and the time stopped before that read's entry */
    const uint8_t *ring_map; /* the VM's coalesced MMIO ring, through this vCPU's mapping */
    Py_buffer ring_view;
    int ring; /* index into rings (used only with ring_map) */
    int rip; /* RIP_OFF, RIP_ARMED (kvm_valid_regs set), RIP_ON (a run entered since: RIP parts) */
} Page;
enum { RIP_OFF, RIP_ARMED, RIP_ON };

typedef struct {
    int used, tid, pid;
    int runner, in_run, creating, budget;
    int64_t entry_ns;
    int page; /* index into pages while in KVM_RUN, -1 otherwise */
    int handling;          /* two stops: between a KVM_RUN return and the next entry */
    struct window open;    /* ...the time stopped in it so far */
    struct window entered; /* the window that ended at this run's entry */
    int64_t resumed_ns;    /* resumed from a syscall stop at (0: not from one) */
    int resumed_run;       /* ...of KVM_RUN */
} Thread;

typedef struct {
    int used, pid, mode, flags;
} Process;

/* One VM's coalesced MMIO ring as kvmtop last looked at it (its vCPUs share it). */
typedef struct {
    int used, pid, vm, readable;
    uint32_t first, last;
} RingLook;
#define MAX_RINGS 256

#define MAX_THREADS 8192 /* power of two */
#define MAX_PAGES 2048
#define MAX_PROCS 256
#define ROUND_TRIP_BLOCK 64 /* round trips measured per estimate */
#define ROUND_TRIP_FIRST 16 /* ...and the first estimate, before a whole block */
#define ROUND_TRIP_CLASS 16 /* a class's most is taken from a block that has this many of its own */
#define ROUND_TRIP_OTHERS 16 /* the estimate leaves KVM_RUN's out where a block has this many others */

typedef struct {
    uint8_t *data;
    size_t len, cap;
} Buffer;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    Thread threads[MAX_THREADS];
    Page pages[MAX_PAGES];
    Process procs[MAX_PROCS];
    int pages_hi, procs_hi; /* one past the highest slot ever used: lookups scan no further */
    Buffer records, seen;
    RingLook rings[MAX_RINGS];
    Buffer coalesced; /* COALESCED records */
    int64_t base_ns;
    int with_data, wait_flags, sys_ioctl;
    struct poll_chooser chooser;
    long stops, notifications, lost, exits;
    int64_t round_trips[ROUND_TRIP_BLOCK]; /* a block's resume-to-next-stop times, in ns */
    int round_trip_runs[ROUND_TRIP_BLOCK];    /* ...was it KVM_RUN's */
    int round_trip_ways[ROUND_TRIP_BLOCK];    /* ...the class of the stop that ended it */
    int n_round_trips;
    struct stop_costs stop_costs; /* of the latest block */
    int polled;                   /* the class of the stop last waited for: SLEPT or POLLED */
    struct notif pending; /* a notification handed back to Python, not yet answered */
    int has_pending;
    uint8_t scratch[RUN_MAP_SIZE];
} Engine;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* --- tables --------------------------------------------------------------------------------- */

static Thread *thread_find(Engine *e, int tid) {
    for (unsigned i = (unsigned)tid & (MAX_THREADS - 1), n = 0; n < MAX_THREADS;
         i = (i + 1) & (MAX_THREADS - 1), n++) {
        if (!e->threads[i].used) return NULL;
        if (e->threads[i].tid == tid) return &e->threads[i];
    }
    return NULL;
}

static Thread *thread_insert(Engine *e, int tid) {
    for (unsigned i = (unsigned)tid & (MAX_THREADS - 1), n = 0; n < MAX_THREADS;
         i = (i + 1) & (MAX_THREADS - 1), n++) {
        Thread *t = &e->threads[i];
        if (!t->used || t->tid == tid) return t;
    }
    return NULL;
}

static void thread_delete(Engine *e, Thread *t) {
    /* backward-shift deletion keeps every probe chain whole */
    unsigned i = (unsigned)(t - e->threads);
    e->threads[i].used = 0;
    for (unsigned j = (i + 1) & (MAX_THREADS - 1); e->threads[j].used; j = (j + 1) & (MAX_THREADS - 1)) {
        unsigned home = (unsigned)e->threads[j].tid & (MAX_THREADS - 1);
        int between = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!between) {
            e->threads[i] = e->threads[j];
            e->threads[j].used = 0;
            i = j;
        }
    }
}

static Page *page_find(Engine *e, int pid, int fd) {
    for (int i = 0; i < e->pages_hi; i++) {
        Page *p = &e->pages[i];
        if (p->used && p->fd == fd && p->pid == pid) return p;
    }
    return NULL;
}

static Process *proc_find(Engine *e, int pid) {
    for (int i = 0; i < e->procs_hi; i++)
        if (e->procs[i].used && e->procs[i].pid == pid) return &e->procs[i];
    return NULL;
}

/* --- records -------------------------------------------------------------------------------- */

static uint8_t *buffer_grow(Engine *e, Buffer *b, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->len + n) cap *= 2;
        if (cap > MAX_BUFFER) return NULL;
        uint8_t *data = realloc(b->data, cap);
        if (!data) return NULL;
        b->data = data;
        b->cap = cap;
    }
    uint8_t *at = b->data + b->len;
    memset(at, 0, n);
    b->len += n;
    (void)e;
    return at;
}

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* The run page's bytes: our mapping, or a fresh copy of the VMM's (NULL if unreadable). */
static const uint8_t *page_bytes(Engine *e, Page *p) {
    if (p->map) return p->map;
    if (!p->remote) return NULL; /* a vCPU whose kvm_run cannot be read */
    struct iovec local = {e->scratch, RUN_MAP_SIZE};
    struct iovec remote = {(void *)(uintptr_t)p->remote, RUN_MAP_SIZE};
    if (syscall(SYS_process_vm_readv, p->pid, &local, 1, &remote, 1, 0) != RUN_MAP_SIZE) return NULL;
    return e->scratch;
}

/* a, b, flags and data of an exit (kvmtop/abi/arch/x86_64.py decode_union, the reference) */
static void decode_union(const uint8_t *run, uint32_t reason, uint64_t *a, uint32_t *b,
                         uint8_t *flags, uint8_t *data, size_t *data_len, int with_data,
                         int reads) {
    const uint8_t *u = run + RUN_UNION;
    *a = 0; *b = 0; *flags = 0; *data_len = 0;
    switch (reason) {
    case KVM_EXIT_IO: {
        uint8_t direction = u[0], size = u[1];
        uint32_t count = get32(u + 4);
        uint64_t offset = get64(u + 8);
        *a = (uint16_t)(u[2] | u[3] << 8);
        *b = size | (count << 8);
        *flags = direction ? F_WRITE : 0;
        if (with_data && (direction == 1 || reads)) {
            uint64_t end = offset + (uint64_t)size * count;
            if (end <= RUN_MAP_SIZE && end >= offset) {
                memcpy(data, run + offset, end - offset);
                *data_len = end - offset;
            }
        }
        break;
    }
    case KVM_EXIT_MMIO: {
        uint32_t len = get32(u + 16);
        uint8_t is_write = u[20];
        *a = get64(u);
        *b = len;
        *flags = is_write ? F_WRITE : 0;
        if (with_data && (is_write || reads)) {
            *data_len = len < 8 ? len : 8;
            memcpy(data, u + 8, *data_len);
        }
        break;
    }
    case KVM_EXIT_X86_RDMSR:
    case KVM_EXIT_X86_WRMSR:
        *a = get32(u + 12);
        *b = get32(u + 8);
        if (reason == KVM_EXIT_X86_WRMSR) *flags = F_WRITE;
        if (with_data && (*flags || reads)) { memcpy(data, u + 16, 8); *data_len = 8; }
        break;
    case KVM_EXIT_HYPERCALL:
        *a = get64(u);
        *b = get32(u + 64);
        break;
    case KVM_EXIT_SYSTEM_EVENT:
    case KVM_EXIT_INTERNAL_ERROR:
    case KVM_EXIT_EXCEPTION:
        *a = get32(u);
        *b = get32(u + 4);
        break;
    case KVM_EXIT_FAIL_ENTRY:
    case KVM_EXIT_TPR_ACCESS:
        *a = get64(u);
        *b = get32(u + 8);
        if (reason == KVM_EXIT_TPR_ACCESS && *b) *flags = F_WRITE;
        break;
    case KVM_EXIT_UNKNOWN:
        *a = get64(u);
        break;
    case KVM_EXIT_DEBUG:
        *a = get64(u + 8);
        *b = get32(u);
        break;
    case KVM_EXIT_IOAPIC_EOI:
        *a = u[0];
        break;
    case KVM_EXIT_NOTIFY:
    case KVM_EXIT_HYPERV:
    case KVM_EXIT_XEN:
        *a = get32(u);
        break;
    case KVM_EXIT_MEMORY_FAULT: {
        uint64_t fl = get64(u), size = get64(u + 16);
        *a = get64(u + 8);
        *b = size > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)size;
        *flags = (fl & KVM_MEMORY_EXIT_FLAG_PRIVATE) ? F_PRIVATE : 0;
        break;
    }
    default:
        break;
    }
}

/* The guest's RIP part of an exit whose run KVM synced the registers of (guest_rip.h); 0 where
   kvm_valid_regs does not ask for them. */
static int rip_part(const uint8_t *run, uint8_t *r) {
    struct guest_rip g;
    if (!guest_rip(run, &g)) return 0;
    memset(r, 0, RECORD_SIZE);
    r[0] = KIND_RIP;
    r[RIP_AT_FLAGS] = g.cpl >= 0 ? R_SEGMENTS : 0;
    r[RIP_AT_CPL] = (uint8_t)(g.cpl >= 0 ? g.cpl : 0);
    put64(r + RIP_AT_RIP, g.rip);
    put64(r + RIP_AT_LINEAR, g.linear);
    return 1;
}

/* One exit: EXIT, then LONG when guest_ns does not fit, then DATA, HELD and RIP
   (docs/recording-format.md); ``rip``: the page's RIP parts are on. */
static void emit(Engine *e, int vcpu, uint32_t reason, int err, int64_t entry, int64_t exit_ns,
                 const uint8_t *run, int cycle, int reads, const struct window *w, int rip) {
    uint64_t a = 0;
    uint32_t b = 0;
    uint8_t flags = 0, data[RUN_MAP_SIZE];
    size_t data_len = 0;
    if (err) {
        flags = F_FAILED;
        b = (uint32_t)err;
    } else {
        decode_union(run, reason, &a, &b, &flags, data, &data_len, e->with_data, reads);
    }
    if (cycle) flags |= F_CYCLE;
    if (data_len) flags |= F_DATA;
    int64_t guest = exit_ns - entry;
    if (guest < 0 || guest > (int64_t)GUEST_NS_MAX) flags |= F_LONG;
    size_t chunks = (data_len + DATA_CHUNK - 1) / DATA_CHUNK;
    int held = w && w->stops;
    size_t n = RECORD_SIZE * (1 + ((flags & F_LONG) ? 1 : 0) + chunks + (held ? 1 : 0) + (rip ? 1 : 0));
    uint8_t *r = buffer_grow(e, &e->records, n);
    if (!r) {
        e->lost++;
        return;
    }
    r[0] = KIND_EXIT;
    r[EXIT_AT_FLAGS] = flags;
    put16(r + EXIT_AT_VCPU, (uint16_t)vcpu);
    put32(r + EXIT_AT_REASON, reason);
    put64(r + EXIT_AT_T_EXIT, (uint64_t)(exit_ns - e->base_ns));
    put32(r + EXIT_AT_GUEST_NS, (flags & F_LONG) ? 0xFFFFFFFFu : (uint32_t)guest);
    put32(r + EXIT_AT_B, b);
    put64(r + EXIT_AT_A, a);
    r += RECORD_SIZE;
    if (flags & F_LONG) {
        r[0] = KIND_LONG;
        put64(r + LONG_AT_GUEST_NS, (uint64_t)(guest < 0 ? 0 : guest));
        r += RECORD_SIZE;
    }
    for (size_t i = 0; i < data_len; i += DATA_CHUNK, r += RECORD_SIZE) {
        size_t k = data_len - i < DATA_CHUNK ? data_len - i : DATA_CHUNK;
        r[0] = KIND_DATA;
        r[DATA_AT_LENGTH] = (uint8_t)k;
        memcpy(r + DATA_AT_BYTES, data + i, k);
    }
    if (held) {
        memset(r, 0, RECORD_SIZE);
        r[0] = KIND_HELD;
        put16(r + HELD_AT_STOPS, (uint16_t)(w->stops > 0xFFFF ? 0xFFFF : w->stops));
        put32(r + HELD_AT_UNSEEN_LOW_NS, w->unseen_low_ns > (int64_t)UNSEEN_LOW_MAX
                                             ? UNSEEN_LOW_MAX : (uint32_t)w->unseen_low_ns);
        put64(r + HELD_AT_SEEN_NS, (uint64_t)w->seen_ns);
        put64(r + HELD_AT_UNSEEN_NS, (uint64_t)w->unseen_ns);
        put64(r + HELD_AT_UNSEEN_HIGH_NS, (uint64_t)w->unseen_high_ns);
        r += RECORD_SIZE;
    }
    if (rip && !rip_part(run, r)) e->records.len -= RECORD_SIZE; /* not synced: no part */
    e->exits++;
}

/* The vCPU runs on a thread not seen running it before: say so (a VCPU record). */
static void seen(Engine *e, Page *p, int tid, int64_t now) {
    p->tid = tid;
    if (p->vcpu < 0) return; /* not a vCPU whose kvm_run cannot be read */
    uint8_t *r = buffer_grow(e, &e->seen, RECORD_SIZE);
    if (!r) return;
    r[0] = KIND_VCPU;
    put16(r + VCPU_AT_VCPU, (uint16_t)p->vcpu);
    put32(r + VCPU_AT_TID, (uint32_t)tid);
    put64(r + VCPU_AT_T, (uint64_t)(now - e->base_ns));
}

/* One stop / notify: the run entered at open_since ended with the exit its kvm_run holds. */
static void record_cycle(Engine *e, Page *p, int64_t now) {
    const uint8_t *run = page_bytes(e, p);
    int64_t since = p->open_since;
    p->open_since = 0;
    if (!run) {
        e->lost++;
        return;
    }
    uint32_t reason = p->open_immediate ? KVM_EXIT_INTR : get32(run + RUN_EXIT_REASON);
    if (reason == KVM_EXIT_INTR) /* the kernel sets it when a signal ends the run (EINTR) */
        emit(e, p->vcpu, reason, EINTR, since, now, run, 1, 0, NULL, p->rip == RIP_ON);
    else
        emit(e, p->vcpu, reason, 0, since, now, run, 1, 1, NULL, p->rip == RIP_ON);
}

/* An exit whose value the VMM gives the guest: IO in, MMIO read, RDMSR (decoder.is_read). */
static int is_read(const uint8_t *run, uint32_t reason) {
    const uint8_t *u = run + RUN_UNION;
    return (reason == KVM_EXIT_IO && u[0] == 0) || (reason == KVM_EXIT_MMIO && u[20] == 0) ||
           reason == KVM_EXIT_X86_RDMSR;
}

/* A read held for its value: at the vCPU's next entry (reads), or as it is when the vCPU goes. */
static void record_held(Engine *e, Page *p, int reads) {
    const uint8_t *run = page_bytes(e, p);
    p->held = 0;
    if (!run) {
        e->lost++;
        return;
    }
    emit(e, p->vcpu, get32(run + RUN_EXIT_REASON), 0, p->held_entry, p->held_exit, run, 0, reads,
         &p->held_window, p->rip == RIP_ON);
}

static void open_run(Engine *e, Page *p, int64_t now) {
    const uint8_t *run = page_bytes(e, p);
    p->open_since = now;
    if (p->rip == RIP_ARMED) p->rip = RIP_ON; /* this run began with kvm_valid_regs set */
    /* With immediate_exit set, KVM_RUN returns EINTR at once and leaves exit_reason as it was:
       remember it, or the previous exit would be counted twice. */
    p->open_immediate = run ? run[RUN_IMMEDIATE_EXIT] != 0 : 0;
}

/* --- the coalesced MMIO ring (kvmtop/model/coalesced.py RingLook, the reference) ------------------- */

static void put_coalesced(Engine *e, uint8_t flags, int vcpu, uint32_t len, int64_t now,
                          uint32_t count, uint64_t address) {
    uint8_t *r = buffer_grow(e, &e->coalesced, RECORD_SIZE);
    if (!r) return;
    r[0] = KIND_COALESCED;
    r[COALESCED_AT_FLAGS] = flags;
    put16(r + COALESCED_AT_VCPU, (uint16_t)vcpu);
    put32(r + COALESCED_AT_LEN, len);
    put64(r + COALESCED_AT_T, (uint64_t)(now - e->base_ns));
    put32(r + COALESCED_AT_COUNT, count);
    put64(r + COALESCED_AT_ADDRESS, address);
}

/* At each exit seen: a COALESCED record per (address, pio, len) of the entries the VM's ring
   took since the previous look. Nothing new (the common case): two loads, no syscall. */
static void ring_look(Engine *e, Page *p, int64_t now) {
    if (!p || !p->ring_map) return;
    RingLook *g = &e->rings[p->ring];
    uint32_t first = get32(p->ring_map), last = get32(p->ring_map + 4);
    if (last == g->last || last >= RING_MAX || first >= RING_MAX) {
        if (first < RING_MAX) g->first = first;
        return;
    }
    uint32_t unseen_before = (g->last + RING_MAX - g->first) % RING_MAX;
    uint32_t consumed = (first + RING_MAX - g->first) % RING_MAX;
    uint8_t wrap = consumed > unseen_before ? C_WRAP : 0;
    struct ring_group { uint64_t address; uint32_t len, pio, count; } groups[RING_MAX];
    int n = 0;
    for (uint32_t i = g->last; i != last; i = (i + 1) % RING_MAX) {
        const uint8_t *entry = p->ring_map + RING_HEAD + (size_t)i * RING_ENTRY;
        uint64_t address = get64(entry + RING_ENTRY_AT_PHYS_ADDR);
        uint32_t len = get32(entry + RING_ENTRY_AT_LEN), pio = get32(entry + RING_ENTRY_AT_PIO) ? 1 : 0;
        int k = 0;
        while (k < n && !(groups[k].address == address && groups[k].pio == pio &&
                          groups[k].len == len))
            k++;
        if (k == n) groups[n++] = (struct ring_group){address, len, pio, 0};
        groups[k].count++;
    }
    for (int k = 0; k < n; k++, wrap = 0) /* the wrap is flagged once a look, on its first */
        put_coalesced(e, (groups[k].pio ? C_PIO : 0) | wrap, p->vcpu, groups[k].len, now,
                      groups[k].count, groups[k].address);
    g->first = first;
    g->last = last;
}

/* --- ptrace stops ----------------------------------------------------------------------------- */

static int resume_thread(Engine *e, Thread *t, int sig) {
    Process *proc = proc_find(e, t->pid);
    int mode = proc ? proc->mode : MODE_TWO_STOP;
    long request;
    if (proc && (proc->flags & P_SYSCALLS))
        request = PTRACE_SYSCALL_;
    else if (mode == MODE_TWO_STOP)
        request = (t->runner || t->budget > 0) ? PTRACE_SYSCALL_ : PTRACE_CONT_;
    else /* one stop: only the filter stops it, and KVM_CREATE_VCPU's return */
        request = t->creating ? PTRACE_SYSCALL_ : PTRACE_CONT_;
    if (syscall(SYS_ptrace, request, t->tid, 0, (long)sig) != 0 && errno != ESRCH) return -1;
    return 0; /* ESRCH: killed while stopped; its exit status follows */
}

/* --- two stops: the time a vCPU thread's handling spends stopped for kvmtop ---------------------- */

static int cmp_ns(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* A stop's unseen cost per the first n round trips, each ended by a stop of a class (SLEPT,
   POLLED): each is one unseen resume-to-stop plus a syscall (a run's: plus KVM's part and the
   guest's run) or the VMM's work in user space, so at least its own stop's cost. Where there
   are enough others' round trips, the least is the shortest of them and the estimate their mean;
   else the least is 0 (a run's holds KVM's part, which can be most of it) and the estimate the
   mean of all. A most is the mean of the slowest quarter of its class's (kvmtop's own wake-up is most of what a stop
   costs, and one from sleep is the slow one), kept from ``before`` for a class the block has
   fewer than ROUND_TRIP_CLASS of. The same integer arithmetic as py_engine.round_trip_costs. */
static struct stop_costs round_trip_costs(const Engine *e, int n, const struct stop_costs *before) {
    int64_t total = 0, others = 0, shortest = INT64_MAX;
    int n_others = 0;
    for (int i = 0; i < n; i++) {
        int64_t ns = e->round_trips[i];
        total += ns;
        if (!e->round_trip_runs[i]) {
            others += ns;
            n_others++;
            if (ns < shortest) shortest = ns;
        }
    }
    int enough = n_others >= ROUND_TRIP_OTHERS;
    struct stop_costs c = {enough ? shortest : 0, enough ? others / n_others : total / n,
                           {before->most[SLEPT], before->most[POLLED]}};
    for (int way = SLEPT; way <= POLLED; way++) {
        int64_t ways[ROUND_TRIP_BLOCK], slower = 0;
        int m = 0;
        for (int i = 0; i < n; i++)
            if (e->round_trip_ways[i] == way) ways[m++] = e->round_trips[i];
        if (m < ROUND_TRIP_CLASS) continue;
        qsort(ways, (size_t)m, sizeof ways[0], cmp_ns);
        for (int i = m - m / 4; i < m; i++) slower += ways[i];
        slower /= m / 4;
        c.most[way] = slower > 1 ? slower : 1;
    }
    return c;
}

/* A resume-to-next-stop time of a vCPU thread, ended by the stop just waited for (held_stop
   says which count). */
static void round_trip_seen(Engine *e, int64_t ns, int run) {
    int n = e->n_round_trips;
    e->round_trips[n] = ns;
    e->round_trip_runs[n] = run;
    e->round_trip_ways[n] = e->polled;
    e->n_round_trips = ++n;
    if (n == ROUND_TRIP_BLOCK || (n == ROUND_TRIP_FIRST && !e->stop_costs.most[SLEPT]))
        e->stop_costs = round_trip_costs(e, n, &e->stop_costs);
    if (n == ROUND_TRIP_BLOCK) e->n_round_trips = 0;
}

/* After a vCPU thread's stop was handled and the thread resumed (two stops): the stop was seen
   at ``now`` and the resume began at ``resumed``, read before it (after it, the thread may
   already run, and kvmtop may not: a wake-up can preempt it). Its unseen part comes with the
   thread's next stop (held_unseen). */
static void held_stop(Engine *e, Thread *t, const struct syscall_info *info, int64_t now,
                      int64_t resumed) {
    /* resume to the next stop: one stop's unseen round trip, plus a syscall (entry to exit), or
       the VMM's own work in user space (exit to an entry other than KVM_RUN's) */
    if (t->resumed_ns && (info->op == PTRACE_SYSCALL_INFO_EXIT || !t->in_run))
        round_trip_seen(e, now - t->resumed_ns, t->resumed_run);
    t->resumed_ns = resumed;
    t->resumed_run = t->in_run;
    if (!t->handling) return;
    t->open.stops++;
    t->open.seen_ns += resumed - now;
}

/* A stop of a thread in its handling window ends the unseen part of the window's latest stop:
   what that cost depends on whether kvmtop slept for this stop or a poll caught it
   (py_engine.window_with_unseen). */
static void held_unseen(Engine *e, Thread *t) {
    const struct stop_costs *c = &e->stop_costs;
    /* a stop a poll caught costs at most what one kvmtop slept for does, where its own class has
       no figure yet; the estimate lies within the bound (py_engine.stop_cost) */
    int64_t most = c->most[SLEPT];
    if (e->polled == POLLED && c->most[POLLED]) most = c->most[POLLED];
    int64_t estimate = c->estimate;
    if (most) estimate = estimate < c->least ? c->least : estimate > most ? most : estimate;
    struct window *w = &t->open;
    int bounded = most && (w->unseen_high_ns || w->stops == 1); /* no basis once: no most */
    w->unseen_ns += estimate;
    w->unseen_low_ns += c->least;
    w->unseen_high_ns = bounded ? w->unseen_high_ns + most : 0;
}

/* 1: handled and resumed; 0: for Python (nothing changed); -1: errno set. Lock held. */
static int handle_stop(Engine *e, int tid, int status, int64_t now) {
    if (!WIFSTOPPED(status)) return 0;
    Thread *t = thread_find(e, tid);
    if (!t) return 0;
    Process *proc = proc_find(e, t->pid);
    if (!proc) return 0;
    if (t->handling && t->open.stops) held_unseen(e, t);
    int sig = WSTOPSIG(status), event = status >> 16;
    struct syscall_info info = {0};
    if (sig == SYSCALL_STOP_SIG && event == 0) {
        if (syscall(SYS_ptrace, PTRACE_GET_SYSCALL_INFO_, tid, sizeof info, &info) <= 0)
            return errno == ESRCH ? 0 : -1;
        if (info.op == PTRACE_SYSCALL_INFO_ENTRY) {
            if (proc->mode != MODE_TWO_STOP) {
                /* its KVM_RUN entries are seccomp stops or notifications: nothing here */
            } else if (info.entry.nr == (uint64_t)e->sys_ioctl &&
                       ((info.entry.args[1] >> 8) & 0xFF) == KVMIO) {
                uint32_t request = (uint32_t)info.entry.args[1];
                if (request == KVM_RUN) {
                    Page *p = page_find(e, t->pid, (int)info.entry.args[0]);
                    if (!p) return 0;
                    if (p->tid != tid) seen(e, p, tid, now);
                    if (p->held) record_held(e, p, 1);
                    if (p->rip == RIP_ARMED) p->rip = RIP_ON; /* begun with kvm_valid_regs set */
                    t->runner = 1;
                    t->in_run = 1;
                    t->page = (int)(p - e->pages);
                    t->entry_ns = now;
                    t->entered = t->handling ? t->open : (struct window){0};
                    t->handling = 0;
                } else if (request == KVM_CREATE_VCPU) {
                    t->runner = 1;
                    t->creating = 1;
                } else {
                    t->budget = SYSCALL_BUDGET; /* a KVM thread: keep watching it */
                }
            } else if (t->budget > 0) {
                t->budget--;
            }
        } else if (info.op == PTRACE_SYSCALL_INFO_EXIT) {
            if (t->in_run) {
                t->in_run = 0;
                int64_t rval = info.exit.rval;
                Page *p = t->page >= 0 ? &e->pages[t->page] : NULL;
                if (p && p->used) ring_look(e, p, now);
                t->page = -1;
                const uint8_t *run = p && p->used ? page_bytes(e, p) : NULL;
                if (!run) {
                    if (rval == 0) e->lost++; /* an exit happened, but its kvm_run is unreadable */
                } else if (rval == 0) {
                    uint32_t reason = get32(run + RUN_EXIT_REASON);
                    if (e->with_data && is_read(run, reason)) { /* its value comes at the next entry */
                        p->held = 1;
                        p->held_entry = t->entry_ns;
                        p->held_exit = now;
                        p->held_window = t->entered;
                    } else {
                        emit(e, p->vcpu, reason, 0, t->entry_ns, now, run, 0, 0, &t->entered,
                             p->rip == RIP_ON);
                    }
                } else {
                    emit(e, p->vcpu, get32(run + RUN_EXIT_REASON), (int)-rval, t->entry_ns, now, run,
                         0, 0, &t->entered, p->rip == RIP_ON);
                }
                t->handling = 1; /* this stop starts the VMM's handling of the exit */
                t->open = (struct window){0};
            } else if (t->creating) {
                return 0; /* a new vCPU fd: Python maps it */
            }
        }
    } else if (sig == SIGTRAP && event == PTRACE_EVENT_SECCOMP_) {
        if (syscall(SYS_ptrace, PTRACE_GET_SYSCALL_INFO_, tid, sizeof info, &info) <= 0)
            return errno == ESRCH ? 0 : -1;
        if (info.op != PTRACE_SYSCALL_INFO_SECCOMP) return 0;
        uint32_t request = (uint32_t)info.entry.args[1];
        if (request == KVM_RUN) {
            Page *p = page_find(e, t->pid, (int)info.entry.args[0]);
            if (!p) return 0;
            if (p->tid != tid) seen(e, p, tid, now);
            ring_look(e, p, now);
            if (p->open_since) record_cycle(e, p, now);
            open_run(e, p, now);
        } else if (request == KVM_CREATE_VCPU) {
            t->creating = 1; /* resumed with PTRACE_SYSCALL: its return gives the fd */
        } else {
            return 0;
        }
    } else {
        return 0;
    }
    e->stops++;
    if (proc->flags & P_NO_RESUME) return 1;
    int held = proc->mode == MODE_TWO_STOP && t->runner;
    int64_t resumed = held ? now_ns() : 0;
    if (resume_thread(e, t, 0) != 0) return -1;
    if (held) held_stop(e, t, &info, now, resumed);
    return 1;
}

/* --- Python API --------------------------------------------------------------------------------- */

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    static char *names[] = {"base_ns", "with_data", "poll_max_ns", "wait_flags", "sys_ioctl", NULL};
    long long base = 0, poll_max = 0;
    int with_data = 0, wait_flags = 0, sys_ioctl = SYS_ioctl;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LpLi|i", names, &base, &with_data, &poll_max,
                                     &wait_flags, &sys_ioctl))
        return -1;
    e->base_ns = base;
    e->with_data = with_data;
    chooser_init(&e->chooser, poll_max);
    e->wait_flags = wait_flags;
    e->sys_ioctl = sys_ioctl;
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Engine *e = (Engine *)type->tp_alloc(type, 0); /* zeroed */
    if (e) pthread_mutex_init(&e->lock, NULL);
    for (int i = 0; e && i < MAX_THREADS; i++) e->threads[i].page = -1;
    return (PyObject *)e;
}

static void page_release(Page *p) {
    if (p->map) PyBuffer_Release(&p->view);
    if (p->ring_map) PyBuffer_Release(&p->ring_view);
    memset(p, 0, sizeof *p);
}

static void Engine_dealloc(Engine *e) {
    for (int i = 0; i < MAX_PAGES; i++)
        if (e->pages[i].used) page_release(&e->pages[i]);
    free(e->records.data);
    free(e->seen.data);
    free(e->coalesced.data);
    pthread_mutex_destroy(&e->lock);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

#define LOCK(e) pthread_mutex_lock(&(e)->lock)
#define UNLOCK(e) pthread_mutex_unlock(&(e)->lock)

/* waitpid, polling first (from the last stop's moment, for the window) when the chooser says
   so; *now: when the stop was seen, the one clock read per stop (polling adds one per failed
   poll, the chooser a read of the CPU pressure per comparison). GIL released by the
   caller. */
static int wait_stop(Engine *e, int *status, int64_t *now) {
    struct poll_chooser *c = &e->chooser;
    int tid = 0;
    if (c->poll_ns) {
        int64_t deadline = c->last_ns + c->poll_ns;
        for (;;) {
            tid = waitpid(-1, status, e->wait_flags | WNOHANG);
            if (tid != 0 || now_ns() >= deadline) break;
        }
    }
    e->polled = tid != 0 ? POLLED : SLEPT;
    if (tid == 0) tid = waitpid(-1, status, e->wait_flags);
    if (tid < 0) return tid;
    *now = now_ns();
    if (chooser_seen(c, *now)) chooser_pressure(c, read_pressure());
    return tid;
}

static PyObject *Engine_run(Engine *e, PyObject *args) {
    long long deadline;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "Ln", &deadline, &max_bytes)) return NULL;
    int tid = 0, status = 0, handled = 0, err = 0;
    int64_t now = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        tid = wait_stop(e, &status, &now);
        if (tid < 0) {
            err = errno;
            break;
        }
        LOCK(e);
        Thread *t = thread_find(e, tid);
        Process *proc = t ? proc_find(e, t->pid) : NULL;
        handled = proc && !(proc->flags & P_HANDBACK) ? handle_stop(e, tid, status, now) : 0;
        size_t pending = e->records.len;
        UNLOCK(e);
        if (handled < 0) {
            err = errno;
            break;
        }
        if (!handled) break;
        if ((Py_ssize_t)pending >= max_bytes || now >= deadline) {
            tid = 0;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (err == EINTR) Py_RETURN_NONE;
    if (err) return PyErr_SetFromErrno(PyExc_OSError), NULL;
    if (tid == 0) Py_RETURN_NONE;
    return Py_BuildValue("iiL", tid, status, (long long)now);
}

static PyObject *Engine_handle(Engine *e, PyObject *args) {
    int tid, status;
    long long now;
    if (!PyArg_ParseTuple(args, "iiL", &tid, &status, &now)) return NULL;
    LOCK(e);
    int handled = handle_stop(e, tid, status, now);
    UNLOCK(e);
    if (handled < 0) return PyErr_SetFromErrno(PyExc_OSError), NULL;
    return PyBool_FromLong(handled);
}

static PyObject *Engine_resume(Engine *e, PyObject *args) {
    int tid, sig;
    if (!PyArg_ParseTuple(args, "ii", &tid, &sig)) return NULL;
    LOCK(e);
    Thread *t = thread_find(e, tid);
    int rc = t ? resume_thread(e, t, sig) : (errno = ESRCH, -1);
    UNLOCK(e);
    if (rc < 0) return PyErr_SetFromErrno(PyExc_OSError), NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_add_process(Engine *e, PyObject *args) {
    int pid, mode;
    if (!PyArg_ParseTuple(args, "ii", &pid, &mode)) return NULL;
    LOCK(e);
    Process *p = proc_find(e, pid);
    for (int i = 0; !p && i < MAX_PROCS; i++)
        if (!e->procs[i].used) p = &e->procs[i];
    if (p) {
        *p = (Process){1, pid, mode, 0};
        if (p - e->procs >= e->procs_hi) e->procs_hi = (int)(p - e->procs) + 1;
    }
    UNLOCK(e);
    if (!p) return PyErr_Format(PyExc_OSError, "more than %d traced processes", MAX_PROCS);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_process(Engine *e, PyObject *args) {
    int pid, mode, flags;
    if (!PyArg_ParseTuple(args, "iii", &pid, &mode, &flags)) return NULL;
    LOCK(e);
    Process *p = proc_find(e, pid);
    if (p) {
        p->mode = mode;
        p->flags = flags;
    }
    UNLOCK(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_remove_process(Engine *e, PyObject *args) {
    int pid;
    if (!PyArg_ParseTuple(args, "i", &pid)) return NULL;
    LOCK(e);
    Process *p = proc_find(e, pid);
    if (p) p->used = 0;
    for (int i = 0; i < MAX_RINGS; i++)
        if (e->rings[i].pid == pid) e->rings[i].used = 0;
    for (int i = 0; i < MAX_THREADS;) {
        if (e->threads[i].used && e->threads[i].pid == pid)
            thread_delete(e, &e->threads[i]); /* may shift another entry into i */
        else
            i++;
    }
    UNLOCK(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_add_thread(Engine *e, PyObject *args) {
    int tid, pid;
    if (!PyArg_ParseTuple(args, "ii", &tid, &pid)) return NULL;
    LOCK(e);
    Thread *t = thread_find(e, tid);
    int fresh = t == NULL;
    if (!t) t = thread_insert(e, tid);
    if (t && fresh) *t = (Thread){1, tid, pid, 0, 0, 0, SYSCALL_BUDGET, 0, -1};
    UNLOCK(e);
    if (!t) return PyErr_Format(PyExc_OSError, "more than %d traced threads", MAX_THREADS);
    return PyBool_FromLong(fresh);
}

static PyObject *Engine_remove_thread(Engine *e, PyObject *args) {
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid)) return NULL;
    LOCK(e);
    Thread *t = thread_find(e, tid);
    if (t) thread_delete(e, t);
    UNLOCK(e);
    return PyBool_FromLong(t != NULL);
}

static PyObject *Engine_thread(Engine *e, PyObject *args) {
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid)) return NULL;
    LOCK(e);
    Thread *t = thread_find(e, tid);
    Thread copy = t ? *t : (Thread){0};
    UNLOCK(e);
    if (!t) Py_RETURN_NONE;
    return Py_BuildValue("(iNiNN)", copy.pid, PyBool_FromLong(copy.runner), copy.budget,
                         PyBool_FromLong(copy.creating), PyBool_FromLong(copy.in_run));
}

static PyObject *Engine_set_thread(Engine *e, PyObject *args) {
    int tid, runner, creating;
    if (!PyArg_ParseTuple(args, "ipp", &tid, &runner, &creating)) return NULL;
    LOCK(e);
    Thread *t = thread_find(e, tid);
    if (t) { /* and out of KVM_RUN: a run that ended is the caller's to account for */
        t->runner = runner;
        t->creating = creating;
        t->in_run = 0;
        t->page = -1;
        t->handling = 0;
        t->resumed_ns = 0;
    }
    UNLOCK(e);
    return PyBool_FromLong(t != NULL);
}

static PyObject *Engine_threads_of(Engine *e, PyObject *args) {
    int pid;
    if (!PyArg_ParseTuple(args, "i", &pid)) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    LOCK(e);
    for (int i = 0; i < MAX_THREADS; i++) {
        if (e->threads[i].used && e->threads[i].pid == pid) {
            PyObject *tid = PyLong_FromLong(e->threads[i].tid);
            if (!tid || PyList_Append(out, tid) < 0) {
                Py_XDECREF(tid);
                Py_DECREF(out);
                UNLOCK(e);
                return NULL;
            }
            Py_DECREF(tid);
        }
    }
    UNLOCK(e);
    return out;
}

static PyObject *Engine_add_page(Engine *e, PyObject *args) {
    int pid, fd, vcpu, tid;
    PyObject *mapping;
    unsigned long long remote;
    if (!PyArg_ParseTuple(args, "iiiiOK", &pid, &fd, &vcpu, &tid, &mapping, &remote)) return NULL;
    Py_buffer view = {0};
    if (mapping != Py_None) {
        if (PyObject_GetBuffer(mapping, &view, PyBUF_SIMPLE) < 0) return NULL;
        if (view.len < RUN_MAP_SIZE) {
            PyBuffer_Release(&view);
            return PyErr_Format(PyExc_ValueError, "a run mapping holds %d bytes", RUN_MAP_SIZE);
        }
    }
    LOCK(e);
    Page *p = page_find(e, pid, fd);
    if (p && p->held) record_held(e, p, 0);
    if (p) page_release(p);
    for (int i = 0; !p && i < MAX_PAGES; i++)
        if (!e->pages[i].used) p = &e->pages[i];
    if (p) {
        *p = (Page){.used = 1, .pid = pid, .fd = fd, .vcpu = vcpu, .tid = tid, .remote = remote};
        if (p - e->pages >= e->pages_hi) e->pages_hi = (int)(p - e->pages) + 1;
        if (mapping != Py_None) {
            p->view = view;
            p->map = view.buf;
        }
    }
    UNLOCK(e);
    if (!p) {
        if (mapping != Py_None) PyBuffer_Release(&view);
        return PyErr_Format(PyExc_OSError, "more than %d vCPUs traced", MAX_PAGES);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_remove_page(Engine *e, PyObject *args) {
    int pid, fd;
    if (!PyArg_ParseTuple(args, "ii", &pid, &fd)) return NULL;
    LOCK(e);
    Page *p = page_find(e, pid, fd);
    if (p) {
        int index = (int)(p - e->pages);
        for (int i = 0; i < MAX_THREADS; i++)
            if (e->threads[i].used && e->threads[i].page == index) e->threads[i].page = -1;
        if (p->held) record_held(e, p, 0);
        page_release(p);
    }
    UNLOCK(e);
    return PyBool_FromLong(p != NULL);
}

/* set_rip(pid, fd, on): Python has set the page's kvm_valid_regs (on), or is about to restore it */
static PyObject *Engine_set_rip(Engine *e, PyObject *args) {
    int pid, fd, on;
    if (!PyArg_ParseTuple(args, "iip", &pid, &fd, &on)) return NULL;
    LOCK(e);
    Page *p = page_find(e, pid, fd);
    if (p) p->rip = on ? RIP_ARMED : RIP_OFF;
    UNLOCK(e);
    return PyBool_FromLong(p != NULL);
}

static PyObject *Engine_page(Engine *e, PyObject *args) {
    int pid, fd;
    if (!PyArg_ParseTuple(args, "ii", &pid, &fd)) return NULL;
    LOCK(e);
    Page *p = page_find(e, pid, fd);
    int vcpu = p ? p->vcpu : 0, tid = p ? p->tid : 0;
    UNLOCK(e);
    if (!p) Py_RETURN_NONE;
    return Py_BuildValue("(ii)", vcpu, tid);
}

static PyObject *Engine_close_runs(Engine *e, PyObject *args) {
    int pid, tid;
    long long now;
    if (!PyArg_ParseTuple(args, "iiL", &pid, &tid, &now)) return NULL;
    LOCK(e);
    for (int i = 0; i < e->pages_hi; i++) {
        Page *p = &e->pages[i];
        if (!p->used || p->pid != pid || !p->open_since || (tid && p->tid != tid)) continue;
        ring_look(e, p, now);
        const uint8_t *run = page_bytes(e, p);
        /* a last run that a dying process's kill cut short (KVM_EXIT_INTR) is no guest exit */
        if (p->open_immediate || !run || get32(run + RUN_EXIT_REASON) == KVM_EXIT_INTR)
            p->open_since = 0;
        else
            record_cycle(e, p, now);
    }
    UNLOCK(e);
    Py_RETURN_NONE;
}

/* add_ring(pid, fd, vm, mapping or None): after add_page. */
static PyObject *Engine_add_ring(Engine *e, PyObject *args) {
    int pid, fd, vm;
    PyObject *mapping;
    if (!PyArg_ParseTuple(args, "iiiO", &pid, &fd, &vm, &mapping)) return NULL;
    Py_buffer view = {0};
    if (mapping != Py_None) {
        if (PyObject_GetBuffer(mapping, &view, PyBUF_SIMPLE) < 0) return NULL;
        if (view.len < RING_PAGE) {
            PyBuffer_Release(&view);
            return PyErr_Format(PyExc_ValueError, "a ring mapping holds %d bytes", RING_PAGE);
        }
    }
    int kept = 0;
    LOCK(e);
    Page *p = page_find(e, pid, fd);
    RingLook *g = NULL;
    for (int i = 0; p && !g && i < MAX_RINGS; i++)
        if (e->rings[i].used && e->rings[i].pid == pid && e->rings[i].vm == vm) g = &e->rings[i];
    int fresh = g == NULL;
    for (int i = 0; p && !g && i < MAX_RINGS; i++)
        if (!e->rings[i].used) g = &e->rings[i];
    if (p && g) {
        if (fresh) *g = (RingLook){1, pid, vm, 0, 0, 0};
        if (mapping == Py_None) {
            if (fresh) /* said once per VM; nothing is counted */
                put_coalesced(e, C_UNREADABLE, p->vcpu < 0 ? 0 : p->vcpu, 0, now_ns(), 0, 0);
        } else {
            if (!g->readable) { /* nothing from before the first look is counted */
                g->first = get32(view.buf);
                g->last = get32((const uint8_t *)view.buf + 4);
                g->readable = 1;
            }
            if (p->ring_map) PyBuffer_Release(&p->ring_view);
            p->ring_view = view;
            p->ring_map = view.buf;
            p->ring = (int)(g - e->rings);
            kept = 1;
        }
    }
    UNLOCK(e);
    if (!kept && mapping != Py_None) PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *take_buffer(Buffer *b) {
    PyObject *out = PyBytes_FromStringAndSize((const char *)b->data, (Py_ssize_t)b->len);
    b->len = 0;
    return out;
}

static PyObject *Engine_take(Engine *e, PyObject *unused) {
    LOCK(e);
    PyObject *records = take_buffer(&e->records);
    PyObject *seen_records = take_buffer(&e->seen);
    long stops = e->stops, notifications = e->notifications, lost = e->lost, exits = e->exits;
    e->stops = e->notifications = e->lost = e->exits = 0;
    UNLOCK(e);
    if (!records || !seen_records) {
        Py_XDECREF(records);
        Py_XDECREF(seen_records);
        return NULL;
    }
    return Py_BuildValue("(NNllll)", records, seen_records, stops, notifications, lost, exits);
}

static PyObject *Engine_take_coalesced(Engine *e, PyObject *unused) {
    LOCK(e);
    PyObject *out = take_buffer(&e->coalesced);
    UNLOCK(e);
    return out;
}

static PyObject *Engine_pending(Engine *e, PyObject *unused) {
    LOCK(e);
    size_t n = e->records.len + e->seen.len + e->coalesced.len;
    long counted = e->stops + e->notifications + e->lost;
    UNLOCK(e);
    return PyLong_FromSize_t(n + (size_t)counted);
}

static PyObject *Engine_set_base(Engine *e, PyObject *args) {
    long long base;
    if (!PyArg_ParseTuple(args, "L", &base)) return NULL;
    LOCK(e);
    e->base_ns = base;
    UNLOCK(e);
    Py_RETURN_NONE;
}

/* --- seccomp user notification ---------------------------------------------------------------- */

/* 1: answered; 0: unknown thread or fd, kept pending for Python; -1: errno. Lock held. */
static int answer(Engine *e, int listener, struct notif *n, int force) {
    int64_t now = now_ns();
    Thread *t = thread_find(e, (int)n->pid);
    Page *p = NULL;
    if (n->nr == e->sys_ioctl && (uint32_t)n->args[1] == KVM_RUN && t)
        p = page_find(e, t->pid, (int)n->args[0]);
    if (!p && !force) return 0;
    if (p) {
        if (p->tid != (int)n->pid) seen(e, p, (int)n->pid, now);
        ring_look(e, p, now);
        /* The previous run ended when this one is asked for, whatever becomes of this one. */
        if (p->open_since) record_cycle(e, p, now);
    }
    struct notif_resp resp = {.id = n->id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE_};
    e->notifications++;
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND_, &resp) != 0) {
        /* ENOENT: the caller took a signal and its KVM_RUN was not entered; it asks again */
        return errno == ENOENT ? 1 : -1;
    }
    if (p) open_run(e, p, now); /* counted once, when the run it ends was really entered */
    return 1;
}

static PyObject *Engine_notify_run(Engine *e, PyObject *args) {
    int listener, wake;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "iin", &listener, &wake, &max_bytes)) return NULL;
    const char *why = NULL;
    int err = 0;
    struct notif n;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        struct pollfd fds[2] = {{listener, POLLIN, 0}, {wake, POLLIN, 0}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        if (fds[1].revents) { why = "wake"; break; }
        if (fds[0].revents & (POLLHUP | POLLERR | POLLNVAL)) { why = "hangup"; break; }
        memset(&n, 0, sizeof n);
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV_, &n) != 0) {
            if (errno == EINTR || errno == ENOENT) continue; /* ENOENT: withdrawn by a signal */
            err = errno;
            break;
        }
        LOCK(e);
        int rc = answer(e, listener, &n, 0);
        if (rc == 0) {
            e->pending = n;
            e->has_pending = 1;
        }
        size_t pending = e->records.len;
        UNLOCK(e);
        if (rc < 0) { err = errno; break; }
        if (rc == 0) { why = "unknown"; break; }
        if ((Py_ssize_t)pending >= max_bytes) { why = "full"; break; }
    }
    Py_END_ALLOW_THREADS
    if (err) return PyErr_SetFromErrno(PyExc_OSError), NULL;
    if (why[0] == 'u')
        return Py_BuildValue("(siiN)", why, (int)n.pid, (int)n.args[0],
                             PyBool_FromLong(n.nr == e->sys_ioctl && (uint32_t)n.args[1] == KVM_RUN));
    return Py_BuildValue("(s)", why);
}

static PyObject *Engine_notify_continue(Engine *e, PyObject *args) {
    int listener;
    if (!PyArg_ParseTuple(args, "i", &listener)) return NULL;
    LOCK(e);
    int rc = e->has_pending ? answer(e, listener, &e->pending, 1) : 1;
    e->has_pending = 0;
    UNLOCK(e);
    if (rc < 0) return PyErr_SetFromErrno(PyExc_OSError), NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_VARARGS,
     "run(deadline_ns, max_bytes) -> (tid, status, now_ns) of a stop for Python, or None"},
    {"handle", (PyCFunction)Engine_handle, METH_VARARGS, "handle(tid, status, now_ns) -> handled"},
    {"resume", (PyCFunction)Engine_resume, METH_VARARGS, "resume(tid, sig): as the mode says"},
    {"add_process", (PyCFunction)Engine_add_process, METH_VARARGS, "add_process(pid, mode)"},
    {"set_process", (PyCFunction)Engine_set_process, METH_VARARGS,
     "set_process(pid, mode, flags): P_HANDBACK, P_SYSCALLS, P_NO_RESUME"},
    {"remove_process", (PyCFunction)Engine_remove_process, METH_VARARGS,
     "remove_process(pid): it and its threads"},
    {"add_thread", (PyCFunction)Engine_add_thread, METH_VARARGS, "add_thread(tid, pid) -> new"},
    {"remove_thread", (PyCFunction)Engine_remove_thread, METH_VARARGS, "remove_thread(tid)"},
    {"thread", (PyCFunction)Engine_thread, METH_VARARGS,
     "thread(tid) -> (pid, runner, budget, creating, in_run) or None"},
    {"set_thread", (PyCFunction)Engine_set_thread, METH_VARARGS,
     "set_thread(tid, runner, creating): also out of KVM_RUN"},
    {"threads_of", (PyCFunction)Engine_threads_of, METH_VARARGS, "threads_of(pid) -> [tid]"},
    {"add_page", (PyCFunction)Engine_add_page, METH_VARARGS,
     "add_page(pid, fd, vcpu, tid, mapping or None, remote_address)"},
    {"remove_page", (PyCFunction)Engine_remove_page, METH_VARARGS, "remove_page(pid, fd)"},
    {"page", (PyCFunction)Engine_page, METH_VARARGS, "page(pid, fd) -> (vcpu, tid) or None"},
    {"set_rip", (PyCFunction)Engine_set_rip, METH_VARARGS,
     "set_rip(pid, fd, on): RIP parts from the page's next run on (its kvm_valid_regs is set), or none"},
    {"close_runs", (PyCFunction)Engine_close_runs, METH_VARARGS,
     "close_runs(pid, tid or 0, now_ns): the last exit of runs that have ended"},
    {"take", (PyCFunction)Engine_take, METH_NOARGS,
     "take() -> (records, vcpu_records, stops, notifications, lost, exits), reset"},
    {"add_ring", (PyCFunction)Engine_add_ring, METH_VARARGS,
     "add_ring(pid, fd, vm, mapping or None): the VM's coalesced MMIO ring, after add_page"},
    {"take_coalesced", (PyCFunction)Engine_take_coalesced, METH_NOARGS,
     "take_coalesced() -> COALESCED records, reset"},
    {"pending", (PyCFunction)Engine_pending, METH_NOARGS, "pending() -> anything to take"},
    {"set_base", (PyCFunction)Engine_set_base, METH_VARARGS, "set_base(ns): record times' zero"},
    {"notify_run", (PyCFunction)Engine_notify_run, METH_VARARGS,
     "notify_run(listener, wake_fd, max_bytes) -> ('unknown', tid, fd, is_run) | ('full',) | "
     "('wake',) | ('hangup',)"},
    {"notify_continue", (PyCFunction)Engine_notify_continue, METH_VARARGS,
     "notify_continue(listener): answer the notification handed back"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvmtop.native._hotloop.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, /* kvmtop/trace/native_engine.py */
    .tp_doc = "The hot state and loops of tracing (see kvmtop/trace/py_engine.py for the reference).",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

/* The engine's chooser on its own, for the tests: fed with the timings kvmtop/trace/stop_wait.py's
   PollChooser is fed with, it must choose the same. */
typedef struct {
    PyObject_HEAD
    struct poll_chooser c;
} Chooser;

static int Chooser_init(Chooser *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"max_ns", NULL};
    long long max_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "L", names, &max_ns)) return -1;
    chooser_init(&self->c, max_ns);
    return 0;
}

static PyObject *Chooser_seen(Chooser *self, PyObject *arg) {
    long long now = PyLong_AsLongLong(arg);
    if (now == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(chooser_seen(&self->c, now));
}

static PyObject *Chooser_pressure(Chooser *self, PyObject *arg) {
    long long waited = PyLong_AsLongLong(arg);
    if (waited == -1 && PyErr_Occurred()) return NULL;
    chooser_pressure(&self->c, waited);
    Py_RETURN_NONE;
}

static PyMethodDef Chooser_methods[] = {
    {"seen", (PyCFunction)Chooser_seen, METH_O,
     "seen(now_ns) -> a stop was seen then; True: call pressure() now"},
    {"pressure", (PyCFunction)Chooser_pressure, METH_O,
     "pressure(waited): the host's CPU pressure (PSI some avg10 in 1/100 %; -1: unknown)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Chooser_members[] = {
    {"max_ns", T_LONGLONG, offsetof(Chooser, c.max_ns), READONLY, "the poll window"},
    {"poll_ns", T_LONGLONG, offsetof(Chooser, c.poll_ns), READONLY,
     "the next wait's poll window (0: sleep at once)"},
    {"last_ns", T_LONGLONG, offsetof(Chooser, c.last_ns), READONLY, "when the last stop was seen"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ChooserType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvmtop.native._hotloop.PollChooser",
    .tp_basicsize = sizeof(Chooser),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Whether a wait polls first (see kvmtop/trace/stop_wait.py PollChooser, the reference).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Chooser_init,
    .tp_methods = Chooser_methods,
    .tp_members = Chooser_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvmtop.native._hotloop",
                                    "The tracer's per-exit work in C.", -1, NULL};

PyMODINIT_FUNC PyInit__hotloop(void) {
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&ChooserType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) return NULL;
    Py_INCREF(&ChooserType);
    if (PyModule_AddObject(m, "PollChooser", (PyObject *)&ChooserType) < 0) return NULL;
    PyModule_AddIntConstant(m, "MODE_TWO_STOP", MODE_TWO_STOP);
    PyModule_AddIntConstant(m, "MODE_ONE_STOP", MODE_ONE_STOP);
    PyModule_AddIntConstant(m, "MODE_NOTIFY", MODE_NOTIFY);
    PyModule_AddIntConstant(m, "SYSCALL_BUDGET", SYSCALL_BUDGET);
    PyModule_AddIntConstant(m, "P_HANDBACK", P_HANDBACK);
    PyModule_AddIntConstant(m, "P_SYSCALLS", P_SYSCALLS);
    PyModule_AddIntConstant(m, "P_NO_RESUME", P_NO_RESUME);
    return m;
}
