/**
 * UNIX stream sockets through the shim, for what Deno's own sockets cannot do: adopt an inherited
 * listening descriptor, and receive or send file descriptors (SCM_RIGHTS) with the bytes of a request.
 * Server-side calls are non-blocking (they return null where the call would block); the client calls
 * that can block run on a pool thread and return promises.
 */
import { check, cstr, EAGAIN, EINTR, OsError, shim } from "./shim.ts";

/** The most descriptors accepted with one message (the kernel's SCM_MAX_FD). */
export const MAX_FDS_PER_MESSAGE = 253;

const SO_TYPE = 3;
const SO_ACCEPTCONN = 30;
const SOCK_STREAM = 1;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;

/** Closes `fd`, ignoring errors (the descriptor is gone either way). */
export function closeFd(fd: number): void {
  shim().kvs_close(fd);
}

/** A non-blocking listening socket bound at `path`; with `mode`, the file has those permissions from the start. */
export function unixListen(path: string, backlog = 128, mode?: number): number {
  const s = shim();
  const r = mode === undefined
    ? s.kvs_unix_listen(cstr(path), backlog)
    : s.kvs_unix_listen_mode(cstr(path), backlog, mode);
  return check(r, `listen on ${path}`);
}

/**
 * Takes over an inherited descriptor that must be a listening stream socket; makes it non-blocking.
 * Throws a message naming what is wrong with it otherwise.
 */
export function adoptListener(fd: number): number {
  const s = shim();
  const type = Number(s.kvs_sockopt_int(fd, SO_TYPE));
  if (type < 0) throw new OsError(-type, `fd ${fd} is not an open socket`);
  if (type !== SOCK_STREAM) throw new Error(`fd ${fd} is not a stream socket`);
  if (Number(s.kvs_sockopt_int(fd, SO_ACCEPTCONN)) !== 1) throw new Error(`fd ${fd} is not listening`);
  const flags = check(s.kvs_fcntl(fd, F_GETFL, 0), `fcntl(${fd}, F_GETFL)`);
  check(s.kvs_fcntl(fd, F_SETFL, flags | O_NONBLOCK), `fcntl(${fd}, F_SETFL)`);
  return fd;
}

/** A new connection (non-blocking), or null when none is waiting. */
export function accept(listener: number): number | null {
  const r = Number(shim().kvs_accept(listener));
  if (r === -EAGAIN || r === -EINTR) return null;
  return check(r, "accept");
}

/** Buffers reused by every {@link recvWithFds} call of one thread. */
const fdSlots = new Int32Array(1 + MAX_FDS_PER_MESSAGE);

/**
 * Reads what is waiting on `fd` into `buf`, with the descriptors that came along. Returns null when
 * nothing is waiting, `{ n: 0 }` at end of stream. Throws when the kernel had to drop descriptors.
 */
export function recvWithFds(fd: number, buf: Uint8Array<ArrayBuffer>): { n: number; fds: number[] } | null {
  fdSlots[0] = 0;
  const r = Number(shim().kvs_recv_fds(fd, buf, buf.length, fdSlots, MAX_FDS_PER_MESSAGE));
  if (r === -EAGAIN || r === -EINTR) return null;
  check(r, "recvmsg");
  const count = fdSlots[0];
  if (count < 0) throw new Error(`more than ${MAX_FDS_PER_MESSAGE} file descriptors in one message`);
  const fds = count === 0 ? NO_FDS : Array.from(fdSlots.subarray(1, 1 + count));
  return { n: r, fds };
}
const NO_FDS: number[] = [];

/** Writes what it can of `bytes` without blocking; null when the socket is full. Never SIGPIPE. */
export function sendSome(fd: number, bytes: Uint8Array<ArrayBuffer>): number | null {
  const r = Number(shim().kvs_send_fds(fd, bytes, bytes.length, null, 0));
  if (r === -EAGAIN || r === -EINTR) return null;
  return check(r, "send");
}

/** Connects to the UNIX socket at `path` (a blocking socket, used from a pool thread). */
export async function unixConnect(path: string): Promise<number> {
  return check(await shim().kvs_unix_connect_async(cstr(path)), `connect to ${path}`);
}

/** Sends all of `bytes` on a blocking socket, the descriptors `fds` with the first part. */
export async function sendAllWithFds(
  fd: number,
  bytes: Uint8Array<ArrayBuffer>,
  fds: number[],
): Promise<void> {
  if (fds.length > MAX_FDS_PER_MESSAGE) throw new Error(`at most ${MAX_FDS_PER_MESSAGE} descriptors`);
  let off = 0;
  let withFds = fds.length > 0 ? Int32Array.from(fds) : null;
  while (off < bytes.length || withFds) {
    const part = bytes.subarray(off);
    const r = await shim().kvs_send_fds_async(fd, part, part.length, withFds, withFds?.length ?? 0);
    if (Number(r) === -EINTR) continue;
    off += check(r, "sendmsg");
    withFds = null;
  }
}

/** Reads from a blocking socket on a pool thread; 0 at end of stream. */
export async function readAsync(fd: number, buf: Uint8Array<ArrayBuffer>): Promise<number> {
  for (;;) {
    const r = Number(await shim().kvs_read_async(fd, buf, buf.length));
    if (r === -EINTR) continue;
    return check(r, "read");
  }
}

/** Names the calling thread (up to 15 bytes), as `/proc/PID/task/TID/comm` shows it. */
export function setThreadName(name: string): void {
  check(shim().kvs_set_thread_name(cstr(name.slice(0, 15))), `name thread ${name}`);
}
