import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { addressOf, EAGAIN, EBADF, EFAULT, hostBytes } from "../ffi/shim.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  type NetBackend,
  netConfigSpace,
  NetCounters,
  NetDevice,
  netFeatures,
  RX_QUEUE,
  tapOffloadFor,
  TX_QUEUE,
} from "../devices/virtio/net.ts";
import { NetService } from "../devices/virtio/device_net.ts";
import { formatMac, parseIpv4, parseMac, randomMac } from "../devices/virtio/tap.ts";
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
    let done = 0;
    for (let i = 0; i < count && done < f.length; i++) {
      const dst = hostBytes(iov[2 * i], Number(iov[2 * i + 1]));
      const n = Math.min(dst.length, f.length - done);
      dst.set(f.subarray(done, done + n));
      done += n;
    }
    return done;
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
  const svc = new NetService(-1, new NetCounters(), {
    setPolling: (on) => polling.push(on),
    warn: (m) => warnings.push(m),
  }, be);
  svc.activate(0n); // TUNSETOFFLOAD on fd -1 fails: a warning, not a crash
  assert.deepEqual(polling, [true]);
  assert.equal(warnings.length, 1);
  be.inbox.push(frame(60, 1));
  assert.equal(svc.service(rx, RX_QUEUE), false); // no buffers: stop polling
  assert.deepEqual(polling, [true, false]);
  rxd.setDesc(0, 0x10000, 2048, W);
  rxd.publish(0);
  rxd.setDesc(1, 0x11000, 2048, W);
  rxd.publish(1);
  assert.equal(svc.service(rx, RX_QUEUE), true); // the notify serves the frame; tap empty: poll again
  assert.deepEqual(polling, [true, false, true]);
  txd.setDesc(0, 0x20000, 64);
  txd.publish(0);
  assert.equal(svc.service(tx, TX_QUEUE), true);
  assert.equal(be.sent.length, 1);
  svc.deactivate();
  assert.deepEqual(polling, [true, false, true, false]);
});

Deno.test("net: features, tap offloads and config space", () => {
  const base = netFeatures();
  for (const b of [NET_F.MAC, NET_F.STATUS]) assert.ok(base & featureBit(b));
  for (const b of [F.VERSION_1, F.EVENT_IDX, F.INDIRECT_DESC]) assert.ok(base & featureBit(b));
  assert.equal(base & (featureBit(NET_F.CSUM) | featureBit(NET_F.GUEST_TSO4) | featureBit(NET_F.MQ)), 0n);
  assert.equal(base & featureBit(NET_F.HOST_UFO), 0n);
  const all = netFeatures({ csum: true, tso: true });
  assert.ok(all & featureBit(NET_F.GUEST_TSO6));
  assert.equal(tapOffloadFor(0n), 0);
  assert.equal(tapOffloadFor(featureBit(NET_F.GUEST_TSO4)), 0, "TSO without GUEST_CSUM is not set");
  assert.equal(tapOffloadFor(all), 0x0f);
  assert.equal(tapOffloadFor(featureBit(NET_F.GUEST_CSUM)), 0x01);
  const cfg = netConfigSpace(parseMac("52:54:00:12:34:56"));
  assert.deepEqual(Array.from(cfg), [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0, 0]);
  const m = randomMac();
  assert.equal(m[0] & 3, 2, "unicast, locally administered");
  assert.equal(formatMac(parseMac("52:54:0:a:bb:cc")), "52:54:00:0a:bb:cc");
  assert.throws(() => parseMac("52:54:00:12:34"), /bad MAC/);
  assert.deepEqual(Array.from(parseIpv4("192.168.249.1")), [192, 168, 249, 1]);
  assert.throws(() => parseIpv4("192.168.249.256"), /bad IPv4/);
});
