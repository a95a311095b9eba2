/* The guest's RIP of the exit KVM last returned from, read from the registers KVM synced into
 * struct kvm_run while kvm_valid_regs asks for them (kvmtop.abi.arch.x86_64.guest_rip is the
 * reference; the tracer's hot loop and the watch's sampler both read it here). Include after
 * kvmtop_abi.h. Reads only; decides nothing.
 */
#ifndef KVMTOP_GUEST_RIP_H
#define KVMTOP_GUEST_RIP_H
#include <stdint.h>
#include <string.h>

struct guest_rip {
    uint64_t rip, linear; /* linear: cs.base + rip outside 64-bit code */
    int cpl;              /* -1: not known (the segment registers are not synced) */
};

static inline uint64_t guest_rip_u64(const volatile uint8_t *p) {
    uint64_t v;
    memcpy(&v, (const void *)p, 8);
    return v;
}

/* 1 and *out where KVM synced the registers (KVM_SYNC_X86_REGS), else 0. */
static inline int guest_rip(const volatile uint8_t *run, struct guest_rip *out) {
    uint64_t valid = guest_rip_u64(run + RUN_VALID_REGS);
    if (!(valid & KVM_SYNC_X86_REGS)) return 0;
    uint64_t rip = guest_rip_u64(run + SYNC_RIP), rflags = guest_rip_u64(run + SYNC_RIP + 8);
    out->rip = out->linear = rip;
    out->cpl = -1;
    if (valid & KVM_SYNC_X86_SREGS) {
        out->cpl = 0;
        if (guest_rip_u64(run + SYNC_CR0) & X86_CR0_PE)
            out->cpl = (rflags & X86_EFLAGS_VM) ? 3 : (run[SYNC_SS_DPL] & 3);
        if (!run[SYNC_CS_L]) out->linear = (guest_rip_u64(run + SYNC_CS) + rip) & 0xFFFFFFFFu;
    }
    return 1;
}
#endif
