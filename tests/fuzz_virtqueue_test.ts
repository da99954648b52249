/**
 * Virtqueue fuzzer over every device handler that processes guest rings — blk, rng, pmem, virtio-mem,
 * balloon, virtio-net (transmitq, receiveq with and without mergeable buffers, control queue),
 * virtio-console (transmitq, receiveq) and virtio-vsock (rx, tx and event queues): random rings built the
 * way a hostile driver would (descriptor tables with wild addresses, lengths, flags and loops, indirect
 * tables, avail indices far ahead), run through each device, with an independent reference check:
 *
 * - nothing escapes as an exception (a guest-controlled ring must never kill a device worker);
 * - the device writes guest memory only inside descriptors the driver marked device-writable (any table,
 *   direct or indirect) or the used ring: every other byte is compared before and after, and so are
 *   guard areas either side of guest memory;
 * - every used length is at most the writable bytes of the whole table (a device never claims more than
 *   the driver offered).
 *
 * Guest memory is a real host mapping (mmap), so the handlers that give the kernel host addresses (net,
 * vsock) really readv/writev into it. Backends, real where they can run:
 * - net: a real AF_UNIX stream socket pair (the shim has no socketpair(2): a listener in a temporary
 *   directory, a connect and an accept) driven through the production TapBackend; transmitted frames
 *   are writev'd into it, received ones readv'd from bytes written to the other end beforehand. A stream
 *   keeps no frame boundaries, so a readv fills what the chains offer and never reports a truncated
 *   frame as a tap does (virtio_net_test.ts covers that). The control queue's handler (set queue pairs,
 *   set offloads) is a minimal in-process object answering yes or no.
 * - console: output to /dev/null through a real fd (sometimes a sink that throws); input is the real
 *   ConsoleInput ring, filled beforehand.
 * - vsock: real UNIX sockets in a temporary directory, the device's listener and one at PATH_5000 for
 *   guest-initiated connections. Each episode makes a device and first runs a well-formed prelude on
 *   private rings below 0x4000 (outside the fuzzed payload): host CONNECTs with data behind them, the
 *   guest's RESPONSEs, a guest-initiated REQUEST, packets that earn RSTs and credit updates; then the
 *   fuzzed queue is served, so the rx pass writes headers and host data into hostile buffers, and the tx
 *   pass reads packets whose headers name live connections. Every episode closes its descriptors; the
 *   test checks /proc/self/fd after the run.
 *
 * Host data is 0xa5 bytes, so a device write that lands on a descriptor table (a writable buffer may
 * overlap one) turns it into descriptors outside guest memory rather than new writable buffers.
 *
 * `make test` runs a bounded number of episodes (DVMM_FUZZ_EPISODES, default 3000, seeded, so a failure
 * names its seed and replays); `make fuzz` runs many more and prints the counts.
 */
import assert from "node:assert/strict";
import { type Seeded, seeded } from "./helpers/seeded.ts";
import { FakeDriverQueue, type VsockHeader, writeVsockHeader } from "./virtio_driver.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { check, cstr, hostBytes, shim } from "../ffi/shim.ts";
import { accept, closeFd, unixListen } from "../ffi/socket.ts";
import { type HostMapping, mapAnonymous, unmap } from "../ffi/kvm.ts";
import { ringSizes, SplitQueue } from "../devices/virtio/queue.ts";
import { BlkDevice, MemoryDisk } from "../devices/virtio/blk.ts";
import { RngDevice } from "../devices/virtio/rng.ts";
import { PmemDevice } from "../devices/virtio/pmem.ts";
import { memConfigSpace, VirtioMemDevice } from "../devices/virtio/mem.ts";
import { BalloonDevice } from "../devices/virtio/balloon.ts";
import { DEFAULT_MTU, MAX_GSO_FRAME, NetControl, NetDevice, netFeatures } from "../devices/virtio/net.ts";
import { TapBackend } from "../devices/virtio/device_net.ts";
import { ConsoleDevice, ConsoleInput } from "../devices/virtio/console.ts";
import {
  VSOCK_BUF_ALLOC,
  VSOCK_EVENT_QUEUE,
  VSOCK_HDR_SIZE,
  VSOCK_HOST_CID,
  VSOCK_OP,
  VSOCK_RX_QUEUE,
  VSOCK_TX_QUEUE,
  VSOCK_TYPE_STREAM,
  VsockDevice,
} from "../devices/virtio/vsock.ts";
import {
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";

const MEM_SIZE = 0x20000;
/** Bytes of the mapping either side of guest memory, which nothing may write. */
const GUARD = 0x10000;
const RING = 0x1000;
const QSIZE = 16;
/** Random payload (and every non-wild buffer) from here up; below it only rings. */
const PAYLOAD = 0x4000;
const SHUT_WR = 1;
/** Host-side data: 0xa5 bytes. */
const A5 = new Uint8Array(0x20000).fill(0xa5);
const enc = new TextEncoder();

/** A descriptor of the fuzzed ring (main table or an indirect table it points at). */
interface Buf {
  addr: number;
  len: number;
  flags: number;
}

/** What a device gets to set up an episode. */
interface Ctx {
  r: Seeded;
  /** Every descriptor of the fuzzed ring, for devices that shape request headers into its buffers. */
  bufs: Buf[];
  /** Runs after the episode (last deferred first), also when it failed. */
  defer(fn: () => void): void;
  host: Host;
}

type Device = {
  name: string;
  /** Chance of the WRITE flag on a random descriptor (receive queues want mostly writable chains). */
  wBias?: number;
  make: (mem: GuestMemory, ctx: Ctx) => (q: SplitQueue) => void;
};

/** Host resources shared by a run's episodes (created on first use, closed at the end). */
class Host {
  #dir = "";
  #pairListen = -1;
  #vsockListen = -1;
  #vsockPeerListen = -1;
  #devNull: Deno.FsFile | null = null;

  get dir(): string {
    if (this.#dir === "") this.#dir = Deno.makeTempDirSync({ prefix: "dvmm-fuzz-vq-" });
    return this.#dir;
  }

  /** A connected pair of non-blocking AF_UNIX stream sockets; the caller closes both. */
  pair(): [number, number] {
    const path = `${this.dir}/pair.sock`;
    if (this.#pairListen < 0) this.#pairListen = unixListen(path);
    const a = check(shim().kvs_unix_connect_nb(cstr(path)), "connect (socket pair)");
    const b = accept(this.#pairListen);
    if (b === null) {
      closeFd(a);
      throw new Error("socket pair: the connection did not arrive");
    }
    return [a, b];
  }

  /** The vsock device's listener, and the host listener for guest-initiated connections to VS_PEER_PORT. */
  vsock(): { path: string; listenFd: number; peerFd: number } {
    const path = `${this.dir}/v.sock`;
    if (this.#vsockListen < 0) {
      this.#vsockListen = unixListen(path);
      this.#vsockPeerListen = unixListen(`${path}_${VS_PEER_PORT}`);
    }
    return { path, listenFd: this.#vsockListen, peerFd: this.#vsockPeerListen };
  }

  devNull(): Deno.FsFile {
    return this.#devNull ??= Deno.openSync("/dev/null", { write: true });
  }

  close(): void {
    for (const fd of [this.#pairListen, this.#vsockListen, this.#vsockPeerListen]) if (fd >= 0) closeFd(fd);
    this.#pairListen = this.#vsockListen = this.#vsockPeerListen = -1;
    this.#devNull?.close();
    this.#devNull = null;
    if (this.#dir !== "") Deno.removeSync(this.#dir, { recursive: true });
    this.#dir = "";
  }
}

/** Writes n bytes of 0xa5 (what fits: the sockets are non-blocking). */
function sendA5(fd: number, n: number): void {
  for (let off = 0; off < n;) {
    const part = A5.subarray(0, Math.min(n - off, A5.length));
    const k = shim().kvs_write_i32(fd, part, part.length);
    if (k <= 0) return;
    off += k;
  }
}

function send(fd: number, bytes: Uint8Array<ArrayBuffer>): void {
  shim().kvs_write_i32(fd, bytes, bytes.length);
}

/** Accepts and closes whatever waits on a listener. */
function drain(listenFd: number): void {
  for (let fd = accept(listenFd); fd !== null; fd = accept(listenFd)) closeFd(fd);
}

function inPayload(addr: number, len: number): boolean {
  return addr >= PAYLOAD && addr + len <= MEM_SIZE;
}

// ------------------------------------------------------------------ vsock

const VS_CID = 3;
/** Guest-initiated connections to this host port reach a listener (others find nobody: RST). */
const VS_PEER_PORT = 5000;

/** A header the vsock prelude writes: from the guest (VS_CID). */
type VsockHdr = Omit<VsockHeader, "srcCid">;

function writeVsockHdr(mem: GuestMemory, at: number, h: VsockHdr): void {
  writeVsockHeader(mem, at, { srcCid: VS_CID, ...h });
}

/** The well-formed driver of the vsock prelude: its own rx and tx rings and buffers in [0x2000, 0x3000). */
class VsockPrelude {
  static readonly RX_BUFS = 0x2800;
  static readonly TX_HDRS = 0x2c00;
  readonly rxd: FakeDriverQueue;
  readonly txd: FakeDriverQueue;
  readonly rx: SplitQueue;
  readonly tx: SplitQueue;
  sent = 0;

  constructor(readonly mem: GuestMemory) {
    this.rxd = new FakeDriverQueue(mem, 0x2000, 8);
    this.txd = new FakeDriverQueue(mem, 0x2400, 16);
    this.rx = new SplitQueue(mem, this.rxd.config);
    this.tx = new SplitQueue(mem, this.txd.config);
    for (let i = 0; i < 8; i++) {
      this.rxd.setDesc(i, VsockPrelude.RX_BUFS + 0x80 * i, 0x80, W);
      this.rxd.publish(i);
    }
  }

  /** Headers of the packets the device put on the prelude's rx ring. */
  received(): { op: number; srcPort: number; dstPort: number }[] {
    const out = [];
    for (let i = 0; i < this.rxd.usedIdx(); i++) {
      const at = VsockPrelude.RX_BUFS + 0x80 * (this.rxd.used(i).id % 8);
      out.push({
        op: this.mem.readU16(at + 30),
        srcPort: this.mem.readU32(at + 16),
        dstPort: this.mem.readU32(at + 20),
      });
    }
    return out;
  }

  send(h: VsockHdr): void {
    if (this.sent === 16) return;
    const at = VsockPrelude.TX_HDRS + 0x40 * this.sent;
    writeVsockHdr(this.mem, at, h);
    this.txd.setDesc(this.sent, at, VSOCK_HDR_SIZE);
    this.txd.publish(this.sent++);
  }
}

/** A vsock episode that ends by serving queue `queue` over the fuzzed ring. */
function vsockEpisode(queue: number): Device["make"] {
  return (mem, { r, bufs, defer, host }) => {
    const v = host.vsock();
    const ours: number[] = [];
    defer(() => {
      for (const fd of ours) closeFd(fd);
      drain(v.listenFd);
      drain(v.peerFd);
    });
    const dev = new VsockDevice(mem, { cid: VS_CID, path: v.path, listenFd: v.listenFd });
    defer(() => dev.close());
    if (r.chance(0.95)) dev.activate(0n);
    const connect = (line: string): number => {
      const fd = Number(shim().kvs_unix_connect_nb(cstr(v.path)));
      if (fd < 0) return -1;
      ours.push(fd);
      send(fd, enc.encode(line));
      return fd;
    };
    const credit = () => r.chance(0.15) ? 0 : r.chance(0.5) ? r.below(0x1000) : VSOCK_BUF_ALLOC;
    // Host-initiated connections (data may follow the line, or end of stream), announced on the prelude's rx.
    const hosts: number[] = [];
    for (let i = r.below(5); i > 0; i--) {
      const line = r.chance(0.9) ? `CONNECT ${1024 + r.below(8)}\n` : r.chance(0.5) ? "CONNECT x\n" : "hello";
      const fd = connect(line);
      if (fd < 0) continue;
      if (r.chance(0.7)) sendA5(fd, r.below(0x3000));
      if (r.chance(0.15)) shim().kvs_shutdown(fd, SHUT_WR);
      hosts.push(fd);
    }
    const pre = new VsockPrelude(mem);
    dev.service(pre.rx, VSOCK_RX_QUEUE);
    // The guest's answers, and packets that leave work for the rx queue. pairs: (guest port, host port).
    const pairs: [number, number][] = [];
    for (const p of pre.received()) {
      if (p.op !== VSOCK_OP.REQUEST) continue;
      if (r.chance(0.85)) {
        pre.send({ srcPort: p.dstPort, dstPort: p.srcPort, op: VSOCK_OP.RESPONSE, bufAlloc: credit() });
        pairs.push([p.dstPort, p.srcPort]);
      } else if (r.chance(0.5)) pre.send({ srcPort: p.dstPort, dstPort: p.srcPort, op: VSOCK_OP.RST });
    }
    if (r.chance(0.6)) {
      pre.send({ srcPort: 77, dstPort: VS_PEER_PORT, op: VSOCK_OP.REQUEST, bufAlloc: credit() });
      pairs.push([77, VS_PEER_PORT]);
    }
    if (r.chance(0.3)) pre.send({ srcPort: 78, dstPort: 4242, op: VSOCK_OP.REQUEST }); // nobody there
    if (r.chance(0.3)) pre.send({ srcPort: 79, dstPort: 4343, op: VSOCK_OP.RW }); // no such connection
    for (const [g, h] of pairs) {
      if (r.chance(0.3)) {
        pre.send({ srcPort: g, dstPort: h, op: VSOCK_OP.CREDIT_REQUEST, bufAlloc: credit() });
      }
    }
    if (pre.sent > 0) dev.service(pre.tx, VSOCK_TX_QUEUE);
    // The host ends of guest-initiated connections, more host data, late host connections.
    for (let fd = accept(v.peerFd); fd !== null; fd = accept(v.peerFd)) {
      ours.push(fd);
      if (r.chance(0.8)) sendA5(fd, r.below(0x3000));
      if (r.chance(0.15)) shim().kvs_shutdown(fd, SHUT_WR);
    }
    for (const fd of hosts) if (r.chance(0.4)) sendA5(fd, r.below(0x2000));
    if (r.chance(0.3)) connect("CONNECT 7\n");
    if (queue === VSOCK_TX_QUEUE) {
      // Packet headers at the start of readable buffers, mostly naming live connections.
      for (const b of bufs) {
        if (b.flags & W || !inPayload(b.addr, VSOCK_HDR_SIZE) || !r.chance(0.7)) continue;
        const [g, h] = pairs.length > 0 && r.chance(0.8)
          ? pairs[r.below(pairs.length)]
          : [r.below(100), r.below(100)];
        writeVsockHdr(mem, b.addr, {
          srcPort: g,
          dstPort: h,
          op: r.chance(0.4) ? VSOCK_OP.RW : r.chance(0.9) ? 1 + r.below(7) : r.below(0x10000),
          len: r.chance(0.5)
            ? r.below(Math.max(1, b.len - VSOCK_HDR_SIZE + 1)) // data in the same buffer
            : r.chance(0.3)
            ? 0
            : r.chance(0.8)
            ? r.below(0x4000)
            : r.u32(),
          type: r.chance(0.9) ? VSOCK_TYPE_STREAM : r.below(4),
          flags: r.below(4),
          bufAlloc: credit(),
          fwdCnt: r.chance(0.8) ? r.below(0x100) : r.u32(),
          dstCid: r.chance(0.9) ? VSOCK_HOST_CID : r.u32(),
        });
      }
    }
    return (q) => void dev.service(q, queue);
  };
}

// ------------------------------------------------------------------ the devices

const DEVICES: Device[] = [
  {
    name: "blk",
    make: () => {
      const d = new BlkDevice(new MemoryDisk(64 * 512, false, "fuzz"));
      return (q) => void d.processQueue(q);
    },
  },
  {
    name: "rng",
    make: () => {
      const d = new RngDevice({ fill: (b: Uint8Array) => b.fill(0x42) } as never);
      return (q) => void d.processQueue(q);
    },
  },
  {
    name: "pmem",
    make: () => {
      const d = new PmemDevice({ flush() {} });
      return (q) => void d.service(q);
    },
  },
  {
    name: "virtio-mem",
    make: () => {
      const cfg = new DataView(
        memConfigSpace({ addr: 0x1_0000_0000, regionSize: 64 << 20, requested: 8 << 20 }).buffer,
      );
      const d = new VirtioMemDevice({
        read: (o) => Number(cfg.getBigUint64(o, true)),
        write: (o, v) => cfg.setBigUint64(o, BigInt(v), true),
      }, { discard: () => true });
      return (q) => void d.service(q);
    },
  },
  {
    name: "balloon",
    make: (mem) => {
      const d = new BalloonDevice({ release: () => true }, mem);
      return (q) => void d.service(q, 0);
    },
  },
  {
    name: "net-tx",
    wBias: 0.15,
    make: (_mem, { defer, host }) => {
      const [a, b] = host.pair();
      defer(() => (closeFd(a), closeFd(b)));
      const d = new NetDevice(new TapBackend(a));
      return (q) => void d.processTx(q);
    },
  },
  {
    name: "net-rx",
    wBias: 0.85,
    make: (_mem, { r, defer, host }) => {
      const [a, b] = host.pair();
      defer(() => (closeFd(a), closeFd(b)));
      const d = new NetDevice(new TapBackend(b));
      d.configure(r.chance(0.5), r.chance(0.5) ? DEFAULT_MTU + 18 : MAX_GSO_FRAME);
      for (let i = r.below(5); i > 0; i--) sendA5(a, r.chance(0.2) ? r.below(0x12000) : r.below(0x2000));
      if (r.chance(0.1)) shim().kvs_shutdown(a, SHUT_WR); // end of stream: readv returns 0
      return (q) => void d.processRx(q, { irq: false });
    },
  },
  {
    name: "net-ctrl",
    make: (mem, { r, bufs }) => {
      const yes = () => r.chance(0.8);
      const c = new NetControl(1 + r.below(4), { setQueuePairs: yes, setGuestOffloads: yes });
      c.features = r.chance(0.9)
        ? netFeatures({ csum: r.chance(0.7), tso: r.chance(0.5), ufo: r.chance(0.5) })
        : (BigInt(r.u32()) << 32n) | BigInt(r.u32());
      // Commands with a known class and command at the start of readable buffers.
      for (const b of bufs) {
        if (b.flags & W || !inPayload(b.addr, 2) || !r.chance(0.7)) continue;
        mem.writeU8(b.addr, r.below(7));
        mem.writeU8(b.addr + 1, r.below(3));
      }
      return (q) => void c.process(q);
    },
  },
  {
    name: "console-tx",
    wBias: 0.15,
    make: (_mem, { r, host }) => {
      const out = host.devNull();
      const sink = r.chance(0.1)
        ? {
          write(): void {
            throw new Error("output failed");
          },
        }
        : { write: (b: Uint8Array) => void out.writeSync(b) };
      const d = new ConsoleDevice(sink, new ConsoleInput(ConsoleInput.create(1 << 12)));
      return (q) => void d.processTx(q);
    },
  },
  {
    name: "console-rx",
    wBias: 0.85,
    make: (_mem, { r }) => {
      const input = new ConsoleInput(ConsoleInput.create(1 << 15));
      input.push(A5.subarray(0, r.chance(0.2) ? r.below(1 << 15) : r.below(0x1000)));
      const d = new ConsoleDevice({ write() {} }, input);
      return (q) => void d.processRx(q);
    },
  },
  { name: "vsock-rx", wBias: 0.85, make: vsockEpisode(VSOCK_RX_QUEUE) },
  { name: "vsock-tx", wBias: 0.15, make: vsockEpisode(VSOCK_TX_QUEUE) },
  { name: "vsock-event", wBias: 0.85, make: vsockEpisode(VSOCK_EVENT_QUEUE) },
];

/** A random descriptor: mostly inside memory, sometimes anywhere; random flags and next. */
function randomDesc(r: Seeded, wBias: number) {
  const wild = r.chance(0.1);
  const addr = wild ? r.u32() * (r.chance(0.5) ? 2 ** 20 : 1) : PAYLOAD + r.below(MEM_SIZE - PAYLOAD);
  const len = r.chance(0.1) ? r.u32() : r.below(r.chance(0.5) ? 64 : 0x3000);
  let flags = 0;
  if (r.chance(0.5)) flags |= NEXT;
  if (r.chance(wBias)) flags |= W;
  if (r.chance(0.08)) flags |= INDIRECT;
  if (r.chance(0.02)) flags |= r.below(0x10000);
  return { addr, len, flags, next: r.chance(0.9) ? r.below(QSIZE) : r.below(0x10000) };
}

function writeDesc(mem: GuestMemory, at: number, d: ReturnType<typeof randomDesc>): void {
  if (!mem.contains(at, 16)) return;
  mem.writeU64(at, d.addr);
  mem.writeU32(at + 8, d.len >>> 0);
  mem.writeU16(at + 12, d.flags & 0xffff);
  mem.writeU16(at + 14, d.next & 0xffff);
}

/** Every descriptor of the table at descAddr and of the indirect tables it points at, as they are now. */
function tableDescs(mem: GuestMemory, descAddr: number): Buf[] {
  const out: Buf[] = [];
  const visit = (table: number, count: number, depth: number) => {
    for (let i = 0; i < count; i++) {
      const o = table + 16 * i;
      if (!mem.contains(o, 16)) return;
      const addr = Number(mem.readU64Big(o));
      const len = mem.readU32(o + 8);
      const flags = mem.readU16(o + 12);
      out.push({ addr, len, flags });
      if (flags & INDIRECT && depth === 0 && addr < MEM_SIZE) {
        visit(addr, Math.min(Math.floor(len / 16), 256), 1);
      }
    }
  };
  visit(descAddr, QSIZE, 0);
  return out;
}

/** Marks the bytes the device may write: every writable descriptor (direct or in an indirect table). */
function allowedWrites(descs: Buf[], usedAddr: number, usedLen: number): Uint8Array {
  const ok = new Uint8Array(MEM_SIZE);
  const mark = (addr: number, len: number) => {
    const end = Math.min(MEM_SIZE, addr + len);
    for (let i = Math.max(0, addr); i < end; i++) ok[i] = 1;
  };
  mark(usedAddr, usedLen);
  for (const d of descs) if (d.flags & W) mark(d.addr, d.len);
  return ok;
}

function writableTotal(descs: Buf[]): number {
  let total = 0;
  for (const d of descs) if (d.flags & W) total += d.len;
  return total;
}

/** Per-device counts: episodes, used chains, rings refused as broken, episodes that wrote into buffers. */
type Counts = { episodes: number; chains: number; broken: number; wrote: number };

/** Runs `episodes` random episodes against every device; returns counts (in all and per device). */
export function fuzzVirtqueues(seed: number, episodes: number, devices: Device[] = DEVICES) {
  const counts = { episodes: 0, chains: 0, broken: 0, perDevice: {} as Record<string, Counts> };
  for (const d of devices) counts.perDevice[d.name] = { episodes: 0, chains: 0, broken: 0, wrote: 0 };
  const host = new Host();
  let mapping: HostMapping | null = null;
  try {
    mapping = mapAnonymous(MEM_SIZE + 2 * GUARD);
    const whole = hostBytes(mapping.hostAddr, MEM_SIZE + 2 * GUARD);
    const guards = [
      new Uint32Array(whole.buffer, 0, GUARD / 4),
      new Uint32Array(whole.buffer, GUARD + MEM_SIZE, GUARD / 4),
    ];
    const mem = GuestMemory.fromHost([
      { gpa: 0, size: MEM_SIZE, hostAddr: mapping.hostAddr + BigInt(GUARD) },
    ]);
    for (let e = 0; e < episodes; e++) {
      const dev = devices[e % devices.length];
      const s = seed + e;
      const r = seeded(s);
      const sizes = ringSizes(QSIZE);
      const descAddr = RING, driverAddr = RING + sizes.desc;
      const deviceAddr = (driverAddr + sizes.avail + 3) & ~3;
      // Rings start zeroed, random payload bytes everywhere else (requests read from here), then the tables.
      mem.fill(0, PAYLOAD, 0);
      for (let i = PAYLOAD; i < MEM_SIZE; i += 4) mem.writeU32(i, r.u32());
      const wBias = dev.wBias ?? 0.5;
      for (let i = 0; i < QSIZE; i++) writeDesc(mem, descAddr + 16 * i, randomDesc(r, wBias));
      for (let t = 0; t < 3; t++) {
        const table = 0x8000 + r.below(0x10000);
        for (let i = 0; i < 8; i++) writeDesc(mem, table + 16 * i, randomDesc(r, wBias));
      }
      const avail = r.chance(0.1) ? r.below(0x10000) : r.below(QSIZE * 2);
      mem.writeU16(driverAddr, r.below(2));
      mem.writeU16(driverAddr + 2, avail);
      for (let i = 0; i < QSIZE; i++) {
        mem.writeU16(driverAddr + 4 + 2 * i, r.chance(0.9) ? r.below(QSIZE) : r.below(0x10000));
      }
      const q = new SplitQueue(mem, { size: QSIZE, descAddr, driverAddr, deviceAddr }, {
        eventIdx: r.chance(0.5),
        indirect: true,
      });
      const cleanups: (() => void)[] = [];
      try {
        let run: (q: SplitQueue) => void;
        try {
          run = dev.make(mem, {
            r,
            bufs: tableDescs(mem, descAddr),
            defer: (fn) => void cleanups.push(fn),
            host,
          });
        } catch (err) {
          throw new Error(`${dev.name}, seed ${s}: setting up the episode failed: ${(err as Error).stack}`);
        }
        // The reference: the tables as the device will find them (set-up may have shaped buffers).
        const descs = tableDescs(mem, descAddr);
        const allowed = allowedWrites(descs, deviceAddr, sizes.used);
        const before = mem.read(0, MEM_SIZE).slice();
        const writable = writableTotal(descs);
        const usedBefore = mem.readU16(deviceAddr + 2);
        try {
          run(q);
        } catch (err) {
          throw new Error(`${dev.name}, seed ${s}: the handler threw: ${(err as Error).stack}`);
        }
        const after = mem.read(0, MEM_SIZE);
        let wrote = false;
        for (let i = 0; i < MEM_SIZE; i++) {
          if (before[i] === after[i]) continue;
          if (!allowed[i]) {
            throw new Error(
              `${dev.name}, seed ${s}: wrote byte 0x${i.toString(16)} outside every writable descriptor`,
            );
          }
          if (i < deviceAddr || i >= deviceAddr + sizes.used) wrote = true;
        }
        for (const g of guards) {
          for (let i = 0; i < g.length; i++) {
            if (g[i] !== 0) throw new Error(`${dev.name}, seed ${s}: wrote outside guest memory`);
          }
        }
        const produced = (mem.readU16(deviceAddr + 2) - usedBefore) & 0xffff;
        for (let k = 0; k < Math.min(produced, QSIZE); k++) {
          const len = mem.readU32(deviceAddr + 4 + 8 * ((usedBefore + k) % QSIZE) + 4);
          if (len > writable) {
            throw new Error(`${dev.name}, seed ${s}: used length ${len} > ${writable} writable bytes`);
          }
        }
        const c = counts.perDevice[dev.name];
        c.episodes++;
        c.chains += produced;
        if (q.broken !== null) c.broken++;
        if (wrote) c.wrote++;
        counts.episodes++;
        counts.chains += produced;
        if (q.broken !== null) counts.broken++;
      } finally {
        for (const fn of cleanups.reverse()) fn();
      }
    }
  } finally {
    if (mapping !== null) unmap(mapping);
    host.close();
  }
  return counts;
}

function openFds(): number {
  let n = 0;
  for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
  return n;
}

Deno.test(
  "fuzz: virtqueues over blk, rng, pmem, virtio-mem, balloon, net (tx, rx, ctrl), console (tx, rx), vsock (rx, tx, event): " +
    "no throw, no write outside the driver's buffers",
  () => {
    const episodes = Number(Deno.env.get("DVMM_FUZZ_EPISODES") ?? 3000);
    const seed = Number(Deno.env.get("DVMM_FUZZ_SEED") ?? 0x5eed);
    shim();
    const fds = openFds();
    const t0 = performance.now();
    const c = fuzzVirtqueues(seed, episodes);
    const secs = (performance.now() - t0) / 1000;
    console.log(
      `virtqueue fuzzer: ${c.episodes} episodes (seed ${seed}), ${c.chains} chains completed, ` +
        `${c.broken} rings refused as broken, ${secs.toFixed(1)} s`,
    );
    console.log(
      "  per device (episodes/chains/broken/wrote into buffers): " +
        Object.entries(c.perDevice).map(([n, d]) => `${n} ${d.episodes}/${d.chains}/${d.broken}/${d.wrote}`)
          .join(", "),
    );
    assert.equal(c.episodes, episodes);
    assert.equal(openFds(), fds, "every episode closes its descriptors");
    // The receive paths must really have filled guest buffers, or the check proved nothing for them.
    if (episodes >= 1000) {
      for (const name of ["blk", "rng", "net-rx", "console-rx", "vsock-rx", "net-ctrl"]) {
        assert.ok(c.perDevice[name].wrote > 0, `${name} never wrote into a guest buffer`);
      }
    }
  },
);

Deno.test("fuzz: the reference check catches a device that writes into a device-readable buffer", () => {
  // A wrong device: it answers into the first buffer of every chain, readable or not.
  const careless: Device = {
    name: "careless",
    make: (mem) => (q) => {
      for (;;) {
        const chain = q.popChain();
        if (chain === null || q.broken !== null) break;
        if (!chain.headValid) continue;
        if (chain.readableCount > 0) chain.readable(0).fill(0xcc);
        q.pushUsed(chain.head, 0);
      }
      void mem;
    },
  };
  assert.throws(() => fuzzVirtqueues(1, 200, [careless]), /outside every writable descriptor/);
});
