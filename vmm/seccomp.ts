/**
 * Seccomp confinement, as Cloud Hypervisor's `--seccomp true|false|log|errno`: one allow list per thread
 * kind, compiled here to classic BPF and loaded by the shim (libkvmshim/sandbox.c).
 *
 * - The main thread calls {@link startSeccomp} before it starts any worker: the `vmm` filter goes on every
 *   thread the process has (TSYNC: Deno's and V8's own threads too) and is inherited by every thread
 *   started later.
 * - Each worker calls {@link confineThread} with its kind when its module starts: its own, narrower filter
 *   stacks on the inherited one (the kernel applies both; the stricter answer wins).
 * - `true` traps a call outside the list: the shim's SIGSYS handler prints the thread kind and the call's
 *   name, then the process ends (killed by SIGSYS, exit status 159). `errno` fails the call with EPERM.
 *   `log` reports each call outside a thread kind's list once on stderr and carries it out (the handler
 *   re-issues it from one instruction the filter allows); that is how the lists were built: run the
 *   suites with `--seccomp log` and collect the reports.
 *
 * Lists are system call names (ffi/syscalls.ts). `ioctl` is further limited by request type: KVM's (0xAE)
 * on vCPU threads, a tap's and FIONREAD ('T', 0x54) on device and migration threads.
 */
import { shim } from "../ffi/shim.ts";
import { SYSCALL_NAMES, SYSCALL_NR } from "../ffi/syscalls.ts";

/** `--seccomp` values. */
export type SeccompMode = "true" | "false" | "log" | "errno";
/** The thread kinds that have a filter of their own. */
export type ThreadKind = "vmm" | "vcpu" | "device" | "migration";

const KIND_INDEX: Record<ThreadKind, number> = { vmm: 0, vcpu: 1, device: 2, migration: 3 };
const MODE_CODE: Record<Exclude<SeccompMode, "false">, number> = { true: 1, log: 2, errno: 3 };

// Calls every thread may make: the ones the SIGSYS handler itself makes, signal return and masks (which
// the log-mode handler could not carry out on a thread's behalf), thread start and end, memory management
// (V8's heap), futexes, clocks and sleeping, each isolate's own event loop (epoll), closing descriptors;
// `sendto` is what Deno's signal handler uses to wake its loop, on whichever thread the signal lands.
// deno-fmt-ignore
const EVERY_THREAD = [
  "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "sigaltstack", "restart_syscall", "sendto", "write",
  "getpid", "gettid", "tgkill", "exit", "exit_group", "clone", "clone3", "set_robust_list", "rseq", "prctl",
  "sched_getaffinity", "mmap", "munmap", "mprotect", "pkey_mprotect", "pkey_alloc", "pkey_free", "madvise",
  "mremap", "brk", "futex", "sched_yield",
  "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday", "getrandom", "epoll_create1", "epoll_ctl",
  "epoll_wait", "epoll_pwait", "eventfd2", "close", "read", "sched_getparam", "sched_getscheduler",
];

// What each kind does beyond that (found with --seccomp log over the suites, native and in the KVM lab).
// deno-fmt-ignore
const LISTS: Record<ThreadKind, string[]> = {
  // The API server, control loop, VM set-up and Deno's own runtime threads (module loading, timers,
  // the blocking pool that runs file and FFI work); `seccomp`: each worker adds its own filter; Landlock.
  vmm: [
    "seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "ioctl", "openat", "open", "stat", "fstat", "lstat", "newfstatat", "statx", "readlink", "access",
    "faccessat", "faccessat2", "getcwd", "getdents64", "lseek", "pread64", "pwrite64", "readv", "writev",
    "preadv", "pwritev", "fsync", "fdatasync", "ftruncate", "fallocate", "fcntl", "flock", "dup", "dup3",
    "pipe2", "unlink", "unlinkat", "rename", "renameat", "mkdir", "mkdirat", "chmod", "fchmod", "memfd_create",
    "socket", "socketpair", "bind", "listen", "accept4", "connect", "shutdown", "getsockname", "getpeername",
    "getsockopt", "setsockopt", "sendmsg", "recvmsg", "recvfrom", "sendmmsg", "poll", "ppoll",
    "sched_getparam", "sched_getscheduler", "sysinfo", "uname", "getuid", "geteuid", "getrlimit", "prlimit64", "getppid",
  ],
  // KVM_RUN and the vCPU's other KVM requests (ioctl: KVM's requests only, see ARG_RULES); the file
  // calls are Deno's, for its module caches (seen once, on a vCPU thread's first run of a new build).
  vcpu: [
    "ioctl", "openat", "newfstatat", "statx", "fstat", "lseek", "pread64", "pwrite64", "fcntl", "fdatasync",
    "fsync", "ftruncate", "unlink", "rename", "mkdir", "readlink", "getcwd", "flock",
  ],
  // Queue work: the device's backing fd (files, taps), eventfds, guest-memory advice; vsock's host
  // sockets (accept, connect to PATH_port), vhost-user's control socket (descriptors over sendmsg); a
  // disk's io_uring (what it runs is the disk's reads, writes and syncs, outside this filter, as in CH).
  device: [
    "socket", "connect", "accept4", "shutdown", "sendmsg", "recvmsg", "recvfrom", "getsockopt", "setsockopt",
    "ioctl", "newfstatat", "statx", "unlink", "rename", "mkdir", "readlink", "getcwd", "flock", "ftruncate",
    "openat", "readv", "writev", "preadv", "pwritev", "pread64", "pwrite64", "fdatasync", "fsync", "fallocate",
    "lseek", "fstat", "fcntl", "ppoll", "poll", "io_uring_setup", "io_uring_enter",
  ],
  // Migration: its socket (UNIX or TCP) and the received memory's memfds; a host name in a tcp: URL goes
  // through the C library's resolver (/etc/hosts, DNS: the files, sendmmsg/recvfrom, FIONREAD).
  migration: [
    "socket", "bind", "listen", "accept4", "connect", "fcntl", "setsockopt", "poll", "ppoll", "pread64",
    "pwrite64", "ftruncate", "memfd_create", "statx", "fstat", "sendmsg", "recvmsg", "shutdown",
    "openat", "newfstatat", "lseek", "uname", "sendmmsg", "recvfrom", "getsockname", "getpeername", "ioctl",
  ],
};

/** A call allowed only when `(args[arg] & mask) === value` (low 32 bits) for one of its rules. */
export interface ArgRule {
  arg: number;
  mask: number;
  value: number;
}

/** KVM's ioctl requests all have type 0xAE (bits 8-15 of the request number). */
const KVM_IOCTLS: ArgRule = { arg: 1, mask: 0xff00, value: 0xae00 };

/** A tap's requests (TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ, …) are type 'T' (0x54). */
const TUN_IOCTLS: ArgRule = { arg: 1, mask: 0xff00, value: 0x5400 };

// Calls of a kind that are allowed with certain arguments only.
const ARG_RULES: Partial<Record<ThreadKind, Record<string, ArgRule[]>>> = {
  vcpu: { ioctl: [KVM_IOCTLS] },
  // virtio-net's worker sets the tap's offloads and queues as the guest negotiates them.
  device: { ioctl: [TUN_IOCTLS] },
  // The resolver's FIONREAD (also type 'T').
  migration: { ioctl: [TUN_IOCTLS] },
};

/** The argument rules of a thread kind, by system call number. */
export function argRules(kind: ThreadKind): Map<number, ArgRule[]> {
  return new Map(
    Object.entries(ARG_RULES[kind] ?? {}).map(([name, rules]) => [SYSCALL_NR.get(name)!, rules]),
  );
}

/** The allow list of a thread kind (names), for reports and tests. */
export function allowList(kind: ThreadKind): string[] {
  // Workers start under the vmm filter (inherited) and add theirs: the vmm list must hold every kind's.
  const own = kind === "vmm" ? Object.values(LISTS).flat() : LISTS[kind];
  return [...new Set([...EVERY_THREAD, ...own])].sort();
}

// Classic BPF opcodes and seccomp's return values and data layout (linux/filter.h, linux/seccomp.h).
const LD_W_ABS = 0x20;
const JEQ_K = 0x15;
const JGE_K = 0x35;
const RET_K = 0x06;
const AUDIT_ARCH_X86_64 = 0xc000003e;
const X32_BIT = 0x40000000;
const RET = {
  killProcess: 0x80000000,
  trap: 0x00030000,
  errnoEperm: 0x00050000 | 1,
  allow: 0x7fff0000,
};
const DATA_NR = 0;
const DATA_ARCH = 4;
const DATA_IP = 8;
const DATA_ARGS = 16;
const ALU_AND_K = 0x54;

/**
 * Compiles an allow list to a seccomp BPF program (8-byte sock_filter entries): x86_64 only (other
 * architectures and the x32 ABI are killed), each listed call allowed, the rest answered with `deny`.
 * `escapeIp` (log mode) also allows any call made from that return address.
 */
export function compileFilter(
  names: string[],
  deny: number,
  escapeIp?: bigint,
  rules: Map<number, ArgRule[]> = new Map(),
): Uint8Array<ArrayBuffer> {
  const prog: [number, number, number, number][] = [];
  const op = (code: number, jt: number, jf: number, k: number) => prog.push([code, jt, jf, k >>> 0]);
  op(LD_W_ABS, 0, 0, DATA_ARCH);
  op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64);
  op(RET_K, 0, 0, RET.killProcess);
  if (escapeIp !== undefined) {
    op(LD_W_ABS, 0, 0, DATA_IP);
    op(JEQ_K, 0, 3, Number(escapeIp & 0xffffffffn));
    op(LD_W_ABS, 0, 0, DATA_IP + 4);
    op(JEQ_K, 0, 1, Number(escapeIp >> 32n));
    op(RET_K, 0, 0, RET.allow);
  }
  op(LD_W_ABS, 0, 0, DATA_NR);
  op(JGE_K, 0, 1, X32_BIT);
  op(RET_K, 0, 0, deny);
  const nrs = names.map((n) => {
    const nr = SYSCALL_NR.get(n);
    if (nr === undefined) throw new Error(`seccomp: unknown system call ${n}`);
    return nr;
  });
  for (const nr of [...new Set(nrs)].sort((a, b) => a - b)) {
    const argRules = rules.get(nr);
    if (!argRules) {
      op(JEQ_K, 0, 1, nr);
      op(RET_K, 0, 0, RET.allow);
      continue;
    }
    // jeq nr; then per rule: ld arg (low word); and mask; jeq value → allow; after the rules: deny.
    op(JEQ_K, 0, argRules.length * 4 + 1, nr);
    for (const r of argRules) {
      op(LD_W_ABS, 0, 0, DATA_ARGS + 8 * r.arg);
      op(ALU_AND_K, 0, 0, r.mask);
      op(JEQ_K, 0, 1, r.value);
      op(RET_K, 0, 0, RET.allow);
    }
    op(RET_K, 0, 0, deny);
  }
  op(RET_K, 0, 0, deny);
  const out = new Uint8Array(prog.length * 8);
  const v = new DataView(out.buffer);
  prog.forEach(([code, jt, jf, k], i) => {
    v.setUint16(i * 8, code, true);
    v.setUint8(i * 8 + 2, jt);
    v.setUint8(i * 8 + 3, jf);
    v.setUint32(i * 8 + 4, k, true);
  });
  return out;
}

function install(kind: ThreadKind, tsync: boolean): void {
  const code = shim().kvs_seccomp_mode();
  if (code === 0) return;
  const deny = code === MODE_CODE.errno ? RET.errnoEperm : RET.trap;
  const escape = code === MODE_CODE.log ? shim().kvs_seccomp_escape_ip() : undefined;
  const prog = compileFilter(allowList(kind), deny, escape, argRules(kind));
  const r = Number(
    shim().kvs_seccomp_install(
      prog,
      prog.length / 8,
      KIND_INDEX[kind],
      new TextEncoder().encode(kind + "\0"),
      tsync ? 1 : 0,
    ),
  );
  if (r !== 0) throw new Error(`seccomp: loading the ${kind} filter failed (errno ${-r})`);
}

/**
 * Main thread, once, before any worker starts: sets the mode for the whole process and puts the `vmm`
 * filter on every thread. `false` installs nothing.
 */
export function startSeccomp(mode: SeccompMode): void {
  if (mode === "false") return;
  const names = new TextEncoder().encode(SYSCALL_NAMES.join("\0") + "\0");
  const r = Number(shim().kvs_seccomp_setup(MODE_CODE[mode], names, BigInt(names.length)));
  if (r !== 0) throw new Error(`seccomp: setting up the SIGSYS handler failed (errno ${-r})`);
  install("vmm", true);
}

/** A worker's first step: its kind's filter on its own thread (nothing when the process has none). */
export function confineThread(kind: Exclude<ThreadKind, "vmm">): void {
  install(kind, false);
}
