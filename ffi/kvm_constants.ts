// KVM ioctl numbers, exit reasons, capabilities and the libc flag constants dvmm needs (x86-64 Linux).
// ioctl numbers are computed from the kernel's _IOC encoding with the struct sizes from ffi/structs.ts, and
// checked against the values a C program printed from <linux/kvm.h> (tests/ffi_test.ts).

import { SIZES } from "./structs.ts";

// ---- ioctl encoding (include/uapi/asm-generic/ioctl.h) ----
const IOC_NRBITS = 8;
const IOC_TYPEBITS = 8;
const IOC_SIZEBITS = 14;
const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS;
export const IOC_NONE = 0;
export const IOC_WRITE = 1;
export const IOC_READ = 2;

/** Encodes an ioctl request number. The result is a non-negative JS number (it may exceed 2^31). */
export function ioc(dir: number, type: number, nr: number, size: number): number {
  if (size < 0 || size >= 1 << IOC_SIZEBITS) throw new RangeError(`ioctl size ${size} out of range`);
  // Multiplication instead of `<<` keeps the value unsigned when dir has bit 31 set.
  return dir * 2 ** IOC_DIRSHIFT + ((size << IOC_SIZESHIFT) | (type << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT));
}
export const io = (type: number, nr: number): number => ioc(IOC_NONE, type, nr, 0);
export const ior = (type: number, nr: number, size: number): number => ioc(IOC_READ, type, nr, size);
export const iow = (type: number, nr: number, size: number): number => ioc(IOC_WRITE, type, nr, size);
export const iowr = (type: number, nr: number, size: number): number =>
  ioc(IOC_READ | IOC_WRITE, type, nr, size);

export const KVMIO = 0xae;

// ---- /dev/kvm (system) ioctls ----
export const KVM_GET_API_VERSION = io(KVMIO, 0x00);
export const KVM_CREATE_VM = io(KVMIO, 0x01);
export const KVM_GET_MSR_INDEX_LIST = iowr(KVMIO, 0x02, SIZES.kvm_msr_list);
export const KVM_CHECK_EXTENSION = io(KVMIO, 0x03);
export const KVM_GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04);
export const KVM_GET_SUPPORTED_CPUID = iowr(KVMIO, 0x05, SIZES.kvm_cpuid2);
export const KVM_GET_EMULATED_CPUID = iowr(KVMIO, 0x09, SIZES.kvm_cpuid2);
export const KVM_GET_MSR_FEATURE_INDEX_LIST = iowr(KVMIO, 0x0a, SIZES.kvm_msr_list);

// ---- VM ioctls ----
export const KVM_SET_USER_MEMORY_REGION = iow(KVMIO, 0x46, SIZES.kvm_userspace_memory_region);
export const KVM_CREATE_VCPU = io(KVMIO, 0x41);
export const KVM_SET_TSS_ADDR = io(KVMIO, 0x47);
export const KVM_SET_IDENTITY_MAP_ADDR = iow(KVMIO, 0x48, 8);
export const KVM_CREATE_IRQCHIP = io(KVMIO, 0x60);
export const KVM_IRQ_LINE = iow(KVMIO, 0x61, SIZES.kvm_irq_level);
export const KVM_IRQ_LINE_STATUS = iowr(KVMIO, 0x67, SIZES.kvm_irq_level);
export const KVM_SET_GSI_ROUTING = iow(KVMIO, 0x6a, SIZES.kvm_irq_routing);
export const KVM_IRQFD = iow(KVMIO, 0x76, SIZES.kvm_irqfd);
export const KVM_CREATE_PIT2 = iow(KVMIO, 0x77, SIZES.kvm_pit_config);
export const KVM_IOEVENTFD = iow(KVMIO, 0x79, SIZES.kvm_ioeventfd);
export const KVM_REGISTER_COALESCED_MMIO = iow(KVMIO, 0x67, SIZES.kvm_coalesced_mmio_zone);
export const KVM_UNREGISTER_COALESCED_MMIO = iow(KVMIO, 0x68, SIZES.kvm_coalesced_mmio_zone);
export const KVM_GET_IRQCHIP = iowr(KVMIO, 0x62, SIZES.kvm_irqchip);
export const KVM_SET_IRQCHIP = ior(KVMIO, 0x63, SIZES.kvm_irqchip);
export const KVM_GET_DIRTY_LOG = iow(KVMIO, 0x42, SIZES.kvm_dirty_log);
export const KVM_GET_PIT2 = ior(KVMIO, 0x9f, SIZES.kvm_pit_state2);
export const KVM_SET_PIT2 = iow(KVMIO, 0xa0, SIZES.kvm_pit_state2);
export const KVM_SET_CLOCK = iow(KVMIO, 0x7b, SIZES.kvm_clock_data);
export const KVM_GET_CLOCK = ior(KVMIO, 0x7c, SIZES.kvm_clock_data);
export const KVM_SIGNAL_MSI = iow(KVMIO, 0xa5, SIZES.kvm_msi);
export const KVM_ENABLE_CAP = iow(KVMIO, 0xa3, SIZES.kvm_enable_cap);

// ---- vCPU ioctls ----
export const KVM_RUN = io(KVMIO, 0x80);
export const KVM_GET_REGS = ior(KVMIO, 0x81, SIZES.kvm_regs);
export const KVM_SET_REGS = iow(KVMIO, 0x82, SIZES.kvm_regs);
export const KVM_GET_SREGS = ior(KVMIO, 0x83, SIZES.kvm_sregs);
export const KVM_SET_SREGS = iow(KVMIO, 0x84, SIZES.kvm_sregs);
export const KVM_INTERRUPT = iow(KVMIO, 0x86, 4);
export const KVM_GET_MSRS = iowr(KVMIO, 0x88, SIZES.kvm_msrs);
export const KVM_SET_MSRS = iow(KVMIO, 0x89, SIZES.kvm_msrs);
export const KVM_GET_FPU = ior(KVMIO, 0x8c, SIZES.kvm_fpu);
export const KVM_SET_FPU = iow(KVMIO, 0x8d, SIZES.kvm_fpu);
export const KVM_GET_LAPIC = ior(KVMIO, 0x8e, SIZES.kvm_lapic_state);
export const KVM_SET_LAPIC = iow(KVMIO, 0x8f, SIZES.kvm_lapic_state);
export const KVM_SET_CPUID2 = iow(KVMIO, 0x90, SIZES.kvm_cpuid2);
export const KVM_GET_CPUID2 = iowr(KVMIO, 0x91, SIZES.kvm_cpuid2);
export const KVM_GET_MP_STATE = ior(KVMIO, 0x98, SIZES.kvm_mp_state);
export const KVM_SET_MP_STATE = iow(KVMIO, 0x99, SIZES.kvm_mp_state);
export const KVM_NMI = io(KVMIO, 0x9a);
export const KVM_GET_VCPU_EVENTS = ior(KVMIO, 0x9f, SIZES.kvm_vcpu_events);
export const KVM_SET_VCPU_EVENTS = iow(KVMIO, 0xa0, SIZES.kvm_vcpu_events);
export const KVM_GET_DEBUGREGS = ior(KVMIO, 0xa1, SIZES.kvm_debugregs);
export const KVM_SET_DEBUGREGS = iow(KVMIO, 0xa2, SIZES.kvm_debugregs);
export const KVM_SET_TSC_KHZ = io(KVMIO, 0xa2);
export const KVM_GET_TSC_KHZ = io(KVMIO, 0xa3);
export const KVM_GET_XSAVE = ior(KVMIO, 0xa4, SIZES.kvm_xsave);
export const KVM_SET_XSAVE = iow(KVMIO, 0xa5, SIZES.kvm_xsave);
export const KVM_GET_XCRS = ior(KVMIO, 0xa6, SIZES.kvm_xcrs);
export const KVM_SET_XCRS = iow(KVMIO, 0xa7, SIZES.kvm_xcrs);

export const KVM_API_VERSION = 12;

// ---- exit reasons (kvm_run.exit_reason) ----
export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_EXCEPTION = 1;
export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HYPERCALL = 3;
export const KVM_EXIT_DEBUG = 4;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_IRQ_WINDOW_OPEN = 7;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_SET_TPR = 11;
export const KVM_EXIT_TPR_ACCESS = 12;
export const KVM_EXIT_NMI = 16;
export const KVM_EXIT_INTERNAL_ERROR = 17;
export const KVM_EXIT_SYSTEM_EVENT = 24;
export const KVM_EXIT_IOAPIC_EOI = 26;
export const KVM_EXIT_HYPERV = 27;
export const KVM_EXIT_DIRTY_RING_FULL = 31;
export const KVM_EXIT_AP_RESET_HOLD = 32;
export const KVM_EXIT_X86_RDMSR = 29;
export const KVM_EXIT_X86_WRMSR = 30;
export const KVM_EXIT_X86_BUS_LOCK = 33;
export const KVM_EXIT_NOTIFY = 37;

/** Name of an exit reason, for diagnostics. */
export function exitReasonName(reason: number): string {
  return EXIT_NAMES[reason] ?? `KVM_EXIT_${reason}`;
}
const EXIT_NAMES: Record<number, string> = {
  0: "UNKNOWN",
  1: "EXCEPTION",
  2: "IO",
  3: "HYPERCALL",
  4: "DEBUG",
  5: "HLT",
  6: "MMIO",
  7: "IRQ_WINDOW_OPEN",
  8: "SHUTDOWN",
  9: "FAIL_ENTRY",
  10: "INTR",
  11: "SET_TPR",
  12: "TPR_ACCESS",
  16: "NMI",
  17: "INTERNAL_ERROR",
  24: "SYSTEM_EVENT",
  26: "IOAPIC_EOI",
  27: "HYPERV",
  29: "X86_RDMSR",
  30: "X86_WRMSR",
  31: "DIRTY_RING_FULL",
  32: "AP_RESET_HOLD",
  33: "X86_BUS_LOCK",
  37: "NOTIFY",
};

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

export const KVM_SYSTEM_EVENT_SHUTDOWN = 1;
export const KVM_SYSTEM_EVENT_RESET = 2;
export const KVM_SYSTEM_EVENT_CRASH = 3;
export const KVM_SYSTEM_EVENT_WAKEUP = 4;
export const KVM_SYSTEM_EVENT_SUSPEND = 5;

export const KVM_INTERNAL_ERROR_EMULATION = 1;
export const KVM_INTERNAL_ERROR_SIMUL_EX = 2;
export const KVM_INTERNAL_ERROR_DELIVERY_EV = 3;
export const KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4;

// ---- mp_state ----
export const KVM_MP_STATE_RUNNABLE = 0;
export const KVM_MP_STATE_UNINITIALIZED = 1;
export const KVM_MP_STATE_INIT_RECEIVED = 2;
export const KVM_MP_STATE_HALTED = 3;
export const KVM_MP_STATE_SIPI_RECEIVED = 4;

// ---- capabilities (KVM_CHECK_EXTENSION) ----
export const KVM_CAP_IRQCHIP = 0;
export const KVM_CAP_HLT = 1;
export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_SET_TSS_ADDR = 4;
export const KVM_CAP_EXT_CPUID = 7;
export const KVM_CAP_NR_VCPUS = 9;
export const KVM_CAP_NR_MEMSLOTS = 10;
export const KVM_CAP_PIT = 11;
export const KVM_CAP_MP_STATE = 14;
/** The ring's page offset in a vCPU's mmap, or 0 when unsupported. */
export const KVM_CAP_COALESCED_MMIO = 15;
export const KVM_CAP_SYNC_MMU = 16;
export const KVM_CAP_USER_NMI = 22;
export const KVM_CAP_IRQ_ROUTING = 25;
export const KVM_CAP_IRQ_INJECT_STATUS = 26;
export const KVM_CAP_IRQFD = 32;
export const KVM_CAP_PIT2 = 33;
export const KVM_CAP_SET_BOOT_CPU_ID = 34;
export const KVM_CAP_PIT_STATE2 = 35;
export const KVM_CAP_IOEVENTFD = 36;
export const KVM_CAP_SET_IDENTITY_MAP_ADDR = 37;
export const KVM_CAP_ADJUST_CLOCK = 39;
export const KVM_CAP_VCPU_EVENTS = 41;
export const KVM_CAP_DEBUGREGS = 50;
export const KVM_CAP_ENABLE_CAP = 54;
export const KVM_CAP_XSAVE = 55;
export const KVM_CAP_XCRS = 56;
export const KVM_CAP_TSC_CONTROL = 60;
export const KVM_CAP_GET_TSC_KHZ = 61;
export const KVM_CAP_MAX_VCPUS = 66;
export const KVM_CAP_TSC_DEADLINE_TIMER = 72;
export const KVM_CAP_KVMCLOCK_CTRL = 76;
export const KVM_CAP_SIGNAL_MSI = 77;
export const KVM_CAP_READONLY_MEM = 81;
export const KVM_CAP_IRQFD_RESAMPLE = 82;
export const KVM_CAP_ENABLE_CAP_VM = 98;
export const KVM_CAP_IOEVENTFD_NO_LENGTH = 100;
export const KVM_CAP_CHECK_EXTENSION_VM = 105;
export const KVM_CAP_SPLIT_IRQCHIP = 121;
export const KVM_CAP_IOEVENTFD_ANY_LENGTH = 122;
export const KVM_CAP_MAX_VCPU_ID = 128;
export const KVM_CAP_X2APIC_API = 129;
export const KVM_CAP_MSI_DEVID = 131;
export const KVM_CAP_COALESCED_PIO = 162;
export const KVM_CAP_IMMEDIATE_EXIT = 136;
export const KVM_CAP_X86_DISABLE_EXITS = 143;
export const KVM_CAP_GET_MSR_FEATURES = 153;
export const KVM_CAP_X86_USER_SPACE_MSR = 188;
export const KVM_CAP_XSAVE2 = 208;

// ---- flags for VM ioctls ----
export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0;
export const KVM_MEM_READONLY = 1 << 1;
export const KVM_PIT_SPEAKER_DUMMY = 1;
export const KVM_IRQFD_FLAG_DEASSIGN = 1 << 0;
export const KVM_IRQFD_FLAG_RESAMPLE = 1 << 1;
export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0;
export const KVM_IOEVENTFD_FLAG_PIO = 1 << 1;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;
export const KVM_IRQ_ROUTING_IRQCHIP = 1;
export const KVM_IRQ_ROUTING_MSI = 2;
export const KVM_MSI_VALID_DEVID = 1 << 0;
export const KVM_IRQCHIP_PIC_MASTER = 0;
export const KVM_IRQCHIP_PIC_SLAVE = 1;
export const KVM_IRQCHIP_IOAPIC = 2;
export const KVM_NR_INTERRUPTS = 256;
/** kvm_cpuid_entry2.flags */
export const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0;
export const KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1;
export const KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2;

// ---- open(2) ----
export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_NOCTTY = 0o400;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DSYNC = 0o10000;
export const O_DIRECT = 0o40000;
export const O_CLOEXEC = 0o2000000;

// ---- fcntl(2) ----
export const F_GETFD = 1;
export const F_SETFD = 2;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const FD_CLOEXEC = 1;

// ---- mmap(2) / madvise(2) ----
export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const PROT_EXEC = 4;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_POPULATE = 0x8000;
export const MAP_HUGETLB = 0x40000;
export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;
export const MADV_POPULATE_WRITE = 23;
export const MADV_DONTFORK = 10;
export const MADV_MERGEABLE = 12;
export const MADV_HUGEPAGE = 14;
export const MADV_NOHUGEPAGE = 15;
export const MADV_DONTDUMP = 16;

// ---- memfd_create(2) ----
export const MFD_CLOEXEC = 0x0001;
export const MFD_ALLOW_SEALING = 0x0002;
export const MFD_HUGETLB = 0x0004;

// ---- eventfd(2) ----
export const EFD_SEMAPHORE = 1;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;

// ---- epoll(7) / poll(2) ----
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLIN = 0x001;
export const EPOLLPRI = 0x002;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;
export const EPOLLONESHOT = 1 << 30;
export const EPOLLET = 2 ** 31;
export const POLLIN = 0x001;
export const POLLPRI = 0x002;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLNVAL = 0x020;
