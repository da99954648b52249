// Deno.dlopen of libkvmshim (libkvmshim/kvmshim.h): typed symbols, errno helpers and foreign-memory views.
//
// Where the library comes from, in order:
//  1. `DVMM_SHIM` (absolute path). If set, it must load; there is no silent fallback.
//  2. `build/libkvmshim.so` relative to the repository root (computed from this module's URL).
//  3. An embedded copy: under `deno compile --include build/libkvmshim.so`, the path from (2) resolves inside
//     the binary's virtual file system, which Deno's fs API can read but dlopen(3) cannot. The bytes are then
//     written to a private file (in /dev/shm when writable, else Deno.makeTempFile's directory), loaded from
//     there, and `DVMM_SHIM` is set to that path so vCPU/device workers load the *same* file (glibc then
//     shares one copy of the library, which matters for the process-wide kick signal handler). The file is
//     removed when the main thread unloads.
//
// Every shim call returns a non-negative result or -errno. `check()` turns the negative case into an OsError.
// Hot paths use functions and aliases with i32 results (a JS number: no BigInt allocated per call) and only
// 32-bit or f64 parameters (see kvs_run below); an alias may declare a C function returning int64_t with an
// i32 result where the value is a C int sign-extended to 64 bits (readv/writev, epoll_wait).

const SYMBOLS = {
  kvs_open: { parameters: ["buffer", "i32", "i32"], result: "i64" },
  kvs_close: { parameters: ["i32"], result: "i64" },
  kvs_ioctl: { parameters: ["i32", "u64", "buffer"], result: "i64" },
  kvs_ioctl_val: { parameters: ["i32", "u64", "u64"], result: "i64" },
  kvs_mmap: { parameters: ["u64", "u64", "i32", "i32", "i32", "i64"], result: "i64" },
  kvs_munmap: { parameters: ["u64", "u64"], result: "i64" },
  kvs_madvise: { parameters: ["u64", "u64", "i32"], result: "i64" },
  kvs_memfd: { parameters: ["buffer", "u32"], result: "i64" },
  kvs_ftruncate: { parameters: ["i32", "i64"], result: "i64" },
  kvs_eventfd: { parameters: ["u32", "i32"], result: "i64" },
  kvs_fd_size: { parameters: ["i32"], result: "i64" },
  kvs_lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  kvs_read: { parameters: ["i32", "buffer", "u64"], result: "i64" },
  kvs_write: { parameters: ["i32", "buffer", "u64"], result: "i64" },
  kvs_pread: { parameters: ["i32", "buffer", "u64", "i64"], result: "i64" },
  kvs_pwrite: { parameters: ["i32", "buffer", "u64", "i64"], result: "i64" },
  kvs_readv: { parameters: ["i32", "buffer", "i32"], result: "i64" },
  kvs_writev: { parameters: ["i32", "buffer", "i32"], result: "i64" },
  kvs_preadv: { parameters: ["i32", "buffer", "i32", "i64"], result: "i64" },
  kvs_pwritev: { parameters: ["i32", "buffer", "i32", "i64"], result: "i64" },
  kvs_fsync: { parameters: ["i32"], result: "i64" },
  kvs_fdatasync: { parameters: ["i32"], result: "i64" },
  kvs_fcntl: { parameters: ["i32", "i32", "i64"], result: "i64" },
  kvs_dup: { parameters: ["i32"], result: "i64" },
  kvs_dup2: { parameters: ["i32", "i32"], result: "i64" },
  kvs_epoll_create: { parameters: [], result: "i64" },
  kvs_epoll_ctl: { parameters: ["i32", "i32", "i32", "u32", "u32"], result: "i32" },
  kvs_epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i64" },
  kvs_poll1: { parameters: ["i32", "i32", "i32"], result: "i64" },
  kvs_socket: { parameters: ["i32", "i32", "i32"], result: "i64" },
  kvs_unix_listen: { parameters: ["buffer", "i32"], result: "i64" },
  kvs_unix_listen_mode: { parameters: ["buffer", "i32", "i32"], result: "i64" },
  kvs_unix_connect: { parameters: ["buffer"], result: "i64" },
  kvs_accept: { parameters: ["i32"], result: "i64" },
  kvs_tcp_listen: { parameters: ["buffer", "i32", "i32"], result: "i64" },
  kvs_tcp_connect: { parameters: ["buffer", "i32"], result: "i64" },
  kvs_sockopt_int: { parameters: ["i32", "i32"], result: "i64" },
  kvs_recv_fds: { parameters: ["i32", "buffer", "u64", "buffer", "i32"], result: "i64" },
  kvs_send_fds: { parameters: ["i32", "buffer", "u64", "buffer", "i32"], result: "i64" },
  kvs_set_thread_name: { parameters: ["buffer"], result: "i64" },
  kvs_kick_init: { parameters: [], result: "i64" },
  kvs_kick_signal: { parameters: [], result: "i32" },
  kvs_thread_self: { parameters: [], result: "u64" },
  kvs_kick: { parameters: ["u64"], result: "i64" },
  kvs_gettid: { parameters: [], result: "i64" },
  kvs_kick_tid: { parameters: ["i32"], result: "i64" },
  kvs_now_ns: { parameters: [], result: "u64" },
  kvs_unix_connect_nb: { parameters: ["buffer"], result: "i64" },
  kvs_shutdown: { parameters: ["i32", "i32"], result: "i64" },
  kvs_seccomp_setup: { parameters: ["i32", "buffer", "u64"], result: "i64" },
  kvs_seccomp_mode: { parameters: [], result: "i32" },
  kvs_seccomp_install: { parameters: ["buffer", "u32", "i32", "buffer", "i32"], result: "i64" },
  kvs_seccomp_escape_ip: { parameters: [], result: "u64" },
  kvs_landlock_create_ruleset: { parameters: ["buffer", "u64", "u32"], result: "i64" },
  kvs_landlock_add_rule: { parameters: ["i32", "i32", "buffer"], result: "i64" },
  kvs_landlock_restrict_self: { parameters: ["i32"], result: "i64" },

  // ---- hot-path functions, and aliases (same C functions, different FFI signatures) ----
  // Hot paths take only 32-bit and f64 parameters (C functions of their own): V8's fast call wants a BigInt
  // for a u64/i64 parameter, and a JIT-compiled caller passing a number there is deoptimized on every call
  // and compiled again, for ever (a vCPU loop kept a V8 compiler thread 24% busy that way).
  /** ioctl with a struct buffer: its result or -errno (hot paths: KVM_IRQ_LINE, get/set regs...). */
  kvs_ioctl_i32: { name: "kvs_ioctl32", parameters: ["i32", "u32", "buffer"], result: "i32" },
  /** KVM_RUN on a vCPU fd: 0 or -errno. */
  kvs_run: { parameters: ["i32"], result: "i32" },
  /** read/write with a 32-bit size and result (eventfd signalling, serial output, sockets). */
  kvs_read_i32: { name: "kvs_read32", parameters: ["i32", "buffer", "u32"], result: "i32" },
  kvs_write_i32: { name: "kvs_write32", parameters: ["i32", "buffer", "u32"], result: "i32" },
  /** pread/pwrite/preadv/pwritev at a file offset given as a number (exact below 2^53): disk I/O. */
  kvs_pread_at: { parameters: ["i32", "buffer", "u32", "f64"], result: "i32" },
  kvs_pwrite_at: { parameters: ["i32", "buffer", "u32", "f64"], result: "i32" },
  kvs_preadv_at: { parameters: ["i32", "buffer", "i32", "f64"], result: "i32" },
  /** io_uring for batched disk I/O (libkvmshim/uring.c): a ring is a small handle owned by one thread. */
  kvs_uring_create: { parameters: ["u32"], result: "i32" },
  kvs_uring_prep: { parameters: ["i32", "i32", "i32", "buffer", "i32", "f64", "u32"], result: "i32" },
  kvs_uring_submit_wait: { parameters: ["i32", "u32"], result: "i32" },
  kvs_uring_reap: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  kvs_uring_destroy: { parameters: ["i32"], result: "i32" },
  kvs_pwritev_at: { parameters: ["i32", "buffer", "i32", "f64"], result: "i32" },
  /** madvise on a host address given as a number (balloon and virtio-mem releases). */
  kvs_madvise_at: { parameters: ["f64", "f64", "i32"], result: "i32" },
  /** ioctl whose argument is a host address (a struct living in foreign memory). */
  kvs_ioctl_addr: { name: "kvs_ioctl", parameters: ["i32", "u64", "u64"], result: "i64" },
  /** read/write/pread/pwrite to/from a host address (e.g. straight into guest RAM). */
  kvs_read_addr: { name: "kvs_read", parameters: ["i32", "u64", "u64"], result: "i64" },
  kvs_write_addr: { name: "kvs_write", parameters: ["i32", "u64", "u64"], result: "i64" },
  kvs_pread_addr: { name: "kvs_pread", parameters: ["i32", "u64", "u64", "i64"], result: "i64" },
  kvs_pwrite_addr: { name: "kvs_pwrite", parameters: ["i32", "u64", "u64", "i64"], result: "i64" },
  /** readv/writev with an int result (virtio-net frames: no BigInt per call). */
  kvs_readv_i32: { name: "kvs_readv", parameters: ["i32", "buffer", "i32"], result: "i32" },
  kvs_writev_i32: { name: "kvs_writev", parameters: ["i32", "buffer", "i32"], result: "i32" },
  /** epoll_wait with an int result (a device worker's nested epoll set: no BigInt per pass). */
  kvs_epoll_wait_i32: { name: "kvs_epoll_wait", parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  /** Blocking calls run on a Deno blocking-pool thread; they return Promises (for the main thread). */
  kvs_epoll_wait_async: {
    name: "kvs_epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i64",
    nonblocking: true,
  },
  /** A client's connect, send and receive (blocking on a pool thread; the main thread stays free). */
  kvs_unix_connect_async: {
    name: "kvs_unix_connect",
    parameters: ["buffer"],
    result: "i64",
    nonblocking: true,
  },
  kvs_send_fds_async: {
    name: "kvs_send_fds",
    parameters: ["i32", "buffer", "u64", "buffer", "i32"],
    result: "i64",
    nonblocking: true,
  },
  kvs_poll1_async: { name: "kvs_poll1", parameters: ["i32", "i32", "i32"], result: "i64", nonblocking: true },
  kvs_read_async: {
    name: "kvs_read",
    parameters: ["i32", "buffer", "u64"],
    result: "i64",
    nonblocking: true,
  },
} as const satisfies Deno.ForeignLibraryInterface;

type RawSymbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];
/** Deno types 64-bit parameters as bigint only; at run time it also takes JS numbers (no BigInt needed). */
type Loosen<A> = { [I in keyof A]: A[I] extends bigint ? number | bigint : A[I] };
export type ShimSymbols = {
  [K in keyof RawSymbols]: RawSymbols[K] extends (...args: infer A) => infer R ? (...args: Loosen<A>) => R
    : never;
};

// ---- errno ----
export const EPERM = 1;
export const ENOENT = 2;
export const ESRCH = 3;
export const EINTR = 4;
export const EIO = 5;
export const ENXIO = 6;
export const E2BIG = 7;
export const EBADF = 9;
export const EAGAIN = 11;
export const EWOULDBLOCK = EAGAIN;
export const ENOMEM = 12;
export const EACCES = 13;
export const EFAULT = 14;
export const EBUSY = 16;
export const EEXIST = 17;
export const ENODEV = 19;
export const EINVAL = 22;
export const ENFILE = 23;
export const EMFILE = 24;
export const ENOTTY = 25;
export const ENOSPC = 28;
export const ESPIPE = 29;
export const EPIPE = 32;
export const ERANGE = 34;
export const ENOSYS = 38;
export const EOPNOTSUPP = 95;
export const ENOTSUP = EOPNOTSUPP;
export const ETIMEDOUT = 110;
export const EALREADY = 114;
export const EINPROGRESS = 115;

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  3: "ESRCH",
  4: "EINTR",
  5: "EIO",
  6: "ENXIO",
  7: "E2BIG",
  8: "ENOEXEC",
  9: "EBADF",
  10: "ECHILD",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  14: "EFAULT",
  16: "EBUSY",
  17: "EEXIST",
  18: "EXDEV",
  19: "ENODEV",
  20: "ENOTDIR",
  21: "EISDIR",
  22: "EINVAL",
  23: "ENFILE",
  24: "EMFILE",
  25: "ENOTTY",
  27: "EFBIG",
  28: "ENOSPC",
  29: "ESPIPE",
  30: "EROFS",
  32: "EPIPE",
  34: "ERANGE",
  35: "EDEADLK",
  38: "ENOSYS",
  75: "EOVERFLOW",
  95: "EOPNOTSUPP",
  110: "ETIMEDOUT",
  114: "EALREADY",
  115: "EINPROGRESS",
};

/** Symbolic name of an errno value ("EINTR"), or "errno N". */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

/** A failed system call: `errno` is positive, `code` its symbolic name. */
export class OsError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly what: string;
  constructor(errno: number, what: string) {
    super(`${what}: ${errnoName(errno)} (${errno})`);
    this.name = "OsError";
    this.errno = errno;
    this.code = errnoName(errno);
    this.what = what;
  }
}

/** Returns `ret` as a number, or throws OsError(-ret) when negative. */
export function check(ret: bigint | number, what: string): number {
  if (ret < 0) throw new OsError(-Number(ret), what);
  return Number(ret);
}

/** Like check() but keeps 64-bit results (addresses) exact. */
export function checkBig(ret: bigint, what: string): bigint {
  if (ret < 0n) throw new OsError(-Number(ret), what);
  return ret;
}

const encoder = new TextEncoder();
/** NUL-terminated UTF-8 copy of `s`, for `const char *` parameters. */
export function cstr(s: string): Uint8Array<ArrayBuffer> {
  const b = encoder.encode(s);
  const out = new Uint8Array(b.length + 1);
  out.set(b);
  return out;
}

/** A Uint8Array over `len` bytes of foreign memory at host address `addr` (no copy, no ownership). */
export function hostBytes(addr: bigint, len: number): Uint8Array<ArrayBuffer> {
  const ptr = Deno.UnsafePointer.create(addr);
  if (ptr === null) throw new RangeError("hostBytes: null address");
  return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, len));
}

/** Host address of the first byte of a typed array/ArrayBuffer (valid while the buffer is alive). */
export function addressOf(buf: BufferSource): bigint {
  const p = Deno.UnsafePointer.of(buf);
  return Deno.UnsafePointer.value(p) as bigint;
}

// ---- loading ----
let lib: Deno.DynamicLibrary<typeof SYMBOLS> | null = null;
let loadedFrom = "";

function repoShimPath(): string | null {
  const url = new URL("../build/libkvmshim.so", import.meta.url);
  if (url.protocol !== "file:") return null;
  return decodeURIComponent(url.pathname);
}

function isMainThread(): boolean {
  // Inside a Worker the global object is a WorkerGlobalScope.
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  return typeof g.WorkerGlobalScope === "undefined" || !(g instanceof g.WorkerGlobalScope);
}

/**
 * Copies the library bytes at `src` (readable through Deno's fs API, e.g. embedded by `deno compile`) to a
 * real file and loads it. Tries /dev/shm first, then the default temp directory (/dev/shm may be noexec).
 */
function extractEmbedded(src: string): Deno.DynamicLibrary<typeof SYMBOLS> {
  const bytes = Deno.readFileSync(src);
  const errors: string[] = [];
  for (const dir of ["/dev/shm", undefined]) {
    let path: string;
    try {
      path = Deno.makeTempFileSync({ dir, prefix: "dvmm-kvmshim-", suffix: ".so" });
      Deno.writeFileSync(path, bytes, { mode: 0o700 });
    } catch (e) {
      errors.push(`${dir ?? "tmp"}: ${(e as Error).message}`);
      continue;
    }
    try {
      const l = Deno.dlopen(path, SYMBOLS);
      // Workers started later load the same file, so glibc maps one copy of the library per process.
      Deno.env.set("DVMM_SHIM", path);
      loadedFrom = path;
      if (isMainThread()) {
        globalThis.addEventListener("unload", () => {
          try {
            Deno.removeSync(path);
          } catch { /* already gone */ }
        });
      }
      return l;
    } catch (e) {
      errors.push(`${path}: ${(e as Error).message}`);
      try {
        Deno.removeSync(path);
      } catch { /* ignore */ }
    }
  }
  throw new Error(`cannot extract the embedded library: ${errors.join("; ")}`);
}

function load(): Deno.DynamicLibrary<typeof SYMBOLS> {
  const env = Deno.env.get("DVMM_SHIM");
  if (env) {
    loadedFrom = env;
    return Deno.dlopen(env, SYMBOLS);
  }
  const repo = repoShimPath();
  if (repo === null) throw new Error("libkvmshim: cannot locate the library (set DVMM_SHIM)");
  try {
    const l = Deno.dlopen(repo, SYMBOLS);
    loadedFrom = repo;
    return l;
  } catch (e) {
    try {
      return extractEmbedded(repo);
    } catch (e2) {
      throw new Error(
        `libkvmshim: cannot load ${repo} (${(e as Error).message}; ${(e2 as Error).message}); ` +
          "run `make build/libkvmshim.so` or set DVMM_SHIM",
      );
    }
  }
}

/** The shim's symbols, loaded on first use (once per isolate: main thread and each Worker). */
export function shim(): ShimSymbols {
  if (lib === null) lib = load();
  return lib.symbols as unknown as ShimSymbols;
}

/** Path the shim was loaded from ("" before the first shim() call). */
export function shimPath(): string {
  return loadedFrom;
}
