/* A VMM whose clock is C's: one vCPU looping on `out 0x80`, each exit handled by spinning a
 * fixed time. It times each KVM_RUN call around the ioctl (two clock reads, tens of ns apart from
 * the syscall) and prints, at the end, one JSON line: the exits and the time in and out of
 * KVM_RUN. The truth a sampled VMM share is checked against.
 *
 *     cc -O2 -o timed_vmm timed_vmm.c && ./timed_vmm EXITS HANDLER_US
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int must(int value, const char *what) {
    if (value < 0) {
        perror(what);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: timed_vmm EXITS HANDLER_US\n"), 2;
    long exits = atol(argv[1]);
    uint64_t handler_ns = (uint64_t)(atof(argv[2]) * 1000);
    int kvm = must(open("/dev/kvm", O_RDWR | O_CLOEXEC), "/dev/kvm");
    int vm = must(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM");
    unsigned char *memory = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return perror("mmap"), 2;
    static const unsigned char code[] = {0xe6, 0x80, 0xeb, 0xfc}; /* out 0x80, al; jmp $-2 */
    for (unsigned i = 0; i < sizeof code; i++) memory[0x1000 + i] = code[i];
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
    must(ioctl(vcpu, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0x1000, .rflags = 2};
    must(ioctl(vcpu, KVM_SET_REGS, &regs), "KVM_SET_REGS");
    uint64_t in_run = 0, out = 0, returned = 0;
    for (long i = 0; i < exits; i++) {
        uint64_t entered = now_ns();
        if (returned) out += entered - returned;
        int r = ioctl(vcpu, KVM_RUN, 0);
        returned = now_ns();
        in_run += returned - entered;
        if (r < 0 && errno == EINTR) { /* a signal (a tracer's attach, say): no exit, again */
            i--;
            continue;
        }
        must(r, "KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) return fprintf(stderr, "exit %u\n", run->exit_reason), 2;
        while (now_ns() - returned < handler_ns) {
        }
    }
    printf("{\"exits\": %ld, \"in_run_ns\": %llu, \"out_ns\": %llu}\n", exits,
           (unsigned long long)in_run, (unsigned long long)out);
    return 0;
}
