/**
 * The front-end side of the vhost-user protocol (QEMU docs/interop/vhost-user.rst): message framing and
 * a synchronous client over a UNIX stream socket.
 *
 * A message is a 12-byte header { u32 request, u32 flags, u32 size } followed by `size` bytes of payload,
 * all in host byte order (little-endian here). Descriptors (guest RAM memfds, kick and call eventfds)
 * travel as SCM_RIGHTS with the message that names them.
 *
 * The client blocks (poll with a deadline) while it waits for the socket, so it belongs on a thread
 * that may block: the main thread at device creation (a few round trips) and the device worker.
 * Any transport or protocol error leaves the connection unusable ({@link VhostUserError}); the device
 * reports it, dvmm keeps running.
 */
import { EAGAIN, EINTR, shim } from "../../ffi/shim.ts";
import { POLLIN, POLLOUT } from "../../ffi/kvm_constants.ts";

/** Front-end request codes. */
export const VHOST_USER = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
} as const;

const REQUEST_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(VHOST_USER).map(([k, v]) => [v, k]),
);

/** "GET_FEATURES", or "request N" for a code this client does not know. */
export function requestName(code: number): string {
  return REQUEST_NAMES[code] ?? `request ${code}`;
}

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const PROTOCOL_F = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CONFIG: 9,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** The virtio feature bit (unused by virtio itself) a back-end sets when it speaks protocol features. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** Header flags: protocol version (bits 0-1), reply (bit 2), need_reply (bit 3). */
export const VHOST_USER_VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
export const HEADER_SIZE = 12;
/** SET_VRING_KICK/CALL/ERR: bits 0-7 carry the ring index; bit 8 says no descriptor comes along. */
export const VRING_INDEX_MASK = 0xff;
export const VRING_NOFD = 0x100;
/** SET_MEM_TABLE carries at most this many regions. */
export const MAX_MEM_REGIONS = 8;
/** GET_CONFIG / SET_CONFIG: the largest device configuration this client exchanges. */
export const MAX_CONFIG_SIZE = 256;
/** Replies larger than this are garbage (the largest one this client asks for is a config reply). */
const MAX_REPLY_PAYLOAD = 12 + MAX_CONFIG_SIZE;

const u64Mask = (1n << 64n) - 1n;

// ---------------------------------------------------------------------------------------------------
// Framing (pure functions; the unit tests check them byte for byte)

export interface MessageHeader {
  request: number;
  flags: number;
  size: number;
}

/** One message: the header followed by `payload`. `flags` defaults to the version alone. */
export function encodeMessage(
  request: number,
  payload: Uint8Array = new Uint8Array(0),
  flags = 0,
): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, (flags & ~FLAG_VERSION_MASK) | VHOST_USER_VERSION, true);
  v.setUint32(8, payload.length, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

export function decodeHeader(b: Uint8Array): MessageHeader {
  if (b.length < HEADER_SIZE) throw new RangeError("short vhost-user header");
  const v = new DataView(b.buffer, b.byteOffset, HEADER_SIZE);
  return { request: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
}

/** A u64 payload (features, queue numbers, acks, kick/call ring selectors). */
export function u64Payload(value: bigint | number): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(value) & u64Mask, true);
  return out;
}

export function readU64(p: Uint8Array): bigint {
  if (p.length !== 8) throw new RangeError(`u64 payload of ${p.length} bytes`);
  return new DataView(p.buffer, p.byteOffset, 8).getBigUint64(0, true);
}

/** A vring state description { u32 index, u32 num }. */
export function vringStatePayload(index: number, num: number): Uint8Array {
  const out = new Uint8Array(8);
  const v = new DataView(out.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return out;
}

export function readVringState(p: Uint8Array): { index: number; num: number } {
  if (p.length !== 8) throw new RangeError(`vring state payload of ${p.length} bytes`);
  const v = new DataView(p.buffer, p.byteOffset, 8);
  return { index: v.getUint32(0, true), num: v.getUint32(4, true) };
}

/** Ring addresses, as addresses in the front-end's own address space (no IOMMU). */
export interface VringAddresses {
  index: number;
  flags?: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log?: bigint;
}

/** A vring address description { u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log }. */
export function vringAddrPayload(a: VringAddresses): Uint8Array {
  const out = new Uint8Array(40);
  const v = new DataView(out.buffer);
  v.setUint32(0, a.index, true);
  v.setUint32(4, a.flags ?? 0, true);
  v.setBigUint64(8, a.desc, true);
  v.setBigUint64(16, a.used, true);
  v.setBigUint64(24, a.avail, true);
  v.setBigUint64(32, a.log ?? 0n, true);
  return out;
}

/** One guest RAM region as the back-end maps it: `fd` mapped from `mmapOffset`. */
export interface MemRegion {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
  fd: number;
}

/** The memory regions description { u32 count, u32 padding, count × { gpa, size, uaddr, offset } }. */
export function memTablePayload(regions: readonly MemRegion[]): Uint8Array {
  if (regions.length === 0 || regions.length > MAX_MEM_REGIONS) {
    throw new RangeError(`${regions.length} memory regions (1 to ${MAX_MEM_REGIONS})`);
  }
  const out = new Uint8Array(8 + 32 * regions.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => {
    const o = 8 + 32 * i;
    v.setBigUint64(o, r.guestPhysAddr, true);
    v.setBigUint64(o + 8, r.size, true);
    v.setBigUint64(o + 16, r.userAddr, true);
    v.setBigUint64(o + 24, r.mmapOffset, true);
  });
  return out;
}

/** A device config space description { u32 offset, u32 size, u32 flags, size bytes }. */
export function configPayload(offset: number, size: number, flags: number, bytes?: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + size);
  const v = new DataView(out.buffer);
  v.setUint32(0, offset, true);
  v.setUint32(4, size, true);
  v.setUint32(8, flags, true);
  if (bytes) out.set(bytes.subarray(0, size), 12);
  return out;
}

export function readConfig(
  p: Uint8Array,
): { offset: number; size: number; flags: number; bytes: Uint8Array } {
  if (p.length < 12) throw new RangeError(`config payload of ${p.length} bytes`);
  const v = new DataView(p.buffer, p.byteOffset, 12);
  const size = v.getUint32(4, true);
  if (p.length !== 12 + size) {
    throw new RangeError(`config payload of ${p.length} bytes for ${size} config bytes`);
  }
  return { offset: v.getUint32(0, true), size, flags: v.getUint32(8, true), bytes: p.slice(12) };
}

// ---------------------------------------------------------------------------------------------------
// The client

/** A failed exchange with the back-end; the connection is not used again. */
export class VhostUserError extends Error {
  constructor(message: string, readonly disconnected = false) {
    super(message);
    this.name = "VhostUserError";
  }
}

/** What the worker needs to go on with a connection the main thread set up (structured-cloneable). */
export interface VhostUserDescriptor {
  /** The connected socket (owned by the main thread, closed after the worker exits). */
  socketFd: number;
  socket: string;
  /** Features the back-end offered (GET_FEATURES) and protocol features both sides agreed on. */
  backendFeatures: bigint;
  protocolFeatures: bigint;
  /** Int32 [0]: the last epoch the worker finished stopping the rings for (the reset handshake). */
  state: SharedArrayBuffer;
  /** Milliseconds to wait for each reply. */
  timeoutMs: number;
  /**
   * vhost-user-net: the queue pairs the back-end serves. The control queue (after the pairs) is then
   * dvmm's own, served by the device worker, and never handed to the back-end.
   */
  netPairs?: number;
}

export interface FrontendOptions {
  /** Milliseconds to wait for the socket to take a request or give a reply (default 10 s). */
  timeoutMs?: number;
  /** Protocol features already agreed on this connection (when adopting one). */
  protocolFeatures?: bigint;
}

const ECONNREFUSED = 111;
const ENOENT = 2;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;
const MAX_FDS = 8;

/** Sleeps on this thread (poll on no descriptor). */
function sleepMs(ms: number): void {
  shim().kvs_poll1(-1, 0, Math.max(0, Math.round(ms)));
}

/**
 * A connected vhost-user front-end. Each request is sent whole and, when it has a reply (or REPLY_ACK
 * was agreed and asked for), waited for before the call returns.
 */
export class VhostUserFrontend {
  readonly fd: number;
  readonly timeoutMs: number;
  /** Protocol features both sides agreed on (after setProtocolFeatures). */
  protocolFeatures: bigint;
  #broken: string | null = null;
  readonly #hdr = new Uint8Array(HEADER_SIZE);
  readonly #fdSlots = new Int32Array(1 + MAX_FDS);

  /** Wraps a connected stream socket (made non-blocking). */
  constructor(fd: number, opts: FrontendOptions = {}) {
    this.fd = fd;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.protocolFeatures = opts.protocolFeatures ?? 0n;
    const s = shim();
    const fl = Number(s.kvs_fcntl(fd, F_GETFL, 0));
    if (fl < 0) throw new VhostUserError(`vhost-user socket fd ${fd} is not open`);
    s.kvs_fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  }

  /**
   * Connects to the back-end listening at `path`, retrying while the socket is absent or refuses
   * (the back-end may still be starting), for up to `connectTimeoutMs` (as Cloud Hypervisor: 60 s).
   */
  static connect(
    path: string,
    opts: FrontendOptions & { connectTimeoutMs?: number } = {},
  ): VhostUserFrontend {
    const deadline = performance.now() + (opts.connectTimeoutMs ?? 60_000);
    const enc = new TextEncoder().encode(path);
    const cpath = new Uint8Array(enc.length + 1);
    cpath.set(enc);
    for (;;) {
      const r = Number(shim().kvs_unix_connect(cpath));
      if (r >= 0) return new VhostUserFrontend(r, opts);
      const retry = -r === ENOENT || -r === ECONNREFUSED || -r === EINTR;
      if (!retry || performance.now() >= deadline) {
        throw new VhostUserError(`cannot connect to the vhost-user back-end at ${path}: errno ${-r}`, true);
      }
      sleepMs(100);
    }
  }

  get broken(): string | null {
    return this.#broken;
  }

  hasProtocolFeature(bit: number): boolean {
    return (this.protocolFeatures & (1n << BigInt(bit))) !== 0n;
  }

  close(): void {
    shim().kvs_close(this.fd);
    this.#broken ??= "closed";
  }

  // ------------------------------------------------------------------ requests

  setOwner(): void {
    this.#call(VHOST_USER.SET_OWNER);
  }

  getFeatures(): bigint {
    return readU64(this.#call(VHOST_USER.GET_FEATURES, undefined, [], 8)!);
  }

  setFeatures(features: bigint): void {
    this.#call(VHOST_USER.SET_FEATURES, u64Payload(features));
  }

  getProtocolFeatures(): bigint {
    return readU64(this.#call(VHOST_USER.GET_PROTOCOL_FEATURES, undefined, [], 8)!);
  }

  /** Agrees on `features`; from then on REPLY_ACK (when among them) guards every request. */
  setProtocolFeatures(features: bigint): void {
    this.#call(VHOST_USER.SET_PROTOCOL_FEATURES, u64Payload(features));
    this.protocolFeatures = features;
  }

  getQueueNum(): number {
    return Number(readU64(this.#call(VHOST_USER.GET_QUEUE_NUM, undefined, [], 8)!));
  }

  setMemTable(regions: readonly MemRegion[]): void {
    this.#call(VHOST_USER.SET_MEM_TABLE, memTablePayload(regions), regions.map((r) => r.fd));
  }

  setVringNum(index: number, num: number): void {
    this.#call(VHOST_USER.SET_VRING_NUM, vringStatePayload(index, num));
  }

  setVringAddr(a: VringAddresses): void {
    this.#call(VHOST_USER.SET_VRING_ADDR, vringAddrPayload(a));
  }

  setVringBase(index: number, base: number): void {
    this.#call(VHOST_USER.SET_VRING_BASE, vringStatePayload(index, base));
  }

  /** Stops ring `index` and returns the next available index the back-end would have processed. */
  getVringBase(index: number): number {
    const st = readVringState(this.#call(VHOST_USER.GET_VRING_BASE, vringStatePayload(index, 0), [], 8)!);
    if (st.index !== index) throw this.#fail(`GET_VRING_BASE: reply for ring ${st.index}, asked ${index}`);
    return st.num;
  }

  /** The eventfd the back-end waits on for ring `index` (fd < 0: none, the back-end polls). */
  setVringKick(index: number, fd: number): void {
    this.#ringFd(VHOST_USER.SET_VRING_KICK, index, fd);
  }

  /** The eventfd the back-end signals when it used buffers of ring `index` (fd < 0: none). */
  setVringCall(index: number, fd: number): void {
    this.#ringFd(VHOST_USER.SET_VRING_CALL, index, fd);
  }

  setVringEnable(index: number, enable: boolean): void {
    this.#call(VHOST_USER.SET_VRING_ENABLE, vringStatePayload(index, enable ? 1 : 0));
  }

  /** Reads `size` bytes of the device configuration at `offset` (needs PROTOCOL_F_CONFIG). */
  getConfig(offset: number, size: number): Uint8Array {
    if (size <= 0 || size > MAX_CONFIG_SIZE) throw new RangeError(`config size ${size}`);
    const p = this.#call(VHOST_USER.GET_CONFIG, configPayload(offset, size, 0), [], -1)!;
    // An empty reply is the back-end's "no" (the exchange itself went well: the connection stays usable).
    if (p.length === 0) throw new VhostUserError("GET_CONFIG: the back-end refused (empty reply)");
    let c;
    try {
      c = readConfig(p);
    } catch (e) {
      throw this.#fail(`GET_CONFIG: ${(e as Error).message}`);
    }
    if (c.offset !== offset || c.size !== size) {
      throw this.#fail(`GET_CONFIG: reply for ${c.size} bytes at ${c.offset}, asked ${size} at ${offset}`);
    }
    return c.bytes;
  }

  setConfig(offset: number, bytes: Uint8Array): void {
    this.#call(VHOST_USER.SET_CONFIG, configPayload(offset, bytes.length, 0, bytes));
  }

  /**
   * The socket became readable while no request was outstanding: the back-end hung up or sent
   * something unasked. Returns why the connection is now unusable (null if nothing was there).
   */
  probe(): string | null {
    if (this.#broken) return this.#broken;
    const ev = Number(shim().kvs_poll1(this.fd, POLLIN, 0));
    if (ev <= 0) return null;
    const one = new Uint8Array(HEADER_SIZE);
    this.#fdSlots[0] = 0;
    const n = Number(shim().kvs_recv_fds(this.fd, one, one.length, this.#fdSlots, MAX_FDS));
    this.#closeReceived();
    if (n === -EAGAIN || n === -EINTR) return null;
    this.#broken = n === 0 || n < 0
      ? "the back-end closed the connection"
      : "the back-end sent a message nobody asked for";
    return this.#broken;
  }

  // ------------------------------------------------------------------ plumbing

  #ringFd(request: number, index: number, fd: number): void {
    if (index < 0 || index > VRING_INDEX_MASK) throw new RangeError(`ring index ${index}`);
    const sel = fd < 0 ? index | VRING_NOFD : index;
    this.#call(request, u64Payload(sel), fd < 0 ? [] : [fd]);
  }

  #fail(why: string, disconnected = false): VhostUserError {
    this.#broken ??= why;
    return new VhostUserError(why, disconnected);
  }

  /**
   * Sends one request and reads its reply. `replySize`: the reply payload size expected (-1: any up to
   * the limit), or undefined when the request has no reply of its own; then, with REPLY_ACK agreed,
   * need_reply is set and the u64 ack (0 = success) is checked. Returns the reply payload.
   */
  #call(request: number, payload?: Uint8Array, fds: number[] = [], replySize?: number): Uint8Array | null {
    const name = requestName(request);
    if (this.#broken) throw new VhostUserError(`${name}: connection unusable (${this.#broken})`, true);
    const ack = replySize === undefined && this.hasProtocolFeature(PROTOCOL_F.REPLY_ACK);
    const msg = encodeMessage(request, payload, ack ? FLAG_NEED_REPLY : 0);
    const deadline = performance.now() + this.timeoutMs;
    this.#send(name, msg, fds, deadline);
    if (replySize === undefined && !ack) return null;
    const p = this.#reply(name, request, deadline, ack ? 8 : replySize!);
    if (ack) {
      const status = readU64(p);
      if (status !== 0n) throw this.#fail(`${name}: the back-end answered failure (${status})`);
    }
    return p;
  }

  #send(name: string, msg: Uint8Array, fds: number[], deadline: number): void {
    const s = shim();
    let off = 0;
    let withFds: Int32Array | null = fds.length ? Int32Array.from(fds) : null;
    while (off < msg.length) {
      const part = msg.subarray(off);
      const r = Number(s.kvs_send_fds(this.fd, part, part.length, withFds, withFds?.length ?? 0));
      if (r >= 0) {
        off += r;
        withFds = null;
      } else if (r === -EAGAIN) this.#wait(name, POLLOUT, deadline);
      else if (r !== -EINTR) {
        throw this.#fail(`${name}: send failed (errno ${-r}): the back-end is gone`, true);
      }
    }
  }

  #wait(name: string, events: number, deadline: number): void {
    const left = deadline - performance.now();
    if (left <= 0) throw this.#fail(`${name}: no answer from the back-end within ${this.timeoutMs} ms`);
    const r = Number(shim().kvs_poll1(this.fd, events, Math.ceil(left)));
    if (r < 0 && r !== -EINTR) throw this.#fail(`${name}: poll failed (errno ${-r})`);
  }

  #closeReceived(): void {
    const n = this.#fdSlots[0];
    for (let i = 0; i < n; i++) shim().kvs_close(this.#fdSlots[1 + i]);
    this.#fdSlots[0] = 0;
  }

  /** Reads exactly buf.length bytes (closing any descriptor that comes along: none is expected). */
  #readExact(name: string, buf: Uint8Array, deadline: number): void {
    const s = shim();
    let off = 0;
    while (off < buf.length) {
      this.#fdSlots[0] = 0;
      const part = buf.subarray(off);
      const r = Number(s.kvs_recv_fds(this.fd, part, part.length, this.#fdSlots, MAX_FDS));
      this.#closeReceived();
      if (r > 0) off += r;
      else if (r === 0) throw this.#fail(`${name}: the back-end closed the connection`, true);
      else if (r === -EAGAIN) this.#wait(name, POLLIN, deadline);
      else if (r !== -EINTR) throw this.#fail(`${name}: receive failed (errno ${-r})`, true);
    }
  }

  #reply(name: string, request: number, deadline: number, size: number): Uint8Array {
    this.#readExact(name, this.#hdr, deadline);
    const h = decodeHeader(this.#hdr);
    if (h.request !== request) {
      throw this.#fail(`${name}: the back-end answered with ${requestName(h.request)}`);
    }
    if ((h.flags & FLAG_VERSION_MASK) !== VHOST_USER_VERSION || !(h.flags & FLAG_REPLY)) {
      throw this.#fail(`${name}: reply with bad flags 0x${h.flags.toString(16)}`);
    }
    if (h.size > MAX_REPLY_PAYLOAD || (size >= 0 && h.size !== size)) {
      throw this.#fail(
        `${name}: reply of ${h.size} bytes, expected ${size >= 0 ? size : "at most " + MAX_REPLY_PAYLOAD}`,
      );
    }
    const p = new Uint8Array(h.size);
    this.#readExact(name, p, deadline);
    return p;
  }
}
