/**
 * The vhost-user front-end: message framing byte for byte, and the front-end's exchanges with a
 * scripted back-end over a real UNIX socket (tests/helpers/vhost_user_fake_worker.ts): the creation
 * handshake, activation (memfds, kick and call eventfds as SCM_RIGHTS) and the reset, plus back-ends
 * that hang up, answer garbage, stay silent or refuse. The fake only checks framing; the KVM lab test
 * (tests/lab_vhost_user_test.ts) runs real back-ends (virtiofsd, qemu-storage-daemon).
 */
import assert from "node:assert/strict";
import { shim } from "../ffi/shim.ts";
import { EventFd, mapMemfd, mappingBytes, unmap } from "../ffi/kvm.ts";
import { EFD_NONBLOCK } from "../ffi/kvm_constants.ts";
import { unixListen } from "../ffi/socket.ts";
import {
  configPayload,
  decodeHeader,
  encodeMessage,
  FLAG_NEED_REPLY,
  memTablePayload,
  PROTOCOL_F,
  readConfig,
  readU64,
  readVringState,
  u64Payload,
  VHOST_USER,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VhostUserError,
  VhostUserFrontend,
  vringAddrPayload,
  vringStatePayload,
} from "../devices/virtio/vhost_user.ts";
import {
  connectVhostUser,
  fsConfigSpace,
  VhostUserControl,
  waitVhostUserStopped,
} from "../devices/virtio/device_vhost_user.ts";
import { BLK_F, F, featureBit, VIRTIO_ID } from "../devices/virtio/constants.ts";
import type { Activation } from "../devices/virtio/pci_transport.ts";
import type { FakeBackendInit, FakeReport } from "./helpers/vhost_user_fake_worker.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { FakeDriverQueue, writeCommon as common } from "./virtio_driver.ts";
import { VirtioPciDevice } from "../devices/virtio/pci_transport.ts";
import {
  CTL_STOP,
  newControlBlock,
  type VirtioDeviceDescriptor,
  VirtioDeviceHandle,
} from "../devices/virtio/device_shared.ts";
import type { DeviceWorkerExit } from "../devices/virtio/worker.ts";
import { which } from "./helpers/host.ts";

const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const bit = (n: number) => featureBit(n);
const PF = bit(VHOST_USER_F_PROTOCOL_FEATURES);

Deno.test("vhost-user framing: header and payloads byte for byte", () => {
  assert.equal(hex(encodeMessage(VHOST_USER.GET_FEATURES)), "01000000" + "01000000" + "00000000");
  assert.equal(
    hex(encodeMessage(VHOST_USER.SET_FEATURES, u64Payload(0x1_4000_0000n), FLAG_NEED_REPLY)),
    "02000000" + "09000000" + "08000000" + "0000004001000000",
  );
  assert.deepEqual(decodeHeader(encodeMessage(VHOST_USER.GET_VRING_BASE, vringStatePayload(3, 0))), {
    request: 11,
    flags: 1,
    size: 8,
  });
  assert.equal(hex(vringStatePayload(2, 256)), "02000000" + "00010000");
  assert.deepEqual(readVringState(vringStatePayload(5, 77)), { index: 5, num: 77 });
  assert.equal(readU64(u64Payload(0x0102030405060708n)), 0x0102030405060708n);
  // { index, flags, desc, used, avail, log }: used comes before avail.
  assert.equal(
    hex(vringAddrPayload({ index: 1, desc: 0x1000n, used: 0x3000n, avail: 0x2000n })),
    "01000000" + "00000000" + "0010000000000000" + "0030000000000000" + "0020000000000000" +
      "0000000000000000",
  );
  const mt = memTablePayload([
    { guestPhysAddr: 0n, size: 0x8000_0000n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n, fd: 5 },
    { guestPhysAddr: 0x1_0000_0000n, size: 0x1000_0000n, userAddr: 0x7e00_0000_0000n, mmapOffset: 0n, fd: 6 },
  ]);
  assert.equal(mt.length, 8 + 2 * 32);
  assert.equal(hex(mt.subarray(0, 8)), "02000000" + "00000000");
  assert.equal(
    hex(mt.subarray(40, 72)),
    "0000000001000000" + "0000001000000000" + "00000000007e0000" + "0000000000000000",
  );
  assert.throws(() => memTablePayload([]), RangeError);
  const cfg = configPayload(0, 4, 0, new Uint8Array([1, 2, 3, 4]));
  assert.equal(hex(cfg), "00000000" + "04000000" + "00000000" + "01020304");
  assert.deepEqual(readConfig(cfg).bytes, new Uint8Array([1, 2, 3, 4]));
  assert.throws(() => readConfig(cfg.subarray(0, 14)), RangeError);
});

Deno.test("virtio-fs configuration: tag padded to 36 bytes, then le32 request queues", () => {
  const c = fsConfigSpace("myfs", 1);
  assert.equal(c.length, 40);
  assert.equal(new TextDecoder().decode(c.subarray(0, 4)), "myfs");
  assert.ok(c.subarray(4, 36).every((b) => b === 0));
  assert.equal(hex(c.subarray(36)), "01000000");
  assert.throws(() => fsConfigSpace("x".repeat(37), 1));
});

// ---------------------------------------------------------------------------------------------------

interface Fake {
  path: string;
  report: Promise<FakeReport>;
  done(): void;
}

let n = 0;
/** A fake back-end listening at a fresh socket path, served by a worker thread. */
function fakeBackend(init: Omit<FakeBackendInit, "listenFd">): Fake {
  const dir = Deno.makeTempDirSync({ prefix: "dvmm-vu-" });
  const path = `${dir}/vu${n++}.sock`;
  const listenFd = unixListen(path);
  const w = new Worker(new URL("./helpers/vhost_user_fake_worker.ts", import.meta.url).href, {
    type: "module",
  });
  const report = new Promise<FakeReport>((resolve, reject) => {
    w.onmessage = (ev) => resolve(ev.data);
    w.onerror = (ev) => {
      ev.preventDefault();
      reject(new Error(ev.message));
    };
  });
  w.postMessage({ ...init, listenFd });
  return {
    path,
    report,
    done() {
      w.terminate();
      shim().kvs_close(listenFd);
      Deno.removeSync(dir, { recursive: true });
    },
  };
}

const BACKEND_FEATURES = bit(F.VERSION_1) | bit(F.EVENT_IDX) | bit(F.INDIRECT_DESC) | PF |
  bit(F.RING_PACKED) | bit(BLK_F.FLUSH) | bit(BLK_F.SEG_MAX) | bit(BLK_F.CONFIG_WCE) | bit(BLK_F.MQ);
const PROTOCOL = bit(PROTOCOL_F.MQ) | bit(PROTOCOL_F.REPLY_ACK) | bit(PROTOCOL_F.CONFIG) |
  bit(PROTOCOL_F.BACKEND_REQ) | bit(PROTOCOL_F.INFLIGHT_SHMFD);

function blkConfig(): Uint8Array {
  const c = new Uint8Array(60);
  new DataView(c.buffer).setBigUint64(0, 2048n, true); // capacity, sectors
  new DataView(c.buffer).setUint32(12, 254, true); // seg_max
  return c;
}

Deno.test("vhost-user-blk creation: owner, features, protocol features, queue count, config", async () => {
  const fake = fakeBackend({
    mode: "normal",
    features: BACKEND_FEATURES,
    protocolFeatures: PROTOCOL,
    queueNum: 4,
    config: blkConfig(),
  });
  const mem = mapMemfd(0x10000, "vu-test");
  try {
    const ram = [{ gpa: 0, size: 0x10000, hostAddr: mem.hostAddr, fd: mem.fd }];
    const { spec, vhostUser } = connectVhostUser({
      kind: "blk",
      id: "_disk0",
      socket: fake.path,
      queueSizes: [128, 128],
      ram,
    });
    assert.equal(spec.type, VIRTIO_ID.BLOCK);
    assert.equal(spec.numQueues, 2);
    assert.equal(spec.maxQueueSize, 128);
    // Offered: the transport's and blk's bits the back-end has; not packed rings, not the WCE toggle,
    // never the vhost-user protocol bit.
    assert.equal(
      spec.features,
      bit(F.VERSION_1) | bit(F.EVENT_IDX) | bit(F.INDIRECT_DESC) | bit(BLK_F.FLUSH) | bit(BLK_F.SEG_MAX) |
        bit(BLK_F.MQ),
    );
    const cv = new DataView(spec.config.buffer, spec.config.byteOffset);
    assert.equal(cv.getBigUint64(0, true), 2048n);
    assert.equal(cv.getUint16(34, true), 2, "num_queues is the device's");
    assert.equal(
      vhostUser.protocolFeatures,
      bit(PROTOCOL_F.MQ) | bit(PROTOCOL_F.REPLY_ACK) | bit(PROTOCOL_F.CONFIG),
    );
    assert.equal(vhostUser.backendFeatures, BACKEND_FEATURES);
    shim().kvs_close(vhostUser.socketFd);
    const r = await fake.report;
    assert.equal(r.error, undefined);
    assert.deepEqual(r.messages.map((m) => m.request), [
      VHOST_USER.SET_OWNER,
      VHOST_USER.GET_FEATURES,
      VHOST_USER.GET_PROTOCOL_FEATURES,
      VHOST_USER.SET_PROTOCOL_FEATURES,
      VHOST_USER.GET_QUEUE_NUM,
      VHOST_USER.GET_CONFIG,
    ]);
    // Before REPLY_ACK is agreed nothing asks for a reply; after it, requests without one do.
    assert.ok(r.messages.every((m) => (m.flags & FLAG_NEED_REPLY) === 0));
    assert.equal(readU64(r.messages[3].payload), vhostUser.protocolFeatures);
  } finally {
    unmap(mem);
    fake.done();
  }
});

Deno.test("vhost-user activation and reset: memfds, rings, kick and call eventfds, enable, vring base", async () => {
  const fake = fakeBackend({
    mode: "normal",
    features: BACKEND_FEATURES,
    protocolFeatures: PROTOCOL,
    queueNum: 2,
    vringBase: 7,
  });
  const mem = mapMemfd(0x20000, "vu-test");
  mappingBytes(mem).set([0xde, 0xad, 0xbe, 0xef]);
  const kick = [EventFd.create(EFD_NONBLOCK), EventFd.create(EFD_NONBLOCK)];
  const call = [0, 1, 2].map(() => EventFd.create(EFD_NONBLOCK));
  try {
    const ram = [{ gpa: 0x10_0000, size: 0x20000, hostAddr: mem.hostAddr, fd: mem.fd }];
    const { vhostUser } = connectVhostUser({
      kind: "fs",
      id: "_fs0",
      socket: fake.path,
      tag: "myfs",
      queueSizes: [64, 64],
      ram,
    });
    const fe = new VhostUserFrontend(vhostUser.socketFd, { protocolFeatures: vhostUser.protocolFeatures });
    const ctl = new VhostUserControl(
      fe,
      ram,
      kick.map((e) => e.fd),
      call.map((e) => e.fd),
      vhostUser.backendFeatures,
    );
    const a: Activation = {
      features: bit(F.VERSION_1) | bit(F.EVENT_IDX),
      eventIdx: true,
      indirect: false,
      configMsixVector: 0,
      queues: [
        {
          index: 0,
          size: 64,
          descAddr: 0x10_1000,
          driverAddr: 0x10_1400,
          deviceAddr: 0x10_1600,
          msixVector: 1,
          notifyOffset: 0,
        },
        {
          index: 1,
          size: 64,
          descAddr: 0x10_2000,
          driverAddr: 0x10_2400,
          deviceAddr: 0x10_2600,
          msixVector: 2,
          notifyOffset: 4,
        },
      ],
    };
    ctl.start(a);
    assert.deepEqual(ctl.running, [0, 1]);
    const bases = ctl.stop();
    assert.deepEqual([...bases], [[0, 7], [1, 7]]);
    // A ring outside guest RAM is refused before the back-end hears of it.
    const bad = { ...a, queues: [{ ...a.queues[0], descAddr: 0x1000 }] };
    assert.throws(() => ctl.start(bad), /not in guest RAM/);
    fe.close();
    // The back-end signalled each call fd it was given: the vector's irqfd, one each.
    const word = new Uint8Array(8);
    assert.equal(Number(shim().kvs_read(call[0].fd, word, 8)), -11, "vector 0 (config) untouched");
    assert.equal(Number(shim().kvs_read(call[1].fd, word, 8)), 8);
    assert.equal(Number(shim().kvs_read(call[2].fd, word, 8)), 8);

    const r = await fake.report;
    assert.equal(r.error, undefined);
    const act = r.messages.slice(5); // after owner, features, protocol features (get, set), queue num
    const names = act.map((m) => Object.entries(VHOST_USER).find(([, v]) => v === m.request)![0]);
    assert.deepEqual(names, [
      "SET_FEATURES",
      "SET_MEM_TABLE",
      "SET_VRING_NUM",
      "SET_VRING_NUM",
      "SET_VRING_BASE",
      "SET_VRING_ADDR",
      "SET_VRING_CALL",
      "SET_VRING_KICK",
      "SET_VRING_BASE",
      "SET_VRING_ADDR",
      "SET_VRING_CALL",
      "SET_VRING_KICK",
      "SET_VRING_ENABLE",
      "SET_VRING_ENABLE",
      "SET_VRING_ENABLE",
      "GET_VRING_BASE",
      "SET_VRING_ENABLE",
      "GET_VRING_BASE",
    ]);
    // REPLY_ACK agreed: every request without a reply of its own asks for one.
    for (const m of act) {
      const asks = (m.flags & FLAG_NEED_REPLY) !== 0;
      assert.equal(asks, m.request !== VHOST_USER.GET_VRING_BASE, `flags of request ${m.request}`);
    }
    // The driver's features plus the protocol-features bit.
    assert.equal(readU64(act[0].payload), a.features | PF);
    // The memory table: the region's guest and host addresses, its memfd (which holds guest RAM).
    assert.equal(act[1].fds, 1);
    assert.equal(act[1].memfdHeads![0].slice(0, 8), "deadbeef");
    const mt = new DataView(act[1].payload.buffer);
    assert.equal(mt.getUint32(0, true), 1);
    assert.equal(mt.getBigUint64(8, true), 0x10_0000n);
    assert.equal(mt.getBigUint64(16, true), 0x20000n);
    assert.equal(mt.getBigUint64(24, true), mem.hostAddr);
    assert.equal(mt.getBigUint64(32, true), 0n);
    assert.deepEqual(readVringState(act[2].payload), { index: 0, num: 64 });
    assert.deepEqual(readVringState(act[4].payload), { index: 0, num: 0 });
    // Ring addresses are dvmm's own (user) addresses of the guest rings.
    const ra = new DataView(act[5].payload.buffer);
    assert.equal(ra.getBigUint64(8, true), mem.hostAddr + 0x1000n);
    assert.equal(ra.getBigUint64(16, true), mem.hostAddr + 0x1600n, "used");
    assert.equal(ra.getBigUint64(24, true), mem.hostAddr + 0x1400n, "avail");
    for (const i of [6, 7, 10, 11]) assert.equal(act[i].fds, 1, `${names[i]} carries its eventfd`);
    assert.equal(readU64(act[10].payload), 1n, "ring 1's call");
    assert.deepEqual(readVringState(act[12].payload), { index: 0, num: 1 });
    assert.deepEqual(readVringState(act[14].payload), { index: 0, num: 0 });
    // Each ring got one kick at start (notifies made before the ioeventfd existed are not lost).
    assert.deepEqual(r.kicked.sort(), [0, 1]);
  } finally {
    for (const e of [...kick, ...call]) e.close();
    unmap(mem);
    fake.done();
  }
});

const base = { features: BACKEND_FEATURES, protocolFeatures: PROTOCOL, queueNum: 2, config: blkConfig() };
const setup = (path: string) => ({
  kind: "blk" as const,
  id: "_disk0",
  socket: path,
  queueSizes: [128],
  ram: [{ gpa: 0, size: 0x1000, hostAddr: 0x1000n, fd: 99 }],
  timeoutMs: 500,
});

Deno.test("vhost-user: a back-end that hangs up, answers garbage, stays silent or refuses is an error", async (t) => {
  const cases: [string, FakeBackendInit["mode"], number, RegExp][] = [
    ["hang-up", "hangup", VHOST_USER.GET_FEATURES, /GET_FEATURES: the back-end closed the connection/],
    [
      "garbage",
      "garbage",
      VHOST_USER.GET_QUEUE_NUM,
      /GET_QUEUE_NUM: the back-end answered with SET_MEM_TABLE/,
    ],
    ["silence", "silent", VHOST_USER.GET_CONFIG, /GET_CONFIG: no answer from the back-end within 500 ms/],
  ];
  for (const [name, mode, at, re] of cases) {
    await t.step(name, async () => {
      const fake = fakeBackend({ ...base, mode, at });
      try {
        assert.throws(() => connectVhostUser(setup(fake.path)), re);
        await fake.report;
      } finally {
        fake.done();
      }
    });
  }
  await t.step("a failed REPLY_ACK", async () => {
    const fake = fakeBackend({ ...base, mode: "nack", at: VHOST_USER.SET_MEM_TABLE });
    const mem = mapMemfd(0x1000, "vu-test");
    try {
      const ram = [{ gpa: 0, size: 0x1000, hostAddr: mem.hostAddr, fd: mem.fd }];
      const { vhostUser } = connectVhostUser({ ...setup(fake.path), ram });
      const fe = new VhostUserFrontend(vhostUser.socketFd, { protocolFeatures: vhostUser.protocolFeatures });
      const ctl = new VhostUserControl(fe, ram, [], [], vhostUser.backendFeatures);
      assert.throws(
        () =>
          ctl.start({
            features: bit(F.VERSION_1),
            eventIdx: false,
            indirect: false,
            configMsixVector: 0,
            queues: [],
          }),
        (e) =>
          e instanceof VhostUserError && /SET_MEM_TABLE: the back-end answered failure \(1\)/.test(e.message),
      );
      // Once broken, the connection is not used again.
      assert.throws(() => fe.getFeatures(), /connection unusable/);
      fe.close();
      await fake.report;
    } finally {
      unmap(mem);
      fake.done();
    }
  });
  await t.step("probe: the back-end hung up while no request was outstanding", async () => {
    const fake = fakeBackend({ ...base, mode: "hangup", at: VHOST_USER.SET_OWNER });
    try {
      const fe = VhostUserFrontend.connect(fake.path, { timeoutMs: 500 });
      assert.equal(fe.probe(), null, "nothing to read yet");
      fe.setOwner(); // no reply expected; the back-end hangs up after reading it
      await fake.report;
      assert.equal(fe.probe(), "the back-end closed the connection");
      assert.throws(() => fe.getFeatures(), /connection unusable \(the back-end closed the connection\)/);
      fe.close();
    } finally {
      fake.done();
    }
  });
  await t.step("no back-end at the path: retried, then a clear error", () => {
    const t0 = performance.now();
    assert.throws(
      () => VhostUserFrontend.connect("/nonexistent/vu.sock", { connectTimeoutMs: 300 }),
      /cannot connect to the vhost-user back-end at \/nonexistent\/vu\.sock/,
    );
    assert.ok(performance.now() - t0 >= 250, "retried until the deadline");
  });
  await t.step("memory not shared", () => {
    assert.throws(
      () => connectVhostUser({ ...setup("/x"), ram: [{ gpa: 0, size: 0x1000, hostAddr: 0x1000n }] }),
      /--memory shared=on/,
    );
  });
});

// ---------------------------------------------------------------------------------------------------
// Real back-ends on this host (no VM): dvmm's control plane programs them over guest "RAM" in a memfd,
// a hand-made driver puts one request in a ring, kicks, and waits for the call eventfd.

const VIRTIOFSD = "/usr/lib/qemu/virtiofsd";
const QSD = which("qemu-storage-daemon");
const hasVirtiofsd = (() => {
  try {
    return Deno.statSync(VIRTIOFSD).isFile && Deno.uid() === 0;
  } catch {
    return false;
  }
})();

/** Starts a back-end and waits for its socket. */
async function startBackend(cmd: string, args: string[], sock: string): Promise<Deno.ChildProcess> {
  const p = new Deno.Command(cmd, { args, stdout: "null", stderr: "null" }).spawn();
  for (let i = 0; i < 100; i++) {
    try {
      if (Deno.statSync(sock).isSocket) return p;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  p.kill("SIGKILL");
  await p.status;
  throw new Error(`${cmd} did not create ${sock}`);
}

/**
 * One request through a real back-end: `fill` lays it out in guest memory and the ring; the result has
 * the used entry and what `inspect` read from guest memory (before it is unmapped).
 */
async function oneRequest(
  kind: "fs" | "blk" | "generic",
  sock: string,
  fill: (mem: GuestMemory, drv: FakeDriverQueue) => void,
  inspect: (mem: GuestMemory) => Uint8Array,
) {
  const m = mapMemfd(1 << 20, "vu-real");
  const ram = [{ gpa: 0, size: 1 << 20, hostAddr: m.hostAddr, fd: m.fd }];
  const mem = GuestMemory.fromHost(ram);
  const nq = kind === "fs" ? 2 : 1;
  const queueSizes = Array<number>(nq).fill(64);
  const vu = connectVhostUser({ kind, id: "t", socket: sock, tag: "myfs", queueSizes, ram, deviceType: 2 });
  const fe = new VhostUserFrontend(vu.vhostUser.socketFd, {
    protocolFeatures: vu.vhostUser.protocolFeatures,
  });
  const kicks = Array.from({ length: nq }, () => EventFd.create(EFD_NONBLOCK));
  const calls = Array.from({ length: nq + 1 }, () => EventFd.create(EFD_NONBLOCK));
  const fds = (l: EventFd[]) => l.map((e) => e.fd);
  const ctl = new VhostUserControl(fe, ram, fds(kicks), fds(calls), vu.vhostUser.backendFeatures);
  const drivers = Array.from({ length: nq }, (_, i) => new FakeDriverQueue(mem, 0x10000 + 0x8000 * i, 64));
  const q = drivers[nq - 1]; // fs: the first request queue; blk: its queue
  try {
    ctl.start({
      features: bit(F.VERSION_1),
      eventIdx: false,
      indirect: false,
      configMsixVector: 0,
      queues: drivers.map((d, i) => ({ index: i, ...d.config, msixVector: i + 1, notifyOffset: 4 * i })),
    });
    fill(mem, q);
    q.publish(0);
    shim().kvs_write(kicks[nq - 1].fd, new Uint8Array(new BigUint64Array([1n]).buffer), 8);
    for (let i = 0; i < 200 && q.usedIdx() === 0; i++) await new Promise((r) => setTimeout(r, 25));
    const called = Number(shim().kvs_read(calls[nq].fd, new Uint8Array(8), 8)) === 8;
    const used = q.usedIdx() === 1 ? q.used(0) : null;
    const bases = ctl.stop();
    return { out: inspect(mem), used, called, bases, spec: vu.spec };
  } finally {
    fe.close();
    for (const e of [...kicks, ...calls]) e.close();
    unmap(m);
  }
}

Deno.test({
  name: "vhost-user against QEMU's virtiofsd on this host: FUSE_INIT through the request queue",
  ignore: !hasVirtiofsd,
}, async () => {
  const dir = Deno.makeTempDirSync({ prefix: "dvmm-vu-real-" });
  Deno.mkdirSync(`${dir}/share`);
  const sock = `${dir}/fs.sock`;
  const p = await startBackend(
    VIRTIOFSD,
    [`--socket-path=${sock}`, "-o", `source=${dir}/share`, "-o", "cache=none", "-o", "sandbox=chroot"],
    sock,
  );
  try {
    const IN = 0x40000, OUT = 0x41000;
    const r = await oneRequest("fs", sock, (mem, drv) => {
      mem.writeU32(IN, 56); // fuse_in_header.len
      mem.writeU32(IN + 4, 26); // FUSE_INIT
      mem.writeU64(IN + 8, 77); // unique
      mem.writeU32(IN + 40, 7); // fuse_init_in: major, minor, max_readahead, flags
      mem.writeU32(IN + 44, 31);
      drv.setDesc(0, IN, 56, 1, 1);
      drv.setDesc(1, OUT, 80, 2, 0);
    }, (mem) => mem.read(OUT, 24));
    assert.equal(r.spec.type, VIRTIO_ID.FS);
    assert.deepEqual(r.used, { id: 0, len: 80 }, "one used entry");
    assert.ok(r.called, "the back-end signalled the queue's call eventfd");
    const o = new DataView(r.out.buffer, r.out.byteOffset);
    assert.equal(o.getUint32(0, true), 80); // fuse_out_header.len
    assert.equal(o.getInt32(4, true), 0); // error
    assert.equal(o.getBigUint64(8, true), 77n); // unique
    assert.equal(o.getUint32(16, true), 7); // fuse_init_out.major
    assert.deepEqual([...r.bases], [[0, 0], [1, 1]]);
  } finally {
    p.kill("SIGKILL");
    await p.status;
    Deno.removeSync(dir, { recursive: true });
  }
});

for (const kind of ["blk", "generic"] as const) {
  Deno.test({
    name: `vhost-user against qemu-storage-daemon on this host (${
      kind === "blk" ? "--disk vhost_user=on" : "--generic-vhost-user device_type=block"
    }): config from the back-end, a sector read`,
    ignore: QSD === null,
  }, async () => {
    const dir = Deno.makeTempDirSync({ prefix: "dvmm-vu-real-" });
    const img = `${dir}/disk.img`;
    const data = new Uint8Array(1 << 20);
    data.set(new TextEncoder().encode("blk-token-9001"));
    Deno.writeFileSync(img, data);
    const sock = `${dir}/blk.sock`;
    const p = await startBackend(QSD!, [
      "--blockdev",
      `driver=file,node-name=f,filename=${img}`,
      "--export",
      `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sock},writable=on`,
    ], sock);
    try {
      const HDR = 0x40000, DATA = 0x41000, ST = 0x42000;
      const r = await oneRequest(kind, sock, (mem, drv) => {
        mem.writeU32(HDR, 0); // T_IN
        mem.writeU64(HDR + 8, 0); // sector 0
        mem.writeU8(ST, 0xee);
        drv.setDesc(0, HDR, 16, 1, 1);
        drv.setDesc(1, DATA, 512, 3, 2);
        drv.setDesc(2, ST, 1, 2, 0);
      }, (mem) => new Uint8Array([...mem.read(DATA, 14), mem.readU8(ST)]));
      const cfg = new DataView(r.spec.config.buffer, r.spec.config.byteOffset);
      assert.equal(cfg.getBigUint64(0, true), 2048n, "capacity in sectors, from the back-end");
      assert.equal(r.spec.type, VIRTIO_ID.BLOCK);
      assert.ok(r.spec.features & bit(BLK_F.FLUSH));
      assert.deepEqual(r.used, { id: 0, len: 513 });
      assert.ok(r.called, "the back-end signalled the queue's call eventfd");
      assert.equal(r.out[14], 0, "status OK");
      assert.equal(new TextDecoder().decode(r.out.subarray(0, 14)), "blk-token-9001");
    } finally {
      p.kill("SIGKILL");
      await p.status;
      Deno.removeSync(dir, { recursive: true });
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The device worker (devices/virtio/worker.ts) as the control plane, driven through the transport.

Deno.test("vhost-user device worker: DRIVER_OK programs the back-end, a reset waits for the rings to stop, a hang-up needs reset", async (t) => {
  for (const mode of ["normal", "hangup"] as const) {
    await t.step(
      mode === "normal" ? "activation and reset" : "back-end hangs up during activation",
      async () => {
        const fake = fakeBackend({ mode, at: VHOST_USER.SET_VRING_ENABLE, ...base, vringBase: 3 });
        const mem = mapMemfd(0x100000, "vu-worker");
        const fds: EventFd[] = [];
        const efd = () => {
          const e = EventFd.create(EFD_NONBLOCK);
          fds.push(e);
          return e.fd;
        };
        let w: Worker | null = null;
        try {
          const ram = [{ gpa: 0, size: 0x100000, hostAddr: mem.hostAddr, fd: mem.fd }];
          const vu = connectVhostUser({
            kind: "fs",
            id: "_fs0",
            socket: fake.path,
            tag: "myfs",
            queueSizes: [64, 64],
            ram,
          });
          const tr = new VirtioPciDevice(vu.spec);
          const desc: VirtioDeviceDescriptor = {
            id: "_fs0",
            kind: "vhost_user",
            slot: 1,
            spec: vu.spec,
            shared: tr.shared,
            control: newControlBlock(),
            queueFds: [efd(), efd()],
            irqFds: [efd(), efd(), efd()],
            controlFd: efd(),
            gsiBase: 24,
            counters: new SharedArrayBuffer(8),
            vhostUser: vu.vhostUser,
          };
          const h = new VirtioDeviceHandle(desc, tr);
          let stopWait = -1;
          tr.onActivate = () => h.bumpEpoch();
          tr.onReset = () => {
            h.bumpEpoch();
            const t0 = performance.now();
            waitVhostUserStopped(desc, h.epoch);
            stopWait = performance.now() - t0;
          };
          w = new Worker(new URL("../devices/virtio/worker.ts", import.meta.url).href, { type: "module" });
          const exited = new Promise<DeviceWorkerExit>((r) => w!.onmessage = (ev) => r(ev.data));
          w.postMessage({ devices: [desc], ram });
          // The driver: features (VERSION_1 only), two queues at fixed addresses, vectors 1 and 2.
          common(tr, 0x14, 1, 1 | 2);
          common(tr, 0x08, 4, 1);
          common(tr, 0x0c, 4, 1); // VERSION_1 (bit 32)
          common(tr, 0x14, 1, 1 | 2 | 8);
          for (const q of [0, 1]) {
            common(tr, 0x16, 2, q);
            common(tr, 0x18, 2, 64);
            common(tr, 0x1a, 2, q + 1);
            common(tr, 0x20, 4, 0x10000 + 0x1000 * q);
            common(tr, 0x28, 4, 0x10400 + 0x1000 * q);
            common(tr, 0x30, 4, 0x10800 + 0x1000 * q);
            common(tr, 0x1c, 2, 1);
          }
          common(tr, 0x14, 1, 1 | 2 | 4 | 8); // DRIVER_OK: the worker programs the back-end
          const deadline = performance.now() + 5000;
          if (mode === "normal") {
            // Started once both call eventfds have been signalled by the fake (it does that on SET_VRING_CALL).
            const word = new Uint8Array(8);
            const got = new Set<number>();
            while (got.size < 2 && performance.now() < deadline) {
              for (const v of [1, 2]) if (Number(shim().kvs_read(desc.irqFds[v], word, 8)) === 8) got.add(v);
              await new Promise((r) => setTimeout(r, 10));
            }
            assert.equal(got.size, 2, "both rings' call eventfds went to the back-end");
            common(tr, 0x14, 1, 0); // reset: returns once the worker stopped the rings
            assert.ok(stopWait >= 0 && stopWait < 4000, `reset waited ${stopWait} ms`);
          } else {
            while (!(tr.status & 0x40) && performance.now() < deadline) {
              await new Promise((r) => setTimeout(r, 10));
            }
            assert.ok(tr.status & 0x40, "DEVICE_NEEDS_RESET after the back-end hung up");
            common(tr, 0x14, 1, 0); // a reset does not wait for a dead back-end
            assert.ok(stopWait >= 0 && stopWait < 1000, `reset waited ${stopWait} ms`);
          }
          Atomics.store(h.ctl, CTL_STOP, 1);
          h.kickWorker();
          const ex = await exited;
          assert.equal(ex.error, undefined, ex.error);
          shim().kvs_close(vu.vhostUser.socketFd);
          const r = await fake.report;
          const reqs = r.messages.map((m) => m.request);
          if (mode === "normal") {
            // After the handshake: the activation, then on reset each ring disabled and its base taken.
            const tail = reqs.slice(-4);
            assert.deepEqual(tail, [
              VHOST_USER.SET_VRING_ENABLE,
              VHOST_USER.GET_VRING_BASE,
              VHOST_USER.SET_VRING_ENABLE,
              VHOST_USER.GET_VRING_BASE,
            ]);
            assert.ok(reqs.includes(VHOST_USER.SET_MEM_TABLE));
          } else {
            assert.equal(reqs.at(-1), VHOST_USER.SET_VRING_ENABLE);
          }
        } finally {
          w?.terminate();
          for (const e of fds) e.close();
          unmap(mem);
          fake.done();
        }
      },
    );
  }
});
