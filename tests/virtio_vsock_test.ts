/**
 * virtio-vsock's device model (devices/virtio/vsock.ts) against a fake guest driver (queues in test
 * memory) and real UNIX sockets in a temporary directory: the hybrid CONNECT handshake, guest-initiated
 * connections to PATH_P, credit in both directions, the overflow ring, shutdowns, RSTs, many
 * connections, and hostile packets and buffers.
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { addressOf, cstr, EAGAIN, shim } from "../ffi/shim.ts";
import { accept, closeFd, unixListen } from "../ffi/socket.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  parseConnectLine,
  VSOCK_BUF_ALLOC,
  VSOCK_HDR_SIZE,
  VSOCK_OP as OP,
  VSOCK_RX_QUEUE,
  VSOCK_SHUTDOWN_RCV,
  VSOCK_SHUTDOWN_SEND,
  VSOCK_TX_QUEUE,
  vsockConfigSpace,
  VsockCounters,
  VsockDevice,
  vsockFeatures,
} from "../devices/virtio/vsock.ts";
import { openVsockListener } from "../devices/virtio/device_vsock.ts";
import {
  F,
  featureBit,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue, type VsockHeader, writeVsockHeader } from "./virtio_driver.ts";

const CID = 3;
const POLLIN = 1;
const RX_BUF = 4096;
const QSIZE = 64;
const RX_BASE = 0x100000; // rx chain i: header at RX_BASE + 0x2000 * i, data 0x100 after it
const TX_HDR = 0x200000;
const TX_DATA = 0x210000; // up to 1 MiB of payload
const enc = new TextEncoder();
const dec = new TextDecoder();

interface Packet {
  srcCid: number;
  dstCid: number;
  srcPort: number;
  dstPort: number;
  len: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
  data: Uint8Array;
  usedLen: number;
}

type Send = Omit<VsockHeader, "srcCid">;

/** The guest's side: its rx/tx queues in test memory and the device over them. */
class Guest {
  readonly mem: GuestMemory;
  readonly rxd: FakeDriverQueue;
  readonly txd: FakeDriverQueue;
  readonly rx: SplitQueue;
  readonly tx: SplitQueue;
  readonly dev: VsockDevice;
  readonly counters = new VsockCounters();
  readonly warnings: string[] = [];
  #freeRx: number[] = [];
  #rxSeen = 0;
  #txSeen = 0;
  irqs = 0;

  constructor(readonly dir: string, readonly listenFd: number, rxKickFd = -1) {
    const bytes = new Uint8Array(0x400000);
    this.mem = new GuestMemory([{ gpa: 0, bytes, hostAddr: addressOf(bytes) }]);
    this.rxd = new FakeDriverQueue(this.mem, 0x1000, QSIZE);
    this.txd = new FakeDriverQueue(this.mem, 0x8000, QSIZE);
    this.rx = new SplitQueue(this.mem, this.rxd.config);
    this.tx = new SplitQueue(this.mem, this.txd.config);
    for (let i = 0; i < QSIZE / 2; i++) this.#freeRx.push(2 * i);
    this.dev = new VsockDevice(this.mem, {
      cid: CID,
      path: `${dir}/v.sock`,
      listenFd,
      rxKickFd,
      counters: this.counters,
      warn: (m) => this.warnings.push(m),
    });
    this.dev.activate(0n);
  }

  /** Makes `n` rx chains (44-byte header + 4 KiB data, as Linux's driver) available. */
  addRx(n: number): void {
    for (let k = 0; k < n; k++) {
      const head = this.#freeRx.pop();
      if (head === undefined) return; // every descriptor is posted already
      const base = RX_BASE + 0x1000 * head;
      this.rxd.setDesc(head, base, VSOCK_HDR_SIZE, W | NEXT, head + 1);
      this.rxd.setDesc(head + 1, base + 0x100, RX_BUF, W);
      this.rxd.publish(head);
    }
  }

  /** Serves the rx queue (host readiness included). */
  pump(): void {
    if (this.dev.service(this.rx, VSOCK_RX_QUEUE)) this.irqs++;
  }

  /** Packets the device completed on the rx queue since the last call (their descriptors are freed). */
  take(): Packet[] {
    const out: Packet[] = [];
    while (this.#rxSeen !== this.rxd.usedIdx()) {
      const u = this.rxd.used(this.#rxSeen);
      this.#rxSeen = (this.#rxSeen + 1) & 0xffff;
      this.#freeRx.push(u.id);
      const base = RX_BASE + 0x1000 * u.id;
      const m = this.mem;
      const len = m.readU32(base + 24);
      out.push({
        srcCid: m.readU32(base),
        dstCid: m.readU32(base + 8),
        srcPort: m.readU32(base + 16),
        dstPort: m.readU32(base + 20),
        len,
        type: m.readU16(base + 28),
        op: m.readU16(base + 30),
        flags: m.readU32(base + 32),
        bufAlloc: m.readU32(base + 36),
        fwdCnt: m.readU32(base + 40),
        data: m.read(base + 0x100, Math.min(len, u.len > VSOCK_HDR_SIZE ? u.len - VSOCK_HDR_SIZE : 0)),
        usedLen: u.len,
      });
    }
    return out;
  }

  /** Rx buffers until nothing more comes, then everything that came. */
  drain(perRound = 16): Packet[] {
    const all: Packet[] = [];
    for (let i = 0; i < 10000; i++) {
      this.addRx(Math.min(perRound, this.#freeRx.length));
      this.pump();
      const got = this.take();
      if (got.length === 0) break;
      all.push(...got);
    }
    return all;
  }

  /** Sends one packet on the tx queue (header and payload in two descriptors) and serves the queue. */
  send(p: Send, payload?: Uint8Array): void {
    const m = this.mem;
    writeVsockHeader(m, TX_HDR, { srcCid: CID, ...p, len: p.len ?? payload?.length ?? 0 });
    if (payload && payload.length > 0) {
      m.write(TX_DATA, payload);
      this.txd.setDesc(0, TX_HDR, VSOCK_HDR_SIZE, NEXT, 1);
      this.txd.setDesc(1, TX_DATA, payload.length);
    } else {
      this.txd.setDesc(0, TX_HDR, VSOCK_HDR_SIZE);
    }
    this.txd.publish(0);
    this.serveTx();
  }

  /** Publishes a raw tx chain starting at descriptor `head` (set up by the caller) and serves it. */
  sendRaw(head: number): void {
    this.txd.publish(head);
    this.serveTx();
  }

  serveTx(): void {
    this.dev.service(this.tx, VSOCK_TX_QUEUE);
    assert.equal(this.txd.usedIdx(), (this.#txSeen + 1) & 0xffff, "the tx chain was completed");
    this.#txSeen = this.txd.usedIdx();
  }

  close(): void {
    this.dev.close();
  }
}

/** A blocking client socket connected to `path`. */
function connect(path: string): number {
  const fd = Number(shim().kvs_unix_connect(cstr(path)));
  assert.ok(fd >= 0, `connect ${path}: errno ${-fd}`);
  return fd;
}

function write(fd: number, bytes: Uint8Array | string): void {
  const b = typeof bytes === "string" ? enc.encode(bytes) : bytes;
  let off = 0;
  while (off < b.length) {
    const r = shim().kvs_write_i32(fd, b.subarray(off), b.length - off);
    assert.ok(r > 0, `write: ${r}`);
    off += r;
  }
}

/** Reads what is there within `ms` (null: nothing came; an empty array: end of stream). */
function readSome(fd: number, ms = 500, max = 1 << 20): Uint8Array | null {
  const s = shim();
  if (Number(s.kvs_poll1(fd, POLLIN, ms)) <= 0) return null;
  const buf = new Uint8Array(max);
  const r = s.kvs_read_i32(fd, buf, max);
  if (r === -EAGAIN) return null;
  if (r < 0) return new Uint8Array(0); // ECONNRESET: ended
  return buf.subarray(0, r);
}

function readLine(fd: number): string {
  let s = "";
  for (let i = 0; i < 64; i++) {
    const b = readSome(fd, 1000, 1);
    if (b === null || b.length === 0) break;
    s += String.fromCharCode(b[0]);
    if (b[0] === 10) break;
  }
  return s;
}

function withDevice(fn: (g: Guest, dir: string) => void): () => void {
  return () => {
    const dir = Deno.makeTempDirSync({ prefix: "dvmm-vsock-" });
    const l = openVsockListener(`${dir}/v.sock`);
    const g = new Guest(dir, l);
    try {
      fn(g, dir);
    } finally {
      g.close();
      closeFd(l);
      Deno.removeSync(dir, { recursive: true });
    }
  };
}

/** A host connection through the hybrid socket, up to the guest's RESPONSE; returns fd and host port. */
function hostConnect(
  g: Guest,
  dir: string,
  port: number,
  guestPort = port,
): { fd: number; hostPort: number } {
  const fd = connect(`${dir}/v.sock`);
  write(fd, `CONNECT ${port}\n`);
  g.addRx(1);
  g.pump();
  const [req] = g.take();
  assert.ok(req, "a REQUEST reaches the guest");
  assert.equal(req.op, OP.REQUEST);
  assert.equal(req.dstPort, port);
  g.send({ srcPort: guestPort, dstPort: req.srcPort, op: OP.RESPONSE });
  assert.equal(readLine(fd), `OK ${req.srcPort}\n`);
  return { fd, hostPort: req.srcPort };
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff;
  return b;
}

Deno.test("vsock: features, config space and the CONNECT line", () => {
  const f = vsockFeatures();
  assert.ok(f & featureBit(F.VERSION_1));
  assert.deepEqual(Array.from(vsockConfigSpace(3)), [3, 0, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual(Array.from(vsockConfigSpace(0x1_0000_0005)), [5, 0, 0, 0, 1, 0, 0, 0]);
  const p = (s: string) => parseConnectLine(enc.encode(s));
  assert.equal(p("CONNECT 1024"), 1024);
  assert.equal(p("connect 52"), 52);
  assert.equal(p("Connect  7 "), 7);
  assert.equal(p("CONNECT 4294967295"), 0xffff_ffff);
  for (
    const bad of [
      "CONNECT 4294967296",
      "CONNECT",
      "CONNECT ",
      "CONNECT -1",
      "CONNECT 1x",
      "LISTEN 5",
      "CONNECT1",
    ]
  ) {
    assert.equal(p(bad), null, bad);
  }
});

Deno.test(
  "vsock: a host connection through the socket: CONNECT, REQUEST, RESPONSE, OK, data both ways",
  withDevice((g, dir) => {
    const fd = connect(`${dir}/v.sock`);
    write(fd, "CONNECT 1024\n");
    g.addRx(4);
    g.pump();
    const [req, ...rest] = g.take();
    assert.equal(rest.length, 0);
    assert.deepEqual(
      [req.srcCid, req.dstCid, req.dstPort, req.type, req.op, req.len, req.bufAlloc, req.fwdCnt],
      [2, CID, 1024, 1, OP.REQUEST, 0, VSOCK_BUF_ALLOC, 0],
    );
    assert.ok(req.srcPort >= 2 ** 30 && req.srcPort < 2 ** 31, `host port ${req.srcPort}`);
    assert.equal(req.usedLen, VSOCK_HDR_SIZE);
    assert.equal(readSome(fd, 50), null, "no OK before the guest answers");

    g.send({ srcPort: 1024, dstPort: req.srcPort, op: OP.RESPONSE, bufAlloc: 65536 });
    assert.equal(readLine(fd), `OK ${req.srcPort}\n`);
    assert.equal(g.dev.connectionCount, 1);

    write(fd, "hello guest");
    g.pump();
    const [rw] = g.take();
    assert.equal(rw.op, OP.RW);
    assert.equal(rw.srcPort, req.srcPort);
    assert.equal(rw.dstPort, 1024);
    assert.equal(dec.decode(rw.data), "hello guest");
    assert.equal(rw.usedLen, VSOCK_HDR_SIZE + 11);

    g.send({ srcPort: 1024, dstPort: req.srcPort, op: OP.RW }, enc.encode("hello host"));
    assert.equal(dec.decode(readSome(fd)!), "hello host");
    const c = g.counters.snapshot();
    assert.deepEqual([c.rx_bytes, c.tx_bytes, c.connections, c.dropped_packets], [11, 10, 1, 0]);
    assert.ok(g.irqs > 0);

    // The guest resets the connection: the host's socket ends.
    g.send({ srcPort: 1024, dstPort: req.srcPort, op: OP.RST });
    assert.deepEqual(readSome(fd), new Uint8Array(0));
    assert.equal(g.dev.connectionCount, 0);
    assert.equal(g.counters.snapshot().connections, 0);
    closeFd(fd);
  }),
);

Deno.test(
  "vsock: bytes written right after the CONNECT line are not eaten by it; a bad line closes the socket",
  withDevice((g, dir) => {
    const fd = connect(`${dir}/v.sock`);
    write(fd, "connect 77\nearly bytes");
    g.addRx(2);
    g.pump();
    const [req] = g.take();
    assert.equal(req.op, OP.REQUEST);
    g.send({ srcPort: 77, dstPort: req.srcPort, op: OP.RESPONSE });
    assert.equal(readLine(fd), `OK ${req.srcPort}\n`);
    g.addRx(2);
    g.pump();
    const [rw] = g.take();
    assert.equal(dec.decode(rw.data), "early bytes");
    closeFd(fd);

    for (
      const bad of [
        "HELLO 1024\n",
        "CONNECT x\n",
        "CONNECT 99999999999\n",
        "CONNECT 1024 with a very long tail",
      ]
    ) {
      const b = connect(`${dir}/v.sock`);
      write(b, bad);
      g.pump();
      assert.deepEqual(readSome(b), new Uint8Array(0), bad);
      closeFd(b);
    }
    // EOF before any line
    const e = connect(`${dir}/v.sock`);
    shim().kvs_shutdown(e, 1);
    g.pump();
    assert.deepEqual(readSome(e), new Uint8Array(0));
    closeFd(e);
    g.addRx(8);
    g.pump();
    // The first connection's host end closed: the guest hears SHUTDOWN; no REQUEST came for the others.
    assert.deepEqual(g.take().map((p) => p.op), [OP.SHUTDOWN]);
    assert.equal(g.dev.connectionCount, 1);
  }),
);

Deno.test(
  "vsock: no guest listener: the guest's RST closes the host socket without an OK",
  withDevice((g, dir) => {
    const fd = connect(`${dir}/v.sock`);
    write(fd, "CONNECT 9\n");
    g.addRx(1);
    g.pump();
    const [req] = g.take();
    g.send({ srcPort: 9, dstPort: req.srcPort, op: OP.RST });
    assert.deepEqual(readSome(fd), new Uint8Array(0));
    assert.equal(g.dev.connectionCount, 0);
    closeFd(fd);
  }),
);

Deno.test(
  "vsock: a guest connection to host port P reaches PATH_P; nobody at PATH_P means RST",
  withDevice((g, dir) => {
    const l = unixListen(`${dir}/v.sock_1025`);
    g.send({ srcPort: 40000, dstPort: 1025, op: OP.REQUEST, bufAlloc: 4096 });
    g.addRx(2);
    g.pump();
    const [resp] = g.take();
    assert.deepEqual([resp.op, resp.srcPort, resp.dstPort, resp.srcCid, resp.dstCid], [
      OP.RESPONSE,
      1025,
      40000,
      2,
      CID,
    ]);
    const a = accept(l);
    assert.ok(a !== null);
    g.send({ srcPort: 40000, dstPort: 1025, op: OP.RW }, enc.encode("ping"));
    assert.equal(dec.decode(readSome(a)!), "ping");
    write(a, "pong");
    g.pump();
    const [rw] = g.take();
    assert.equal(dec.decode(rw.data), "pong");

    g.send({ srcPort: 40001, dstPort: 1026, op: OP.REQUEST });
    g.addRx(1);
    g.pump();
    const [rst] = g.take();
    assert.deepEqual([rst.op, rst.srcPort, rst.dstPort, rst.bufAlloc], [OP.RST, 1026, 40001, 0]);
    closeFd(a);
    closeFd(l);
  }),
);

Deno.test(
  "vsock: host → guest data never exceeds the guest's credit; out of credit, one CREDIT_REQUEST",
  withDevice((g, dir) => {
    const l = unixListen(`${dir}/v.sock_5000`);
    g.send({ srcPort: 1, dstPort: 5000, op: OP.REQUEST, bufAlloc: 1000, fwdCnt: 0 });
    g.addRx(1);
    g.pump();
    assert.equal(g.take()[0].op, OP.RESPONSE);
    const a = accept(l)!;
    write(a, pattern(3000, 1));
    const first = g.drain();
    assert.deepEqual(first.map((p) => [p.op, p.len]), [[OP.RW, 1000], [OP.CREDIT_REQUEST, 0]]);
    assert.deepEqual(g.drain(), [], "nothing more without credit, and no second request");
    // Packets that bring no credit (data, an unchanged CREDIT_UPDATE) do not start a request ping-pong.
    g.send({ srcPort: 1, dstPort: 5000, op: OP.CREDIT_UPDATE, bufAlloc: 1000, fwdCnt: 0 });
    g.send({ srcPort: 1, dstPort: 5000, op: OP.RW, bufAlloc: 1000, fwdCnt: 0 }, enc.encode("x"));
    assert.deepEqual(g.drain(), []);
    assert.equal(dec.decode(readSome(a)!), "x");
    // The guest consumed 600 bytes: 600 more may come.
    g.send({ srcPort: 1, dstPort: 5000, op: OP.CREDIT_UPDATE, bufAlloc: 1000, fwdCnt: 600 });
    const second = g.drain();
    assert.deepEqual(second.map((p) => [p.op, p.len]), [[OP.RW, 600], [OP.CREDIT_REQUEST, 0]]);
    g.send({ srcPort: 1, dstPort: 5000, op: OP.CREDIT_UPDATE, bufAlloc: 100000, fwdCnt: 1600 });
    const third = g.drain();
    assert.deepEqual(third.map((p) => [p.op, p.len]), [[OP.RW, 1400]]);
    const all = [...first, ...second, ...third].flatMap((p) => Array.from(p.data));
    assert.deepEqual(new Uint8Array(all), pattern(3000, 1));
    // A CREDIT_REQUEST from the guest is answered with our fwd_cnt.
    g.send({ srcPort: 1, dstPort: 5000, op: OP.CREDIT_REQUEST, bufAlloc: 100000, fwdCnt: 3000 });
    const [cu] = g.drain();
    assert.deepEqual([cu.op, cu.fwdCnt, cu.bufAlloc], [OP.CREDIT_UPDATE, 1, VSOCK_BUF_ALLOC]);
    closeFd(a);
    closeFd(l);
  }),
);

Deno.test(
  "vsock: guest → host: credit updates as data is consumed; a full socket spills into the ring, in order",
  withDevice((g, dir) => {
    const { fd, hostPort } = hostConnect(g, dir, 1024);
    // 64 KiB consumed: the guest hears of it.
    const big = pattern(65536, 2);
    g.send({ srcPort: 1024, dstPort: hostPort, op: OP.RW }, big);
    const [cu] = g.drain();
    assert.deepEqual([cu.op, cu.fwdCnt], [OP.CREDIT_UPDATE, 65536]);
    let got = 0;
    while (got < 65536) got += readSome(fd)!.length;
    // The host does not read: 256 KiB (the whole window) must still be taken.
    const sent: Uint8Array[] = [];
    for (let i = 0; i < 4; i++) {
      const part = pattern(65536, 10 + i);
      sent.push(part);
      g.send({ srcPort: 1024, dstPort: hostPort, op: OP.RW }, part);
    }
    assert.equal(g.dev.connectionCount, 1, "within the credit: no reset");
    // The host reads it all, in order, while the device is served (the ring drains on EPOLLOUT).
    const want = new Uint8Array(4 * 65536);
    sent.forEach((p, i) => want.set(p, i * 65536));
    const have = new Uint8Array(want.length);
    let n = 0;
    let fwd = 0;
    for (let i = 0; i < 1000 && n < want.length; i++) {
      g.addRx(8);
      g.pump();
      for (const p of g.take()) if (p.op === OP.CREDIT_UPDATE) fwd = p.fwdCnt;
      const b = readSome(fd, 100);
      if (b && b.length) {
        have.set(b, n);
        n += b.length;
      }
    }
    assert.equal(n, want.length);
    assert.ok(have.every((v, i) => v === want[i]), "byte-exact, in order");
    g.addRx(8);
    g.pump();
    for (const p of g.take()) if (p.op === OP.CREDIT_UPDATE) fwd = p.fwdCnt;
    assert.ok(fwd >= 5 * 65536 - 65536, `credit updates reported the consumption (${fwd})`);
    closeFd(fd);
  }),
);

Deno.test(
  "vsock: a guest sending beyond its credit is reset",
  withDevice((g, dir) => {
    const { fd, hostPort } = hostConnect(g, dir, 1024);
    const part = pattern(65536, 3);
    for (let i = 0; i < 12 && g.dev.connectionCount > 0; i++) {
      g.send({ srcPort: 1024, dstPort: hostPort, op: OP.RW }, part);
    }
    assert.equal(g.dev.connectionCount, 0, "reset once the window was overrun");
    assert.match(g.dev.lastDrop, /credit/);
    const pk = g.drain();
    assert.ok(pk.some((p) => p.op === OP.RST && p.srcPort === hostPort && p.dstPort === 1024));
    closeFd(fd);
  }),
);

Deno.test(
  "vsock: shutdowns: guest SEND ends the host's reading; host EOF tells the guest; both ends: RST",
  withDevice((g, dir) => {
    const { fd, hostPort } = hostConnect(g, dir, 1024);
    g.send({ srcPort: 1024, dstPort: hostPort, op: OP.RW }, enc.encode("last words"));
    g.send({ srcPort: 1024, dstPort: hostPort, op: OP.SHUTDOWN, flags: VSOCK_SHUTDOWN_SEND });
    assert.equal(dec.decode(readSome(fd)!), "last words");
    assert.deepEqual(readSome(fd), new Uint8Array(0), "EOF on the host");
    // The host can still talk, then shuts its write side: the guest hears SHUTDOWN(SEND).
    write(fd, "reply");
    shim().kvs_shutdown(fd, 1);
    const pk = g.drain();
    assert.deepEqual(pk.map((p) => p.op), [OP.RW, OP.SHUTDOWN]);
    assert.equal(dec.decode(pk[0].data), "reply");
    assert.equal(pk[1].flags & VSOCK_SHUTDOWN_SEND, VSOCK_SHUTDOWN_SEND);
    // The guest closes: SHUTDOWN(both) is answered with RST and the connection is gone.
    g.send({ srcPort: 1024, dstPort: hostPort, op: OP.SHUTDOWN, flags: 3 });
    const [rst] = g.drain();
    assert.equal(rst.op, OP.RST);
    assert.equal(g.dev.connectionCount, 0);
    closeFd(fd);

    // A host that closes outright: SHUTDOWN with both flags.
    const b = hostConnect(g, dir, 2048);
    closeFd(b.fd);
    const [sd] = g.drain();
    assert.deepEqual([sd.op, sd.flags], [OP.SHUTDOWN, VSOCK_SHUTDOWN_SEND | VSOCK_SHUTDOWN_RCV]);
    g.send({ srcPort: 2048, dstPort: b.hostPort, op: OP.RST });
    assert.equal(g.dev.connectionCount, 0);
  }),
);

Deno.test(
  "vsock: 40 connections at once to one guest port, each routed to its own socket, served round-robin",
  withDevice((g, dir) => {
    const conns: { fd: number; hostPort: number }[] = [];
    for (let i = 0; i < 40; i++) conns.push(hostConnect(g, dir, 1024));
    assert.equal(g.dev.connectionCount, 40);
    assert.equal(new Set(conns.map((c) => c.hostPort)).size, 40, "a host port each");
    // Every host writes 10 KiB (3 rx buffers each): the first rx round serves every connection once.
    conns.forEach((c, i) => write(c.fd, pattern(10240, i)));
    g.addRx(32);
    g.pump();
    const round = g.take();
    assert.equal(round.length, 32);
    assert.equal(new Set(round.map((p) => p.srcPort)).size, 32, "one packet per connection first");
    const rest = [...round, ...g.drain(32)];
    conns.forEach((c, i) => {
      const bytes = rest.filter((p) => p.srcPort === c.hostPort && p.op === OP.RW).flatMap((p) =>
        Array.from(p.data)
      );
      assert.deepEqual(new Uint8Array(bytes), pattern(10240, i), `connection ${i}`);
    });
    conns.forEach((c, i) => {
      g.send({ srcPort: 1024, dstPort: c.hostPort, op: OP.RW }, pattern(100, 100 + i));
      assert.deepEqual(readSome(c.fd), pattern(100, 100 + i));
    });
    assert.equal(g.counters.snapshot().connections, 40);
    conns.forEach((c) => closeFd(c.fd));
  }),
);

Deno.test(
  "vsock: hostile tx packets are dropped or reset, never thrown",
  withDevice((g, dir) => {
    const { fd, hostPort } = hostConnect(g, dir, 1024);
    const dropped = () => g.counters.snapshot().dropped_packets;
    // header shorter than 44 bytes
    g.txd.setDesc(2, TX_HDR, 20);
    g.sendRaw(2);
    assert.equal(dropped(), 1);
    // buffer outside guest RAM
    g.txd.setDesc(2, 0x7000_0000, 64);
    g.sendRaw(2);
    assert.equal(dropped(), 2);
    // a device-writable buffer only (nothing to read)
    g.txd.setDesc(2, TX_HDR, 64, W);
    g.sendRaw(2);
    assert.equal(dropped(), 3);
    // a descriptor loop
    g.txd.setDesc(2, TX_HDR, 44, NEXT, 3);
    g.txd.setDesc(3, TX_HDR, 44, NEXT, 2);
    g.sendRaw(2);
    assert.equal(dropped(), 4);
    // another CID
    g.send({ srcPort: 1024, dstPort: hostPort, op: OP.RW, dstCid: 7 }, enc.encode("x"));
    assert.equal(dropped(), 5);
    // an unknown op on a live connection
    g.send({ srcPort: 1024, dstPort: hostPort, op: 99 });
    assert.equal(dropped(), 6);
    assert.equal(g.dev.connectionCount, 1);
    assert.deepEqual(g.drain(), []);
    // a datagram (type 2): RST
    g.send({ srcPort: 5, dstPort: 6, op: OP.REQUEST, type: 2 });
    // data for a connection that does not exist: RST
    g.send({ srcPort: 7, dstPort: 8, op: OP.RW }, enc.encode("nobody"));
    // an unexpected RESPONSE / SHUTDOWN / CREDIT_UPDATE for nobody: RST; an RST for nobody: nothing
    g.send({ srcPort: 9, dstPort: 10, op: OP.RESPONSE });
    g.send({ srcPort: 11, dstPort: 12, op: OP.RST });
    let pk = g.drain();
    assert.deepEqual(pk.map((p) => [p.op, p.srcPort, p.dstPort]), [[OP.RST, 6, 5], [OP.RST, 8, 7], [
      OP.RST,
      10,
      9,
    ]]);
    // RW whose len claims more than the packet holds: the connection is reset
    g.send({ srcPort: 1024, dstPort: hostPort, op: OP.RW, len: 5000 }, enc.encode("short"));
    pk = g.drain();
    assert.deepEqual(pk.map((p) => p.op), [OP.RST]);
    assert.equal(g.dev.connectionCount, 0);
    assert.deepEqual(readSome(fd), new Uint8Array(0));
    // a zero-length RW, a duplicate REQUEST: harmless
    const b = hostConnect(g, dir, 1024);
    g.send({ srcPort: 1024, dstPort: b.hostPort, op: OP.RW, len: 0 });
    g.send({ srcPort: 1024, dstPort: b.hostPort, op: OP.REQUEST });
    assert.equal(g.dev.connectionCount, 1);
    closeFd(fd);
    closeFd(b.fd);
  }),
);

Deno.test(
  "vsock: unusable rx buffers are completed empty; the packet waits for a good one",
  withDevice((g, dir) => {
    const fd = connect(`${dir}/v.sock`);
    write(fd, "CONNECT 1\n");
    g.rxd.setDesc(40, RX_BASE, 30, W); // shorter than a header
    g.rxd.publish(40);
    g.rxd.setDesc(41, RX_BASE, 4096); // device-readable
    g.rxd.publish(41);
    g.rxd.setDesc(42, 0x7000_0000, 4096, W); // outside RAM
    g.rxd.publish(42);
    g.pump();
    assert.deepEqual([0, 1, 2].map((i) => g.rxd.used(i)), [{ id: 40, len: 0 }, { id: 41, len: 0 }, {
      id: 42,
      len: 0,
    }]);
    assert.equal(g.counters.snapshot().dropped_packets, 3);
    assert.ok(g.dev.rxPending, "the REQUEST still waits");
    g.rxd.setDesc(43, RX_BASE + 0x1000 * 43, 4096, W); // header and data in one buffer
    g.rxd.publish(43);
    g.pump();
    assert.deepEqual(g.rxd.used(3), { id: 43, len: VSOCK_HDR_SIZE });
    assert.equal(g.mem.readU16(RX_BASE + 0x1000 * 43 + 30), OP.REQUEST);
    closeFd(fd);
  }),
);

Deno.test(
  "vsock: reset closes every connection; the listener keeps accepting after re-activation",
  withDevice((g, dir) => {
    const a = hostConnect(g, dir, 1024);
    const b = hostConnect(g, dir, 1025);
    g.dev.deactivate();
    assert.equal(g.dev.connectionCount, 0);
    assert.deepEqual(readSome(a.fd), new Uint8Array(0));
    assert.deepEqual(readSome(b.fd), new Uint8Array(0));
    g.dev.activate(0n);
    const c = hostConnect(g, dir, 1024);
    write(c.fd, "again");
    g.addRx(1);
    g.pump();
    assert.equal(dec.decode(g.take()[0].data), "again");
    [a.fd, b.fd, c.fd].forEach(closeFd);
  }),
);

Deno.test("vsock: tx work for the rx queue kicks its eventfd, unless the rx queue waits for buffers", () => {
  const dir = Deno.makeTempDirSync({ prefix: "dvmm-vsock-" });
  const l = openVsockListener(`${dir}/v.sock`);
  const kick = Number(shim().kvs_eventfd(0, 0x800 /* EFD_NONBLOCK */));
  const g = new Guest(dir, l, kick);
  const kicked = () => {
    const b = new BigUint64Array(1);
    return shim().kvs_read_i32(kick, b, 8) === 8 && b[0] > 0n;
  };
  try {
    g.send({ srcPort: 1, dstPort: 1026, op: OP.REQUEST }); // nobody at PATH_1026: an RST to send
    assert.equal(kicked(), true);
    g.pump(); // no buffers: starved
    assert.equal(kicked(), false);
    g.send({ srcPort: 2, dstPort: 1026, op: OP.REQUEST });
    assert.equal(kicked(), false, "the guest's notify for new buffers wakes the rx queue");
    g.addRx(2);
    g.pump();
    assert.deepEqual(g.take().map((p) => [p.op, p.dstPort]), [[OP.RST, 1], [OP.RST, 2]]);
    g.send({ srcPort: 3, dstPort: 1026, op: OP.REQUEST });
    assert.equal(kicked(), true);
  } finally {
    g.close();
    closeFd(l);
    closeFd(kick);
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("vsock: a taken socket path fails with its name", () => {
  const dir = Deno.makeTempDirSync({ prefix: "dvmm-vsock-" });
  try {
    const l = openVsockListener(`${dir}/v.sock`);
    assert.throws(() => openVsockListener(`${dir}/v.sock`), /v\.sock already exists/);
    closeFd(l);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
