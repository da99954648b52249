/**
 * The host end of a serial port or console in Cloud Hypervisor's `pty` and `socket=PATH` modes.
 *
 * The device writes its output to one descriptor that stays the same for the VM's life ({@link
 * HostEnd.outFd}), from whichever thread runs it; what that descriptor reaches changes underneath:
 *
 * - `pty`: a pseudo-terminal dvmm opens (raw mode); its path (`/dev/pts/N`) is what a user attaches to
 *   (`screen /dev/pts/N`) and what vm.info reports in `file`, as Cloud Hypervisor does.
 * - `socket=PATH`: a UNIX socket dvmm listens on; one client at a time (`socat - UNIX-CONNECT:PATH`).
 *   The output descriptor is re-pointed (dup3) at the client while one is connected, at /dev/null
 *   otherwise; a second client is refused while the first is there.
 *
 * Output never blocks the guest: the descriptor is non-blocking and the device drops what a slow or
 * absent reader does not take. Input is read on the main thread and handed to `onInput`.
 */
import { check, cstr, EAGAIN, EINTR, shim } from "../ffi/shim.ts";
import { O_NOCTTY, O_NONBLOCK, O_RDWR, POLLIN } from "../ffi/kvm_constants.ts";
import { accept, closeFd, unixListen } from "../ffi/socket.ts";
import { type Logger, logger } from "./log.ts";

/** A host end: the device's output descriptor and, for a pty, its path. */
export interface HostEnd {
  /** Where the device writes (non-blocking; output that does not fit is dropped). */
  readonly outFd: number;
  /** The pseudo-terminal's path (pty mode). */
  readonly path?: string;
  close(): Promise<void>;
}

const TCGETS = 0x5401;
const TCSETS = 0x5402;
const TIOCGPTN = 0x80045430;
const TIOCSPTLCK = 0x40045431;
// termios flags (asm-generic): the cfmakeraw set.
const IGNBRK = 0o1, BRKINT = 0o2, PARMRK = 0o10, ISTRIP = 0o40, INLCR = 0o100, IGNCR = 0o200, ICRNL = 0o400;
const IXON = 0o2000, OPOST = 0o1, ECHO = 0o10, ECHONL = 0o100, ICANON = 0o2, ISIG = 0o1, IEXTEN = 0o100000;
const CSIZE = 0o60, PARENB = 0o400, CS8 = 0o60;

/** Reads what arrives on `fd` (non-blocking) and passes it on, until `stopped()`; returns on end of input. */
async function pump(
  fd: number,
  onInput: (bytes: Uint8Array) => void,
  stopped: () => boolean,
): Promise<"eof" | "stopped"> {
  const s = shim();
  const buf = new Uint8Array(4096);
  while (!stopped()) {
    const r = Number(await s.kvs_poll1_async(fd, POLLIN, 200));
    if (stopped()) break;
    if (r <= 0) continue;
    const n = s.kvs_read_i32(fd, buf, buf.length);
    if (n > 0) onInput(buf.slice(0, n));
    else if (n === 0) return "eof";
    else if (n !== -EAGAIN && n !== -EINTR) {
      // A pty whose other side nobody holds answers EIO: wait for someone to open it.
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return "stopped";
}

/** Opens a pseudo-terminal in raw mode; output goes to whoever opens its path. */
export function openPty(onInput: (bytes: Uint8Array) => void, log: Logger = logger("serial")): HostEnd {
  const s = shim();
  const master = check(s.kvs_open(cstr("/dev/ptmx"), O_RDWR | O_NOCTTY | O_NONBLOCK, 0), "open /dev/ptmx");
  let path: string;
  try {
    const n = new Int32Array(1);
    check(s.kvs_ioctl(master, TIOCSPTLCK, n), "unlock the pty"); // n[0] = 0: unlocked
    check(s.kvs_ioctl(master, TIOCGPTN, n), "pty number");
    path = `/dev/pts/${n[0]}`;
    const t = new Uint32Array(15); // struct termios: 4 flag words, line, cc[19], speeds
    check(s.kvs_ioctl(master, TCGETS, t), "get pty attributes");
    t[0] &= ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
    t[1] &= ~OPOST;
    t[3] &= ~(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
    t[2] = (t[2] & ~(CSIZE | PARENB)) | CS8;
    check(s.kvs_ioctl(master, TCSETS, t), "set the pty raw");
  } catch (e) {
    closeFd(master);
    throw e;
  }
  log.info(`pty: ${path}`);
  let stop = false;
  const done = pump(master, onInput, () => stop);
  return {
    outFd: master,
    path,
    async close() {
      stop = true;
      await done;
      closeFd(master);
    },
  };
}

/** Listens on a UNIX socket at `path`; the connected client (one at a time) is the terminal. */
export function openSocketEnd(
  path: string,
  onInput: (bytes: Uint8Array) => void,
  log: Logger = logger("serial"),
): HostEnd {
  const s = shim();
  try {
    const st = Deno.lstatSync(path);
    if (!st.isSocket) throw new Error(`${path} exists and is not a socket`);
    Deno.removeSync(path); // a stale socket of an earlier run
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const listener = unixListen(path, 4);
  const nullFd = check(s.kvs_open(cstr("/dev/null"), O_RDWR, 0), "open /dev/null");
  // The stable output descriptor: a copy of /dev/null until a client connects.
  const outFd = check(s.kvs_dup(nullFd), "dup /dev/null");
  let stop = false;
  const serve = async () => {
    while (!stop) {
      const r = Number(await s.kvs_poll1_async(listener, POLLIN, 200));
      if (stop) break;
      if (r <= 0) continue;
      const client = accept(listener);
      if (client === null) continue;
      log.info(`serial socket ${path}: client connected`);
      check(s.kvs_dup2(client, outFd), "point the output at the client");
      // While this client is connected, others are refused.
      let clientDone = false;
      const refuse = (async () => {
        while (!clientDone && !stop) {
          const q = Number(await s.kvs_poll1_async(listener, POLLIN, 200));
          if (q > 0) {
            const other = accept(listener);
            if (other !== null) closeFd(other);
          }
        }
      })();
      await pump(client, onInput, () => stop);
      clientDone = true;
      await refuse;
      s.kvs_dup2(nullFd, outFd);
      closeFd(client);
      log.info(`serial socket ${path}: client gone`);
    }
  };
  const done = serve();
  return {
    outFd,
    async close() {
      stop = true;
      await done;
      closeFd(listener);
      closeFd(outFd);
      closeFd(nullFd);
      await Deno.remove(path).catch(() => {});
    },
  };
}
