import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { addressOf, EAGAIN, EBADF, EFAULT, hostBytes, shim } from "../ffi/shim.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  ctrlQueueIndex,
  NET_ERR,
  NET_OK,
  type NetBackend,
  netConfigSpace,
  NetControl,
  NetCounters,
  NetDevice,
  netFeatures,
  RX_QUEUE,
  tapOffloadFor,
  TX_QUEUE,
} from "../devices/virtio/net.ts";
import { NetService } from "../devices/virtio/device_net.ts";
import {
  formatMac,
  getMtu,
  IFF_MULTI_QUEUE,
  openTap,
  parseIpv4,
  parseMac,
  randomMac,
  setTapQueue,
} from "../devices/virtio/tap.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import {
  F,
  featureBit,
  NET_F,
  VIRTQ_DESC_F_INDIRECT as IND,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";

/** Guest memory over a real buffer, so the iovecs' host addresses can be dereferenced. */
function hostMemory(size = 0x100000): GuestMemory {
  const bytes = new Uint8Array(size);
  return new GuestMemory([{ gpa: 0, bytes, hostAddr: addressOf(bytes) }]);
}

class FakeBackend implements NetBackend {
  sent: Uint8Array[] = [];
  inbox: Uint8Array[] = [];
  /** Results to return from readv before looking at the inbox (e.g. -EFAULT). */
  readErrors: number[] = [];
  writeError = 0;
  /** Frames handed out by readv. */
  reads = 0;
  writev(iov: BigUint64Array, count: number): number {
    if (this.writeError) return -this.writeError;
    const parts: number[] = [];
    for (let i = 0; i < count; i++) parts.push(...hostBytes(iov[2 * i], Number(iov[2 * i + 1])));
    this.sent.push(Uint8Array.from(parts));
    return parts.length;
  }
  readv(iov: BigUint64Array, count: number): number {
    const e = this.readErrors.shift();
    if (e !== undefined) {
      if (e === -EFAULT) this.inbox.shift(); // the kernel drops the frame that did not fit
      return e;
    }
    const f = this.inbox.shift();
    if (!f) return -EAGAIN;
    this.reads++;
    let done = 0;
    for (let i = 0; i < count && done < f.length; i++) {
      const dst = hostBytes(iov[2 * i], Number(iov[2 * i + 1]));
      const n = Math.min(dst.length, f.length - done);
      dst.set(f.subarray(done, done + n));
      done += n;
    }
    return f.length; // as tun: the frame's length, even when the buffers were too small for it
  }
}

/** A frame with a 12-byte virtio-net header (zeros) and `len` payload bytes of `fill`. */
function frame(len: number, fill: number): Uint8Array {
  const b = new Uint8Array(12 + len);
  b.fill(fill, 12);
  return b;
}

function setup() {
  const mem = hostMemory();
  const rxd = new FakeDriverQueue(mem, 0x1000, 8);
  const txd = new FakeDriverQueue(mem, 0x3000, 8);
  const rx = new SplitQueue(mem, rxd.config, { indirect: true });
  const tx = new SplitQueue(mem, txd.config, { indirect: true });
  const be = new FakeBackend();
  const dev = new NetDevice(be);
  return { mem, rxd, txd, rx, tx, be, dev };
}

Deno.test("net: TX gathers header and frame from several descriptors (zero-copy iovecs)", () => {
  const { mem, txd, tx, be, dev } = setup();
  mem.write(0x10000, new Uint8Array(12));
  mem.fill(0x20000, 60, 0xab);
  txd.setDesc(0, 0x10000, 12, NEXT, 1);
  txd.setDesc(1, 0x20000, 60);
  txd.publish(0);
  assert.equal(dev.processTx(tx), true);
  assert.equal(be.sent.length, 1);
  assert.equal(be.sent[0].length, 72);
  assert.ok(be.sent[0].subarray(12).every((b) => b === 0xab));
  assert.deepEqual(txd.used(0), { id: 0, len: 0 });
  assert.deepEqual(dev.counters.snapshot(), { rx_bytes: 0, rx_frames: 0, tx_bytes: 60, tx_frames: 1 });
});

Deno.test("net: hostile TX chains are completed and dropped, never sent", () => {
  const { txd, tx, be, dev } = setup();
  txd.setDesc(0, 0x900000, 100); // outside RAM
  txd.publish(0);
  txd.setDesc(1, 0x10000, 20); // shorter than header + Ethernet header
  txd.publish(1);
  txd.setDesc(2, 0x10000, 100, W); // device-writable only
  txd.publish(2);
  txd.setDesc(3, 0x10000, 100, NEXT, 4); // loop
  txd.setDesc(4, 0x10000, 100, NEXT, 3);
  txd.publish(3);
  txd.setDesc(5, 0x10000, 100, IND | NEXT, 6); // indirect with NEXT
  txd.publish(5);
  txd.publish(9); // head out of range: cannot be completed
  dev.processTx(tx);
  assert.equal(be.sent.length, 0);
  assert.deepEqual([0, 1, 2, 3, 4].map((i) => txd.used(i)), [
    { id: 0, len: 0 },
    { id: 1, len: 0 },
    { id: 2, len: 0 },
    { id: 3, len: 0 },
    { id: 5, len: 0 },
  ]);
  assert.equal(txd.usedIdx(), 5);
  assert.equal(dev.counters.dropped, 5);
  assert.equal(dev.counters.snapshot().tx_frames, 0);
  // a backend error drops the frame too
  be.writeError = EBADF;
  txd.setDesc(6, 0x10000, 80);
  txd.publish(6);
  dev.processTx(tx);
  assert.deepEqual(txd.used(5), { id: 6, len: 0 });
  assert.equal(dev.counters.dropped, 6);
});

Deno.test("net: RX scatters a frame over the chain and sets num_buffers", () => {
  const { mem, rxd, rx, be, dev } = setup();
  rxd.setDesc(0, 0x10000, 40, W | NEXT, 1);
  rxd.setDesc(1, 0x20000, 1514, W);
  rxd.publish(0);
  be.inbox.push(frame(100, 0x5a));
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "no-buffers"); // the only chain was used
  assert.equal(out.irq, true);
  assert.deepEqual(rxd.used(0), { id: 0, len: 112 });
  assert.equal(mem.readU16(0x10000 + 10), 1, "num_buffers");
  assert.equal(mem.read(0x10000 + 12, 28).every((b) => b === 0x5a), true);
  assert.equal(mem.read(0x20000, 72).every((b) => b === 0x5a), true);
  assert.deepEqual(dev.counters.snapshot(), { rx_bytes: 100, rx_frames: 1, tx_bytes: 0, tx_frames: 0 });
});

Deno.test("net: RX without buffers waits; without frames the chain is given back unused", () => {
  const { rxd, rx, be, dev } = setup();
  be.inbox.push(frame(60, 1), frame(60, 2));
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.equal(out.irq, false);
  assert.equal(be.inbox.length, 2);
  for (let i = 0; i < 3; i++) {
    rxd.setDesc(i, 0x10000 + 0x1000 * i, 2048, W);
    rxd.publish(i);
  }
  assert.equal(dev.processRx(rx, out), "empty");
  assert.equal(rxd.usedIdx(), 2);
  assert.equal(rx.availableCount(), 1, "the third chain stays available");
  be.inbox.push(frame(70, 3));
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.deepEqual(rxd.used(2), { id: 2, len: 82 });
});

Deno.test("net: hostile RX chains are completed with length 0; oversize frames are skipped", () => {
  const { rxd, rx, be, dev } = setup();
  rxd.setDesc(0, 0x10000, 2048); // device-readable only: nowhere to put a frame
  rxd.publish(0);
  rxd.setDesc(1, 0x900000, 2048, W); // outside RAM
  rxd.publish(1);
  rxd.setDesc(2, 0x10000, 8, W); // smaller than the header
  rxd.publish(2);
  rxd.setDesc(3, 0x10000, 2048, W);
  rxd.publish(3);
  be.inbox.push(frame(5000, 9), frame(50, 7));
  be.readErrors.push(-EFAULT); // the first frame does not fit and is dropped by the backend
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.deepEqual([0, 1, 2, 3].map((i) => rxd.used(i)), [
    { id: 0, len: 0 },
    { id: 1, len: 0 },
    { id: 2, len: 0 },
    { id: 3, len: 62 },
  ]);
  assert.equal(dev.counters.snapshot().rx_frames, 1);
  // a hard backend error stops the pass and keeps the chain
  rxd.setDesc(4, 0x10000, 2048, W);
  rxd.publish(4);
  be.readErrors.push(-EBADF);
  assert.equal(dev.processRx(rx, out), "error");
  assert.equal(dev.lastRxErrno, EBADF);
  assert.equal(rx.availableCount(), 1);
  // a broken ring (avail idx jumped) stops with "error" and completes nothing
  rxd.setAvailIdx(rxd.availIdx + 100);
  assert.equal(dev.processRx(rx, out), "error");
  assert.equal(rxd.usedIdx(), 4);
});

Deno.test("net: the service switches tap polling with the RX buffers", () => {
  const { rxd, rx, txd, tx, be } = setup();
  const polling: boolean[] = [];
  const warnings: string[] = [];
  const svc = new NetService([-1], new NetCounters(), {
    setPolling: (_k, on) => polling.push(on),
    warn: (m) => warnings.push(m),
  }, { backends: [be] });
  svc.activate(0n); // TUNSETOFFLOAD on fd -1 fails: a warning, not a crash
  assert.deepEqual(polling, [], "no polling before the RX queue is first served");
  assert.equal(warnings.length, 1);
  be.inbox.push(frame(60, 1));
  assert.equal(svc.service(rx, RX_QUEUE), false); // no buffers: no polling
  assert.deepEqual(polling, []);
  rxd.setDesc(0, 0x10000, 2048, W);
  rxd.publish(0);
  rxd.setDesc(1, 0x11000, 2048, W);
  rxd.publish(1);
  assert.equal(svc.service(rx, RX_QUEUE), true); // the notify serves the frame; tap empty: poll
  assert.deepEqual(polling, [true]);
  be.inbox.push(frame(60, 2));
  assert.equal(svc.service(rx, RX_QUEUE), true); // tap readiness: the last buffer is used
  assert.deepEqual(polling, [true, false], "no buffers left: polling off until the next notify");
  txd.setDesc(0, 0x20000, 64);
  txd.publish(0);
  assert.equal(svc.service(tx, TX_QUEUE), true);
  assert.equal(be.sent.length, 1);
  rxd.setDesc(2, 0x12000, 2048, W);
  rxd.publish(2);
  svc.service(rx, RX_QUEUE);
  assert.deepEqual(polling, [true, false, true]);
  svc.deactivate();
  assert.deepEqual(polling, [true, false, true, false]);
});

Deno.test("net: features as Cloud Hypervisor maps the offload options; tap offloads; config space", () => {
  const has = (f: bigint, b: number) => (f & featureBit(b)) !== 0n;
  const base = netFeatures();
  for (const b of [NET_F.MAC, NET_F.STATUS, NET_F.CTRL_VQ, NET_F.MQ, NET_F.GUEST_ANNOUNCE]) {
    assert.ok(has(base, b));
  }
  for (const b of [F.VERSION_1, F.EVENT_IDX, F.INDIRECT_DESC]) assert.ok(has(base, b));
  for (const b of [NET_F.CSUM, NET_F.GUEST_TSO4, NET_F.HOST_UFO, NET_F.MTU, NET_F.MRG_RXBUF, NET_F.CTRL_RX]) {
    assert.ok(!has(base, b), `bit ${b}`);
  }
  // offload_tso / offload_ufo only count with offload_csum
  assert.equal(netFeatures({ tso: true, ufo: true }), base);
  const csum = netFeatures({ csum: true });
  assert.deepEqual(
    [NET_F.CSUM, NET_F.GUEST_CSUM, NET_F.CTRL_GUEST_OFFLOADS, NET_F.HOST_TSO4, NET_F.GUEST_UFO].map((b) =>
      has(csum, b)
    ),
    [true, true, true, false, false],
  );
  const tso = netFeatures({ csum: true, tso: true });
  for (const b of [NET_F.HOST_TSO4, NET_F.HOST_TSO6, NET_F.HOST_ECN, NET_F.GUEST_TSO4, NET_F.GUEST_TSO6]) {
    assert.ok(has(tso, b));
  }
  assert.ok(has(tso, NET_F.GUEST_ECN) && !has(tso, NET_F.HOST_UFO));
  const all = netFeatures({ csum: true, tso: true, ufo: true, mtu: true, mrgRxbuf: true });
  for (const b of [NET_F.HOST_UFO, NET_F.GUEST_UFO, NET_F.MTU, NET_F.MRG_RXBUF]) assert.ok(has(all, b));
  assert.equal(tapOffloadFor(0n), 0);
  assert.equal(tapOffloadFor(featureBit(NET_F.GUEST_TSO4)), 0, "TSO without GUEST_CSUM is not set");
  assert.equal(tapOffloadFor(tso), 0x0f);
  assert.equal(tapOffloadFor(all), 0x1f);
  assert.equal(
    tapOffloadFor(featureBit(NET_F.GUEST_CSUM) | featureBit(NET_F.GUEST_ECN)),
    0x01,
    "ECN needs TSO",
  );
  assert.equal(tapOffloadFor(featureBit(NET_F.GUEST_CSUM)), 0x01);
  const cfg = netConfigSpace(parseMac("52:54:00:12:34:56"));
  assert.deepEqual(Array.from(cfg), [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0, 0]);
  const mq = netConfigSpace(parseMac("52:54:00:12:34:56"), 4, 9000);
  assert.deepEqual(Array.from(mq.subarray(6)), [1, 0, 4, 0, 0x28, 0x23]);
  const m = randomMac();
  assert.equal(m[0] & 3, 2, "unicast, locally administered");
  assert.equal(formatMac(parseMac("52:54:0:a:bb:cc")), "52:54:00:0a:bb:cc");
  assert.throws(() => parseMac("52:54:00:12:34"), /bad MAC/);
  assert.deepEqual(Array.from(parseIpv4("192.168.249.1")), [192, 168, 249, 1]);
  assert.throws(() => parseIpv4("192.168.249.256"), /bad IPv4/);
  // the control queue follows the pairs the driver may use
  const cvq = featureBit(NET_F.CTRL_VQ), mqf = featureBit(NET_F.MQ);
  assert.equal(ctrlQueueIndex(cvq | mqf, 4), 8);
  assert.equal(ctrlQueueIndex(cvq, 4), 2);
  assert.equal(ctrlQueueIndex(mqf, 4), -1);
});

// ---------------------------------------------------------------------------------------------------
// Mergeable RX buffers (VIRTIO_NET_F_MRG_RXBUF)

/** A frame with a zeroed 12-byte header and `len` payload bytes (i * 7 + seed) & 0xff. */
function patterned(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(12 + len);
  for (let i = 0; i < len; i++) b[12 + i] = (i * 7 + seed) & 0xff;
  return b;
}

/** An RX queue and a device in mergeable mode, for frames of at most `maxFrame` bytes (default 1518). */
function mergeable(size = 16, maxFrame = 1518) {
  const mem = hostMemory();
  const rxd = new FakeDriverQueue(mem, 0x1000, size);
  const rx = new SplitQueue(mem, rxd.config, { indirect: true, eventIdx: true });
  const be = new FakeBackend();
  const dev = new NetDevice(be);
  dev.configure(true, maxFrame);
  /** The bytes the used entries [from, to) hold, concatenated (addresses from `bufs`: head → GPA). */
  const gather = (bufs: Map<number, number>, from: number, to: number) => {
    const parts: number[] = [];
    for (let i = from; i < to; i++) {
      const u = rxd.used(i);
      parts.push(...mem.read(bufs.get(u.id)!, u.len));
    }
    return Uint8Array.from(parts);
  };
  return { mem, rxd, rx, be, dev, gather };
}

/** `frame` as the guest must see it: num_buffers written into its header. */
function withNumBuffers(frame: Uint8Array, n: number): Uint8Array {
  const b = frame.slice();
  b[10] = n & 0xff;
  b[11] = n >> 8;
  return b;
}

Deno.test("net: MRG_RXBUF spreads a frame over several chains, num_buffers set, spare chains kept", () => {
  const { mem, rxd, rx, be, dev, gather } = mergeable();
  const bufs = new Map<number, number>();
  for (let i = 0; i < 8; i++) {
    bufs.set(i, 0x10000 + 0x1000 * i);
    rxd.setDesc(i, 0x10000 + 0x1000 * i, 512, W);
    rxd.publish(i);
  }
  const big = patterned(1200, 3), small = patterned(60, 9);
  be.inbox.push(big, small);
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "empty");
  assert.equal(out.irq, true);
  assert.equal(rxd.usedIdx(), 4);
  assert.deepEqual([0, 1, 2, 3].map((i) => rxd.used(i)), [
    { id: 0, len: 512 },
    { id: 1, len: 512 },
    { id: 2, len: 188 },
    { id: 3, len: 72 },
  ]);
  assert.equal(mem.readU16(0x10000 + 10), 3, "num_buffers of the first frame");
  assert.equal(mem.readU16(0x13000 + 10), 1, "num_buffers of the second");
  assert.deepEqual(gather(bufs, 0, 3), withNumBuffers(big, 3));
  assert.deepEqual(gather(bufs, 3, 4), withNumBuffers(small, 1));
  // chains popped for a frame but not needed stay with the device for the next frame
  assert.equal(dev.heldChains, 3, "topped up again for the next frame");
  assert.equal(rx.availableCount(), 1);
  assert.deepEqual(dev.counters.snapshot(), { rx_bytes: 1260, rx_frames: 2, tx_bytes: 0, tx_frames: 0 });
  be.inbox.push(patterned(100, 1));
  assert.equal(dev.processRx(rx, out), "empty");
  assert.deepEqual(rxd.used(4), { id: 4, len: 112 }, "the held chain is used first");
  // a reset forgets held chains
  dev.configure(true, 1518);
  assert.equal(dev.heldChains, 0);
});

Deno.test("net: MRG_RXBUF: transmitting between receives leaves the held chains' iovecs alone", () => {
  const { mem, rxd, rx, be, dev, gather } = mergeable();
  const txd = new FakeDriverQueue(mem, 0x8000, 8);
  const tx = new SplitQueue(mem, txd.config);
  const bufs = new Map<number, number>();
  for (let i = 0; i < 8; i++) {
    bufs.set(i, 0x10000 + 0x1000 * i);
    rxd.setDesc(i, 0x10000 + 0x1000 * i, 512, W);
    rxd.publish(i);
  }
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "empty");
  assert.equal(dev.heldChains, 3, "a window of chains held, their iovecs built");
  mem.fill(0x30000, 80, 0x77);
  txd.setDesc(0, 0x30006, 60);
  txd.publish(0);
  dev.processTx(tx);
  assert.equal(be.sent.length, 1);
  const f = patterned(700, 4);
  be.inbox.push(f);
  assert.equal(dev.processRx(rx, out), "empty");
  assert.deepEqual([rxd.used(0), rxd.used(1)], [{ id: 0, len: 512 }, { id: 1, len: 200 }]);
  assert.deepEqual(gather(bufs, 0, 2), withNumBuffers(f, 2));
});

Deno.test("net: MRG_RXBUF completes hostile chains with length 0 before the frame's, never throws", () => {
  const { rxd, rx, be, dev, gather } = mergeable();
  const bufs = new Map([[0, 0x10000], [6, 0x16000], [9, 0x19000]]);
  rxd.setDesc(0, 0x10000, 1024, W);
  rxd.publish(0);
  rxd.setDesc(1, 0x11000, 1024); // device-readable only
  rxd.publish(1);
  rxd.setDesc(2, 0x900000, 1024, W); // outside RAM
  rxd.publish(2);
  rxd.setDesc(3, 0x13000, 8, W); // smaller than the header
  rxd.publish(3);
  rxd.setDesc(4, 0x14000, 100, W | NEXT, 5); // loop
  rxd.setDesc(5, 0x15000, 100, W | NEXT, 4);
  rxd.publish(4);
  rxd.setDesc(6, 0x16000, 1024, W);
  rxd.publish(6);
  const f = patterned(2000, 5);
  be.inbox.push(f);
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((i) => rxd.used(i)), [
    { id: 1, len: 0 },
    { id: 2, len: 0 },
    { id: 3, len: 0 },
    { id: 4, len: 0 },
    { id: 0, len: 1024 },
    { id: 6, len: 988 },
  ]);
  assert.deepEqual(gather(bufs, 4, 6), withNumBuffers(f, 2));
  assert.equal(dev.counters.dropped, 4);
  // an indirect descriptor with NEXT, a head out of range, then a good chain
  rxd.setDesc(7, 0x17000, 64, IND | NEXT, 8);
  rxd.publish(7);
  rxd.publish(99);
  rxd.setDesc(9, 0x19000, 2048, W);
  rxd.publish(9);
  const g = patterned(40, 1);
  be.inbox.push(g);
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.deepEqual(rxd.used(6), { id: 7, len: 0 });
  assert.deepEqual(rxd.used(7), { id: 9, len: 52 });
  assert.deepEqual(gather(bufs, 7, 8), withNumBuffers(g, 1));
  // a broken ring stops RX
  rxd.setAvailIdx(rxd.availIdx + 100);
  be.inbox.push(g);
  assert.equal(dev.processRx(rx, out), "error");
  assert.equal(rxd.usedIdx(), 8);
});

Deno.test("net: MRG_RXBUF: a frame larger than the posted buffers waits for more, the tap unread", () => {
  const { rxd, rx, be, dev, gather } = mergeable();
  const bufs = new Map([[0, 0x10000], [1, 0x11000], [2, 0x12000], [3, 0x13000]]);
  rxd.setDesc(0, 0x10000, 256, W);
  rxd.publish(0);
  rxd.setDesc(1, 0x11000, 256, W);
  rxd.publish(1);
  const f = patterned(1000, 11);
  be.inbox.push(f, patterned(10, 0));
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.equal(rxd.usedIdx(), 0, "nothing completed while the frame's tail waits");
  assert.equal(be.reads, 1);
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.equal(be.reads, 1, "the tap is not read while a frame waits for buffers");
  rxd.setDesc(2, 0x12000, 300, W);
  rxd.publish(2);
  rxd.setDesc(3, 0x13000, 300, W);
  rxd.publish(3);
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.equal(out.irq, true);
  assert.deepEqual([0, 1, 2, 3].map((i) => rxd.used(i)), [
    { id: 0, len: 256 },
    { id: 1, len: 256 },
    { id: 2, len: 300 },
    { id: 3, len: 200 },
  ]);
  assert.deepEqual(gather(bufs, 0, 4), withNumBuffers(f, 4));
  assert.equal(be.inbox.length, 1, "the next frame waits for buffers in the tap");
  assert.equal(dev.counters.snapshot().rx_frames, 1);
});

Deno.test("net: MRG_RXBUF drops a frame the whole ring cannot hold, and frames the tap truncated", () => {
  const { rxd, rx, be, dev } = mergeable(4);
  for (let i = 0; i < 4; i++) {
    rxd.setDesc(i, 0x10000 + 0x1000 * i, 64, W);
    rxd.publish(i);
  }
  be.inbox.push(patterned(1000, 1));
  const out = { irq: false };
  assert.equal(dev.processRx(rx, out), "no-buffers");
  assert.deepEqual([0, 1, 2, 3].map((i) => rxd.used(i).len), [0, 0, 0, 0], "every chain back, empty");
  assert.equal(rxd.usedIdx(), 4);
  assert.equal(dev.counters.dropped, 1);
  assert.equal(dev.counters.snapshot().rx_frames, 0);
  // larger than the buffers and the spare buffer together: the tap truncated it, it is dropped
  const m = mergeable(16, 65535 + 18);
  for (let i = 0; i < 16; i++) {
    m.rxd.setDesc(i, 0x10000 + 0x10000 * (i % 8), 0x8000, W);
    m.rxd.publish(i);
  }
  m.be.inbox.push(new Uint8Array(12 + 0x8000 * 3 + 70000), patterned(100, 2));
  assert.equal(m.dev.processRx(m.rx, out), "empty");
  assert.equal(m.dev.counters.dropped, 1);
  assert.deepEqual(m.rxd.used(0), { id: 0, len: 112 });
  // a hard backend error stops the pass; the held chains stay for later
  m.be.readErrors.push(-EBADF);
  assert.equal(m.dev.processRx(m.rx, out), "error");
  assert.equal(m.dev.lastRxErrno, EBADF);
  assert.ok(m.dev.heldChains > 0);
});

// ---------------------------------------------------------------------------------------------------
// The control queue and multi-queue

const CVQ = featureBit(NET_F.CTRL_VQ), MQ = featureBit(NET_F.MQ);

/** Writes a control command as header / data / ack descriptors (or fewer, per `layout`). */
function command(
  q: FakeDriverQueue,
  at: number,
  bytes: number[],
  layout: "split" | "one" | "no-ack" = "split",
): { ack: number } {
  const base = 0x40000 + 0x100 * at;
  q.mem.write(base, Uint8Array.from(bytes));
  const ack = base + 0x80;
  q.mem.writeU8(ack, 0xee);
  const d = 3 * at;
  if (layout === "split" && bytes.length > 2) {
    q.setDesc(d, base, 2, NEXT, d + 1);
    q.setDesc(d + 1, base + 2, bytes.length - 2, NEXT, d + 2);
    q.setDesc(d + 2, ack, 1, W);
  } else if (layout === "no-ack") {
    q.setDesc(d, base, bytes.length);
  } else {
    q.setDesc(d, base, bytes.length, NEXT, d + 1);
    q.setDesc(d + 1, ack, 1, W);
  }
  q.publish(d);
  return { ack };
}

Deno.test("net: control queue commands, good and bad, are answered as the spec and Cloud Hypervisor say", () => {
  const mem = hostMemory();
  const cq = new FakeDriverQueue(mem, 0x1000, 64);
  const q = new SplitQueue(mem, cq.config);
  const calls: string[] = [];
  let accept = true;
  const ctl = new NetControl(4, {
    setQueuePairs: (n) => (calls.push(`pairs ${n}`), accept),
    setGuestOffloads: (f) => (calls.push(`offloads 0x${f.toString(16)}`), true),
  });
  ctl.features = CVQ | MQ | featureBit(NET_F.CTRL_GUEST_OFFLOADS) | featureBit(NET_F.GUEST_CSUM) |
    featureBit(NET_F.GUEST_TSO4);
  const u64 = (v: bigint) => Array.from(new Uint8Array(new BigUint64Array([v]).buffer));
  const csumTso4 = featureBit(NET_F.GUEST_CSUM) | featureBit(NET_F.GUEST_TSO4);
  const cases: [string, number[], number, ("split" | "one" | "no-ack")?][] = [
    ["MQ VQ_PAIRS_SET 4", [4, 0, 4, 0], NET_OK],
    ["MQ VQ_PAIRS_SET 1, one descriptor", [4, 0, 1, 0], NET_OK, "one"],
    ["MQ VQ_PAIRS_SET 0", [4, 0, 0, 0], NET_ERR],
    ["MQ VQ_PAIRS_SET 5 > max", [4, 0, 5, 0], NET_ERR],
    ["MQ VQ_PAIRS_SET, one byte of data", [4, 0, 2], NET_ERR],
    ["MQ unknown command", [4, 1, 2, 0], NET_ERR],
    ["GUEST_OFFLOADS_SET negotiated bits", [5, 0, ...u64(csumTso4)], NET_OK],
    ["GUEST_OFFLOADS_SET a bit not negotiated", [5, 0, ...u64(featureBit(NET_F.GUEST_TSO6))], NET_ERR],
    ["GUEST_OFFLOADS_SET short", [5, 0, 1, 2, 3], NET_ERR],
    ["ANNOUNCE_ACK", [3, 0], NET_OK],
    ["ANNOUNCE unknown", [3, 1], NET_ERR],
    ["RX PROMISC (tolerated)", [0, 0, 1], NET_OK],
    ["RX unknown", [0, 9, 1], NET_ERR],
    ["VLAN ADD (tolerated)", [2, 0, 5, 0], NET_OK],
    ["MAC ADDR_SET (not offered)", [1, 1, 1, 2, 3, 4, 5, 6], NET_ERR],
    ["unknown class", [99, 0, 0, 0], NET_ERR],
    ["header only one byte", [4], NET_ERR, "one"],
  ];
  const acks = cases.map(([, bytes, , layout], i) => command(cq, i, bytes, layout).ack);
  assert.equal(ctl.process(q), true);
  cases.forEach(([what, , want], i) => {
    assert.equal(mem.readU8(acks[i]), want, what);
    assert.deepEqual(cq.used(i), { id: 3 * i, len: 1 }, what);
  });
  assert.deepEqual(calls, ["pairs 4", "pairs 1", `offloads 0x${csumTso4.toString(16)}`]);
  // the handler refusing, no room for the ack, a chain outside RAM, offloads not negotiated
  accept = false;
  let n = cases.length;
  const refused = command(cq, n++, [4, 0, 2, 0]);
  command(cq, n++, [4, 0, 2, 0], "no-ack");
  cq.setDesc(3 * n, 0x900000, 4, NEXT, 3 * n + 1);
  cq.setDesc(3 * n + 1, 0x900100, 1, W);
  cq.publish(3 * n++);
  ctl.process(q);
  assert.equal(mem.readU8(refused.ack), NET_ERR);
  assert.deepEqual(cq.used(cases.length + 1).len, 0, "no ack room: completed empty");
  assert.deepEqual(cq.used(cases.length + 2).len, 0, "outside RAM: completed empty");
  ctl.features = CVQ;
  const off = command(cq, n++, [5, 0, ...u64(featureBit(NET_F.GUEST_CSUM))]);
  ctl.process(q);
  assert.equal(mem.readU8(off.ack), NET_ERR, "without CTRL_GUEST_OFFLOADS");
  assert.equal(cq.usedIdx(), n);
});

/** A multi-queue service over fake tap queues: 4 pairs, their rings, the control ring. */
function multiQueue(attachFails = false) {
  const mem = hostMemory(0x200000);
  const be = [0, 1, 2, 3].map(() => new FakeBackend());
  const tapCalls: string[] = [];
  const polling: string[] = [];
  const warnings: string[] = [];
  const svc = new NetService([10, 11, 12, 13], new NetCounters(), {
    setPolling: (k, on) => polling.push(`${k}:${on ? "on" : "off"}`),
    warn: (m) => warnings.push(m),
  }, {
    backends: be,
    tap: {
      setOffload: (fd, flags) => void tapCalls.push(`offload ${fd} 0x${flags.toString(16)}`),
      setQueue: (fd, attach) => {
        tapCalls.push(`${attach ? "attach" : "detach"} ${fd}`);
        return attach && attachFails ? -22 : 0;
      },
    },
  });
  // rings: queue i at 0x1000 * (i + 1), size 8; data buffers from 0x100000
  const drv = Array.from({ length: 9 }, (_, i) => new FakeDriverQueue(mem, 0x10000 * (i + 1), 8));
  const qs = drv.map((d) => new SplitQueue(mem, d.config, { indirect: true }));
  const post = (i: number, head: number) => {
    drv[i].setDesc(head, 0x100000 + 0x1000 * (8 * i + head), 2048, W);
    drv[i].publish(head);
  };
  const send = (i: number, head: number) => {
    drv[i].setDesc(head, 0x100000 + 0x1000 * (8 * i + head), 80);
    drv[i].publish(head);
  };
  return { mem, be, svc, tapCalls, polling, warnings, drv, qs, post, send };
}

Deno.test("net: multi-queue: one pair after activation, VQ_PAIRS_SET attaches and polls the others", () => {
  const { be, svc, tapCalls, polling, drv, qs, post, send } = multiQueue();
  svc.activate(CVQ | MQ | featureBit(NET_F.GUEST_CSUM));
  assert.deepEqual(tapCalls, ["offload 10 0x1", "detach 11", "detach 12", "detach 13"]);
  assert.equal(svc.activePairs, 1);
  // the worker serves every queue after activation: RX 0 polls, RX 1 is not in use yet
  post(0, 0);
  post(2, 0);
  be[1].inbox.push(frame(60, 1));
  svc.service(qs[0], 0);
  svc.service(qs[2], 2);
  assert.deepEqual(polling, ["0:on"]);
  assert.equal(be[1].inbox.length, 1, "a pair not in use is not read");
  // TX on a pair not in use goes out through pair 0's tap queue
  send(3, 0);
  svc.service(qs[3], 3);
  assert.equal(be[0].sent.length, 1);
  assert.equal(be[1].sent.length, 0);
  // VQ_PAIRS_SET 4 on the control queue (index 2 × max pairs = 8)
  drv[8].mem.write(0x1f0000, Uint8Array.from([4, 0, 4, 0]));
  drv[8].setDesc(0, 0x1f0000, 4, NEXT, 1);
  drv[8].setDesc(1, 0x1f0100, 1, W);
  drv[8].publish(0);
  assert.equal(svc.service(qs[8], 8), true);
  assert.equal(drv[8].mem.readU8(0x1f0100), NET_OK);
  assert.equal(svc.activePairs, 4);
  assert.deepEqual(tapCalls.slice(4), ["attach 11", "attach 12", "attach 13"]);
  assert.deepEqual(polling, ["0:on", "1:on"], "pairs 2 and 3 poll once their RX queue is served");
  svc.service(qs[2], 2);
  assert.equal(be[1].inbox.length, 0, "pair 1 receives now");
  assert.deepEqual(drv[2].used(0), { id: 0, len: 72 });
  send(3, 1);
  svc.service(qs[3], 3);
  assert.equal(be[1].sent.length, 1, "and transmits through its own tap queue");
  post(4, 0);
  svc.service(qs[4], 4);
  assert.deepEqual(polling, ["0:on", "1:on", "1:off", "2:on"], "pair 1 used its only buffer");
  // back to 2 pairs: 2 and 3 detached, their polling off
  drv[8].mem.write(0x1f0200, Uint8Array.from([4, 0, 2, 0]));
  drv[8].setDesc(2, 0x1f0200, 4, NEXT, 3);
  drv[8].setDesc(3, 0x1f0300, 1, W);
  drv[8].publish(2);
  svc.service(qs[8], 8);
  assert.equal(svc.activePairs, 2);
  assert.deepEqual(tapCalls.slice(7), ["detach 12", "detach 13"]);
  assert.deepEqual(polling.slice(4), ["2:off"]);
  // a control queue index beyond the pairs is not a data queue
  assert.equal(svc.service(qs[8], 9), false);
  svc.deactivate();
  assert.deepEqual(polling.slice(5), ["0:off"]);
});

Deno.test("net: multi-queue without VIRTIO_NET_F_MQ: control queue at 2, one pair; attach failures are refused", () => {
  const m = multiQueue(true);
  m.svc.activate(CVQ);
  assert.equal(m.svc.activePairs, 1);
  // the control queue is queue 2 now: VQ_PAIRS_SET 2 cannot attach the tap queue, so it is refused
  m.mem.write(0x1f0000, Uint8Array.from([4, 0, 2, 0]));
  m.drv[2].setDesc(0, 0x1f0000, 4, NEXT, 1);
  m.drv[2].setDesc(1, 0x1f0100, 1, W);
  m.drv[2].publish(0);
  m.svc.service(m.qs[2], 2);
  assert.equal(m.mem.readU8(0x1f0100), NET_ERR);
  assert.equal(m.warnings.length, 1);
  assert.match(m.warnings[0], /TUNSETQUEUE attach queue 1/);
  // without the control queue, nothing is one
  m.svc.activate(0n);
  m.post(2, 0);
  m.be[1].inbox.push(frame(60, 1));
  assert.equal(m.svc.service(m.qs[2], 2), false);
  assert.equal(m.be[1].inbox.length, 1);
});

// ---------------------------------------------------------------------------------------------------
// Taps (on this host when /dev/net/tun can be used) and the config rule

const closeFd = (fd: number) => shim().kvs_close(fd);

function tunUsable(): boolean {
  try {
    const f = Deno.openSync("/dev/net/tun", { read: true, write: true });
    f.close();
    return Deno.uid() === 0;
  } catch {
    return false;
  }
}

Deno.test({
  name: "tap: a multi-queue tap, one fd per pair, with MTU and host MAC; fds handed over; queue detach",
  ignore: !tunUsable(),
}, () => {
  const name = `dvmq${Deno.pid % 100000}`;
  const t = openTap({
    name,
    queues: 4,
    mtu: 9000,
    hostMac: "02:11:22:33:44:55",
    ip: "10.251.7.1",
    mask: "255.255.255.0",
  });
  try {
    assert.equal(t.fds.length, 4);
    assert.equal(t.fd, t.fds[0]);
    assert.equal(t.name, name);
    assert.equal(t.mtu, 9000);
    assert.equal(getMtu(name), 9000);
    assert.equal(Deno.readTextFileSync(`/sys/class/net/${name}/address`).trim(), "02:11:22:33:44:55");
    assert.ok(parseInt(Deno.readTextFileSync(`/sys/class/net/${name}/tun_flags`), 16) & IFF_MULTI_QUEUE);
    // the same tap by name with another queue count is refused before touching it
    assert.throws(() => openTap({ name, queues: 1 }), /multi-queue tap, but one queue pair/);
    // handed over as fds: validated, MTU set, the name found
    const again = openTap({ fds: t.fds, mtu: 4000 });
    assert.deepEqual([again.name, again.fds, again.mtu], [name, t.fds, 4000]);
    assert.throws(() => openTap({ fds: [t.fds[0], 0] }), /TUNGETIFF/);
    // a detached queue cannot be detached twice; it attaches again
    assert.equal(setTapQueue(t.fds[3], false), 0);
    assert.equal(setTapQueue(t.fds[3], false), -22);
    assert.equal(setTapQueue(t.fds[3], true), 0);
  } finally {
    for (const fd of t.fds) closeFd(fd);
  }
  const single = openTap({ name, mtu: 1400 });
  try {
    assert.equal(single.fds.length, 1);
    assert.equal(single.mtu, 1400);
    assert.throws(() => openTap({ name, queues: 2 }), /exists without multi-queue support/);
    assert.throws(() => openTap({ fds: [single.fd, single.fd] }), /without IFF_MULTI_QUEUE/);
  } finally {
    closeFd(single.fd);
  }
});

Deno.test("net config: no more queue pairs than boot vCPUs (as Cloud Hypervisor); fds one per pair", () => {
  const base = { payload: { kernel: "/k" } };
  const ok = VmConfigSchema.parse({
    ...base,
    cpus: { boot_vcpus: 4, max_vcpus: 4 },
    net: [{ num_queues: 8 }],
  });
  assert.equal(ok.net![0].num_queues, 8);
  assert.throws(
    () => VmConfigSchema.parse({ ...base, cpus: { boot_vcpus: 3, max_vcpus: 3 }, net: [{ num_queues: 8 }] }),
    /num_queues=8 is 4 queue pairs, more than the 3 boot vCPU/,
  );
  assert.throws(
    () =>
      VmConfigSchema.parse({
        ...base,
        cpus: { boot_vcpus: 4, max_vcpus: 4 },
        net: [{ fds: [3], num_queues: 4 }],
      }),
    /one descriptor per queue pair/,
  );
});
