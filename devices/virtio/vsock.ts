/**
 * virtio-vsock (virtio 1.x, "Socket Device") with the hybrid host side Cloud Hypervisor and Firecracker
 * use: the host end of every guest stream is a UNIX stream socket.
 *
 * - Host-initiated: a host process connects to the device's listening socket (`--vsock socket=PATH`) and
 *   writes `CONNECT <port>\n`. The device picks a host-side port, sends the guest an OP_REQUEST to
 *   `<port>`; when the guest answers OP_RESPONSE the host process gets `OK <host port>\n` and the bytes
 *   flow; an OP_RST (nobody listens) closes its socket.
 * - Guest-initiated: an OP_REQUEST to the host (CID 2) port P connects to the UNIX socket `PATH_P`;
 *   nobody there means OP_RST.
 *
 * Queues: 0 = rx (device → guest), 1 = tx (guest → device), 2 = event (never used: no transport reset
 * events are sent). Every packet starts with the 44-byte little-endian header (src_cid u64, dst_cid u64,
 * src_port, dst_port, len, type u16, op u16, flags, buf_alloc, fwd_cnt). Only SOCK_STREAM (type 1).
 *
 * Flow control (credit, per the spec): each side advertises `buf_alloc` (its receive buffer) and
 * `fwd_cnt` (bytes it has consumed); a sender keeps `sent - peer fwd_cnt <= peer buf_alloc`. Host → guest
 * data is read from the socket straight into the guest's rx buffers, never more than the guest's credit.
 * Guest → host data is written from guest memory straight to the socket (writev); what the socket does
 * not take waits in a per-connection ring of `buf_alloc` bytes (allocated on first use), which a guest
 * keeping to its credit can never overflow. Our `fwd_cnt` counts bytes handed to the socket, and a
 * CREDIT_UPDATE goes out once a quarter of the window has been consumed unreported.
 *
 * Readiness: the listener and every connection socket sit in a nested epoll set (`pollFd`) that the
 * device worker watches as its host fd (like virtio-net's tap); readiness means "serve the rx queue".
 * Connection sockets are edge-triggered: a connection is marked readable on an event and stays so until
 * a read finds nothing (EAGAIN), so a guest without rx buffers or credit never makes the worker spin. Connections with something to tell the guest wait, round-robin, in an intrusive FIFO; RSTs for
 * connections that no longer exist wait in a fixed ring. The packet path allocates no buffers: headers
 * go through one reused 44-byte buffer, payloads through reused iovec arrays.
 *
 * Hostile guests: a chain with a descriptor error, too short for a header, with too many segments, or a
 * packet for an unknown CID or of an unknown op is completed and dropped (counted); a packet for an
 * unknown connection, of another socket type, or data breaking the credit or its own length is answered
 * with an RST (the connection, if any, is closed).
 */
import { cstr, EAGAIN, EINTR, shim } from "../../ffi/shim.ts";
import {
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLLET,
  EPOLLIN,
  EPOLLOUT,
  EPOLLRDHUP,
} from "../../ffi/kvm_constants.ts";
import type { GuestMemory } from "../../vmm/memory.ts";
import { F, featureBit } from "./constants.ts";
import type { DescriptorChain, SplitQueue } from "./queue.ts";

export const VSOCK_RX_QUEUE = 0;
export const VSOCK_TX_QUEUE = 1;
export const VSOCK_EVENT_QUEUE = 2;
export const VSOCK_NUM_QUEUES = 3;
/** Queue size offered for every queue (Cloud Hypervisor's). */
export const VSOCK_QUEUE_SIZE = 256;
/** Size of struct virtio_vsock_hdr. */
export const VSOCK_HDR_SIZE = 44;

export const VSOCK_OP = {
  REQUEST: 1,
  RESPONSE: 2,
  RST: 3,
  SHUTDOWN: 4,
  RW: 5,
  CREDIT_UPDATE: 6,
  CREDIT_REQUEST: 7,
} as const;
/** SHUTDOWN flags: the sender will receive no more / send no more. */
export const VSOCK_SHUTDOWN_RCV = 1;
export const VSOCK_SHUTDOWN_SEND = 2;
const SHUTDOWN_BOTH = 3;
export const VSOCK_TYPE_STREAM = 1;
export const VSOCK_HOST_CID = 2;
/** Our receive buffer per connection (advertised as buf_alloc; the size of the overflow ring). */
export const VSOCK_BUF_ALLOC = 256 * 1024;
/** A CREDIT_UPDATE is sent once this many consumed bytes have not been reported to the guest. */
const CREDIT_UPDATE_BYTES = VSOCK_BUF_ALLOC / 4;
/** Most connections (host streams awaiting their CONNECT line included), as Cloud Hypervisor. */
export const VSOCK_MAX_CONNECTIONS = 1023;
/** How long a host-initiated request may wait for the guest's answer, and a closing connection for its
 * unsent bytes to leave (Cloud Hypervisor's 2 s; checked when the device is next busy). */
const REQUEST_TIMEOUT_MS = 2000;
const SHUTDOWN_TIMEOUT_MS = 2000;
/** Longest `CONNECT <port>\n` line. */
const CMD_MAX = 32;
/** Shortest valid one ("connect 0\n"): read at once; after it, byte by byte, so no stream data is eaten. */
const CMD_MIN = 10;
/** Pending RSTs for connections that no longer exist (more are dropped, counted). */
const RST_RING = 1024;
/** Most segments in one readv / writev (Linux IOV_MAX). */
const MAX_IOV = 1024;
const EVENTS_PER_WAIT = 64;
const LISTENER_TAG = 0;
const POLLHUP = 0x10;
const SHUT_WR = 1;
const CONN_EVENTS = (EPOLLIN | EPOLLRDHUP | EPOLLET) >>> 0; // EPOLLET is bit 31: keep it unsigned
const CONN_EVENTS_OUT = (CONN_EVENTS | EPOLLOUT) >>> 0;

/** Features offered: VERSION_1, plus event index and indirect descriptors (handled by the queues). */
export function vsockFeatures(): bigint {
  return featureBit(F.VERSION_1) | featureBit(F.EVENT_IDX) | featureBit(F.INDIRECT_DESC);
}

/** Device configuration space: guest_cid (le64). */
export function vsockConfigSpace(cid: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, cid >>> 0, true);
  v.setUint32(4, Math.floor(cid / 0x1_0000_0000), true);
  return b;
}

/**
 * Counter names. Cloud Hypervisor reports no counters for vsock; these follow its net naming (rx: to the
 * guest, tx: from the guest; bytes are payload), plus open connections and dropped guest packets.
 */
export const VSOCK_COUNTERS = [
  "rx_bytes",
  "rx_packets",
  "tx_bytes",
  "tx_packets",
  "connections",
  "dropped_packets",
] as const;
const C_RX_BYTES = 0, C_RX_PACKETS = 1, C_TX_BYTES = 2, C_TX_PACKETS = 3, C_CONNS = 4, C_DROPPED = 5;

/** vsock counters in a Float64Array, optionally over a SharedArrayBuffer read by the main thread. */
export class VsockCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(
      buffer ?? new SharedArrayBuffer(8 * VSOCK_COUNTERS.length),
      0,
      VSOCK_COUNTERS.length,
    );
  }
  snapshot(): Record<(typeof VSOCK_COUNTERS)[number], number> {
    const v = this.values;
    const out = {} as Record<(typeof VSOCK_COUNTERS)[number], number>;
    VSOCK_COUNTERS.forEach((k, i) => out[k] = v[i]);
    return out;
  }
}

/** Parses `CONNECT <port>` (any case, surrounding blanks allowed) from a command line without its `\n`. */
export function parseConnectLine(line: Uint8Array): number | null {
  const prefix = "connect ";
  if (line.length < prefix.length) return null;
  for (let i = 0; i < prefix.length; i++) {
    if ((line[i] | 0x20) !== prefix.charCodeAt(i)) return null;
  }
  let s = "";
  for (let i = prefix.length; i < line.length; i++) s += String.fromCharCode(line[i]);
  s = s.trim();
  if (!/^\d{1,10}$/.test(s)) return null;
  const port = Number(s);
  return port <= 0xffff_ffff ? port : null;
}

// Connection states.
const S_CMD = 0; // host stream: reading its CONNECT line
const S_LOCAL_INIT = 1; // host-initiated: REQUEST sent (or pending), waiting for the guest's RESPONSE
const S_PEER_INIT = 2; // guest-initiated: connected to PATH_P, RESPONSE pending
const S_ESTABLISHED = 3;

// What a connection has to tell the guest (pending rx), in the order it is told.
const P_RESPONSE = 1;
const P_REQUEST = 2;
const P_SHUTDOWN = 4;
const P_RW = 8;
const P_CREDIT_UPDATE = 16;

class Conn {
  state: number;
  localPort = 0;
  peerPort = 0;
  /** The host port was allocated by us (host-initiated). */
  hostInit = false;
  pending = 0;
  inRx = false;
  nextRx: Conn | null = null;
  dead = false;
  /** The host socket may have bytes (or EOF) to read. */
  readable = false;
  /** The host socket's read side reached EOF (a SHUTDOWN went or goes to the guest). */
  hostEof = false;
  /** We shut the host socket's write side (the guest sent SHUTDOWN SEND and everything was written). */
  hostWriteShut = false;
  /** SHUTDOWN flags the guest sent / we sent. */
  peerShut = 0;
  sentShut = 0;
  peerBufAlloc = 0;
  peerFwdCnt = 0;
  /** Bytes sent to the guest. */
  rxCnt = 0;
  /** Bytes of guest data handed to the host socket, and the value last told to the guest. */
  fwdCnt = 0;
  lastFwdCntToPeer = 0;
  creditRequested = false;
  forceCreditUpdate = false;
  /** Guest bytes the socket did not take yet: a ring of VSOCK_BUF_ALLOC bytes. */
  tx: Uint8Array | null = null;
  txStart = 0;
  txLen = 0;
  outArmed = false;
  /** performance.now() deadline, 0 for none. */
  expiry = 0;
  cmd: Uint8Array | null = null;
  cmdLen = 0;

  constructor(readonly slot: number, readonly fd: number, state: number) {
    this.state = state;
  }
}

/** What the device needs from its surroundings. */
export interface VsockOptions {
  /** The guest's CID. */
  cid: number;
  /** The listening socket's path (guest-initiated connections go to `${path}_${port}`). */
  path: string;
  /** The listening socket (non-blocking; owned by the caller). */
  listenFd: number;
  /** An eventfd that wakes rx processing (the rx queue's notify eventfd); -1 for none (tests). */
  rxKickFd?: number;
  counters?: VsockCounters;
  /** Switches the worker's polling of {@link VsockDevice.pollFd} (on while the device is active). */
  setPolling?(on: boolean): void;
  warn?(message: string): void;
}

/** The device side of virtio-vsock over UNIX sockets, as a device worker runs it. */
export class VsockDevice {
  readonly counters: VsockCounters;
  /** The nested epoll set (listener + connections): the worker's host fd, readiness serves the rx queue. */
  readonly pollFd: number;
  readonly hostFd: number;
  readonly hostQueue = VSOCK_RX_QUEUE;

  readonly #cid: number;
  readonly #path: string;
  readonly #listenFd: number;
  readonly #rxKickFd: number;
  readonly #opts: VsockOptions;
  readonly #slots: (Conn | null)[] = new Array(VSOCK_MAX_CONNECTIONS + 1).fill(null);
  readonly #freeSlots: number[] = [];
  readonly #ports = new Map<number, Map<number, Conn>>();
  readonly #localPorts = new Set<number>();
  #lastLocalPort = 0x3fff_ffff;
  #listenerPaused = false;
  #active = false;
  /** The last rx pass ran out of buffers (the guest's notify for new ones will come). */
  #rxStarved = false;
  #rxHead: Conn | null = null;
  #rxTail: Conn | null = null;
  readonly #rstLocal = new Uint32Array(RST_RING);
  readonly #rstPeer = new Uint32Array(RST_RING);
  #rstStart = 0;
  #rstCount = 0;
  #nextExpiry = Infinity;
  /** Guest RAM regions as numbers, to turn segment GPAs into host addresses for iovecs. */
  readonly #rGpa: number[];
  readonly #rSize: number[];
  readonly #rHost: number[];
  readonly #iov = new Uint32Array(4 * MAX_IOV);
  readonly #hdr = new Uint8Array(VSOCK_HDR_SIZE);
  readonly #hv = new DataView(this.#hdr.buffer);
  readonly #ev = new Uint32Array(2 * EVENTS_PER_WAIT);
  readonly #one = new BigUint64Array([1n]);
  /** Why the last guest packet was dropped (tests and logs). */
  lastDrop = "";

  constructor(mem: GuestMemory, opts: VsockOptions) {
    this.#opts = opts;
    this.#cid = opts.cid;
    this.#path = opts.path;
    this.#listenFd = opts.listenFd;
    this.#rxKickFd = opts.rxKickFd ?? -1;
    this.counters = opts.counters ?? new VsockCounters();
    this.#rGpa = mem.regions.map((r) => r.gpa);
    this.#rSize = mem.regions.map((r) => r.bytes.length);
    this.#rHost = mem.regions.map((r) => Number(r.hostAddr));
    for (let i = VSOCK_MAX_CONNECTIONS; i >= 1; i--) this.#freeSlots.push(i);
    const s = shim();
    const ep = Number(s.kvs_epoll_create());
    if (ep < 0) throw new Error(`vsock: epoll_create: errno ${-ep}`);
    this.pollFd = ep;
    this.hostFd = ep;
    const r = Number(s.kvs_epoll_ctl(ep, EPOLL_CTL_ADD, this.#listenFd, EPOLLIN, LISTENER_TAG));
    if (r < 0) {
      s.kvs_close(ep);
      throw new Error(`vsock: epoll_ctl(listener): errno ${-r}`);
    }
  }

  // ------------------------------------------------------------------ worker interface

  /** DRIVER_OK: start accepting host connections. */
  activate(_features: bigint): void {
    this.#active = true;
    this.#opts.setPolling?.(true);
  }

  /** Reset (or a broken rx queue): every connection is closed, nothing is pending. */
  deactivate(): void {
    this.#active = false;
    this.#opts.setPolling?.(false);
    this.#closeAll();
  }

  close(): void {
    this.#closeAll();
    shim().kvs_close(this.pollFd);
  }

  /** Serves a queue after its notify (rx: also after host readiness); true when the guest is to be interrupted. */
  service(q: SplitQueue, index: number): boolean {
    if (index === VSOCK_TX_QUEUE) return this.#serviceTx(q);
    if (index !== VSOCK_RX_QUEUE) return false; // event queue: buffers wait for events never sent
    this.#harvest();
    if (this.#nextExpiry !== Infinity) this.#sweep();
    let irq = false;
    for (;;) {
      const stop = this.#fillRx(q);
      if (q.needsInterrupt()) irq = true;
      // Out of buffers with work left: buffers added meanwhile are used now, otherwise the notify comes.
      if (stop === "no-buffers" && q.enableNotification() && q.broken === null) continue;
      this.#rxStarved = stop === "no-buffers";
      return irq;
    }
  }

  /** Open connections (tests). */
  get connectionCount(): number {
    return VSOCK_MAX_CONNECTIONS - this.#freeSlots.length;
  }

  /** Whether packets wait for rx buffers. */
  get rxPending(): boolean {
    return this.#rstCount > 0 || this.#rxHead !== null;
  }

  // ------------------------------------------------------------------ host side

  /** Takes the nested epoll set's events (never blocks), also those that handling them raised. */
  #harvest(): void {
    const s = shim();
    const ev = this.#ev;
    for (let round = 0; round < 64; round++) {
      const n = s.kvs_epoll_wait_i32(this.pollFd, ev, EVENTS_PER_WAIT, 0);
      if (n === -EINTR) continue;
      if (n <= 0) return;
      for (let i = 0; i < n; i++) {
        const tag = ev[2 * i];
        if (tag === LISTENER_TAG) this.#acceptAll();
        else {
          const c = this.#slots[tag];
          if (c !== null && c !== undefined) this.#hostEvent(c);
        }
      }
    }
  }

  #acceptAll(): void {
    if (!this.#active) return;
    const s = shim();
    for (let i = 0; i < EVENTS_PER_WAIT; i++) {
      const fd = Number(s.kvs_accept(this.#listenFd));
      if (fd === -EAGAIN || fd === -EINTR) return;
      if (fd < 0) {
        // Out of descriptors (or worse): stop listening until a connection goes, rather than spin.
        this.#warn(`accept on ${this.#path}: errno ${-fd}; not accepting until a connection closes`);
        s.kvs_epoll_ctl(this.pollFd, EPOLL_CTL_DEL, this.#listenFd, 0, 0);
        this.#listenerPaused = true;
        return;
      }
      const c = this.#newConn(fd, S_CMD);
      if (c === null) continue;
      c.cmd = new Uint8Array(CMD_MAX);
      this.#readCommand(c); // the line is often there already
    }
  }

  /** A connection object in a free slot, registered for readiness; null (fd closed) when impossible. */
  #newConn(fd: number, state: number): Conn | null {
    const s = shim();
    if (this.#nextExpiry !== Infinity) this.#sweep();
    const slot = this.#freeSlots.pop();
    if (slot === undefined) {
      s.kvs_close(fd);
      return null;
    }
    const r = Number(s.kvs_epoll_ctl(this.pollFd, EPOLL_CTL_ADD, fd, CONN_EVENTS, slot));
    if (r < 0) {
      this.#freeSlots.push(slot);
      s.kvs_close(fd);
      this.#warn(`epoll_ctl: errno ${-r}`);
      return null;
    }
    const c = new Conn(slot, fd, state);
    this.#slots[slot] = c;
    return c;
  }

  #hostEvent(c: Conn): void {
    if (c.state === S_CMD) {
      this.#readCommand(c);
      return;
    }
    if (c.txLen > 0) {
      this.#flush(c);
      if (c.dead) return;
    }
    c.readable = true;
    this.#maybeRead(c);
  }

  /** Reads the `CONNECT <port>\n` line of a host stream without reading past it. */
  #readCommand(c: Conn): void {
    const s = shim();
    const buf = c.cmd!;
    for (;;) {
      const want = Math.max(CMD_MIN - c.cmdLen, 1);
      const r = s.kvs_read_i32(c.fd, buf.subarray(c.cmdLen), want);
      if (r === -EINTR) continue;
      if (r === -EAGAIN) return;
      if (r <= 0) {
        this.#remove(c); // EOF or error before a command
        return;
      }
      c.cmdLen += r;
      const nl = buf.subarray(0, c.cmdLen).indexOf(10);
      if (nl < 0) {
        if (c.cmdLen >= CMD_MAX) break;
        continue;
      }
      const port = nl === c.cmdLen - 1 ? parseConnectLine(buf.subarray(0, nl)) : null;
      if (port === null) break;
      c.cmd = null;
      c.state = S_LOCAL_INIT;
      c.hostInit = true;
      c.localPort = this.#allocLocalPort();
      c.peerPort = port;
      c.readable = true; // bytes may follow the line (edge-triggered: no second event for them)
      this.#mapAdd(c);
      this.#schedule(c, P_REQUEST);
      return;
    }
    this.#warn(`host connection on ${this.#path}: not a "CONNECT <port>" line; closed`);
    this.#remove(c);
  }

  #allocLocalPort(): number {
    for (;;) {
      this.#lastLocalPort = ((this.#lastLocalPort + 1) & 0x3fff_ffff) | 0x4000_0000;
      if (!this.#localPorts.has(this.#lastLocalPort)) break;
    }
    this.#localPorts.add(this.#lastLocalPort);
    return this.#lastLocalPort;
  }

  /** Whether host bytes should be read for the guest now. */
  #maybeRead(c: Conn): void {
    if (
      c.readable && c.state === S_ESTABLISHED && !(c.peerShut & VSOCK_SHUTDOWN_RCV) && !c.hostEof &&
      (!c.creditRequested || this.#credit(c) > 0)
    ) {
      this.#schedule(c, P_RW);
    }
  }

  /** Bytes the guest can take on this connection now. */
  #credit(c: Conn): number {
    const inFlight = (c.rxCnt - c.peerFwdCnt) >>> 0;
    return inFlight >= c.peerBufAlloc ? 0 : c.peerBufAlloc - inFlight;
  }

  /** Writes the overflow ring to the socket; afterwards does what waited for it to empty. */
  #flush(c: Conn): void {
    const s = shim();
    const tx = c.tx!;
    while (c.txLen > 0) {
      const n = Math.min(c.txLen, VSOCK_BUF_ALLOC - c.txStart);
      const r = s.kvs_write_i32(c.fd, tx.subarray(c.txStart, c.txStart + n), n);
      if (r === -EINTR) continue;
      if (r === -EAGAIN) break;
      if (r < 0) {
        this.#kill(c);
        return;
      }
      c.txStart = (c.txStart + r) % VSOCK_BUF_ALLOC;
      c.txLen -= r;
      c.fwdCnt = (c.fwdCnt + r) >>> 0;
      if (r < n) break;
    }
    if (c.txLen === 0) {
      c.txStart = 0;
      this.#armOut(c, false);
      if (c.peerShut & VSOCK_SHUTDOWN_SEND) this.#shutHostWrite(c);
      if (c.peerShut === SHUTDOWN_BOTH) {
        this.#finish(c);
        return;
      }
    }
    this.#creditCheck(c);
  }

  #armOut(c: Conn, on: boolean): void {
    if (c.outArmed === on) return;
    c.outArmed = on;
    shim().kvs_epoll_ctl(this.pollFd, EPOLL_CTL_MOD, c.fd, on ? CONN_EVENTS_OUT : CONN_EVENTS, c.slot);
  }

  #shutHostWrite(c: Conn): void {
    if (c.hostWriteShut) return;
    c.hostWriteShut = true;
    shim().kvs_shutdown(c.fd, SHUT_WR);
  }

  // ------------------------------------------------------------------ guest → device (tx queue)

  #serviceTx(q: SplitQueue): boolean {
    let irq = false;
    do {
      for (;;) {
        const chain = q.popChain();
        if (chain === null || q.broken !== null) break;
        if (!chain.headValid) continue;
        this.#onGuestPacket(chain);
        q.pushUsed(chain.head, 0);
      }
      if (q.needsInterrupt()) irq = true;
      if (q.broken !== null) break;
    } while (q.enableNotification());
    // Answers, RSTs and credit updates go out on the rx queue: wake its processing (unless it waits for
    // buffers: the guest's notify for them wakes it).
    if (this.#rxKickFd >= 0 && this.rxPending && !this.#rxStarved) {
      shim().kvs_write_i32(this.#rxKickFd, this.#one, 8);
    }
    return irq;
  }

  #drop(why: string): void {
    this.counters.values[C_DROPPED]++;
    this.lastDrop = why;
  }

  /** Handles one packet from the guest (the chain is completed by the caller). */
  #onGuestPacket(chain: DescriptorChain): void {
    if (chain.error !== null) return this.#drop(chain.error);
    if (chain.readableBytes < VSOCK_HDR_SIZE) return this.#drop("packet shorter than its header");
    chain.readAt(0, this.#hdr);
    const h = this.#hv;
    const dstCidLo = h.getUint32(8, true);
    const dstCidHi = h.getUint32(12, true);
    const srcPort = h.getUint32(16, true);
    const dstPort = h.getUint32(20, true);
    const len = h.getUint32(24, true);
    const type = h.getUint16(28, true);
    const op = h.getUint16(30, true);
    this.counters.values[C_TX_PACKETS]++;
    if (type !== VSOCK_TYPE_STREAM) {
      this.#drop(`socket type ${type}`);
      this.#queueRst(dstPort, srcPort);
      return;
    }
    if (dstCidLo !== VSOCK_HOST_CID || dstCidHi !== 0) return this.#drop("destination CID is not the host");
    const c = this.#find(dstPort, srcPort);
    if (op === VSOCK_OP.RST) {
      if (c !== undefined) this.#remove(c);
      return;
    }
    if (c === undefined) {
      if (op === VSOCK_OP.REQUEST) {
        this.#guestConnect(dstPort, srcPort, h.getUint32(36, true), h.getUint32(40, true));
      } else this.#queueRst(dstPort, srcPort);
      return;
    }
    c.peerBufAlloc = h.getUint32(36, true);
    c.peerFwdCnt = h.getUint32(40, true);
    // One CREDIT_REQUEST per stall: asking again on every packet without credit would ping-pong.
    if (c.creditRequested && this.#credit(c) > 0) c.creditRequested = false;
    switch (op) {
      case VSOCK_OP.RW:
        if (c.state !== S_ESTABLISHED || (c.peerShut & VSOCK_SHUTDOWN_SEND)) {
          this.#drop("data on a connection not open for it");
          break;
        }
        if (len === 0) break;
        if (len > chain.readableBytes - VSOCK_HDR_SIZE) {
          this.#drop(`len ${len} beyond the packet's ${chain.readableBytes - VSOCK_HDR_SIZE} bytes`);
          this.#kill(c);
          return;
        }
        this.#forward(c, chain, len);
        if (c.dead) return;
        break;
      case VSOCK_OP.RESPONSE:
        if (c.state !== S_LOCAL_INIT) {
          this.#drop("unexpected RESPONSE");
          break;
        }
        c.state = S_ESTABLISHED;
        c.expiry = 0;
        if (!this.#ack(c)) return;
        break;
      case VSOCK_OP.SHUTDOWN:
        if (c.state !== S_ESTABLISHED) {
          this.#drop("SHUTDOWN before the connection was established");
          break;
        }
        this.#peerShutdown(c, h.getUint32(32, true) & SHUTDOWN_BOTH);
        if (c.dead) return;
        break;
      case VSOCK_OP.CREDIT_UPDATE:
        break;
      case VSOCK_OP.CREDIT_REQUEST:
        c.forceCreditUpdate = true;
        this.#schedule(c, P_CREDIT_UPDATE);
        break;
      default:
        this.#drop(`op ${op}`);
    }
    this.#maybeRead(c);
  }

  /** A guest REQUEST to host port `dstPort`: connect to PATH_dstPort, RST when nobody is there. */
  #guestConnect(dstPort: number, srcPort: number, bufAlloc: number, fwdCnt: number): void {
    const fd = Number(shim().kvs_unix_connect_nb(cstr(`${this.#path}_${dstPort}`)));
    if (fd < 0) {
      this.#queueRst(dstPort, srcPort);
      return;
    }
    const c = this.#newConn(fd, S_PEER_INIT);
    if (c === null) {
      this.#queueRst(dstPort, srcPort);
      return;
    }
    c.localPort = dstPort;
    c.peerPort = srcPort;
    c.peerBufAlloc = bufAlloc;
    c.peerFwdCnt = fwdCnt;
    this.#mapAdd(c);
    this.#schedule(c, P_RESPONSE);
  }

  /** Tells the host process its connection is up: `OK <host port>\n`. */
  #ack(c: Conn): boolean {
    const msg = new TextEncoder().encode(`OK ${c.localPort}\n`);
    let r: number;
    do r = shim().kvs_write_i32(c.fd, msg, msg.length); while (r === -EINTR);
    if (r !== msg.length) {
      this.#warn(
        `cannot acknowledge host connection to port ${c.peerPort} (${r < 0 ? `errno ${-r}` : "short"})`,
      );
      this.#kill(c);
      return false;
    }
    return true;
  }

  /** Guest data to the host socket: straight from guest memory, the rest into the ring. */
  #forward(c: Conn, chain: DescriptorChain, len: number): void {
    this.counters.values[C_TX_BYTES] += len;
    if (c.txLen > 0) {
      if (!this.#buffer(c, chain, VSOCK_HDR_SIZE, len)) this.#kill(c);
      return;
    }
    const k = this.#iovFor(chain, false, VSOCK_HDR_SIZE, len);
    if (k < 0) {
      this.#drop("too many segments");
      this.#kill(c);
      return;
    }
    let r: number;
    do r = shim().kvs_writev_i32(c.fd, this.#iov, k); while (r === -EINTR);
    if (r < 0) {
      if (r !== -EAGAIN) {
        this.#kill(c);
        return;
      }
      r = 0;
    }
    c.fwdCnt = (c.fwdCnt + r) >>> 0;
    if (r < len && !this.#buffer(c, chain, VSOCK_HDR_SIZE + r, len - r)) {
      this.#kill(c);
      return;
    }
    this.#creditCheck(c);
  }

  /** Copies chain bytes [pos, pos+n) into the connection's ring; false when the guest broke its credit. */
  #buffer(c: Conn, chain: DescriptorChain, pos: number, n: number): boolean {
    if (c.txLen + n > VSOCK_BUF_ALLOC) {
      this.#drop("data beyond the credit given");
      return false;
    }
    if (c.tx === null) c.tx = new Uint8Array(VSOCK_BUF_ALLOC);
    let at = (c.txStart + c.txLen) % VSOCK_BUF_ALLOC;
    let left = n;
    while (left > 0) {
      const part = Math.min(left, VSOCK_BUF_ALLOC - at);
      chain.readAt(pos, c.tx.subarray(at, at + part));
      pos += part;
      left -= part;
      at = (at + part) % VSOCK_BUF_ALLOC;
    }
    c.txLen += n;
    this.#armOut(c, true);
    return true;
  }

  #creditCheck(c: Conn): void {
    if (((c.fwdCnt - c.lastFwdCntToPeer) >>> 0) >= CREDIT_UPDATE_BYTES) this.#schedule(c, P_CREDIT_UPDATE);
  }

  #peerShutdown(c: Conn, flags: number): void {
    c.peerShut |= flags;
    if ((c.peerShut & VSOCK_SHUTDOWN_SEND) && c.txLen === 0) this.#shutHostWrite(c);
    if (c.peerShut === SHUTDOWN_BOTH) {
      if (c.txLen === 0) this.#finish(c);
      else this.#setExpiry(c, SHUTDOWN_TIMEOUT_MS);
    }
  }

  // ------------------------------------------------------------------ device → guest (rx queue)

  #fillRx(q: SplitQueue): "idle" | "no-buffers" | "broken" {
    for (;;) {
      if (!this.rxPending) return "idle";
      const chain = q.popChain();
      if (chain === null) return "no-buffers";
      if (q.broken !== null) return "broken";
      if (!chain.headValid) continue;
      if (
        chain.error !== null || chain.writableBytes <= VSOCK_HDR_SIZE || chain.writableCount > MAX_IOV ||
        chain.readableCount > 0
      ) {
        this.#drop(chain.error ?? "unusable rx buffer");
        q.pushUsed(chain.head, 0);
        continue;
      }
      const used = this.#produce(chain);
      if (used === 0) {
        q.lastAvailIdx = (q.lastAvailIdx - 1) & 0xffff; // nothing to say after all: give the chain back
        return "idle";
      }
      q.pushUsed(chain.head, used);
    }
  }

  /** Fills one rx chain with the next packet; returns its used length, 0 when nothing is pending. */
  #produce(chain: DescriptorChain): number {
    for (;;) {
      if (this.#rstCount > 0) {
        const i = this.#rstStart;
        this.#rstStart = (i + 1) % RST_RING;
        this.#rstCount--;
        this.#writeHdr(chain, this.#rstLocal[i], this.#rstPeer[i], VSOCK_OP.RST, 0, 0, 0, 0);
        return VSOCK_HDR_SIZE;
      }
      const c = this.#rxHead;
      if (c === null) return 0;
      this.#rxHead = c.nextRx;
      if (this.#rxHead === null) this.#rxTail = null;
      c.nextRx = null;
      c.inRx = false;
      if (c.dead) continue;
      const used = this.#produceFor(c, chain);
      if (c.pending !== 0 && !c.dead) this.#schedule(c, 0); // round-robin: to the back
      if (used > 0) return used;
    }
  }

  #produceFor(c: Conn, chain: DescriptorChain): number {
    const p = c.pending;
    if (p & P_RESPONSE) {
      c.pending &= ~P_RESPONSE;
      c.state = S_ESTABLISHED;
      this.#hdrFor(chain, c, VSOCK_OP.RESPONSE, 0, 0);
      this.#maybeRead(c);
      return VSOCK_HDR_SIZE;
    }
    if (p & P_REQUEST) {
      c.pending &= ~P_REQUEST;
      this.#setExpiry(c, REQUEST_TIMEOUT_MS);
      this.#hdrFor(chain, c, VSOCK_OP.REQUEST, 0, 0);
      return VSOCK_HDR_SIZE;
    }
    if (p & P_SHUTDOWN) {
      c.pending &= ~P_SHUTDOWN;
      this.#hdrFor(chain, c, VSOCK_OP.SHUTDOWN, 0, c.sentShut);
      return VSOCK_HDR_SIZE;
    }
    if (p & P_RW) {
      c.pending &= ~P_RW;
      if (c.readable && c.state === S_ESTABLISHED && !(c.peerShut & VSOCK_SHUTDOWN_RCV) && !c.hostEof) {
        const credit = this.#credit(c);
        if (credit === 0) {
          if (!c.creditRequested) {
            c.creditRequested = true;
            this.#hdrFor(chain, c, VSOCK_OP.CREDIT_REQUEST, 0, 0);
            return VSOCK_HDR_SIZE;
          }
        } else {
          const used = this.#readHost(c, chain, Math.min(chain.writableBytes - VSOCK_HDR_SIZE, credit));
          if (used > 0 || c.dead) return used;
        }
      }
    }
    if (p & P_CREDIT_UPDATE) {
      c.pending &= ~P_CREDIT_UPDATE;
      if (c.forceCreditUpdate || c.fwdCnt !== c.lastFwdCntToPeer) {
        c.forceCreditUpdate = false;
        this.#hdrFor(chain, c, VSOCK_OP.CREDIT_UPDATE, 0, 0);
        return VSOCK_HDR_SIZE;
      }
    }
    return 0;
  }

  /** Reads up to `max` host bytes into the chain after its header: an RW packet, or at EOF a SHUTDOWN. */
  #readHost(c: Conn, chain: DescriptorChain, max: number): number {
    const s = shim();
    const k = this.#iovFor(chain, true, VSOCK_HDR_SIZE, max);
    let r: number;
    do r = s.kvs_readv_i32(c.fd, this.#iov, k); while (r === -EINTR);
    if (r > 0) {
      c.rxCnt = (c.rxCnt + r) >>> 0;
      // Read on (with the next buffer) until EAGAIN: only then does the next edge mark it again. A short
      // read is no proof: an EOF already signalled brings no further edge.
      c.pending |= P_RW;
      this.counters.values[C_RX_BYTES] += r;
      this.#hdrFor(chain, c, VSOCK_OP.RW, r, 0);
      return VSOCK_HDR_SIZE + r;
    }
    if (r === 0) {
      // The host stopped sending; a hang-up (both directions gone) ends the guest's receiving too.
      c.readable = false;
      c.hostEof = true;
      const hup = (Number(s.kvs_poll1(c.fd, 0, 0)) & POLLHUP) !== 0;
      c.sentShut |= VSOCK_SHUTDOWN_SEND | (hup ? VSOCK_SHUTDOWN_RCV : 0);
      this.#hdrFor(chain, c, VSOCK_OP.SHUTDOWN, 0, c.sentShut);
      return VSOCK_HDR_SIZE;
    }
    if (r === -EAGAIN) {
      c.readable = false;
      return 0;
    }
    this.#kill(c);
    return 0;
  }

  /** A packet header from connection `c` (carrying our credit) into the chain. */
  #hdrFor(chain: DescriptorChain, c: Conn, op: number, len: number, flags: number): void {
    c.lastFwdCntToPeer = c.fwdCnt;
    this.#writeHdr(chain, c.localPort, c.peerPort, op, len, flags, VSOCK_BUF_ALLOC, c.fwdCnt);
  }

  #writeHdr(
    chain: DescriptorChain,
    srcPort: number,
    dstPort: number,
    op: number,
    len: number,
    flags: number,
    bufAlloc: number,
    fwdCnt: number,
  ): void {
    const h = this.#hv;
    h.setUint32(0, VSOCK_HOST_CID, true);
    h.setUint32(4, 0, true);
    h.setUint32(8, this.#cid >>> 0, true);
    h.setUint32(12, Math.floor(this.#cid / 0x1_0000_0000), true);
    h.setUint32(16, srcPort, true);
    h.setUint32(20, dstPort, true);
    h.setUint32(24, len, true);
    h.setUint16(28, VSOCK_TYPE_STREAM, true);
    h.setUint16(30, op, true);
    h.setUint32(32, flags, true);
    h.setUint32(36, bufAlloc, true);
    h.setUint32(40, fwdCnt, true);
    chain.writeAt(0, this.#hdr);
    this.counters.values[C_RX_PACKETS]++;
  }

  /**
   * iovecs (host addresses) for `max` bytes of the chain's writable or readable stream from offset
   * `start`; returns their count, or -1 when they do not fit in one readv/writev.
   */
  #iovFor(chain: DescriptorChain, writable: boolean, start: number, max: number): number {
    const n = writable ? chain.writableCount : chain.readableCount;
    const iov = this.#iov;
    let k = 0;
    let pos = 0;
    let left = max;
    for (let i = 0; i < n && left > 0; i++) {
      const len = writable ? chain.writableLen(i) : chain.readableLen(i);
      if (pos + len <= start) {
        pos += len;
        continue;
      }
      const skip = start > pos ? start - pos : 0;
      const take = Math.min(len - skip, left);
      if (k === MAX_IOV) return -1;
      const addr = this.#host((writable ? chain.writableGpa(i) : chain.readableGpa(i)) + skip);
      iov[4 * k] = addr >>> 0;
      iov[4 * k + 1] = Math.floor(addr / 0x1_0000_0000);
      iov[4 * k + 2] = take;
      iov[4 * k + 3] = 0;
      k++;
      left -= take;
      pos += len;
    }
    return k;
  }

  /** Host address of a GPA inside guest RAM (the queue checked every segment against RAM). */
  #host(gpa: number): number {
    const g = this.#rGpa;
    for (let i = 0; i < g.length; i++) {
      if (gpa >= g[i] && gpa < g[i] + this.#rSize[i]) return this.#rHost[i] + (gpa - g[i]);
    }
    return 0;
  }

  // ------------------------------------------------------------------ bookkeeping

  #schedule(c: Conn, what: number): void {
    c.pending |= what;
    if (c.inRx) return;
    c.inRx = true;
    c.nextRx = null;
    if (this.#rxTail === null) this.#rxHead = c;
    else this.#rxTail.nextRx = c;
    this.#rxTail = c;
  }

  #queueRst(localPort: number, peerPort: number): void {
    if (this.#rstCount === RST_RING) {
      this.#drop("RST ring full");
      return;
    }
    const i = (this.#rstStart + this.#rstCount) % RST_RING;
    this.#rstLocal[i] = localPort;
    this.#rstPeer[i] = peerPort;
    this.#rstCount++;
  }

  #find(localPort: number, peerPort: number): Conn | undefined {
    return this.#ports.get(localPort)?.get(peerPort);
  }

  #mapAdd(c: Conn): void {
    let m = this.#ports.get(c.localPort);
    if (m === undefined) {
      m = new Map();
      this.#ports.set(c.localPort, m);
    }
    m.set(c.peerPort, c);
    this.counters.values[C_CONNS]++;
  }

  /** Both sides are done: RST to the guest, socket closed. */
  #finish(c: Conn): void {
    this.#queueRst(c.localPort, c.peerPort);
    this.#remove(c);
  }

  /** Something went wrong on this connection: the same, without waiting for anything. */
  #kill(c: Conn): void {
    if (c.dead) return;
    if (c.state !== S_CMD) this.#queueRst(c.localPort, c.peerPort);
    this.#remove(c);
  }

  /** Forgets a connection and closes its socket (which also leaves the epoll set). */
  #remove(c: Conn): void {
    if (c.dead) return;
    c.dead = true;
    const s = shim();
    s.kvs_close(c.fd);
    this.#slots[c.slot] = null;
    this.#freeSlots.push(c.slot);
    if (c.state !== S_CMD) {
      const m = this.#ports.get(c.localPort);
      if (m !== undefined && m.get(c.peerPort) === c) {
        m.delete(c.peerPort);
        if (m.size === 0) this.#ports.delete(c.localPort);
        this.counters.values[C_CONNS]--;
      }
      if (c.hostInit) this.#localPorts.delete(c.localPort);
    }
    if (this.#listenerPaused) {
      this.#listenerPaused = false;
      s.kvs_epoll_ctl(this.pollFd, EPOLL_CTL_ADD, this.#listenFd, EPOLLIN, LISTENER_TAG);
    }
  }

  #setExpiry(c: Conn, ms: number): void {
    c.expiry = performance.now() + ms;
    if (c.expiry < this.#nextExpiry) this.#nextExpiry = c.expiry;
  }

  /** Kills connections whose deadline passed. */
  #sweep(): void {
    const now = performance.now();
    if (now < this.#nextExpiry) return;
    let next = Infinity;
    for (const c of this.#slots) {
      if (c === null || c.expiry === 0) continue;
      if (c.expiry <= now) {
        if (c.state === S_LOCAL_INIT) this.#warn(`guest did not answer a connection to port ${c.peerPort}`);
        this.#kill(c);
      } else if (c.expiry < next) next = c.expiry;
    }
    this.#nextExpiry = next;
  }

  #closeAll(): void {
    for (const c of this.#slots) if (c !== null) this.#remove(c);
    this.#rxHead = this.#rxTail = null;
    this.#rxStarved = false;
    this.#rstCount = 0;
    this.#nextExpiry = Infinity;
    this.#localPorts.clear();
    this.counters.values[C_CONNS] = 0;
  }

  #warn(message: string): void {
    this.#opts.warn?.(message);
  }
}
