/* kvmtop.native._tracepoints: exits read from KVM's tracepoints, through perf_event_open: no
 * ptrace, no stop, nothing written into any VMM. The kernel writes each event into a ring buffer
 * per CPU; this module reads them with the GIL released, puts the CPUs' events in time order,
 * and turns each thread's KVM_RUN entries and returns into the same packed records the ptrace
 * engines make (kvmtop_abi.h). Python decides: which tracepoints (their ids and the offsets of
 * their fields, from tracefs' format files), which processes, which vCPU each (pid, fd) is.
 *
 *   Rings(cpus, events, pages, with_data, with_rip=False, bpf=False)
 *       events: [(role, id, filter or None, ((offset, size, signed), ...)), ...], the first
 *       event of each CPU also reports forks, exits and execs (PERF_RECORD_FORK, _EXIT, _COMM).
 *       Raises OSError (errno of perf_event_open, or of the filter: EINVAL). with_rip: each
 *       exit has a RIP part where the run's kvm_emulate_insn (R_EMUL) or kvm_exit told it.
 *       bpf: each event's BPF program (bpf_program: its fields, the filters of R_RUN and
 *       R_SYSEXIT) writes it into one BPF ring of pages per CPU; each CPU's perf ring has a
 *       dummy event for the forks, exits and execs. Raises OSError where the kernel refuses
 *       (EPERM: no CAP_BPF).
 *   .add_events(events, with_rip)  more events on every ring from now on
 *   .follow(pid) / .unfollow(pid) / .follow_all(on) / .follow_children(on)
 *   .set_vcpu(pid, fd, slot)       slot -1: not a vCPU that can be named (its exits are lost)
 *   .forget_pid(pid)               its threads and vCPU fds
 *   .set_base(ns)
 *   .run(deadline_ns, max_bytes, wake_fd) -> None | ("unknown", pid, tid, fd, vm, id)
 *       read the rings until the deadline, max_bytes of records, or a KVM_RUN on a (pid, fd)
 *       not told (the event waits; tell it and run again; vm and id: of its KVM_CREATE_VCPU
 *       where the engine saw it, else -1); wake_fd readable returns too
 *   .take() -> (records, seen, exits, lost_exits, news, kernel)
 *       kernel: COALESCED records flagged C_KERNEL: the port and MMIO writes KVM handled in
 *       the kernel (a run's write not followed by its exit to the VMM), by vCPU and target;
 *       then HARDWARE records: the guest's hardware exits by vCPU and reason (kvm_exit)
 *       news: ((what, pid, ppid, tid, t_ns, comm), ...), what: "fork", "exec" (comm: the
 *       program's), "exit" (a thread)
 *   .close_thread(tid)             its last exit is final (records a held one)
 *   .lost_events() -> (per-CPU counts the kernel could not write)
 *   .feed(cpu, bytes)               perf records as a ring holds them (tests)
 *   .fds -> (the ring fds); .ids -> ((the kernel's id of each event, its role), ...)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "kvmtop_abi.h"

#if defined(__linux__)
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { R_RUN, R_UEXIT, R_PIO, R_MMIO, R_HYPERCALL, R_SYSEXIT, R_MARK, R_KEXIT, R_EMUL, R_ROLES };
enum { EMUL_VM86 = 0x2, EMUL_PROT64 = 0x8 }; /* kvm_emulate_insn's flags (0: real mode) */
#define KVM_CREATE_VCPU_CMD KVM_CREATE_VCPU
enum { SLOT_UNNAMED = -1, SLOT_CREATED = -3, SLOT_NEXT_RUN = -4 };
enum { OUT_OR_IN = 2 }; /* a vCPU seen made: Python names it */
enum { MAX_FIELDS = 5, SLACK_NS = 2000000 };
#define SAMPLE_TYPE (PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_RAW)
enum { EV_FORK = R_ROLES, EV_EXIT, EV_EXEC };

typedef struct {
    uint16_t offset, size;
    uint8_t is_signed;
} Field;

typedef struct {
    uint64_t id;
    int role;
} EventId;

typedef struct { /* one event, in a form the processing needs */
    uint64_t t;
    uint32_t pid, tid;
    uint32_t seq;
    uint16_t role, cpu;
    int64_t f[MAX_FIELDS];
} Ev;

typedef struct {
    int fd;
    struct perf_event_mmap_page *page;
    size_t size; /* data area bytes */
    char *data;
} Ring;

typedef struct {
    int pid, fd, slot;
    int vm, id;   /* from its KVM_CREATE_VCPU (SLOT_CREATED), else -1 */
    uint32_t tid; /* the thread last seen running it */
} Vcpu;

typedef struct { /* writes KVM handled in the kernel, since the last take */
    int slot, pio;
    uint32_t len;
    uint64_t address, count, t;
} KernelWrites;

typedef struct { /* the guest's hardware exits by reason (kvm_exit), since the last take */
    int slot, isa;
    uint32_t reason;
    uint64_t count, t, rip;
} HardwareExits;

typedef struct { /* the guest's RIP at an exit, as KVM would sync it into kvm_run */
    int known;
    uint8_t flags, cpl;
    uint64_t rip, linear;
} RipPart;

typedef struct {
    uint32_t tid, pid;
    int used;
    int in_run, fd, slot;
    int creating, create_vm, create_id; /* in KVM_CREATE_VCPU: its return is the new fd */
    int orphan_run;           /* in a run begun before kvmtop looked: its vCPU is unknown */
    KernelWrites pending[8];  /* ...and the writes KVM handled in it, until the next run */
    int npending;
    uint64_t entry;
    int pio, mmio, hc; /* details of this run, the last of each */
    int access;        /* this run's last port or MMIO access (1 pio, 2 mmio), a write not yet
                          known to have exited */
    uint64_t access_addr, access_t;
    uint32_t access_len;
    int64_t pio_f[5], mmio_f[4], hc_nr;
    int awaiting; /* a held exit waits for this run's first completion trace */
    int held;     /* an exit waits for its value (IN's port and value, a read's value) */
    int held_wait; /* ...for a completion (else for the vCPU of the next run); OUT_OR_IN: an
                      OUT unless the next entry completes an IN (then the OUT was KVM's) */
    int held_slot, held_reason;
    uint64_t held_entry, held_exit, held_val;
    int64_t held_a, held_b, held_flags;
    size_t held_len;
    RipPart held_rip;
    /* this run's last emulated instruction (kvm_emulate_insn), or its last hardware exit's RIP */
    int emul_seen, emul_mode, emul_failed, kexit_seen;
    uint64_t emul_rip, emul_cs, emul_len, kexit_rip;
} Thread;

typedef struct {
    PyObject_HEAD
    Ring *rings;
    int nrings, ncpus;
    int *cpus;
    int *fds; /* every event fd, to close */
    int nfds;
    size_t cfds, cids, ring_bytes;
    EventId *ids;
    int nids;
    Field fields[R_ROLES][MAX_FIELDS];
    int nfields[R_ROLES];
    uint64_t *lost; /* per ring */
    int with_data, with_rip, all, children;
    int *followed;
    int nfollowed, cfollowed;
    Vcpu *vcpus;
    int nvcpus, cvcpus;
    Thread *threads;
    uint32_t cthreads, nthreads; /* open addressing, power of 2 */
    Ev *queue;
    size_t nqueue, cqueue, nsorted; /* staged events; the first nsorted in time order */
    uint32_t seq;
    uint64_t base;
    char *out, *seen;
    size_t nout, cout, nseen, cseen;
    uint64_t exits, lost_exits;
    int marks; /* kvm_exit fires: every hardware exit is seen, so a write's fate is known */
    KernelWrites *kernel;
    size_t nkernel, ckernel;
    HardwareExits *hardware;
    size_t nhardware, chardware;
    PyObject *news; /* list */
    char *scratch;
    size_t cscratch;
    /* bpf: each event's program writes it into one BPF ring buffer (below); the CPUs' perf
       rings then hold only forks, exits and execs (a dummy event's) */
    int bpf, bpf_ring, bpf_lost; /* the ring's and the lost counts' map fds */
    long bpf_possible;           /* the lost counts' values: one per CPU the kernel may have */
    uint8_t *bpf_cons, *bpf_prod; /* the consumer page; the producer page and the data, twice */
    size_t bpf_size;
} Rings;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* --- growing buffers ----------------------------------------------------------------------- */

static int grow(void **p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * item);
    if (!q) return -1;
    *p = q;
    *cap = n;
    return 0;
}

static char *record_room(char **buf, size_t *n, size_t *cap, size_t records) {
    if (grow((void **)buf, cap, *n + records * RECORD_SIZE, 1) < 0) return NULL;
    char *at = *buf + *n;
    memset(at, 0, records * RECORD_SIZE);
    *n += records * RECORD_SIZE;
    return at;
}

/* --- threads ----------------------------------------------------------------------------------- */

static Thread *thread_of(Rings *self, uint32_t tid, int make) {
    if (self->cthreads == 0) {
        if (!make) return NULL;
        self->threads = calloc(64, sizeof(Thread));
        if (!self->threads) return NULL;
        self->cthreads = 64;
    }
    uint32_t mask = self->cthreads - 1;
    for (uint32_t i = tid * 2654435761u & mask;; i = (i + 1) & mask) {
        Thread *th = &self->threads[i];
        if (!th->used) {
            if (!make) return NULL;
            if ((self->nthreads + 1) * 2 > self->cthreads) { /* grow, then look again */
                Thread *old = self->threads;
                uint32_t oldc = self->cthreads;
                self->threads = calloc(oldc * 2, sizeof(Thread));
                if (!self->threads) return self->threads = old, NULL;
                self->cthreads = oldc * 2;
                self->nthreads = 0;
                for (uint32_t k = 0; k < oldc; k++)
                    if (old[k].used) {
                        Thread *moved = thread_of(self, old[k].tid, 1);
                        *moved = old[k];
                    }
                free(old);
                return thread_of(self, tid, 1);
            }
            memset(th, 0, sizeof *th);
            th->used = 1;
            th->tid = tid;
            th->fd = -1;
            th->slot = -1;
            self->nthreads++;
            return th;
        }
        if (th->tid == tid) return th;
    }
}

static void drop_thread(Rings *self, uint32_t tid) { /* backward-shift deletion */
    if (!self->cthreads) return;
    uint32_t mask = self->cthreads - 1, i = tid * 2654435761u & mask;
    while (self->threads[i].used && self->threads[i].tid != tid) i = (i + 1) & mask;
    if (!self->threads[i].used) return;
    self->threads[i].used = 0;
    self->nthreads--;
    for (uint32_t j = (i + 1) & mask; self->threads[j].used; j = (j + 1) & mask) {
        Thread moved = self->threads[j];
        self->threads[j].used = 0;
        self->nthreads--;
        *thread_of(self, moved.tid, 1) = moved;
    }
}

static int followed(Rings *self, uint32_t pid) {
    if (self->all) return 1;
    for (int i = 0; i < self->nfollowed; i++)
        if (self->followed[i] == (int)pid) return 1;
    return 0;
}

static int add_followed(Rings *self, int pid) {
    for (int i = 0; i < self->nfollowed; i++)
        if (self->followed[i] == pid) return 0;
    size_t cap = (size_t)self->cfollowed;
    if (grow((void **)&self->followed, &cap, (size_t)self->nfollowed + 1, sizeof(int)) < 0) return -1;
    self->cfollowed = (int)cap;
    self->followed[self->nfollowed++] = pid;
    return 0;
}

static Vcpu *vcpu_of(Rings *self, int pid, int fd) {
    for (int i = 0; i < self->nvcpus; i++)
        if (self->vcpus[i].pid == pid && self->vcpus[i].fd == fd) return &self->vcpus[i];
    return NULL;
}

static Vcpu *add_vcpu(Rings *self, int pid, int fd) {
    Vcpu *v = vcpu_of(self, pid, fd);
    if (v) return v;
    size_t cap = (size_t)self->cvcpus;
    if (grow((void **)&self->vcpus, &cap, (size_t)self->nvcpus + 1, sizeof(Vcpu)) < 0) return NULL;
    self->cvcpus = (int)cap;
    v = &self->vcpus[self->nvcpus++];
    *v = (Vcpu){pid, fd, SLOT_UNNAMED, -1, -1, 0};
    return v;
}

static void forget_pid(Rings *self, int pid) {
    int k = 0;
    for (int i = 0; i < self->nvcpus; i++)
        if (self->vcpus[i].pid != pid) self->vcpus[k++] = self->vcpus[i];
    self->nvcpus = k;
    for (uint32_t i = 0; i < self->cthreads; i++)
        if (self->threads[i].used && self->threads[i].pid == (uint32_t)pid) self->threads[i].fd = -1;
}

/* --- records ----------------------------------------------------------------------------------- */

static int emit(Rings *self, int slot, int reason, uint64_t entry, uint64_t exit_t, int64_t a,
                int64_t b, int flags, const void *data, size_t len, const RipPart *rip) {
    if (slot < 0) {
        self->lost_exits++;
        return 0;
    }
    uint64_t guest = exit_t >= entry ? exit_t - entry : 0;
    int lng = guest > GUEST_NS_MAX;
    size_t chunks = self->with_data ? (len + DATA_CHUNK - 1) / DATA_CHUNK : 0;
    if (chunks) flags |= F_DATA;
    if (lng) flags |= F_LONG;
    int with_rip = rip != NULL && rip->known;
    char *r = record_room(&self->out, &self->nout, &self->cout, 1 + (size_t)lng + chunks + (size_t)with_rip);
    if (!r) return -1;
    uint16_t vcpu = (uint16_t)slot;
    uint32_t reason32 = (uint32_t)reason, g = lng ? 0xFFFFFFFFu : (uint32_t)guest;
    uint32_t b32 = (uint32_t)b;
    int64_t t = (int64_t)(exit_t - self->base);
    uint64_t a64 = (uint64_t)a;
    r[0] = KIND_EXIT;
    r[EXIT_AT_FLAGS] = (char)flags;
    memcpy(r + EXIT_AT_VCPU, &vcpu, 2);
    memcpy(r + EXIT_AT_REASON, &reason32, 4);
    memcpy(r + EXIT_AT_T_EXIT, &t, 8);
    memcpy(r + EXIT_AT_GUEST_NS, &g, 4);
    memcpy(r + EXIT_AT_B, &b32, 4);
    memcpy(r + EXIT_AT_A, &a64, 8);
    r += RECORD_SIZE;
    if (lng) {
        r[0] = KIND_LONG;
        memcpy(r + LONG_AT_GUEST_NS, &guest, 8);
        r += RECORD_SIZE;
    }
    for (size_t i = 0; i < chunks; i++, r += RECORD_SIZE) {
        size_t n = len - i * DATA_CHUNK < DATA_CHUNK ? len - i * DATA_CHUNK : DATA_CHUNK;
        r[0] = KIND_DATA;
        r[DATA_AT_LENGTH] = (char)n;
        memcpy(r + DATA_AT_BYTES, (const char *)data + i * DATA_CHUNK, n);
    }
    if (with_rip) {
        memset(r, 0, RECORD_SIZE);
        r[0] = KIND_RIP;
        r[RIP_AT_FLAGS] = (char)rip->flags;
        r[RIP_AT_CPL] = (char)rip->cpl;
        memcpy(r + RIP_AT_RIP, &rip->rip, 8);
        memcpy(r + RIP_AT_LINEAR, &rip->linear, 8);
    }
    self->exits++;
    return 0;
}

static int saw(Rings *self, Vcpu *v, uint32_t tid, uint64_t t) {
    v->tid = tid;
    if (v->slot < 0) return 0;
    char *r = record_room(&self->seen, &self->nseen, &self->cseen, 1);
    if (!r) return -1;
    uint16_t slot = (uint16_t)v->slot;
    int64_t rel = (int64_t)(t - self->base);
    r[0] = KIND_VCPU;
    memcpy(r + VCPU_AT_VCPU, &slot, 2);
    memcpy(r + VCPU_AT_TID, &tid, 4);
    memcpy(r + VCPU_AT_T, &rel, 8);
    return 0;
}

/* ``count`` writes to one target, in ``list`` (growing it: -1 when it cannot; ``cap`` 0: a
   fixed list of ``*n`` < 8 entries, full: dropped). */
static int count_write(KernelWrites **list, size_t *n, size_t *cap, KernelWrites w) {
    for (size_t i = 0; i < *n; i++) {
        KernelWrites *k = &(*list)[i];
        if (k->slot == w.slot && k->pio == w.pio && k->address == w.address && k->len == w.len) {
            k->count += w.count, k->t = w.t;
            return 0;
        }
    }
    if (cap && grow((void **)list, cap, *n + 1, sizeof(KernelWrites)) < 0) return -1;
    if (!cap && *n >= 8) return 0;
    (*list)[(*n)++] = w;
    return 0;
}

/* The thread's last access was handled in the kernel: counted by vCPU and target (in a run
   begun before kvmtop looked, held until the thread's next run names the vCPU). */
static int kernel_handled(Rings *self, Thread *th) {
    int pio = th->access == 1;
    if (!th->access) return 0;
    th->access = 0;
    KernelWrites w = {th->slot, pio, th->access_len, th->access_addr, 1, th->access_t};
    if (th->slot == SLOT_NEXT_RUN) {
        KernelWrites *list = th->pending;
        size_t n = (size_t)th->npending;
        count_write(&list, &n, NULL, w);
        th->npending = (int)n;
        return 0;
    }
    if (th->slot < 0) return 0;
    return count_write(&self->kernel, &self->nkernel, &self->ckernel, w);
}

/* A KVM event of a thread not seen entering KVM_RUN: it is in a run begun before kvmtop
   looked, which ends with its next exit; its vCPU is the one of its next KVM_RUN. */
static void begun_unseen(Rings *self, Thread *th) {
    if (th->in_run || th->fd >= 0 || th->orphan_run || th->held) return;
    th->in_run = th->orphan_run = 1;
    th->slot = SLOT_NEXT_RUN;
    th->entry = self->base;
    th->pio = th->mmio = th->hc = th->access = 0;
    th->emul_seen = th->kexit_seen = 0;
}

/* A port or MMIO write in a run: the one before it was handled in the kernel. */
static int accessed(Rings *self, Thread *th, int pio, uint64_t addr, uint32_t len, uint64_t t, int write) {
    if (kernel_handled(self, th) < 0) return -1;
    if (write) th->access = pio ? 1 : 2, th->access_addr = addr, th->access_len = len, th->access_t = t;
    return 0;
}

/* The exit a thread holds, with the details it has (a completion's, or its own). */
static int emit_held(Rings *self, Thread *th, const void *data, size_t len) {
    th->held = th->awaiting = th->held_wait = 0;
    if (!data) data = &th->held_val, len = th->held_len;
    return emit(self, th->held_slot, th->held_reason, th->held_entry, th->held_exit, th->held_a,
                th->held_b, (int)th->held_flags, data, len, &th->held_rip);
}

static int news(Rings *self, const char *what, const Ev *e, uint32_t ppid) {
    PyGILState_STATE g = PyGILState_Ensure();
    const char *comm = e->role == EV_EXEC ? (const char *)e->f : "";
    PyObject *item = Py_BuildValue("(sIIIKs)", what, e->pid, ppid, e->tid, (unsigned long long)e->t, comm);
    int rc = item ? PyList_Append(self->news, item) : -1;
    Py_XDECREF(item);
    if (rc < 0) PyErr_Clear();
    PyGILState_Release(g);
    return 0;
}

static void hold(Thread *th, int wait, int slot, int reason, uint64_t entry, uint64_t exit_t,
                 int64_t a, int64_t b, int flags, uint64_t val, size_t len, RipPart rip) {
    th->held = 1, th->held_wait = wait, th->held_rip = rip;
    th->held_slot = slot, th->held_reason = reason, th->held_entry = entry, th->held_exit = exit_t;
    th->held_a = a, th->held_b = b, th->held_flags = flags, th->held_val = val, th->held_len = len;
}

/* The RIP KVM would sync into kvm_run at this exit (with --rip): after the run's last
   emulated instruction, or on it where the VMM's answer completes it (an IN, an MMIO read) or
   its emulation failed; else the RIP of the run's last hardware exit (kvm_exit: the
   instruction that exited). Its linear address and CPL are known in real and vm86 mode. */
static RipPart rip_at_exit(Rings *self, const Thread *th, int completes_later) {
    RipPart r = {0, 0, 0, 0, 0};
    if (!self->with_rip) return r;
    if (th->emul_seen) {
        r.known = 1;
        r.rip = th->emul_rip + (completes_later || th->emul_failed ? 0 : th->emul_len);
        r.linear = th->emul_mode & EMUL_PROT64 ? r.rip : (th->emul_cs + r.rip) & 0xFFFFFFFFu;
        if (th->emul_mode == 0 || th->emul_mode == (EMUL_VM86 | 1))
            r.flags = R_SEGMENTS, r.cpl = th->emul_mode ? 3 : 0;
    } else if (th->kexit_seen) {
        r.known = 1;
        r.rip = r.linear = th->kexit_rip;
    }
    return r;
}

/* A run's end (kvm_userspace_exit): its record, or held for what comes at the next entry: an
   IN's port and value, a read's value (with data), or the vCPU of a run that began before
   kvmtop looked (its entry unseen: timed from the session's start). */
static int run_ended(Rings *self, Thread *th, const Ev *e) {
    begun_unseen(self, th);
    if (!th->in_run) return 0; /* a second return with no entry seen: none such */
    int orphan = th->orphan_run;
    th->in_run = th->orphan_run = 0;
    int reason = (int)e->f[0];
    int64_t err = e->f[1];
    uint64_t entry = orphan ? self->base : th->entry;
    int slot = orphan ? SLOT_NEXT_RUN : th->slot;
    /* the run's last write exited if this exit is of its kind; else KVM handled it */
    int wrote = err == 0 && ((reason == KVM_EXIT_IO && th->access == 1) ||
                             (reason == KVM_EXIT_MMIO && th->access == 2));
    if (wrote) th->access = 0;
    else if (kernel_handled(self, th) < 0) return -1;
    if (th->held && err == 0 && emit_held(self, th, NULL, 0) < 0) return -1; /* no completion */
    if (err < 0) {
        if (err == -EINTR) reason = KVM_EXIT_INTR; /* also where immediate_exit left it */
        RipPart rip = rip_at_exit(self, th, 0);
        if (!orphan) return emit(self, slot, reason, entry, e->t, 0, -err, F_FAILED, NULL, 0, &rip);
        hold(th, 0, slot, reason, entry, e->t, 0, -err, F_FAILED, 0, 0, rip);
        return 0;
    }
    int64_t a = 0, b = 0;
    int flags = 0, wait = 0;
    uint64_t val = 0;
    size_t len = 0;
    if (reason == KVM_EXIT_IO) {
        if (!wrote) {
            wait = 1; /* an IN: port and value come at completion */
        } else {
            a = th->pio_f[1];
            b = th->pio_f[2] | th->pio_f[3] << 8;
            flags = F_WRITE;
            val = (uint64_t)th->pio_f[4];
            len = (size_t)(th->pio_f[2] * th->pio_f[3]);
            len = len < 4 ? len : 4;
        }
        if (wrote && !self->marks) wait = OUT_OR_IN; /* it may be KVM's, before an IN */
    } else if (reason == KVM_EXIT_MMIO && (wrote || (th->mmio && th->mmio_f[0] == 0))) {
        a = th->mmio_f[2];
        b = th->mmio_f[1];
        if (wrote) {
            flags = F_WRITE;
            val = (uint64_t)th->mmio_f[3];
            len = b < 8 ? (size_t)b : 8;
        } else {
            wait = 1; /* a read: its completion comes at the next entry (and its value) */
        }
    } else if (reason == KVM_EXIT_HYPERCALL && th->hc) {
        a = th->hc_nr;
    }
    int completes_later = (reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO) && !wrote;
    RipPart rip = rip_at_exit(self, th, completes_later);
    if (!wait && !orphan) return emit(self, slot, reason, entry, e->t, a, b, flags, &val, len, &rip);
    hold(th, wait, slot, reason, entry, e->t, a, b, flags, val, len, rip);
    return 0;
}

/* One event, in time order. 1: a KVM_RUN on a (pid, fd) not told (nothing done); -1: no memory */
static int process(Rings *self, const Ev *e) {
    if (e->role >= EV_FORK) {
        if (e->role == EV_FORK) {
            uint32_t ppid = (uint32_t)e->f[0];
            if (e->pid != ppid && self->children && !self->all && followed(self, ppid)) {
                if (add_followed(self, (int)e->pid) < 0) return -1;
                news(self, "fork", e, ppid);
            }
        } else if (followed(self, e->pid)) {
            Thread *th = thread_of(self, e->tid, 0);
            if (th && th->held && emit_held(self, th, NULL, 0) < 0) return -1; /* (unnamed: lost) */
            if (th) drop_thread(self, e->tid);
            if (e->role == EV_EXEC) forget_pid(self, (int)e->pid);
            news(self, e->role == EV_EXEC ? "exec" : "exit", e, 0);
        }
        return 0;
    }
    if (!followed(self, e->pid) || e->t < self->base) return 0; /* before the session began */
    Thread *th = thread_of(self, e->tid, 1);
    if (!th) return -1;
    th->pid = e->pid;
    switch (e->role) {
    case R_RUN: {
        int fd = (int)e->f[0];
        th->creating = 0;
        if (e->f[1] == KVM_CREATE_VCPU_CMD) {
            th->creating = 1, th->create_vm = fd, th->create_id = (int)e->f[2];
            return 0;
        }
        if (e->f[1] != KVM_RUN) return 0; /* a kernel whose filter is not in place */
        Vcpu *v = vcpu_of(self, (int)e->pid, fd);
        if (!v || v->slot == SLOT_CREATED) return 1;
        if (v->tid != e->tid && saw(self, v, e->tid, e->t) < 0) return -1;
        if (th->held && th->held_slot == SLOT_NEXT_RUN) { /* the run before kvmtop looked */
            th->held_slot = v->slot;
            if (!th->held_wait && emit_held(self, th, NULL, 0) < 0) return -1;
        }
        for (int i = 0; i < th->npending; i++) { /* ...and the writes KVM handled in it */
            th->pending[i].slot = v->slot;
            if (v->slot >= 0 && count_write(&self->kernel, &self->nkernel, &self->ckernel, th->pending[i]) < 0)
                return -1;
        }
        th->npending = th->orphan_run = 0;
        th->fd = fd;
        th->slot = v->slot;
        th->in_run = 1;
        th->entry = e->t;
        th->pio = th->mmio = th->hc = th->access = 0;
        th->emul_seen = th->kexit_seen = 0;
        th->awaiting = th->held && th->held_wait;
        return 0;
    }
    case R_PIO:
        begun_unseen(self, th);
        if (th->awaiting && e->f[0] == 0 && th->held_wait == OUT_OR_IN) { /* it was an IN */
            th->access = 1, th->access_addr = (uint64_t)th->held_a, th->access_t = th->held_exit;
            th->access_len = (uint32_t)((th->held_b & 0xff) * (th->held_b >> 8));
            int slot = th->slot;
            th->slot = th->held_slot;
            if (kernel_handled(self, th) < 0) return -1; /* the OUT before it was KVM's */
            th->slot = slot;
            th->held_flags = 0;
        }
        if (th->awaiting && e->f[0] == 0) { /* the IN's completion: its port and value */
            th->held_a = e->f[1];
            th->held_b = e->f[2] | e->f[3] << 8;
            uint32_t val = (uint32_t)e->f[4];
            size_t len = (size_t)(e->f[2] * e->f[3]);
            return emit_held(self, th, &val, len < 4 ? len : 4);
        }
        th->awaiting = 0;
        memcpy(th->pio_f, e->f, sizeof th->pio_f);
        th->pio = 1;
        if (!th->in_run) return 0;
        return accessed(self, th, 1, (uint64_t)e->f[1], (uint32_t)(e->f[2] * e->f[3]), e->t, e->f[0] == 1);
    case R_MMIO:
        begun_unseen(self, th);
        if (th->awaiting && e->f[0] == 1) { /* a read's completion: its value */
            uint64_t val = (uint64_t)e->f[3];
            return emit_held(self, th, &val, th->held_b < 8 ? (size_t)th->held_b : 8);
        }
        th->awaiting = 0;
        memcpy(th->mmio_f, e->f, sizeof th->mmio_f);
        th->mmio = 1;
        if (!th->in_run) return 0;
        return accessed(self, th, 0, (uint64_t)e->f[2], (uint32_t)e->f[1], e->t, e->f[0] == 2);
    case R_HYPERCALL:
        th->hc = 1, th->hc_nr = e->f[0];
        return 0;
    case R_SYSEXIT: /* an ioctl that returned > 0: a vCPU's fd if the thread was making one */
        if (th->creating) {
            th->creating = 0;
            int fd = (int)e->f[0];
            Vcpu *v = add_vcpu(self, (int)e->pid, fd);
            if (!v) return -1;
            v->slot = SLOT_CREATED, v->vm = th->create_vm, v->id = th->create_id, v->tid = 0;
        }
        return 0;
    case R_UEXIT:
        return run_ended(self, th, e);
    case R_KEXIT: /* a hardware exit, KVM's own or the VMM's: counted by reason */
        begun_unseen(self, th);
        if (th->in_run && th->slot >= 0) {
            uint32_t reason = (uint32_t)e->f[0];
            int isa = (int)e->f[1];
            size_t i = 0;
            while (i < self->nhardware && !(self->hardware[i].slot == th->slot &&
                                            self->hardware[i].isa == isa && self->hardware[i].reason == reason))
                i++;
            if (i == self->nhardware) {
                if (grow((void **)&self->hardware, &self->chardware, i + 1, sizeof(HardwareExits)) < 0) return -1;
                self->hardware[self->nhardware++] = (HardwareExits){th->slot, isa, reason, 0, 0, 0};
            }
            self->hardware[i].count++, self->hardware[i].t = e->t, self->hardware[i].rip = (uint64_t)e->f[2];
        }
        th->kexit_seen = 1, th->kexit_rip = (uint64_t)e->f[2];
        /* fall through: it is a mark too */
    case R_EMUL: /* an instruction KVM emulated (with --rip): the exiting one, if the last */
        if (e->role == R_EMUL) {
            begun_unseen(self, th);
            th->emul_seen = 1, th->emul_rip = (uint64_t)e->f[0], th->emul_cs = (uint64_t)e->f[1];
            th->emul_len = (uint64_t)e->f[2], th->emul_mode = (int)e->f[3], th->emul_failed = e->f[4] != 0;
        }
        /* fall through: it is a mark too */
    case R_MARK: /* the guest ran again (another hardware exit, another emulated instruction):
                    the run's last write did not exit */
        self->marks = 1;
        begun_unseen(self, th);
        return kernel_handled(self, th);
    }
    return 0;
}

/* --- reading the rings ------------------------------------------------------------------------ */

static int role_of(Rings *self, uint64_t id) {
    for (int i = 0; i < self->nids; i++)
        if (self->ids[i].id == id) return self->ids[i].role;
    return -1;
}

static int64_t field_of(const unsigned char *raw, uint32_t raw_size, const Field *f) {
    if ((uint32_t)f->offset + f->size > raw_size) return 0;
    const unsigned char *p = raw + f->offset;
    switch (f->size) {
    case 1: return f->is_signed ? (int64_t)(int8_t)p[0] : (int64_t)p[0];
    case 2: { uint16_t v; memcpy(&v, p, 2); return f->is_signed ? (int64_t)(int16_t)v : (int64_t)v; }
    case 4: { uint32_t v; memcpy(&v, p, 4); return f->is_signed ? (int64_t)(int32_t)v : (int64_t)v; }
    case 8: { int64_t v; memcpy(&v, p, 8); return v; }
    }
    return 0;
}

/* Stage an event, in the order read (its tie-break among events of the same time). */
static int enqueue(Rings *self, Ev *e) {
    e->seq = self->seq++;
    if (grow((void **)&self->queue, &self->cqueue, self->nqueue + 1, sizeof(Ev)) < 0) return -1;
    self->queue[self->nqueue++] = *e;
    return 0;
}

/* One perf record of ring ``cpu``, whole and contiguous: staged as an Ev (or counted). */
static int stage(Rings *self, int cpu, const unsigned char *rec, size_t size) {
    struct perf_event_header h;
    memcpy(&h, rec, sizeof h);
    Ev e;
    memset(&e, 0, sizeof e);
    e.cpu = (uint16_t)cpu;
    const unsigned char *p = rec + sizeof h;
    if (h.type == PERF_RECORD_SAMPLE) {
        if (size < sizeof h + 24) return 0;
        uint64_t id;
        memcpy(&id, p, 8);
        memcpy(&e.pid, p + 8, 4);
        memcpy(&e.tid, p + 12, 4);
        memcpy(&e.t, p + 16, 8);
        int role = role_of(self, id);
        /* a child's events may come before its fork record is processed: kept, then judged */
        if (role < 0 || (!self->children && !followed(self, e.pid))) return 0;
        uint32_t raw_size = 0;
        if (size >= sizeof h + 28) memcpy(&raw_size, p + 24, 4);
        const unsigned char *raw = p + 28;
        if (sizeof h + 28 + (size_t)raw_size > size) return 0;
        e.role = (uint16_t)role;
        for (int i = 0; i < self->nfields[role]; i++)
            e.f[i] = field_of(raw, raw_size, &self->fields[role][i]);
    } else if (h.type == PERF_RECORD_FORK || h.type == PERF_RECORD_EXIT) {
        if (size < sizeof h + 24) return 0;
        uint32_t ppid;
        memcpy(&e.pid, p, 4);
        memcpy(&ppid, p + 4, 4);
        memcpy(&e.tid, p + 8, 4);
        memcpy(&e.t, p + 16, 8);
        e.f[0] = ppid;
        e.role = h.type == PERF_RECORD_FORK ? EV_FORK : EV_EXIT;
    } else if (h.type == PERF_RECORD_COMM && (h.misc & PERF_RECORD_MISC_COMM_EXEC)) {
        if (size < sizeof h + 8 + 16) return 0;
        memcpy(&e.pid, p, 4);
        memcpy(&e.tid, p + 4, 4);
        memcpy(&e.t, rec + size - 16, 8); /* sample_id: pid, tid, time, identifier */
        strncpy((char *)e.f, (const char *)p + 8, 15); /* comm: its argv if it has gone */
        e.role = EV_EXEC;
    } else if (h.type == PERF_RECORD_LOST) {
        uint64_t n = 0;
        if (size >= sizeof h + 16) memcpy(&n, p + 8, 8);
        self->lost[cpu] += n;
        return 0;
    } else {
        return 0;
    }
    return enqueue(self, &e);
}

static int read_ring(Rings *self, int i) {
    Ring *ring = &self->rings[i];
    uint64_t head = __atomic_load_n(&ring->page->data_head, __ATOMIC_ACQUIRE);
    uint64_t tail = ring->page->data_tail;
    int rc = 0;
    while (tail < head) {
        struct perf_event_header h;
        size_t at = (size_t)(tail % ring->size);
        for (size_t k = 0; k < sizeof h; k++) ((char *)&h)[k] = ring->data[(at + k) % ring->size];
        if (h.size < sizeof h || tail + h.size > head) break;
        const unsigned char *rec = (const unsigned char *)ring->data + at;
        if (at + h.size > ring->size) { /* wraps: copy it whole */
            if (grow((void **)&self->scratch, &self->cscratch, h.size, 1) < 0) return -1;
            size_t first = ring->size - at;
            memcpy(self->scratch, ring->data + at, first);
            memcpy(self->scratch + first, ring->data, h.size - first);
            rec = (const unsigned char *)self->scratch;
        }
        if ((rc = stage(self, self->cpus[i], rec, h.size)) < 0) break;
        tail += h.size;
    }
    __atomic_store_n(&ring->page->data_tail, tail, __ATOMIC_RELEASE);
    return rc;
}

/* --- the BPF ring: one record per event, written by the event's program (bpf_program) --------- */

enum { BPF_REC_HEAD = 24 }; /* u64 time, u32 tid, u32 pid, u64 role; then a u64 per field */

static int stage_bpf(Rings *self, const unsigned char *rec, uint32_t size) {
    if (size < BPF_REC_HEAD) return 0;
    Ev e;
    memset(&e, 0, sizeof e);
    uint64_t role;
    memcpy(&e.t, rec, 8);
    memcpy(&e.tid, rec + 8, 4);
    memcpy(&e.pid, rec + 12, 4);
    memcpy(&role, rec + 16, 8);
    if (role >= R_ROLES || (!self->children && !followed(self, e.pid))) return 0;
    e.role = (uint16_t)role;
    for (int i = 0; i < self->nfields[role]; i++) { /* each field in the low bytes of its u64 */
        const Field *f = &self->fields[role][i];
        uint32_t at = BPF_REC_HEAD + 8 * (uint32_t)i;
        e.f[i] = field_of(rec + at, size > at ? size - at : 0, &(Field){0, f->size, f->is_signed});
    }
    return enqueue(self, &e);
}

static int read_bpf(Rings *self) {
    if (!self->bpf_cons) return 0;
    const unsigned char *data = self->bpf_prod + sysconf(_SC_PAGESIZE);
    uint64_t cons = *(uint64_t *)self->bpf_cons;
    uint64_t prod = __atomic_load_n((uint64_t *)self->bpf_prod, __ATOMIC_ACQUIRE);
    int rc = 0;
    while (cons < prod) {
        const uint32_t *hdr = (const uint32_t *)(data + (cons & (self->bpf_size - 1)));
        uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
        if (len & BPF_RINGBUF_BUSY_BIT) break; /* reserved, not yet written */
        uint32_t n = len & ~(uint32_t)(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
        /* the data is mapped twice in a row: a record that wraps reads whole */
        if (!(len & BPF_RINGBUF_DISCARD_BIT) && (rc = stage_bpf(self, (const unsigned char *)hdr + BPF_RINGBUF_HDR_SZ, n)) < 0)
            break;
        cons += (n + BPF_RINGBUF_HDR_SZ + 7) & ~(uint64_t)7;
    }
    __atomic_store_n((uint64_t *)self->bpf_cons, cons, __ATOMIC_RELEASE);
    return rc;
}

static int by_time(const void *a, const void *b) {
    const Ev *x = a, *y = b;
    if (x->t != y->t) return x->t < y->t ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Put q[0..n) in time order where q[0..sorted) is and the rest nearly is: the BPF ring holds
   the records in the order they were reserved, each timed just before. Insertion costs what is
   out of order; where that is much, a sort. */
static void order_nearly_sorted(Ev *q, size_t sorted, size_t n) {
    size_t moves = 0, limit = 8 * (n - sorted) + 64;
    for (size_t i = sorted ? sorted : 1; i < n; i++) {
        if (by_time(&q[i - 1], &q[i]) <= 0) continue;
        Ev e = q[i];
        size_t j = i;
        for (; j > 0 && by_time(&q[j - 1], &e) > 0 && moves <= limit; j--, moves++) q[j] = q[j - 1];
        q[j] = e;
        if (moves > limit) {
            qsort(q, n, sizeof(Ev), by_time);
            return;
        }
    }
}

/* The time of the earliest fork, exit or exec staged (UINT64_MAX: none). */
static uint64_t news_due(const Rings *self) {
    uint64_t t = UINT64_MAX;
    for (size_t k = 0; k < self->nqueue; k++)
        if (self->queue[k].role >= EV_FORK && self->queue[k].t < t) t = self->queue[k].t;
    return t;
}

/* Process the staged events up to ``until`` in time order. 1: an unknown vCPU (*at: the event) */
static int process_until(Rings *self, uint64_t until, const Ev **at, size_t max_bytes) {
    if (self->bpf) /* what is left from the last time is in order */
        order_nearly_sorted(self->queue, self->nsorted, self->nqueue);
    else /* each CPU's ring in order, one after another */
        qsort(self->queue, self->nqueue, sizeof(Ev), by_time);
    size_t i = 0;
    int rc = 0;
    for (; i < self->nqueue && self->queue[i].t <= until; i++) {
        if (self->nout >= max_bytes) break;
        rc = process(self, &self->queue[i]);
        if (rc != 0) break;
    }
    memmove(self->queue, self->queue + i, (self->nqueue - i) * sizeof(Ev));
    self->nqueue -= i;
    self->nsorted = self->nqueue;
    if (rc == 1) *at = &self->queue[0];
    return rc;
}

/* --- the Python type ------------------------------------------------------------------------- */

static void *close_one(void *fd) {
    close((int)(intptr_t)fd);
    return NULL;
}

/* Close every fd at once: each event's close waits for the kernel's RCU grace periods (its
   tracepoint's probe, its BPF program), and closes made side by side share them (one by one,
   7 events took 0.25 s here, 0.5 s with their programs). */
static void close_fds(int *fds, int n) {
    pthread_t *threads = calloc((size_t)n, sizeof *threads);
    int *started = calloc((size_t)n, sizeof *started);
    for (int i = 0; i < n; i++) {
        if (threads && started && pthread_create(&threads[i], NULL, close_one, (void *)(intptr_t)fds[i]) == 0)
            started[i] = 1;
        else
            close(fds[i]);
    }
    for (int i = 0; i < n; i++)
        if (started && started[i]) pthread_join(threads[i], NULL);
    free(threads);
    free(started);
}

static void close_all(Rings *self) {
    for (int i = 0; i < self->nrings; i++)
        if (self->rings[i].page) munmap(self->rings[i].page, self->rings[i].size + (size_t)sysconf(_SC_PAGESIZE));
    long page = sysconf(_SC_PAGESIZE);
    if (self->bpf_cons) munmap(self->bpf_cons, (size_t)page);
    if (self->bpf_prod) munmap(self->bpf_prod, (size_t)page + 2 * self->bpf_size);
    self->bpf_cons = self->bpf_prod = NULL;
    self->bpf_ring = self->bpf_lost = -1; /* their fds close below */
    if (self->nfds) {
        Py_BEGIN_ALLOW_THREADS
        close_fds(self->fds, self->nfds);
        Py_END_ALLOW_THREADS
    }
    free(self->rings);
    free(self->fds);
    self->rings = NULL, self->fds = NULL;
    self->nrings = self->nfds = 0;
    self->cfds = 0;
}

static void Rings_dealloc(Rings *self) {
    close_all(self);
    free(self->cpus), free(self->ids), free(self->lost), free(self->followed), free(self->vcpus);
    free(self->threads), free(self->queue), free(self->out), free(self->seen), free(self->scratch);
    free(self->kernel), free(self->hardware);
    Py_XDECREF(self->news);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An event of every occurrence (sample_period 1). */
static struct perf_event_attr event_attr(uint32_t type, uint64_t config) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = type;
    attr.config = config;
    attr.sample_period = 1;
    return attr;
}

static int open_event(int role_first, uint32_t type, uint64_t config, int cpu, size_t ring_bytes) {
    struct perf_event_attr attr = event_attr(type, config);
    attr.sample_type = SAMPLE_TYPE;
    attr.sample_id_all = 1;
    attr.use_clockid = 1;
    attr.clockid = CLOCK_MONOTONIC;
    attr.watermark = 1; /* the dummy event's ring holds forks, exits and execs alone: each wakes
                           the reader (wakeup_events would count samples only) */
    attr.wakeup_watermark = type == PERF_TYPE_SOFTWARE ? 1 : (uint32_t)(ring_bytes / 4);
    attr.task = attr.comm = role_first ? 1 : 0;
    attr.comm_exec = role_first ? 1 : 0;
    return (int)syscall(SYS_perf_event_open, &attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC);
}

/* --- BPF delivery ------------------------------------------------------------------------------ */

static long sys_bpf(int cmd, union bpf_attr *attr) { return syscall(SYS_bpf, cmd, attr, sizeof *attr); }

#define INSN(op, dst, src, o, i) ((struct bpf_insn){(op), (dst), (src), (o), (i)})
enum { BPF_PROG_MAX = 64, FP = BPF_REG_10 };

/* An event's program: its fields (as the engine's layout says) into a record of the BPF ring
   (stage_bpf), with the time, thread and role; the same filters as the perf events' (KVM_RUN
   and KVM_CREATE_VCPU entries only; returns > 0 only). It returns 1: other users' perf events
   on the tracepoint go on getting their samples (kvmtop's own attaching event stays disabled).
   A record the ring has no room for is counted, per CPU. The reader is woken once a quarter of
   the ring waits, else by its own timeout. */
static int bpf_program(const Rings *self, int role, struct bpf_insn *p) {
    static const uint8_t load[9] = {0, BPF_B, BPF_H, 0, BPF_W, 0, 0, 0, BPF_DW};
    int nf = self->nfields[role], n = 0, outs[4], nouts = 0;
    int16_t rec = (int16_t)-(BPF_REC_HEAD + 8 * nf);
    const Field *f = self->fields[role];
    for (int i = 0; i < nf; i++)
        if ((f[i].size != 1 && f[i].size != 2 && f[i].size != 4 && f[i].size != 8) || f[i].offset % f[i].size)
            return -1;
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_6, BPF_REG_1, 0, 0);
    if (role == R_RUN && nf >= 2) { /* cmd */
        p[n++] = INSN(BPF_LDX | BPF_MEM | load[f[1].size], BPF_REG_7, BPF_REG_6, (int16_t)f[1].offset, 0);
        p[n++] = INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_7, 0, 1, KVM_RUN);
        outs[nouts++] = n, p[n++] = INSN(BPF_JMP | BPF_JNE | BPF_K, BPF_REG_7, 0, 0, KVM_CREATE_VCPU_CMD);
    } else if (role == R_SYSEXIT && nf >= 1) { /* ret */
        p[n++] = INSN(BPF_LDX | BPF_MEM | load[f[0].size], BPF_REG_7, BPF_REG_6, (int16_t)f[0].offset, 0);
        outs[nouts++] = n, p[n++] = INSN(BPF_JMP | BPF_JSLE | BPF_K, BPF_REG_7, 0, 0, 0);
    }
    p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_ktime_get_ns); /* CLOCK_MONOTONIC */
    p[n++] = INSN(BPF_STX | BPF_MEM | BPF_DW, FP, BPF_REG_0, rec, 0);
    p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_get_current_pid_tgid);
    p[n++] = INSN(BPF_STX | BPF_MEM | BPF_DW, FP, BPF_REG_0, (int16_t)(rec + 8), 0);
    p[n++] = INSN(BPF_ST | BPF_MEM | BPF_DW, FP, 0, (int16_t)(rec + 16), role);
    for (int i = 0; i < nf; i++) {
        p[n++] = INSN(BPF_LDX | BPF_MEM | load[f[i].size], BPF_REG_7, BPF_REG_6, (int16_t)f[i].offset, 0);
        p[n++] = INSN(BPF_STX | BPF_MEM | BPF_DW, FP, BPF_REG_7, (int16_t)(rec + BPF_REC_HEAD + 8 * i), 0);
    }
    /* r1 = the ring; r2 = BPF_RB_AVAIL_DATA */
    p[n++] = INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, self->bpf_ring);
    p[n++] = INSN(0, 0, 0, 0, 0);
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_2, 0, 0, BPF_RB_AVAIL_DATA);
    p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_ringbuf_query);
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_4, 0, 0, BPF_RB_NO_WAKEUP);
    p[n++] = INSN(BPF_JMP | BPF_JLT | BPF_K, BPF_REG_0, 0, 1, (int32_t)(self->bpf_size / 4));
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_4, 0, 0, BPF_RB_FORCE_WAKEUP);
    p[n++] = INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, self->bpf_ring);
    p[n++] = INSN(0, 0, 0, 0, 0);
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, FP, 0, 0);
    p[n++] = INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, rec);
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_3, 0, 0, -rec);
    p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_ringbuf_output);
    outs[nouts++] = n, p[n++] = INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 0, 0);
    /* no room: this CPU's count of lost events, +1 */
    p[n++] = INSN(BPF_ST | BPF_MEM | BPF_W, FP, 0, (int16_t)(rec - 4), 0);
    p[n++] = INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, self->bpf_lost);
    p[n++] = INSN(0, 0, 0, 0, 0);
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, FP, 0, 0);
    p[n++] = INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, rec - 4);
    p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem);
    outs[nouts++] = n, p[n++] = INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 0, 0);
    p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_1, BPF_REG_0, 0, 0);
    p[n++] = INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_1, 0, 0, 1);
    p[n++] = INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_0, BPF_REG_1, 0, 0);
    for (int i = 0; i < nouts; i++) p[outs[i]].off = (int16_t)(n - outs[i] - 1);
    p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 1);
    p[n++] = INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
    return n;
}

static int keep_fd(Rings *self, int fd) {
    if (grow((void **)&self->fds, &self->cfds, (size_t)self->nfds + 1, sizeof(int)) < 0) {
        close(fd);
        PyErr_NoMemory();
        return -1;
    }
    self->fds[self->nfds++] = fd;
    return 0;
}

/* How many CPUs the kernel may ever have (a per-CPU map's values: one each), from
   /sys/devices/system/cpu/possible ("0-3"); 0 where unreadable. */
static long possible_cpus(void) {
    char text[256] = {0};
    FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
    if (!f) return 0;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    long last = -1;
    for (char *p = text; *p;) {
        if (*p >= '0' && *p <= '9') last = strtol(p, &p, 10);
        else p++;
    }
    return last + 1;
}

/* The BPF ring (ring_bytes for each CPU, a power of 2 in all) and the lost counts. */
static int bpf_open_ring(Rings *self, size_t ring_bytes) {
    size_t size = (size_t)sysconf(_SC_PAGESIZE), page = size;
    while (size < ring_bytes * (size_t)self->ncpus) size *= 2;
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_RINGBUF;
    a.max_entries = (uint32_t)size;
    int ring = (int)sys_bpf(BPF_MAP_CREATE, &a);
    if (ring < 0 || keep_fd(self, ring) < 0) return ring < 0 ? (PyErr_SetFromErrno(PyExc_OSError), -1) : -1;
    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_PERCPU_ARRAY;
    a.key_size = 4, a.value_size = 8, a.max_entries = 1;
    int lost = (int)sys_bpf(BPF_MAP_CREATE, &a);
    if (lost < 0 || keep_fd(self, lost) < 0) return lost < 0 ? (PyErr_SetFromErrno(PyExc_OSError), -1) : -1;
    void *cons = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, ring, 0);
    if (cons == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError), -1;
    self->bpf_cons = cons;
    void *prod = mmap(NULL, page + 2 * size, PROT_READ, MAP_SHARED, ring, (off_t)page);
    if (prod == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError), -1;
    self->bpf_prod = prod;
    self->bpf_ring = ring, self->bpf_lost = lost, self->bpf_size = size;
    self->bpf_possible = possible_cpus();
    return 0;
}

/* An event of ``role`` (tracepoint ``config``) with its program: one disabled perf event holds it
   (a tracepoint's programs run on every CPU). */
static int bpf_open_event(Rings *self, int role, uint64_t config) {
    struct bpf_insn prog[BPF_PROG_MAX];
    int n = bpf_program(self, role, prog);
    if (n < 0) return errno = EINVAL, PyErr_SetFromErrnoWithFilename(PyExc_OSError, "a field BPF cannot load"), -1;
    static char log[4096];
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_TRACEPOINT;
    a.insns = (uint64_t)(uintptr_t)prog;
    a.insn_cnt = (uint32_t)n;
    a.license = (uint64_t)(uintptr_t)"GPL";
    a.log_buf = (uint64_t)(uintptr_t)log, a.log_size = sizeof log, a.log_level = 1;
    log[0] = 0;
    int fd = (int)sys_bpf(BPF_PROG_LOAD, &a);
    if (fd < 0) {
        int err = errno;
        size_t len = strlen(log);
        PyErr_Format(PyExc_OSError, "[Errno %d] BPF_PROG_LOAD: %s%s", err, strerror(err),
                     err == EACCES && len ? log + (len > 200 ? len - 200 : 0) : "");
        return -1;
    }
    if (keep_fd(self, fd) < 0) return -1;
    struct perf_event_attr attr = event_attr(PERF_TYPE_TRACEPOINT, config);
    attr.disabled = 1;
    int ev = (int)syscall(SYS_perf_event_open, &attr, -1, self->cpus[0], -1, PERF_FLAG_FD_CLOEXEC);
    if (ev < 0) return PyErr_SetFromErrno(PyExc_OSError), -1;
    if (keep_fd(self, ev) < 0) return -1;
    if (ioctl(ev, PERF_EVENT_IOC_SET_BPF, fd) < 0) return PyErr_SetFromErrno(PyExc_OSError), -1;
    return 0;
}

/* Each event's role and fields (the engine's order), from ((role, config, filter, fields), ...);
   with BPF, each event's program too (its ring already open). */
static int parse_roles(Rings *self, PyObject *ev_seq) {
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(ev_seq); j++) {
        int role;
        unsigned long long config;
        PyObject *filter, *fields;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ev_seq, j), "iKOO", &role, &config, &filter, &fields)) return -1;
        if (role < 0 || role >= R_ROLES) {
            PyErr_SetString(PyExc_ValueError, "no such role");
            return -1;
        }
        PyObject *fseq = PySequence_Fast(fields, "fields must be a sequence");
        if (!fseq) return -1;
        Py_ssize_t nf = PySequence_Fast_GET_SIZE(fseq);
        self->nfields[role] = (int)(nf < MAX_FIELDS ? nf : MAX_FIELDS);
        for (int k = 0; k < self->nfields[role]; k++) {
            int off, size, sgn;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fseq, k), "iip", &off, &size, &sgn)) {
                Py_DECREF(fseq);
                return -1;
            }
            self->fields[role][k] = (Field){(uint16_t)off, (uint16_t)size, (uint8_t)sgn};
        }
        Py_DECREF(fseq);
        if (self->bpf && bpf_open_event(self, role, config) < 0) return -1;
    }
    return 0;
}

/* The events on the i-th CPU: the first opened leads (its ring; later ones write into it). */
static int open_on_cpu(Rings *self, int i, PyObject *ev_seq, size_t ring_bytes) {
    long page_size = sysconf(_SC_PAGESIZE);
    int leader = i < self->nrings ? self->rings[i].fd : -1;
    Py_ssize_t nev = self->bpf ? (leader < 0) : PySequence_Fast_GET_SIZE(ev_seq);
    if (grow((void **)&self->fds, &self->cfds, (size_t)(self->nfds + nev), sizeof(int)) < 0 ||
        grow((void **)&self->ids, &self->cids, (size_t)(self->nids + nev), sizeof(EventId)) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < nev; j++) {
        int role;
        unsigned long long config;
        PyObject *filter, *fields;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ev_seq, j), "iKOO", &role, &config, &filter, &fields)) return -1;
        int fd = self->bpf ? open_event(1, PERF_TYPE_SOFTWARE, PERF_COUNT_SW_DUMMY, self->cpus[i], ring_bytes)
                           : open_event(leader < 0, PERF_TYPE_TRACEPOINT, config, self->cpus[i], ring_bytes);
        if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError), -1;
        self->fds[self->nfds++] = fd;
        if (self->bpf) role = -1; /* forks, exits, execs only */
        else if (filter != Py_None) {
            const char *text = PyUnicode_AsUTF8(filter);
            if (!text) return -1;
            if (ioctl(fd, PERF_EVENT_IOC_SET_FILTER, text) < 0) return PyErr_SetFromErrno(PyExc_OSError), -1;
        }
        uint64_t id;
        if (ioctl(fd, PERF_EVENT_IOC_ID, &id) < 0) return PyErr_SetFromErrno(PyExc_OSError), -1;
        self->ids[self->nids++] = (EventId){id, role};
        if (leader < 0) {
            void *m = mmap(NULL, ring_bytes + (size_t)page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (m == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError), -1;
            Ring *ring = &self->rings[self->nrings++];
            ring->fd = fd;
            ring->page = m;
            ring->size = ring_bytes;
            ring->data = (char *)m + page_size;
            leader = fd;
        } else if (ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, leader) < 0) {
            return PyErr_SetFromErrno(PyExc_OSError), -1;
        }
    }
    return 0;
}

static int Rings_init(Rings *self, PyObject *args, PyObject *kwds) {
    PyObject *cpus, *events;
    long pages;
    int with_data, with_rip = 0, bpf = 0;
    static char *names[] = {"cpus", "events", "pages", "with_data", "with_rip", "bpf", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOlp|pp", names, &cpus, &events, &pages, &with_data,
                                     &with_rip, &bpf))
        return -1;
    PyObject *cpu_seq = PySequence_Fast(cpus, "cpus must be a sequence");
    if (!cpu_seq) return -1;
    PyObject *ev_seq = PySequence_Fast(events, "events must be a sequence");
    if (!ev_seq) return Py_DECREF(cpu_seq), -1;
    Py_ssize_t ncpu = PySequence_Fast_GET_SIZE(cpu_seq), nev = PySequence_Fast_GET_SIZE(ev_seq);
    self->ring_bytes = (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
    int rc = -1;
    if (ncpu < 1 || nev < 1 || pages < 1 || (pages & (pages - 1))) {
        PyErr_SetString(PyExc_ValueError, "cpus, events: not empty; pages: a power of 2");
        goto done;
    }
    self->with_data = with_data;
    self->with_rip = with_rip;
    self->news = PyList_New(0);
    self->cpus = calloc((size_t)ncpu, sizeof(int));
    self->rings = calloc((size_t)ncpu, sizeof(Ring));
    self->lost = calloc((size_t)ncpu, sizeof(uint64_t));
    if (!self->news || !self->cpus || !self->rings || !self->lost) {
        PyErr_NoMemory();
        goto done;
    }
    self->ncpus = (int)ncpu;
    self->bpf = bpf;
    self->bpf_ring = self->bpf_lost = -1;
    if (bpf && bpf_open_ring(self, self->ring_bytes) < 0) goto done;
    if (parse_roles(self, ev_seq) < 0) goto done;
    for (Py_ssize_t i = 0; i < ncpu; i++) {
        int cpu = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(cpu_seq, i));
        if (cpu < 0 && PyErr_Occurred()) goto done;
        self->cpus[i] = cpu;
        if (open_on_cpu(self, (int)i, ev_seq, self->ring_bytes) < 0) goto done;
    }
    rc = 0;
done:
    if (rc < 0) close_all(self);
    Py_DECREF(cpu_seq);
    Py_DECREF(ev_seq);
    return rc;
}

/* More events on every CPU's ring, from now on (as the constructor's ``events``); ``rip``:
   exits carry the guest's RIP from now on. */
static PyObject *Rings_add_events(Rings *self, PyObject *args) {
    PyObject *events;
    int with_rip;
    if (!PyArg_ParseTuple(args, "Op", &events, &with_rip)) return NULL;
    PyObject *ev_seq = PySequence_Fast(events, "events must be a sequence");
    if (!ev_seq) return NULL;
    int rc = parse_roles(self, ev_seq);
    for (int i = 0; rc == 0 && !self->bpf && i < self->nrings; i++) rc = open_on_cpu(self, i, ev_seq, self->ring_bytes);
    Py_DECREF(ev_seq);
    if (rc < 0) return NULL;
    self->with_rip = self->with_rip || with_rip;
    Py_RETURN_NONE;
}

static PyObject *Rings_follow(Rings *self, PyObject *arg) {
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    if (add_followed(self, (int)pid) < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Rings_unfollow(Rings *self, PyObject *arg) {
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    int k = 0;
    for (int i = 0; i < self->nfollowed; i++)
        if (self->followed[i] != pid) self->followed[k++] = self->followed[i];
    self->nfollowed = k;
    Py_RETURN_NONE;
}

static PyObject *Rings_follow_all(Rings *self, PyObject *arg) {
    self->all = PyObject_IsTrue(arg);
    Py_RETURN_NONE;
}

static PyObject *Rings_follow_children(Rings *self, PyObject *arg) {
    self->children = PyObject_IsTrue(arg);
    Py_RETURN_NONE;
}

static PyObject *Rings_set_vcpu(Rings *self, PyObject *args) {
    int pid, fd, slot;
    if (!PyArg_ParseTuple(args, "iii", &pid, &fd, &slot)) return NULL;
    Vcpu *v = add_vcpu(self, pid, fd);
    if (!v) return PyErr_NoMemory();
    v->slot = slot;
    for (uint32_t i = 0; i < self->cthreads; i++) /* threads that ran it under another number */
        if (self->threads[i].used && self->threads[i].pid == (uint32_t)pid && self->threads[i].fd == fd)
            self->threads[i].slot = slot;
    Py_RETURN_NONE;
}

static PyObject *Rings_forget_pid(Rings *self, PyObject *arg) {
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    forget_pid(self, (int)pid);
    Py_RETURN_NONE;
}

static PyObject *Rings_set_base(Rings *self, PyObject *arg) {
    unsigned long long base = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    self->base = base;
    Py_RETURN_NONE;
}

static PyObject *unknown_of(Rings *self, const Ev *e) {
    Vcpu *v = vcpu_of(self, (int)e->pid, (int)e->f[0]);
    int vm = v ? v->vm : -1, id = v ? v->id : -1;
    return Py_BuildValue("(sIIiii)", "unknown", e->pid, e->tid, (int)e->f[0], vm, id);
}

static PyObject *Rings_run(Rings *self, PyObject *args) {
    unsigned long long deadline;
    Py_ssize_t max_bytes;
    int wake;
    if (!PyArg_ParseTuple(args, "Kni", &deadline, &max_bytes, &wake)) return NULL;
    if (!self->rings) return PyErr_Format(PyExc_ValueError, "closed");
    int n = self->nrings;
    struct pollfd *fds = calloc((size_t)n + 2, sizeof *fds);
    if (!fds) return PyErr_NoMemory();
    int rc = 0;
    const Ev *at = NULL;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        uint64_t start = now_ns();
        for (int i = 0; i < n && rc == 0; i++) rc = read_ring(self, i) < 0 ? -1 : 0;
        if (rc == 0) rc = read_bpf(self);
        if (rc < 0) break;
        rc = process_until(self, start - SLACK_NS, &at, (size_t)max_bytes);
        if (rc != 0 || self->nout >= (size_t)max_bytes || start >= deadline ||
            PyList_GET_SIZE(self->news)) /* (this thread alone changes the list) */
            break;
        for (int i = 0; i < n; i++) fds[i] = (struct pollfd){self->rings[i].fd, POLLIN, 0};
        fds[n] = (struct pollfd){self->bpf_ring, POLLIN, 0}; /* -1: none (poll skips it) */
        fds[n + 1] = (struct pollfd){wake, POLLIN, 0};
        /* a fork, exit or exec waits for the other CPUs' events before it (SLACK_NS), not
           for the deadline: a traced process that ended is said at once */
        uint64_t left = deadline - start;
        uint64_t due = news_due(self);
        if (due != UINT64_MAX) {
            uint64_t wait = due + SLACK_NS > start ? due + SLACK_NS - start : 0;
            if (wait < left) left = wait;
        }
        int ms = (int)(left / 1000000u) + 1;
        int got = poll(fds, (nfds_t)n + 2, ms);
        if (got > 0 && wake >= 0 && fds[n + 1].revents) break;
        if (now_ns() >= deadline) {
            start = now_ns();
            for (int i = 0; i < n && rc == 0; i++) rc = read_ring(self, i) < 0 ? -1 : 0;
            if (rc == 0) rc = read_bpf(self) < 0 ? -1 : 0;
            if (rc == 0) rc = process_until(self, start - SLACK_NS, &at, (size_t)max_bytes);
            break;
        }
    }
    Py_END_ALLOW_THREADS
    free(fds);
    if (rc < 0) return PyErr_NoMemory();
    if (rc == 1) return unknown_of(self, at);
    Py_RETURN_NONE;
}

static PyObject *Rings_flush(Rings *self, PyObject *arg) {
    /* Every staged event, whatever its time (the traced processes have all gone). */
    (void)arg;
    for (int i = 0; i < self->nrings; i++)
        if (read_ring(self, i) < 0) return PyErr_NoMemory();
    if (read_bpf(self) < 0) return PyErr_NoMemory();
    const Ev *at = NULL;
    int rc = process_until(self, UINT64_MAX, &at, SIZE_MAX);
    if (rc < 0) return PyErr_NoMemory();
    if (rc == 1) return unknown_of(self, at);
    Py_RETURN_NONE;
}

static PyObject *Rings_feed(Rings *self, PyObject *args) {
    int ring;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iy*", &ring, &buf)) return NULL;
    const unsigned char *p = buf.buf;
    size_t at = 0;
    int rc = 0;
    while (rc == 0 && at + sizeof(struct perf_event_header) <= (size_t)buf.len) {
        struct perf_event_header h;
        memcpy(&h, p + at, sizeof h);
        if (h.size < sizeof h || at + h.size > (size_t)buf.len) break;
        rc = stage(self, ring < self->ncpus ? ring : 0, p + at, h.size);
        at += h.size;
    }
    PyBuffer_Release(&buf);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Rings_take(Rings *self, PyObject *unused) {
    (void)unused;
    PyObject *news = PyList_AsTuple(self->news);
    if (!news) return NULL;
    size_t nrecords = self->nkernel + self->nhardware;
    char *kernel = nrecords ? calloc(nrecords, RECORD_SIZE) : NULL;
    if (nrecords && !kernel) return Py_DECREF(news), PyErr_NoMemory();
    for (size_t i = 0; i < self->nhardware; i++) { /* HARDWARE records */
        HardwareExits *h = &self->hardware[i];
        char *r = kernel + (self->nkernel + i) * RECORD_SIZE;
        uint16_t vcpu = (uint16_t)h->slot;
        int64_t t = (int64_t)(h->t - self->base);
        uint32_t count = h->count > UINT32_MAX ? UINT32_MAX : (uint32_t)h->count;
        r[0] = KIND_HARDWARE;
        r[HARDWARE_AT_ISA] = (char)h->isa;
        memcpy(r + HARDWARE_AT_VCPU, &vcpu, 2);
        memcpy(r + HARDWARE_AT_REASON, &h->reason, 4);
        memcpy(r + HARDWARE_AT_T, &t, 8);
        memcpy(r + HARDWARE_AT_COUNT, &count, 4);
        memcpy(r + HARDWARE_AT_RIP, &h->rip, 8);
    }
    for (size_t i = 0; i < self->nkernel; i++) { /* COALESCED records, flagged C_KERNEL */
        KernelWrites *k = &self->kernel[i];
        char *r = kernel + i * RECORD_SIZE;
        uint16_t vcpu = (uint16_t)k->slot;
        int64_t t = (int64_t)(k->t - self->base);
        uint32_t count = k->count > UINT32_MAX ? UINT32_MAX : (uint32_t)k->count;
        r[0] = KIND_COALESCED;
        r[COALESCED_AT_FLAGS] = (char)(C_KERNEL | (k->pio ? C_PIO : 0));
        memcpy(r + COALESCED_AT_VCPU, &vcpu, 2);
        memcpy(r + COALESCED_AT_LEN, &k->len, 4);
        memcpy(r + COALESCED_AT_T, &t, 8);
        memcpy(r + COALESCED_AT_COUNT, &count, 4);
        memcpy(r + COALESCED_AT_ADDRESS, &k->address, 8);
    }
    PyObject *out = Py_BuildValue("(y#y#KKNy#)", self->out ? self->out : "", (Py_ssize_t)self->nout,
                                  self->seen ? self->seen : "", (Py_ssize_t)self->nseen,
                                  (unsigned long long)self->exits, (unsigned long long)self->lost_exits, news,
                                  kernel ? kernel : "", (Py_ssize_t)(nrecords * RECORD_SIZE));
    free(kernel);
    self->nkernel = self->nhardware = 0;
    if (!out) return NULL;
    PyList_SetSlice(self->news, 0, PyList_GET_SIZE(self->news), NULL);
    self->nout = self->nseen = 0;
    self->exits = self->lost_exits = 0;
    return out;
}

static PyObject *Rings_close_thread(Rings *self, PyObject *arg) {
    long tid = PyLong_AsLong(arg);
    if (tid == -1 && PyErr_Occurred()) return NULL;
    Thread *th = thread_of(self, (uint32_t)tid, 0);
    if (th && th->held && emit_held(self, th, NULL, 0) < 0) return PyErr_NoMemory();
    if (th) drop_thread(self, (uint32_t)tid);
    Py_RETURN_NONE;
}

static PyObject *Rings_pending(Rings *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromSize_t(self->nout + self->nseen + self->nkernel + self->nhardware +
                             (size_t)PyList_GET_SIZE(self->news));
}

static PyObject *Rings_lost_events(Rings *self, PyObject *unused) {
    (void)unused;
    uint64_t *by_cpu = NULL; /* the BPF programs' counts, by CPU number */
    long possible = self->bpf_possible;
    if (self->bpf_lost >= 0 && possible > 0) {
        by_cpu = calloc((size_t)possible, 8);
        uint32_t key = 0;
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.map_fd = (uint32_t)self->bpf_lost, a.key = (uint64_t)(uintptr_t)&key, a.value = (uint64_t)(uintptr_t)by_cpu;
        if (by_cpu && sys_bpf(BPF_MAP_LOOKUP_ELEM, &a) < 0) memset(by_cpu, 0, (size_t)possible * 8);
    }
    PyObject *t = PyTuple_New(self->ncpus);
    if (!t) return free(by_cpu), NULL;
    for (int i = 0; i < self->ncpus; i++) {
        uint64_t n = self->lost ? self->lost[i] : 0;
        if (by_cpu && self->cpus[i] < possible) n += by_cpu[self->cpus[i]];
        PyTuple_SET_ITEM(t, i, PyLong_FromUnsignedLongLong(n));
    }
    free(by_cpu);
    return t;
}

static PyObject *Rings_close(Rings *self, PyObject *unused) {
    (void)unused;
    close_all(self);
    Py_RETURN_NONE;
}

static PyObject *Rings_get_fds(Rings *self, void *closure) {
    (void)closure;
    PyObject *t = PyTuple_New(self->nrings);
    if (!t) return NULL;
    for (int i = 0; i < self->nrings; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLong(self->rings[i].fd));
    return t;
}

static PyMethodDef Rings_methods[] = {
    {"follow", (PyCFunction)Rings_follow, METH_O, "Follow a process's events."},
    {"unfollow", (PyCFunction)Rings_unfollow, METH_O, "Stop following a process."},
    {"follow_all", (PyCFunction)Rings_follow_all, METH_O, "Follow every process (or not)."},
    {"follow_children", (PyCFunction)Rings_follow_children, METH_O, "Follow what followed processes start."},
    {"set_vcpu", (PyCFunction)Rings_set_vcpu, METH_VARARGS, "(pid, fd) is vCPU slot (-1: unnamed)."},
    {"forget_pid", (PyCFunction)Rings_forget_pid, METH_O, "Forget a process's vCPU fds."},
    {"set_base", (PyCFunction)Rings_set_base, METH_O, "Record times count from this ns."},
    {"run", (PyCFunction)Rings_run, METH_VARARGS, "Read the rings until a deadline."},
    {"flush", (PyCFunction)Rings_flush, METH_NOARGS, "Process every staged event."},
    {"feed", (PyCFunction)Rings_feed, METH_VARARGS, "Stage perf records (tests)."},
    {"take", (PyCFunction)Rings_take, METH_NOARGS, "Records and news since the last take."},
    {"close_thread", (PyCFunction)Rings_close_thread, METH_O, "A thread has ended."},
    {"pending", (PyCFunction)Rings_pending, METH_NOARGS, "Bytes and news to take."},
    {"lost_events", (PyCFunction)Rings_lost_events, METH_NOARGS, "Per-CPU events the kernel dropped."},
    {"add_events", (PyCFunction)Rings_add_events, METH_VARARGS, "More events on every ring (events, rip)."},
    {"close", (PyCFunction)Rings_close, METH_NOARGS, "Close every event."},
    {NULL, NULL, 0, NULL},
};

static PyObject *Rings_get_ids(Rings *self, void *closure) {
    (void)closure;
    PyObject *t = PyTuple_New(self->nids);
    if (!t) return NULL;
    for (int i = 0; i < self->nids; i++)
        PyTuple_SET_ITEM(t, i, Py_BuildValue("(Ki)", (unsigned long long)self->ids[i].id, self->ids[i].role));
    return t;
}

static PyGetSetDef Rings_getset[] = {
    {"fds", (getter)Rings_get_fds, NULL, "The ring fds.", NULL},
    {"ids", (getter)Rings_get_ids, NULL, "((the kernel's event id, role), ...).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvmtop.native._tracepoints.Rings",
    .tp_basicsize = sizeof(Rings),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Rings_init,
    .tp_dealloc = (destructor)Rings_dealloc,
    .tp_methods = Rings_methods,
    .tp_getset = Rings_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tracepoints", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__tracepoints(void) {
    if (PyType_Ready(&RingsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&RingsType);
    if (PyModule_AddObject(m, "Rings", (PyObject *)&RingsType) < 0) return NULL;
    PyModule_AddIntConstant(m, "R_RUN", R_RUN);
    PyModule_AddIntConstant(m, "R_UEXIT", R_UEXIT);
    PyModule_AddIntConstant(m, "R_PIO", R_PIO);
    PyModule_AddIntConstant(m, "R_MMIO", R_MMIO);
    PyModule_AddIntConstant(m, "R_HYPERCALL", R_HYPERCALL);
    PyModule_AddIntConstant(m, "R_SYSEXIT", R_SYSEXIT);
    PyModule_AddIntConstant(m, "R_MARK", R_MARK);
    PyModule_AddIntConstant(m, "R_KEXIT", R_KEXIT);
    PyModule_AddIntConstant(m, "R_EMUL", R_EMUL);
    return m;
}
#else
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tracepoints", NULL, -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__tracepoints(void) { return PyModule_Create(&module); }
#endif
