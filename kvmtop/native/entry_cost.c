/* kvmtop.native._sampler.entry_cost: what KVM_RUN spends, on this host, while exit_reason still holds
 * the last exit: before the kernel resets it at entry (the head) and after it sets the next one
 * (the tail). A look at kvm_run in those moments sees a reason, so samples count them as the
 * VMM's time, though the VMM's thread is inside KVM_RUN. Measured on a VM of kvmtop's own (one
 * vCPU looping on `out`), with a second thread that watches the vCPU's kvm_run and a flag the
 * running thread sets around each KVM_RUN: it timestamps each change it sees.
 *
 *   entry_cost(runs) -> (heads, tails, run_ns)
 *       heads, tails: bytes of native uint32 nanoseconds, one of each per run whose four changes
 *       the watcher saw in order; run_ns sums the time inside KVM_RUN of all the runs, as the
 *       running thread's clock says
 *
 * Raises OSError when /dev/kvm cannot make the VM. Decides nothing: Python keeps the figures.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "entry_cost.h"

#include <errno.h>

#if defined(__x86_64__) && defined(__linux__)
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_SIZE 0x10000
#define CODE_AT 0x1000

typedef struct {
    const volatile struct kvm_run *run;
    volatile int phase; /* 1 while the running thread is in KVM_RUN (set just around the call) */
    volatile int done;
    long timed, room;
    uint32_t *heads, *tails;
} Watch;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *watch_loop(void *arg) {
    Watch *w = arg;
    int last_phase = 0, reset = 0, set = 0;
    uint32_t last_reason = 1;
    uint64_t entered = 0, set_at = 0, head = 0;
    while (!w->done) {
        int phase = __atomic_load_n(&w->phase, __ATOMIC_ACQUIRE);
        uint32_t reason = w->run->exit_reason;
        if (__atomic_load_n(&w->phase, __ATOMIC_ACQUIRE) != phase) continue; /* raced: again */
        uint64_t t = now_ns();
        if (phase && !last_phase) { /* into KVM_RUN: the last exit's reason still reads */
            entered = t;
            reset = set = 0;
        } else if (phase && last_reason && !reason && !reset) { /* the kernel's reset */
            head = t - entered;
            reset = 1;
        } else if (phase && !last_reason && reason && reset) { /* the next exit */
            set_at = t;
            set = 1;
        } else if (!phase && last_phase && reset && set && w->timed < w->room) { /* returned */
            w->heads[w->timed] = head > UINT32_MAX ? UINT32_MAX : (uint32_t)head;
            w->tails[w->timed] = t - set_at > UINT32_MAX ? UINT32_MAX : (uint32_t)(t - set_at);
            w->timed++;
        }
        last_phase = phase;
        last_reason = reason;
    }
    return NULL;
}

static int make_vm(int fds[3], void **memory, struct kvm_run **run, long *run_size) {
    fds[0] = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fds[0] < 0) return -1;
    fds[1] = ioctl(fds[0], KVM_CREATE_VM, 0);
    if (fds[1] < 0) return -1;
    *memory = mmap(NULL, GUEST_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (*memory == MAP_FAILED) return *memory = NULL, -1;
    static const unsigned char code[] = {0xe6, 0x80, 0xeb, 0xfc}; /* out 0x80, al; jmp $-2 */
    memcpy((unsigned char *)*memory + CODE_AT, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = GUEST_SIZE, .userspace_addr = (uintptr_t)*memory};
    if (ioctl(fds[1], KVM_SET_USER_MEMORY_REGION, &region) < 0) return -1;
    fds[2] = ioctl(fds[1], KVM_CREATE_VCPU, 0);
    if (fds[2] < 0) return -1;
    *run_size = ioctl(fds[0], KVM_GET_VCPU_MMAP_SIZE, 0);
    if (*run_size < (long)sizeof(struct kvm_run)) return errno = EINVAL, -1;
    void *p = mmap(NULL, (size_t)*run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[2], 0);
    if (p == MAP_FAILED) return -1;
    *run = p;
    struct kvm_sregs sregs;
    if (ioctl(fds[2], KVM_GET_SREGS, &sregs) < 0) return -1;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(fds[2], KVM_SET_SREGS, &sregs) < 0) return -1;
    struct kvm_regs regs = {.rip = CODE_AT, .rflags = 2};
    return ioctl(fds[2], KVM_SET_REGS, &regs);
}

/* Two CPUs of this thread's mask, one for each thread (else the kernel may well put both on
   one, and the watcher would never run while the vCPU does); -1 when there are not two. */
static int two_cpus(const cpu_set_t *mask, cpu_set_t *mine, cpu_set_t *its) {
    int found = 0;
    CPU_ZERO(mine);
    CPU_ZERO(its);
    for (int cpu = 0; cpu < CPU_SETSIZE && found < 2; cpu++) {
        if (!CPU_ISSET(cpu, mask)) continue;
        CPU_SET(cpu, found++ ? its : mine);
    }
    return found == 2 ? 0 : -1;
}

/* The runs, timed; 0, or -1 with errno. GIL released. The calling thread's CPU mask is as it
   was afterwards. */
static int measure(long runs, Watch *w, uint64_t *run_ns) {
    int fds[3] = {-1, -1, -1}, rc = -1, saved = 0;
    void *memory = NULL;
    struct kvm_run *run = NULL;
    long run_size = 0;
    pthread_t thread;
    int started = 0, pinned = 0;
    cpu_set_t mask, mine, its;
    if (make_vm(fds, &memory, &run, &run_size) < 0) goto out;
    w->run = run;
    if (sched_getaffinity(0, sizeof mask, &mask) < 0) goto out;
    if (two_cpus(&mask, &mine, &its) < 0) {
        errno = EXDEV; /* one CPU: nothing to watch the vCPU from */
        goto out;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setaffinity_np(&attr, sizeof its, &its);
    errno = pthread_create(&thread, &attr, watch_loop, w);
    pthread_attr_destroy(&attr);
    if (errno != 0) goto out;
    started = 1;
    pinned = sched_setaffinity(0, sizeof mine, &mine) == 0;
    for (long i = 0; i < runs; i++) {
        uint64_t t0 = now_ns();
        __atomic_store_n(&w->phase, 1, __ATOMIC_RELEASE);
        int r = ioctl(fds[2], KVM_RUN, 0);
        __atomic_store_n(&w->phase, 0, __ATOMIC_RELEASE);
        *run_ns += now_ns() - t0;
        if (r < 0 && errno != EINTR) goto out;
        if (r == 0 && run->exit_reason != KVM_EXIT_IO) {
            errno = EPROTO; /* the guest did not do what it was written to */
            goto out;
        }
    }
    rc = 0;
out:
    saved = errno;
    w->done = 1;
    if (started) pthread_join(thread, NULL);
    if (pinned) sched_setaffinity(0, sizeof mask, &mask);
    if (run) munmap(run, (size_t)run_size);
    for (int i = 2; i >= 0; i--)
        if (fds[i] >= 0) close(fds[i]);
    if (memory) munmap(memory, GUEST_SIZE);
    errno = saved;
    return rc;
}

PyObject *entry_cost(PyObject *module, PyObject *args) {
    (void)module;
    long runs;
    if (!PyArg_ParseTuple(args, "l", &runs)) return NULL;
    if (runs < 1 || runs > 10000000) return PyErr_Format(PyExc_ValueError, "runs must be 1..10000000");
    Watch w = {.room = runs};
    w.heads = PyMem_Calloc((size_t)runs, sizeof *w.heads);
    w.tails = PyMem_Calloc((size_t)runs, sizeof *w.tails);
    PyObject *out = NULL;
    if (!w.heads || !w.tails) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t run_ns = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = measure(runs, &w, &run_ns);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    Py_ssize_t size = (Py_ssize_t)(w.timed * (long)sizeof(uint32_t));
    out = Py_BuildValue("(y#y#K)", (const char *)w.heads, size, (const char *)w.tails, size,
                        (unsigned long long)run_ns);
done:
    PyMem_Free(w.heads);
    PyMem_Free(w.tails);
    return out;
}
#else
PyObject *entry_cost(PyObject *module, PyObject *args) {
    (void)module;
    (void)args;
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
}
#endif
