/**
 * The back-end side of the vhost-user protocol (QEMU docs/interop/vhost-user.rst), for dvmm's own
 * back-end processes (`dvmm vhost-user-net`). The message codec is the front-end's (vhost_user.ts).
 *
 * One {@link VhostUserBackendConnection} serves one connected front-end: it answers the control
 * messages, maps the guest memory regions it is sent (memfds, MAP_SHARED at the given offset, checked
 * against the descriptor's size so a short file can never fault the process), keeps each ring's state
 * and, once a ring is started (kick received, addresses and memory known) and enabled, builds a
 * {@link SplitQueue} over the mapped memory and registers its kick eventfd in the caller's epoll set
 * (tag = ring index). The device ({@link VhostUserBackendDevice}) is told whenever the set of ready
 * rings changes and does the data path; it signals a ring's call eventfd through {@link signal}.
 *
 * Rings start disabled when protocol features were negotiated (VHOST_USER_F_PROTOCOL_FEATURES), enabled
 * otherwise, as the specification says. GET_VRING_BASE stops a ring and answers the next available
 * index it would have processed.
 *
 * Nothing the front-end sends may crash the process: a malformed request is logged and answered with a
 * failed ack when REPLY_ACK asks for one; one whose own reply cannot be given, or a broken stream,
 * ends the connection (the caller then closes it and may accept another front-end).
 */
import { EAGAIN, EINTR, shim } from "../../ffi/shim.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN, POLLIN } from "../../ffi/kvm_constants.ts";
import { GuestMemory } from "../../vmm/memory.ts";
import { F, featureBit } from "./constants.ts";
import { SplitQueue } from "./queue.ts";
import {
  decodeHeader,
  encodeMessage,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FLAG_VERSION_MASK,
  HEADER_SIZE,
  MAX_MEM_REGIONS,
  PROTOCOL_F,
  requestName,
  u64Payload,
  VHOST_USER,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_VERSION,
  VRING_INDEX_MASK,
  VRING_NOFD,
  vringStatePayload,
} from "./vhost_user.ts";

/** What a back-end device provides to the protocol side. */
export interface VhostUserBackendDevice {
  /** Virtio features offered (GET_FEATURES; the protocol-features bit is added here). */
  readonly features: bigint;
  /** Protocol features offered (GET_PROTOCOL_FEATURES); only MQ and REPLY_ACK are understood here. */
  readonly protocolFeatures: bigint;
  /** Rings the device has (GET_QUEUE_NUM). */
  readonly numQueues: number;
  /** Largest ring size accepted (SET_VRING_NUM). */
  readonly maxQueueSize: number;
  /** The set of ready rings (or the features, or the memory) changed: re-read them from `conn`. */
  ringsChanged(conn: VhostUserBackendConnection): void;
}

/** One ring's state as the front-end programmed it. */
interface Vring {
  size: number;
  /** Front-end (user) addresses of the descriptor table, available and used rings; null: not set. */
  addr: { desc: bigint; avail: bigint; used: bigint } | null;
  base: number;
  kickFd: number;
  callFd: number;
  /** A kick was set (with or without a descriptor): the ring is started. */
  started: boolean;
  enabled: boolean;
  /** The queue while the ring is ready (started, enabled, memory and addresses known). */
  queue: SplitQueue | null;
  /** The kick fd registered in the epoll set (-1: none). */
  polled: number;
}

/** One mapped memory region. */
interface Mapped {
  gpa: number;
  size: number;
  userAddr: bigint;
  hostAddr: bigint;
}

const PROT_RW = 0x1 | 0x2;
const MAP_SHARED = 0x01;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;
const MAX_FDS = 8;
/** The largest request payload accepted (a full memory table is 8 + 8 × 32 bytes). */
const MAX_PAYLOAD = 8 + 32 * MAX_MEM_REGIONS;
const PROTOCOL_BIT = featureBit(VHOST_USER_F_PROTOCOL_FEATURES);
const TWO53 = 2n ** 53n;

/** A request the back-end refuses: logged, answered with a failed ack when one is asked for. */
class Refused extends Error {}

/** The back-end end of one vhost-user connection. */
export class VhostUserBackendConnection {
  readonly rings: Vring[];
  /** Features the front-end set (SET_FEATURES). */
  ackedFeatures = 0n;
  /** Protocol features the front-end set (SET_PROTOCOL_FEATURES). */
  protocolFeatures = 0n;
  /** Guest memory as mapped here (null before SET_MEM_TABLE). */
  memory: GuestMemory | null = null;
  #maps: Mapped[] = [];
  #protocolNegotiated = false;
  readonly #hdr = new Uint8Array(HEADER_SIZE);
  readonly #fdSlots = new Int32Array(1 + MAX_FDS);
  readonly #one = new Uint8Array(new BigUint64Array([1n]).buffer);
  #fds: number[] = [];

  /**
   * `fd`: the connected socket (made non-blocking); `epfd`: the epoll set kick eventfds are added
   * to, tagged with their ring index; `log`: where errors go.
   */
  constructor(
    readonly fd: number,
    readonly device: VhostUserBackendDevice,
    readonly epfd: number,
    readonly log: (msg: string) => void = (m) => console.error(m),
    readonly timeoutMs = 5000,
  ) {
    const s = shim();
    const fl = Number(s.kvs_fcntl(fd, F_GETFL, 0));
    if (fl >= 0) s.kvs_fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    this.rings = Array.from({ length: device.numQueues }, () => ({
      size: 0,
      addr: null,
      base: 0,
      kickFd: -1,
      callFd: -1,
      started: false,
      enabled: false,
      queue: null,
      polled: -1,
    }));
  }

  /** The ready queue of ring `i` (null when the ring is not running). */
  queue(i: number): SplitQueue | null {
    return this.rings[i]?.queue ?? null;
  }

  /** Interrupts the driver for ring `i` (its call eventfd, when it has one). */
  signal(i: number): void {
    const fd = this.rings[i]?.callFd ?? -1;
    if (fd >= 0) shim().kvs_write_i32(fd, this.#one, 8);
  }

  /** Stops ring `i` after a data-path error (bad ring contents); the front-end may restart it. */
  stopRing(i: number, why: string): void {
    const r = this.rings[i];
    if (!r || !r.queue) return;
    this.log(`ring ${i} stopped: ${why}`);
    r.base = r.queue.lastAvailIdx;
    r.started = false;
    this.#unready(r);
    this.device.ringsChanged(this);
  }

  /**
   * Reads and answers one request (the socket was readable). Returns false when the connection is over
   * (the front-end hung up, or the stream cannot be trusted any more); the caller then calls close().
   */
  handle(): boolean {
    const deadline = performance.now() + this.timeoutMs;
    try {
      if (!this.#readExact(this.#hdr, deadline, true)) return true; // nothing there after all
      const h = decodeHeader(this.#hdr);
      if ((h.flags & FLAG_VERSION_MASK) !== VHOST_USER_VERSION || (h.flags & FLAG_REPLY)) {
        throw new Error(`request with bad flags 0x${h.flags.toString(16)}`);
      }
      if (h.size > MAX_PAYLOAD) throw new Error(`${requestName(h.request)}: payload of ${h.size} bytes`);
      const p = new Uint8Array(h.size);
      this.#readExact(p, deadline, false);
      const fds = this.#fds;
      this.#fds = [];
      this.#dispatch(h.request, h.flags, p, fds);
      return true;
    } catch (e) {
      this.#closeFds(this.#fds);
      this.#fds = [];
      const m = (e as Error).message;
      if (m !== "closed") this.log(`vhost-user connection: ${m}`);
      return false;
    }
  }

  /** Stops every ring, unmaps memory and closes every descriptor and the socket. */
  close(): void {
    for (const r of this.rings) {
      this.#unready(r);
      r.started = false;
      this.#setFd(r, "kickFd", -1);
      this.#setFd(r, "callFd", -1);
    }
    this.device.ringsChanged(this);
    this.#unmapAll();
    shim().kvs_close(this.fd);
  }

  // ------------------------------------------------------------------ requests

  #dispatch(req: number, flags: number, p: Uint8Array, fds: number[]): void {
    const name = requestName(req);
    const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
    const u64 = () => {
      if (p.length !== 8) throw new Refused(`${name}: payload of ${p.length} bytes`);
      return v.getBigUint64(0, true);
    };
    const state = () => {
      if (p.length !== 8) throw new Refused(`${name}: payload of ${p.length} bytes`);
      return { index: this.#ring(v.getUint32(0, true)), num: v.getUint32(4, true) };
    };
    // Requests with a reply of their own: a refusal there ends the connection (the front-end waits).
    switch (req) {
      case VHOST_USER.GET_FEATURES:
        return this.#reply(req, u64Payload(this.device.features | PROTOCOL_BIT));
      case VHOST_USER.GET_PROTOCOL_FEATURES:
        this.#protocolNegotiated = true;
        return this.#reply(req, u64Payload(this.device.protocolFeatures));
      case VHOST_USER.GET_QUEUE_NUM:
        return this.#reply(req, u64Payload(this.device.numQueues));
      case VHOST_USER.GET_VRING_BASE: {
        const st = state();
        const r = this.rings[st.index];
        if (r.queue) r.base = r.queue.lastAvailIdx;
        r.started = false;
        this.#unready(r);
        this.#setFd(r, "kickFd", -1);
        this.device.ringsChanged(this);
        return this.#reply(req, vringStatePayload(st.index, r.base));
      }
    }
    let ok = true;
    try {
      this.#request(req, name, p, v, fds, u64, state);
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      this.log(`vhost-user: ${e.message}`);
      ok = false;
    } finally {
      this.#closeFds(fds);
    }
    if ((flags & FLAG_NEED_REPLY) && (this.protocolFeatures & featureBit(PROTOCOL_F.REPLY_ACK))) {
      this.#reply(req, u64Payload(ok ? 0 : 1));
    }
  }

  /** Requests without a reply of their own. Descriptors kept are taken out of `fds`. */
  #request(
    req: number,
    name: string,
    p: Uint8Array,
    v: DataView,
    fds: number[],
    u64: () => bigint,
    state: () => { index: number; num: number },
  ): void {
    switch (req) {
      case VHOST_USER.SET_OWNER:
        return;
      case VHOST_USER.RESET_OWNER:
      case VHOST_USER.RESET_DEVICE:
        for (const r of this.rings) {
          this.#unready(r);
          Object.assign(r, { started: false, enabled: false, base: 0, addr: null, size: 0 });
          this.#setFd(r, "kickFd", -1);
          this.#setFd(r, "callFd", -1);
        }
        this.ackedFeatures = 0n;
        this.device.ringsChanged(this);
        return;
      case VHOST_USER.SET_FEATURES: {
        const f = u64();
        if (f & ~(this.device.features | PROTOCOL_BIT)) {
          throw new Refused(`SET_FEATURES 0x${f.toString(16)}: features never offered`);
        }
        this.ackedFeatures = f;
        if (f & PROTOCOL_BIT) this.#protocolNegotiated = true;
        this.#rebuild();
        return;
      }
      case VHOST_USER.SET_PROTOCOL_FEATURES: {
        const f = u64();
        if (f & ~this.device.protocolFeatures) {
          throw new Refused(`SET_PROTOCOL_FEATURES 0x${f.toString(16)}: features never offered`);
        }
        this.protocolFeatures = f;
        this.#protocolNegotiated = true;
        return;
      }
      case VHOST_USER.SET_MEM_TABLE:
        return this.#setMemTable(p, v, fds);
      case VHOST_USER.SET_VRING_NUM: {
        const st = state();
        const n = st.num;
        if (n < 1 || n > this.device.maxQueueSize || (n & (n - 1)) !== 0) {
          throw new Refused(
            `SET_VRING_NUM ${n} for ring ${st.index} (powers of two up to ${this.device.maxQueueSize})`,
          );
        }
        this.rings[st.index].size = n;
        return;
      }
      case VHOST_USER.SET_VRING_BASE: {
        const st = state();
        if (st.num > 0xffff) throw new Refused(`SET_VRING_BASE ${st.num}`);
        this.rings[st.index].base = st.num;
        return;
      }
      case VHOST_USER.SET_VRING_ADDR: {
        if (p.length !== 40) throw new Refused(`${name}: payload of ${p.length} bytes`);
        const i = this.#ring(v.getUint32(0, true));
        const r = this.rings[i];
        r.addr = {
          desc: v.getBigUint64(8, true),
          used: v.getBigUint64(16, true),
          avail: v.getBigUint64(24, true),
        };
        this.#unready(r);
        this.#update(r, i);
        this.device.ringsChanged(this);
        return;
      }
      case VHOST_USER.SET_VRING_KICK:
      case VHOST_USER.SET_VRING_CALL:
      case VHOST_USER.SET_VRING_ERR: {
        const sel = u64();
        const i = this.#ring(Number(sel & BigInt(VRING_INDEX_MASK)));
        const noFd = (sel & BigInt(VRING_NOFD)) !== 0n;
        if (!noFd && fds.length !== 1) throw new Refused(`${name}: ${fds.length} descriptors, expected 1`);
        if (req === VHOST_USER.SET_VRING_ERR) return; // errors are logged here, not signalled
        const fd = noFd ? -1 : fds.shift()!;
        const r = this.rings[i];
        if (req === VHOST_USER.SET_VRING_CALL) {
          this.#setFd(r, "callFd", fd);
          return;
        }
        if (fd >= 0) {
          const s = shim();
          const fl = Number(s.kvs_fcntl(fd, F_GETFL, 0));
          if (fl >= 0) s.kvs_fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        } else {this.log(
            `ring ${i}: no kick descriptor (polling mode is not supported); served on host input only`,
          );}
        this.#unready(r);
        this.#setFd(r, "kickFd", fd);
        r.started = true;
        if (!this.#protocolNegotiated) r.enabled = true;
        this.#update(r, i);
        this.device.ringsChanged(this);
        return;
      }
      case VHOST_USER.SET_VRING_ENABLE: {
        const st = state();
        const r = this.rings[st.index];
        r.enabled = st.num !== 0;
        if (!r.enabled) {
          if (r.queue) r.base = r.queue.lastAvailIdx;
          this.#unready(r);
        } else this.#update(r, st.index);
        this.device.ringsChanged(this);
        return;
      }
      default:
        throw new Refused(`${name} is not implemented by this back-end`);
    }
  }

  #ring(index: number): number {
    if (index >= this.rings.length) throw new Refused(`ring ${index} (the device has ${this.rings.length})`);
    return index;
  }

  #setMemTable(p: Uint8Array, v: DataView, fds: number[]): void {
    if (p.length < 8) throw new Refused(`SET_MEM_TABLE: payload of ${p.length} bytes`);
    const n = v.getUint32(0, true);
    if (n < 1 || n > MAX_MEM_REGIONS || p.length !== 8 + 32 * n || fds.length !== n) {
      throw new Refused(`SET_MEM_TABLE: ${n} regions in ${p.length} bytes with ${fds.length} descriptors`);
    }
    const s = shim();
    const maps: Mapped[] = [];
    try {
      for (let k = 0; k < n; k++) {
        const o = 8 + 32 * k;
        const gpa = v.getBigUint64(o, true), size = v.getBigUint64(o + 8, true);
        const userAddr = v.getBigUint64(o + 16, true), offset = v.getBigUint64(o + 24, true);
        if (size === 0n || gpa + size > TWO53 || offset + size > TWO53 || userAddr + size > 2n ** 64n) {
          throw new Refused(`SET_MEM_TABLE: region ${k} (gpa 0x${gpa.toString(16)}, ${size} bytes)`);
        }
        // A mapping past the end of the file would fault (SIGBUS) on first touch.
        const fileSize = Number(s.kvs_fd_size(fds[k]));
        if (fileSize < 0 || BigInt(fileSize) < offset + size) {
          throw new Refused(
            `SET_MEM_TABLE: region ${k} needs ${offset + size} bytes, its file has ${fileSize}`,
          );
        }
        const addr = BigInt(s.kvs_mmap(0, Number(size), PROT_RW, MAP_SHARED, fds[k], Number(offset)));
        if (addr < 0n) throw new Refused(`SET_MEM_TABLE: mmap region ${k}: errno ${-addr}`);
        maps.push({ gpa: Number(gpa), size: Number(size), userAddr, hostAddr: addr });
      }
      maps.sort((a, b) => a.gpa - b.gpa);
      for (let k = 1; k < maps.length; k++) {
        if (maps[k].gpa < maps[k - 1].gpa + maps[k - 1].size) {
          throw new Refused("SET_MEM_TABLE: overlapping regions");
        }
      }
    } catch (e) {
      for (const m of maps) s.kvs_munmap(m.hostAddr, m.size);
      throw e;
    }
    // Rings stay where they are in guest memory; their queues are rebuilt over the new mappings.
    for (const r of this.rings) {
      if (r.queue) r.base = r.queue.lastAvailIdx;
      this.#unready(r);
    }
    this.#unmapAll();
    this.#maps = maps;
    this.memory = GuestMemory.fromHost(maps);
    this.#rebuild();
  }

  #unmapAll(): void {
    for (const m of this.#maps) shim().kvs_munmap(m.hostAddr, m.size);
    this.#maps = [];
    this.memory = null;
  }

  /** The guest address of front-end address `ua` (the start of `len` bytes in one region), or -1. */
  #gpaOf(ua: bigint, len: number): number {
    for (const m of this.#maps) {
      if (ua >= m.userAddr && ua + BigInt(len) <= m.userAddr + BigInt(m.size)) {
        return m.gpa + Number(ua - m.userAddr);
      }
    }
    return -1;
  }

  /** Rebuilds every ring's queue (memory or features changed) and tells the device. */
  #rebuild(): void {
    this.rings.forEach((r, i) => {
      if (r.queue) r.base = r.queue.lastAvailIdx;
      this.#unready(r);
      this.#update(r, i);
    });
    this.device.ringsChanged(this);
  }

  /** Makes ring i ready if everything it needs is there (a bad ring is logged and left stopped). */
  #update(r: Vring, i: number): void {
    if (r.queue || !r.started || !r.enabled || !r.addr || !this.memory || r.size === 0) return;
    const eventIdx = (this.ackedFeatures & featureBit(F.EVENT_IDX)) !== 0n;
    const indirect = (this.ackedFeatures & featureBit(F.INDIRECT_DESC)) !== 0n;
    const desc = this.#gpaOf(r.addr.desc, 16 * r.size);
    const avail = this.#gpaOf(r.addr.avail, 6 + 2 * r.size);
    const used = this.#gpaOf(r.addr.used, 6 + 8 * r.size);
    if (desc < 0 || avail < 0 || used < 0) {
      this.log(`ring ${i}: its addresses are not in the memory table; the ring stays stopped`);
      return;
    }
    try {
      r.queue = new SplitQueue(this.memory, {
        size: r.size,
        descAddr: desc,
        driverAddr: avail,
        deviceAddr: used,
      }, {
        eventIdx,
        indirect,
        lastAvailIdx: r.base,
        nextUsedIdx: r.base,
      });
    } catch (e) {
      this.log(`ring ${i}: ${(e as Error).message}; the ring stays stopped`);
      return;
    }
    if (r.kickFd >= 0) {
      const rc = Number(shim().kvs_epoll_ctl(this.epfd, EPOLL_CTL_ADD, r.kickFd, EPOLLIN, i));
      if (rc < 0) this.log(`ring ${i}: epoll_ctl on its kick: errno ${-rc}`);
      else r.polled = r.kickFd;
      // A kick may have come before the ring was ready: look at it once.
      shim().kvs_write_i32(r.kickFd, this.#one, 8);
    }
  }

  #unready(r: Vring): void {
    r.queue = null;
    if (r.polled >= 0) {
      shim().kvs_epoll_ctl(this.epfd, EPOLL_CTL_DEL, r.polled, 0, 0);
      r.polled = -1;
    }
  }

  #setFd(r: Vring, which: "kickFd" | "callFd", fd: number): void {
    if (which === "kickFd" && r.polled >= 0) this.#unready(r);
    if (r[which] >= 0) shim().kvs_close(r[which]);
    r[which] = fd;
  }

  #closeFds(fds: number[]): void {
    for (const fd of fds) shim().kvs_close(fd);
    fds.length = 0;
  }

  // ------------------------------------------------------------------ plumbing

  #reply(req: number, payload: Uint8Array): void {
    const msg = encodeMessage(req, payload, FLAG_REPLY);
    const deadline = performance.now() + this.timeoutMs;
    let off = 0;
    while (off < msg.length) {
      const part = msg.subarray(off);
      const r = Number(shim().kvs_send_fds(this.fd, part, part.length, null, 0));
      if (r >= 0) off += r;
      else if (r === -EAGAIN) this.#wait(deadline, 4 /* POLLOUT */);
      else if (r !== -EINTR) throw new Error(`${requestName(req)}: send failed (errno ${-r})`);
    }
  }

  #wait(deadline: number, events: number): void {
    const left = deadline - performance.now();
    if (left <= 0) throw new Error(`the front-end stalled for ${this.timeoutMs} ms within a message`);
    shim().kvs_poll1(this.fd, events, Math.ceil(left));
  }

  /**
   * Reads exactly buf.length bytes, keeping descriptors that come along. `first`: nothing read yet of
   * this message, so EAGAIN before any byte means there was nothing (returns false).
   */
  #readExact(buf: Uint8Array, deadline: number, first: boolean): boolean {
    const s = shim();
    let off = 0;
    while (off < buf.length) {
      this.#fdSlots[0] = 0;
      const part = buf.subarray(off);
      const r = Number(s.kvs_recv_fds(this.fd, part, part.length, this.#fdSlots, MAX_FDS));
      const nfd = this.#fdSlots[0];
      if (nfd < 0) throw new Error("a message carried more descriptors than the protocol allows");
      for (let i = 0; i < nfd; i++) this.#fds.push(this.#fdSlots[1 + i]);
      if (r > 0) off += r;
      else if (r === 0) throw new Error("closed");
      else if (r === -EAGAIN) {
        if (first && off === 0) return false;
        this.#wait(deadline, POLLIN);
      } else if (r !== -EINTR) throw new Error(`receive failed (errno ${-r})`);
    }
    return true;
  }
}
