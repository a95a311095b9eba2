/* A VMM whose clock is C's: one vCPU looping on `out 0x80` (io), on a byte write to unbacked
 * memory at 0x20000 (mmio), or on both in turn (mix), each exit handled by spinning a fixed time
 * (half of it for an MMIO exit of the mix), or (io-sleep: the loop on `out`) by sleeping it, so that
 * each KVM_RUN begins after a wake-up. It times each KVM_RUN call around the ioctl (two
 * clock reads, tens of ns apart from the syscall) and prints, at the end, one JSON line: the
 * exits, the time in KVM_RUN, and out of it after each reason, and how long its thread waited for
 * a CPU meanwhile (where the kernel's schedstat says). The truth a sampled VMM share is
 * checked against. With SYSCALLS, each exit's handling first makes that many getppid calls (each
 * costs a traced thread two stops), then spins its time. With TIMED_VMM_HOLD set in its
 * environment, it stays (its vCPU out of KVM_RUN) until its stdin ends, so that a watcher can
 * read the process once more after the line.
 *
 *     cc -O2 -o timed_vmm timed_vmm.c && ./timed_vmm EXITS HANDLER_US [io|mmio|mix|io-sleep] [SYSCALLS]
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The time this thread waited for a CPU so far (its second schedstat field), 0 if unknown. */
static uint64_t run_delay_ns(void) {
    unsigned long long on_cpu = 0, waited = 0;
    FILE *f = fopen("/proc/thread-self/schedstat", "r");
    if (!f) return 0;
    if (fscanf(f, "%llu %llu", &on_cpu, &waited) != 2) waited = 0;
    fclose(f);
    return waited;
}

static int must(int value, const char *what) {
    if (value < 0) {
        perror(what);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return fprintf(stderr, "usage: timed_vmm EXITS HANDLER_US [io|mmio|mix|io-sleep] [SYSCALLS]\n"), 2;
    const char *mode = argc > 3 ? argv[3] : "io";
    int syscalls = argc > 4 ? atoi(argv[4]) : 0;
    int sleeping = !strcmp(mode, "io-sleep");
    long exits = atol(argv[1]);
    uint64_t handler_ns = (uint64_t)(atof(argv[2]) * 1000);
    int kvm = must(open("/dev/kvm", O_RDWR | O_CLOEXEC), "/dev/kvm");
    int vm = must(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM");
    unsigned char *memory = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return perror("mmap"), 2;
    static const unsigned char io[] = {0xe6, 0x80, 0xeb, 0xfc};           /* out 0x80, al; jmp */
    static const unsigned char mmio[] = {0xa2, 0, 0, 0xeb, 0xfb};          /* mov [ds:0], al; jmp */
    static const unsigned char mix[] = {0xe6, 0x80, 0xa2, 0, 0, 0xeb, 0xf9}; /* both; jmp */
    const unsigned char *code = !strcmp(mode, "mmio") ? mmio : !strcmp(mode, "mix") ? mix : io;
    size_t code_size = code == mmio ? sizeof mmio : code == mix ? sizeof mix : sizeof io;
    memcpy(memory + 0x1000, code, code_size);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = 0x10000, .userspace_addr = (uintptr_t)memory};
    must(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION");
    int vcpu = must(ioctl(vm, KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU");
    int size = must(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) return perror("mmap kvm_run"), 2;
    struct kvm_sregs sregs;
    must(ioctl(vcpu, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0x20000; /* beyond the 64 KiB of memory: its writes exit as MMIO */
    sregs.ds.selector = 0x2000;
    must(ioctl(vcpu, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0x1000, .rflags = 2};
    must(ioctl(vcpu, KVM_SET_REGS, &regs), "KVM_SET_REGS");
    uint64_t in_run = 0, out[2] = {0, 0}, returned = 0, handler = 0, in_syscalls = 0, syscalled = 0;
    uint64_t waited = run_delay_ns(); /* a CPU's wait is neither KVM's nor the handler's */
    long count[2] = {0, 0};
    int last = -1; /* 0: IO, 1: MMIO */
    for (long i = 0; i < exits; i++) {
        uint64_t entered = now_ns();
        if (last >= 0) out[last] += entered - returned, in_syscalls += syscalled; /* the same handlings */
        int r = ioctl(vcpu, KVM_RUN, 0);
        returned = now_ns();
        in_run += returned - entered;
        if (r < 0 && errno == EINTR) { /* a signal (a tracer's attach, say): no exit, again */
            i--;
            continue;
        }
        must(r, "KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO && run->exit_reason != KVM_EXIT_MMIO)
            return fprintf(stderr, "exit %u\n", run->exit_reason), 2;
        last = run->exit_reason == KVM_EXIT_MMIO;
        count[last]++;
        handler = code == mix && last ? handler_ns / 2 : handler_ns;
        for (int k = 0; k < syscalls; k++) syscall(SYS_getppid); /* not the vDSO: a real syscall */
        uint64_t spun = syscalls ? now_ns() : returned;
        syscalled = spun - returned; /* traced, their stops: what NET takes out */
        if (sleeping) {
            struct timespec pause = {.tv_sec = (time_t)(handler / 1000000000u),
                                     .tv_nsec = (long)(handler % 1000000000u)};
            nanosleep(&pause, NULL);
        }
        while (now_ns() - spun < handler) {
        }
    }
    waited = run_delay_ns() - waited;
    printf("{\"exits\": %ld, \"in_run_ns\": %llu, \"out_ns\": %llu, \"io\": [%ld, %llu], "
           "\"mmio\": [%ld, %llu], \"syscalls_ns\": %llu, \"run_delay_ns\": %llu}\n", exits,
           (unsigned long long)in_run, (unsigned long long)(out[0] + out[1]), count[0],
           (unsigned long long)out[0], count[1], (unsigned long long)out[1],
           (unsigned long long)in_syscalls, (unsigned long long)waited);
    fflush(stdout);
    if (getenv("TIMED_VMM_HOLD"))
        while (getchar() != EOF) {
        }
    return 0;
}
