/// <reference lib="deno.worker" />
/**
 * The byte pump of a live migration, on its own thread so the control loop and the API stay responsive
 * while memory streams: blocking socket I/O through the shim, guest memory read and written in place
 * (no copy through JS buffers). The main thread decides everything (rounds, pauses, state) and sends it
 * one command at a time; each gets one reply. See vmm/migration.ts for the wire format.
 */
import { cstr, EAGAIN, EINTR, shim } from "../ffi/shim.ts";
import { setThreadName } from "../ffi/socket.ts";
import { confineThread } from "./seccomp.ts";
import { POLLIN, POLLOUT } from "../ffi/kvm_constants.ts";
import { mapFd, unmap } from "../ffi/kvm.ts";
import { zeroPage } from "./snapshot.ts";
import {
  CANCELLED,
  FRAME,
  FRAME_HEADER,
  type MigrationUrl,
  type PieceLayout,
  type WorkerCommand,
  type WorkerReply,
} from "./migration.ts";

const PAGE = 4096;
const s = shim();
let fd = -1;
let listenFd = -1;
/** The config a receiver read first. */
let received: unknown = null;
/** Set to 1 by the main thread when the VMM shuts down: waits and transfers give up (see CANCELLED). */
let cancel: Int32Array | null = null;
/** Whether the command under way may be cancelled (not once the sender waits for the outcome). */
let cancellable = true;

/** Throws when the main thread has cancelled the migration. */
function checkCancel(): void {
  if (cancellable && cancel !== null && Atomics.load(cancel, 0) !== 0) throw new Error(CANCELLED);
}
const head = new Uint8Array(FRAME_HEADER);
const headView = new DataView(head.buffer);

function fail(what: string, r: number): never {
  throw new Error(`${what}: ${r === 0 ? "connection closed" : `errno ${-r}`}`);
}

/**
 * Moves `len` bytes through the socket, blocking: `io(done, n)` reads or writes up to `n` bytes at
 * position `done` and returns what the system call returned; the socket may be non-blocking (`events`
 * is what to wait for then).
 */
function pump(len: number, events: number, what: string, io: (done: number, n: number) => number): void {
  let done = 0;
  while (done < len) {
    checkCancel();
    const r = io(done, Math.min(len - done, 1 << 30));
    if (r > 0) done += r;
    else if (r === -EAGAIN) s.kvs_poll1(fd, events, 1000);
    else if (r !== -EINTR) fail(what, r);
  }
}

/** Writes `len` bytes from host address `addr`. */
function writeAddr(addr: bigint, len: number): void {
  pump(len, POLLOUT, "sending", (d, n) => Number(s.kvs_write_addr(fd, addr + BigInt(d), BigInt(n))));
}

function writeBytes(b: Uint8Array): void {
  pump(b.length, POLLOUT, "sending", (d, n) => Number(s.kvs_write(fd, b.subarray(d, d + n), BigInt(n))));
}

/** Reads `len` bytes to host address `addr`. */
function readAddr(addr: bigint, len: number): void {
  pump(len, POLLIN, "receiving", (d, n) => Number(s.kvs_read_addr(fd, addr + BigInt(d), BigInt(n))));
}

function readBytes(b: Uint8Array): void {
  pump(b.length, POLLIN, "receiving", (d, n) => Number(s.kvs_read(fd, b.subarray(d, d + n), BigInt(n))));
}

function frame(type: number, length: number): void {
  headView.setUint32(0, type, true);
  headView.setUint32(4, 0, true);
  headView.setBigUint64(8, BigInt(length), true);
  writeBytes(head);
}

function sendJson(type: number, value: unknown): void {
  const b = new TextEncoder().encode(JSON.stringify(value));
  frame(type, b.length);
  writeBytes(b);
}

/** Reads a frame header: [type, length]. */
function readFrame(): [number, number] {
  readBytes(head);
  return [headView.getUint32(0, true), Number(headView.getBigUint64(8, true))];
}

const MAX_JSON = 64 << 20;

function readJson(length: number): unknown {
  if (length > MAX_JSON) throw new Error(`a ${length}-byte message is too large`);
  const b = new Uint8Array(length);
  readBytes(b);
  return JSON.parse(new TextDecoder().decode(b));
}

/** Int32 views of the pieces, made once (the zero-page scan reads them page by page). */
const views = new Map<bigint, Int32Array>();
function pieceView(p: PieceLayout): Int32Array {
  let v = views.get(p.hostAddr);
  if (!v) {
    v = new Int32Array(Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(p.hostAddr)!, p.size));
    views.set(p.hostAddr, v);
  }
  return v;
}

const pageHead = new Uint8Array(16);
const pageView = new DataView(pageHead.buffer);

/** Sends runs of pieces' memory as PAGES frames (with `skipZero`, all-zero pages are left out). */
function sendPages(pieces: PieceLayout[], runs: number[], skipZero: boolean): number {
  let bytes = 0;
  const send = (piece: number, off: number, len: number) => {
    frame(FRAME.PAGES, 16 + len);
    pageView.setUint32(0, piece, true);
    pageView.setBigUint64(8, BigInt(off), true);
    writeBytes(pageHead);
    writeAddr(pieces[piece].hostAddr + BigInt(off), len);
    bytes += len;
  };
  for (let i = 0; i < runs.length; i += 3) {
    const [piece, off, len] = [runs[i], runs[i + 1], runs[i + 2]];
    if (!skipZero) {
      // Frames of at most 64 MiB keep the receiver's checks cheap.
      for (let o = 0; o < len; o += 64 << 20) send(piece, off + o, Math.min(64 << 20, len - o));
      continue;
    }
    const w = pieceView(pieces[piece]);
    let p = off;
    while (p < off + len) {
      while (p < off + len && zeroPage(w, p)) p += PAGE;
      const start = p;
      while (p < off + len && p - start < (64 << 20) && !zeroPage(w, p)) p += PAGE;
      if (p > start) send(piece, start, Math.min(p, off + len) - start);
    }
  }
  return bytes;
}

function connect(url: MigrationUrl): void {
  const r = Number(
    url.kind === "unix" ? s.kvs_unix_connect(cstr(url.path)) : s.kvs_tcp_connect(cstr(url.host), url.port),
  );
  if (r < 0) fail(`connecting to ${url.text}`, r);
  fd = r;
}

function listen(url: MigrationUrl): void {
  if (url.kind === "unix") {
    try {
      Deno.removeSync(url.path);
    } catch { /* not there */ }
  }
  const r = Number(
    url.kind === "unix"
      ? s.kvs_unix_listen(cstr(url.path), 1)
      : s.kvs_tcp_listen(cstr(url.host), url.port, 1),
  );
  if (r < 0) fail(`listening on ${url.text}`, r);
  listenFd = r;
}

/** Waits for the sender and reads up to its config (the main thread starts workers meanwhile). */
function receiveConfig(): WorkerReply {
  for (;;) {
    checkCancel();
    const p = Number(s.kvs_poll1(listenFd, POLLIN, 1000));
    if (p > 0) break;
    if (p < 0 && p !== -EINTR) fail("waiting for the sender", p);
  }
  const c = Number(s.kvs_accept(listenFd));
  if (c < 0) fail("accepting the sender", c);
  fd = c;
  s.kvs_close(listenFd);
  listenFd = -1;
  for (;;) {
    const [type, length] = readFrame();
    if (type === FRAME.HELLO) {
      const h = readJson(length) as { format?: string; version?: number };
      if (h.format !== "dvmm-migration" || h.version !== 1) {
        throw new Error(`the sender speaks ${h.format ?? "an unknown protocol"} version ${h.version}`);
      }
    } else if (type === FRAME.CONFIG) return { ok: true, config: readJson(length) };
    else throw new Error(`migration message ${type} before the config`);
  }
}

/** Receives the rest of a migration; returns what the main thread restores from. */
function receive(config: unknown): WorkerReply {
  let layout: { name: string; size: number; offset: number }[] = [];
  let memfd = -1;
  let map: { hostAddr: bigint; size: number } | null = null;
  let memfds: Record<string, number> | null = null;
  let state: unknown = null;
  try {
    for (;;) {
      const [type, length] = readFrame();
      if (type === FRAME.RANGES) {
        const ranges = readJson(length) as { name: string; size: number }[];
        let off = 0;
        layout = ranges.map((r) => {
          if (!Number.isSafeInteger(r.size) || r.size <= 0 || r.size % PAGE !== 0) {
            throw new Error(`memory range ${r.name}: bad size ${r.size}`);
          }
          off = Math.ceil(off / (2 << 20)) * (2 << 20);
          const at = { name: String(r.name), size: r.size, offset: off };
          off += r.size;
          return at;
        });
        memfd = Number(s.kvs_memfd(cstr("dvmm-migration"), 1 /* MFD_CLOEXEC */));
        if (memfd < 0) fail("memfd_create", memfd);
        const t = Number(s.kvs_ftruncate(memfd, BigInt(off)));
        if (t < 0) fail("sizing the memory file", t);
        map = off > 0 ? mapFd(memfd, off, 0, true) : null;
      } else if (type === FRAME.PAGES) {
        if (!map) throw new Error("pages before the memory layout");
        const ph = new Uint8Array(16);
        if (length < 16) throw new Error("a short pages frame");
        readBytes(ph);
        const v = new DataView(ph.buffer);
        const piece = v.getUint32(0, true);
        const off = Number(v.getBigUint64(8, true));
        const len = length - 16;
        const r = layout[piece];
        if (!r || off % PAGE !== 0 || off + len > r.size) {
          throw new Error(`pages outside the memory layout (range ${piece}, ${off}+${len})`);
        }
        readAddr(map.hostAddr + BigInt(r.offset + off), len);
      } else if (type === FRAME.MEMFDS) {
        const names = readJson(length) as string[];
        if (!Array.isArray(names) || names.length > 64) throw new Error("a bad memory descriptor list");
        const buf = new Uint8Array(1);
        const fds = new Int32Array(names.length + 1); // [count, fd...]
        let n: number;
        for (;;) {
          n = Number(s.kvs_recv_fds(fd, buf, 1n, fds, names.length));
          if (n === -EAGAIN) s.kvs_poll1(fd, POLLIN, 1000);
          else if (n !== -EINTR) break;
        }
        if (n !== 1) fail("receiving the memory descriptors", n);
        const got = fds.slice(1, 1 + Math.max(0, fds[0]));
        if (got.length !== names.length) {
          for (const x of got) s.kvs_close(x);
          throw new Error(`${got.length} of ${names.length} memory descriptors arrived`);
        }
        memfds = Object.fromEntries(names.map((name, i) => [String(name), got[i]]));
      } else if (type === FRAME.STATE) state = readJson(length);
      else if (type === FRAME.ABORT) throw new Error("the sender cancelled the migration");
      else if (type === FRAME.COMPLETE) break;
      else throw new Error(`unknown migration message ${type}`);
    }
    if (!config || !state) throw new Error("the sender completed without a config and a state");
    return { ok: true, config, state, memfd, layout, memfds: memfds ?? undefined };
  } catch (e) {
    if (memfd >= 0) s.kvs_close(memfd);
    for (const x of Object.values(memfds ?? {})) s.kvs_close(x);
    throw e;
  } finally {
    if (map) unmap(map, false);
  }
}

function handle(cmd: WorkerCommand): WorkerReply {
  switch (cmd.op) {
    case "connect":
      connect(cmd.url);
      sendJson(FRAME.HELLO, { format: "dvmm-migration", version: 1 });
      return { ok: true };
    case "json":
      sendJson(cmd.type, cmd.value);
      return { ok: true };
    case "pages": {
      const t = performance.now();
      const bytes = sendPages(cmd.pieces, cmd.runs, cmd.skipZero);
      return { ok: true, bytes, ms: performance.now() - t };
    }
    case "memfds": {
      sendJson(FRAME.MEMFDS, cmd.names);
      const r = Number(s.kvs_send_fds(fd, new Uint8Array(1), 1n, new Int32Array(cmd.fds), cmd.fds.length));
      if (r !== 1) fail("sending the memory descriptors", r);
      return { ok: true };
    }
    case "complete": {
      // From here the destination may be starting the VM: the source waits for its answer, whatever.
      cancellable = false;
      frame(FRAME.COMPLETE, 0);
      const [type, length] = readFrame();
      if (type !== FRAME.ACK) throw new Error(`the receiver answered message ${type}`);
      const ack = readJson(length) as { ok: boolean; error?: string };
      if (!ack.ok) throw new Error(`the receiver could not start the VM: ${ack.error ?? "no reason given"}`);
      return { ok: true };
    }
    case "abort":
      try {
        frame(FRAME.ABORT, 0);
      } catch { /* the receiver is gone */ }
      return { ok: true };
    case "listen":
      listen(cmd.url);
      return { ok: true };
    case "receive-config":
      received = receiveConfig().config;
      return { ok: true, config: received };
    case "receive":
      return receive(received);
    case "ack":
      cancellable = false; // the sender hears the outcome, cancelled or not
      sendJson(FRAME.ACK, { ok: cmd.ok, error: cmd.error });
      return { ok: true };
  }
}

self.onmessage = (ev: MessageEvent<WorkerCommand | { op: "init"; cancel: SharedArrayBuffer }>) => {
  if (ev.data.op === "init") {
    cancel = new Int32Array(ev.data.cancel);
    return; // no reply: the main thread does not wait for this one
  }
  let reply: WorkerReply;
  try {
    reply = handle(ev.data);
  } catch (e) {
    reply = { ok: false, error: (e as Error).message };
  }
  self.postMessage(reply);
};

setThreadName("migration");
confineThread("migration");
