/**
 * The REST API server: HTTP/1.1 on a UNIX socket (`--api-socket path=` or an inherited `fd=`), framed
 * exactly as Cloud Hypervisor's (see {@link formatResponse}), with keep-alive, and with the file
 * descriptors a client sends as SCM_RIGHTS handed to the request they came with (`vm.add-net` taps).
 *
 * Deno's HTTP servers can neither frame replies this way nor receive descriptors, so the socket is
 * driven here through the shim: one epoll set (waited on from a pool thread, so the main thread stays
 * free), non-blocking accept/recvmsg/send. Every request becomes one call of {@link callApi}; the
 * server holds no VM state. Errors are answered with a JSON array of messages, outermost first.
 *
 * The server cannot be starved: connections are capped (the one over the cap is answered 503 and
 * closed), idle and half-sent connections time out, and running out of descriptors sheds the new
 * connection instead of failing the VMM.
 */
import type { ControlLoop, RequestKind } from "../vmm/control.ts";
import { type Logger, logger } from "../vmm/log.ts";
import { check, cstr, EINTR, EMFILE, ENFILE, shim } from "../ffi/shim.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, EPOLLOUT } from "../ffi/kvm_constants.ts";
import { accept, adoptListener, closeFd, recvWithFds, sendSome, unixListen } from "../ffi/socket.ts";
import { type ApiResult, callApi, errorResult } from "./dispatch.ts";
import { CONTINUE_BYTES, formatResponse, type HttpRequest, MAX_HEAD_BYTES, RequestReader } from "./http.ts";
import { API_PREFIX, MAX_BODY_BYTES, ROUTES } from "./routes.ts";

export { API_PREFIX, MAX_BODY_BYTES, ROUTES } from "./routes.ts";

/** What the server tolerates before it sheds a connection. */
export interface ServerLimits {
  /** Open connections; the next one is answered 503 and closed. */
  maxConnections: number;
  /** A connection with nothing under way is closed after this long. */
  idleTimeoutMs: number;
  /** A request must arrive whole (and a reply be taken) within this long of its first byte. */
  requestTimeoutMs: number;
}

export const DEFAULT_LIMITS: ServerLimits = {
  maxConnections: 256,
  idleTimeoutMs: 120_000,
  requestTimeoutMs: 30_000,
};

/** Route one parsed request to the control loop; `allow` is set for a wrong method. */
export async function routeRequest(
  loop: ControlLoop,
  req: { method: string; path: string; body: Uint8Array; fds: number[] },
  log: Logger = logger("api"),
): Promise<ApiResult> {
  const refuse = (r: ApiResult) => {
    req.fds.forEach(closeFd);
    return r;
  };
  if (!req.path.startsWith(API_PREFIX)) return refuse(errorResult(404, [`unknown path ${req.path}`]));
  const name = req.path.slice(API_PREFIX.length);
  if (!Object.hasOwn(ROUTES, name)) return refuse(errorResult(404, [`unknown endpoint ${name}`]));
  const kind = name as RequestKind;
  const route = ROUTES[kind];
  if (req.method !== route.method) {
    return refuse({
      ...errorResult(405, [`${kind} expects ${route.method}, not ${req.method}`]),
      allow: route.method,
    });
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(req.body);
  } catch {
    return refuse(errorResult(400, [`the body of ${kind} is not valid UTF-8`]));
  }
  return await callApi(loop, kind, text, req.fds, log);
}

// ---------------------------------------------------------------------------------------------------
// The socket

export type ApiSocketSpec = { path: string } | { fd: number };

/** Parse an `--api-socket` value: `path=PATH`, `fd=N`, or a bare path. */
export function parseApiSocketOption(value: string): ApiSocketSpec {
  if (value.startsWith("fd=")) {
    const fd = Number(value.slice(3));
    if (!/^\d+$/.test(value.slice(3)) || !Number.isSafeInteger(fd)) {
      throw new Error(`--api-socket: fd must be a file descriptor number, got '${value.slice(3)}'`);
    }
    return { fd };
  }
  const path = value.startsWith("path=") ? value.slice(5) : value;
  if (path === "") throw new Error("--api-socket: expected path=PATH or fd=N");
  if (path.includes(",")) {
    throw new Error(`--api-socket: unexpected ',' in '${value}' (use path=PATH or fd=N)`);
  }
  return { path };
}

export interface ApiServer {
  /** The socket path, or `fd=N` for an inherited socket. */
  readonly path: string;
  /** Stop accepting, finish the replies under way, and remove the socket file. */
  close(): Promise<void>;
}

async function socketIsLive(path: string): Promise<boolean> {
  try {
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
    return true;
  } catch {
    return false;
  }
}

/** Make `path` free for a new socket: replace a stale socket file, refuse a live one or anything else. */
async function claimSocketPath(path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
  if (!info.isSocket) {
    throw new Error(`API socket path ${path} exists and is not a socket; refusing to replace it`);
  }
  if (await socketIsLive(path)) {
    throw new Error(`API socket ${path} is in use by another process (a connection to it succeeded)`);
  }
  await Deno.remove(path);
}

export interface ApiServer {
  /** The socket path, or `fd=N` for an inherited socket. */
  readonly path: string;
  /** Stop accepting, finish the replies under way, close every connection and remove the socket file. */
  close(): Promise<void>;
}

class Conn {
  readonly reader = new RequestReader(MAX_BODY_BYTES);
  /** Bytes of replies not yet taken by the socket. */
  out: Uint8Array<ArrayBuffer>[] = [];
  /** Events registered in the epoll set (0: not registered). */
  interest = 0;
  /** A request of this connection is with the control loop. */
  busy = false;
  /** The peer sent end-of-stream: answer what was asked, then close. */
  eof = false;
  /** Close once the output is written. */
  closeAfter = false;
  /**
   * After an error answer: what the client still sends is read and dropped until it hangs up (or
   * pauses), so it reads the answer rather than a reset in the middle of its own write.
   */
  discard = false;
  closed = false;
  /** When the connection last made progress, and when the request being read began. */
  lastActive: number;
  requestStart = 0;
  constructor(readonly fd: number, now: number) {
    this.lastActive = now;
  }
}

/** The wake eventfd's epoll tag: above any descriptor number (the other tags are the fds themselves). */
const WAKE = 0xffffffff;
/** How long a connection answered with an error is drained after the client goes quiet. */
const LINGER_MS = 2000; // epoll data word of the wake eventfd (no descriptor has this number)

class HttpApiServer implements ApiServer {
  readonly #conns = new Map<number, Conn>();
  readonly #epfd: number;
  readonly #wake: number;
  readonly #events = new BigUint64Array(64);
  readonly #recvBuf = new Uint8Array(64 * 1024);
  readonly #wakeBuf = new BigUint64Array(1);
  /** A spare descriptor, given up to accept (and refuse) a connection when the process is out of them. */
  #reserve = -1;
  #closing = false;
  #inflight = 0;
  #drained: (() => void) | null = null;
  #lastSweep = 0;
  readonly #done: Promise<void>;

  constructor(
    readonly path: string,
    readonly listener: number,
    readonly removeOnClose: boolean,
    readonly loop: ControlLoop,
    readonly limits: ServerLimits,
    readonly log: Logger,
  ) {
    const s = shim();
    this.#epfd = check(s.kvs_epoll_create(), "epoll_create");
    this.#wake = check(s.kvs_eventfd(0, 0o4000 | 0o2000000), "eventfd"); // EFD_NONBLOCK | EFD_CLOEXEC
    check(s.kvs_epoll_ctl(this.#epfd, EPOLL_CTL_ADD, listener, EPOLLIN, listener), "epoll_ctl(listener)");
    check(s.kvs_epoll_ctl(this.#epfd, EPOLL_CTL_ADD, this.#wake, EPOLLIN, WAKE), "epoll_ctl(wake)");
    this.#openReserve();
    this.#done = this.#run();
  }

  #openReserve(): void {
    if (this.#reserve < 0) this.#reserve = Math.max(-1, Number(shim().kvs_open(cstr("/dev/null"), 0, 0)));
  }

  async #run(): Promise<void> {
    const s = shim();
    while (!this.#closing || this.#inflight > 0 || this.#hasOutput()) {
      const n = Number(await s.kvs_epoll_wait_async(this.#epfd, this.#events, this.#events.length, 1000));
      if (n < 0) {
        if (n === -EINTR) continue;
        this.log.error(`API server: epoll_wait failed (errno ${-n}); the API stops`);
        break;
      }
      this.#dispatchEvents(n);
      this.#sweep();
    }
    for (const c of [...this.#conns.values()]) this.#close(c);
    s.kvs_close(this.#epfd);
    s.kvs_close(this.#wake);
    if (this.#reserve >= 0) s.kvs_close(this.#reserve);
    s.kvs_close(this.listener);
  }

  /** Serve the `n` readiness events epoll returned. */
  #dispatchEvents(n: number): void {
    for (let i = 0; i < n; i++) {
      const data = Number(this.#events[i]);
      if (data === WAKE) shim().kvs_read_i32(this.#wake, this.#wakeBuf, 8);
      else if (data === this.listener) this.#acceptAll();
      else {
        const c = this.#conns.get(data);
        if (c) this.#service(c);
      }
    }
  }

  #hasOutput(): boolean {
    for (const c of this.#conns.values()) if (c.out.length > 0) return true;
    return false;
  }

  #acceptAll(): void {
    if (this.#closing) return;
    for (;;) {
      let fd: number | null;
      try {
        fd = accept(this.listener);
      } catch (e) {
        const errno = (e as { errno?: number }).errno;
        // Out of descriptors: the longest-idle connection makes room for the new one, if there is one.
        if ((errno === EMFILE || errno === ENFILE) && this.#evictIdle("the VMM is out of file descriptors")) {
          continue;
        }
        if ((errno === EMFILE || errno === ENFILE) && this.#reserve >= 0) {
          // Out of descriptors: free the spare one to take the connection off the queue and refuse it,
          // rather than letting it spin the loop or fail the VMM.
          shim().kvs_close(this.#reserve);
          this.#reserve = -1;
          const shed = accept(this.listener);
          if (shed !== null) this.#refuse(shed, "the VMM is out of file descriptors");
          this.#openReserve();
          this.log.warn("API server: out of file descriptors; a connection was refused");
          continue;
        }
        this.log.warn(`API server: accept failed: ${(e as Error).message}`);
        return;
      }
      if (fd === null) return;
      // At the cap, an idle connection (nothing asked, nothing owed) gives way to the new one: a flood of
      // idle connections cannot lock real clients out. Only when every connection is busy is the new one
      // refused.
      if (
        this.#conns.size >= this.limits.maxConnections &&
        !this.#evictIdle(`too many connections (limit ${this.limits.maxConnections})`)
      ) {
        this.#refuse(fd, `too many connections (limit ${this.limits.maxConnections})`);
        continue;
      }
      const c = new Conn(fd, performance.now());
      this.#conns.set(fd, c);
      this.#setInterest(c, EPOLLIN);
      // A client writes its request right after connecting: it is usually here already, and reading it
      // now saves a round through epoll (a thread hop) per connection.
      this.#service(c);
    }
  }

  /** Closes the connection idle the longest (no request under way, nothing to send); false if none. */
  #evictIdle(why: string): boolean {
    let oldest: Conn | null = null;
    for (const c of this.#conns.values()) {
      if (c.busy || c.closed || c.out.length > 0 || c.reader.buffered > 0) continue;
      if (oldest === null || c.lastActive < oldest.lastActive) oldest = c;
    }
    if (oldest === null) return false;
    this.log.debug(`API server: closing an idle connection (${why})`);
    this.#close(oldest);
    return true;
  }

  /** Answer 503 on a connection that is not taken, and close it. */
  #refuse(fd: number, why: string): void {
    const r = errorResult(503, [why]);
    try {
      sendSome(fd, formatResponse(r.status, r.body, { keepAlive: false }));
    } catch { /* the client is gone already */ }
    closeFd(fd);
  }

  #setInterest(c: Conn, events: number): void {
    if (c.interest === events || c.closed) return;
    const op = c.interest === 0 ? EPOLL_CTL_ADD : events === 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    const r = Number(shim().kvs_epoll_ctl(this.#epfd, op, c.fd, events, c.fd));
    if (r < 0) {
      this.log.warn(`API server: epoll_ctl on a connection failed (errno ${-r}); closing it`);
      this.#close(c);
      return;
    }
    c.interest = events;
  }

  #updateInterest(c: Conn): void {
    const reading = !c.eof && (!c.closeAfter || c.discard);
    this.#setInterest(c, (reading ? EPOLLIN : 0) | (c.out.length > 0 ? EPOLLOUT : 0));
  }

  /** The connection is readable or writable. */
  #service(c: Conn): void {
    if (c.out.length > 0) this.#flush(c);
    if (c.closed) return;
    if (!c.eof && (!c.closeAfter || c.discard)) this.#read(c);
    if (!c.closed) this.#pump(c);
  }

  #read(c: Conn): void {
    for (;;) {
      let r: { n: number; fds: number[] } | null;
      try {
        r = recvWithFds(c.fd, this.#recvBuf);
      } catch (e) {
        this.log.debug(`API connection: ${(e as Error).message}`);
        this.#close(c);
        return;
      }
      if (r === null) break;
      if (r.n === 0 && r.fds.length === 0) {
        c.eof = true;
        break;
      }
      c.lastActive = performance.now();
      if (c.discard) {
        r.fds.forEach(closeFd);
        continue;
      }
      if (c.reader.buffered === 0) c.requestStart = c.lastActive;
      c.reader.push(this.#recvBuf.subarray(0, r.n), r.fds);
      if (c.reader.buffered > 2 * (MAX_BODY_BYTES + MAX_HEAD_BYTES)) {
        this.log.warn("API connection: too many bytes sent ahead of the replies; closing it");
        this.#close(c);
        return;
      }
    }
    this.#updateInterest(c);
  }

  /** Start the next whole request of `c`, one at a time per connection, in order. */
  #pump(c: Conn): void {
    while (!c.busy && !c.closed && !c.closeAfter) {
      const req = c.reader.next();
      if (req === null) {
        if (c.reader.takeContinue()) this.#send(c, CONTINUE_BYTES);
        break;
      }
      if ("message" in req) {
        const r = errorResult(req.status, [req.message]);
        c.closeAfter = true;
        c.discard = true;
        this.#send(c, formatResponse(r.status, r.body, { keepAlive: false }));
        break;
      }
      this.#start(c, req);
    }
    if (!c.busy && (c.eof || (c.closeAfter && !c.discard)) && c.out.length === 0 && !c.closed) this.#close(c);
    else if (!c.closed) this.#updateInterest(c);
  }

  #start(c: Conn, req: HttpRequest): void {
    c.busy = true;
    this.#inflight++;
    const keepAlive = req.keepAlive;
    routeRequest(this.loop, req, this.log).catch((e) => {
      this.log.error(`API request failed: ${(e as Error)?.stack ?? e}`);
      return errorResult(500, ["internal error in the API server", String((e as Error)?.message ?? e)]);
    }).then((r) => {
      this.#inflight--;
      c.busy = false;
      if (c.closed) return;
      c.lastActive = performance.now();
      c.requestStart = c.reader.buffered > 0 ? c.lastActive : 0;
      const alive = keepAlive && !this.#closing;
      if (!alive) c.closeAfter = true;
      this.#send(c, formatResponse(r.status, r.body, { keepAlive: alive, allow: r.allow }));
      if (!c.closed) this.#pump(c);
      if (this.#closing) this.#wakeUp();
    });
  }

  #send(c: Conn, bytes: Uint8Array<ArrayBuffer>): void {
    c.out.push(bytes);
    if (c.out.length === 1) this.#flush(c);
    else this.#updateInterest(c);
  }

  #flush(c: Conn): void {
    while (c.out.length > 0) {
      const head = c.out[0];
      let n: number | null;
      try {
        n = sendSome(c.fd, head);
      } catch (e) {
        this.log.debug(`API connection: ${(e as Error).message}`);
        this.#close(c);
        return;
      }
      if (n === null) break;
      c.lastActive = performance.now();
      if (n < head.length) c.out[0] = head.subarray(n);
      else c.out.shift();
    }
    if (c.out.length === 0 && c.closeAfter && !c.busy && (!c.discard || c.eof)) {
      this.#close(c);
      return;
    }
    this.#updateInterest(c);
  }

  #close(c: Conn): void {
    if (c.closed) return;
    c.closed = true;
    this.#conns.delete(c.fd);
    closeFd(c.fd); // also leaves the epoll set
    c.reader.takeStrayFds().forEach(closeFd);
    c.out = [];
  }

  /** Shed connections that sat idle, or that started a request (or a reply) and stalled. */
  #sweep(): void {
    const now = performance.now();
    if (now - this.#lastSweep < 1000) return;
    this.#lastSweep = now;
    for (const c of [...this.#conns.values()]) {
      if (c.busy) continue;
      if (c.discard && c.out.length === 0 && now - c.lastActive > LINGER_MS) {
        this.#close(c);
        continue;
      }
      const stalled = (c.reader.buffered > 0 && now - c.requestStart > this.limits.requestTimeoutMs) ||
        (c.out.length > 0 && now - c.lastActive > this.limits.requestTimeoutMs);
      if (stalled) {
        this.log.info("API connection: request or reply stalled; closing it");
        if (c.out.length === 0) {
          const r = errorResult(408, ["the request did not arrive in time"]);
          try {
            sendSome(c.fd, formatResponse(r.status, r.body, { keepAlive: false }));
          } catch { /* the client is gone already */ }
        }
        this.#close(c);
      } else if (c.out.length === 0 && now - c.lastActive > this.limits.idleTimeoutMs) {
        this.#close(c);
      }
    }
  }

  #wakeUp(): void {
    this.#wakeBuf[0] = 1n;
    shim().kvs_write_i32(this.#wake, this.#wakeBuf, 8);
  }

  #closed: Promise<void> | null = null;
  close(): Promise<void> {
    this.#closed ??= (async () => {
      this.#closing = true;
      shim().kvs_epoll_ctl(this.#epfd, EPOLL_CTL_DEL, this.listener, 0, 0);
      // Replies under way still go out (vmm.shutdown answers before the VMM exits); a bounded wait.
      const deadline = performance.now() + 2000;
      while ((this.#inflight > 0 || this.#hasOutput()) && performance.now() < deadline) {
        await new Promise((r) => setTimeout(r, 5));
      }
      this.#inflight = 0;
      for (const c of this.#conns.values()) c.out = [];
      this.#wakeUp();
      await this.#done;
      if (this.removeOnClose) await Deno.remove(this.path).catch(() => {});
    })();
    return this.#closed;
  }
}

/** Listen on the API socket and serve the control loop there. */
export async function startApiServer(
  spec: ApiSocketSpec,
  loop: ControlLoop,
  log: Logger = logger("api"),
  limits: ServerLimits = DEFAULT_LIMITS,
): Promise<ApiServer> {
  if ("fd" in spec) {
    let fd: number;
    try {
      fd = adoptListener(spec.fd);
    } catch (e) {
      throw new Error(`--api-socket fd=${spec.fd}: not an open, listening socket (${(e as Error).message})`);
    }
    log.info(`API server listening on inherited fd ${spec.fd}`);
    return new HttpApiServer(`fd=${spec.fd}`, fd, false, loop, limits, log);
  }
  const path = spec.path;
  await claimSocketPath(path);
  let fd: number;
  try {
    // Owner only, from the moment the file exists (not chmod after bind: a client could connect between).
    fd = unixListen(path, 128, 0o600);
  } catch (e) {
    throw new Error(`cannot listen on API socket ${path}: ${(e as Error).message}`);
  }
  log.info(`API server listening on ${path}`);
  return new HttpApiServer(path, fd, true, loop, limits, log);
}
