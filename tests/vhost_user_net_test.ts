/**
 * vhost-user-net without the lab: dvmm's front-end (connectVhostUser, VhostUserControl) talks over a
 * real UNIX socket to dvmm's own back-end (`dvmm vhost-user-net`, run as a process) with a memfd as
 * guest memory and a real tap (this test needs root, as the back-end creates the tap):
 *
 * - negotiation: the features the device offers the guest (the back-end's, limited by the offload
 *   options, plus dvmm's own MAC/STATUS/CTRL_VQ/MQ), the configuration space dvmm builds;
 * - activation: memory table, ring addresses, kick/call eventfds; the control queue stays with dvmm;
 * - TX: a UDP frame placed in the TX ring reaches a socket on the host (after a bad descriptor that
 *   the back-end drops), with the call eventfd signalled; RX: a datagram the host sends arrives in the
 *   RX ring;
 * - a ring the driver breaks is stopped and logged, the back-end still answers; GET_VRING_BASE gives
 *   the positions back; a front-end that hangs up leaves the back-end listening for the next one.
 */
import assert from "node:assert/strict";
import dgram from "node:dgram";
import { shim } from "../ffi/shim.ts";
import { EventFd, mapMemfd, unmap } from "../ffi/kvm.ts";
import { EFD_NONBLOCK } from "../ffi/kvm_constants.ts";
import { connectVhostUser, splitNetQueues, VhostUserControl } from "../devices/virtio/device_vhost_user.ts";
import { VhostUserFrontend } from "../devices/virtio/vhost_user.ts";
import { F, featureBit, NET_F, VIRTIO_ID } from "../devices/virtio/constants.ts";
import { parseNetBackend } from "../devices/virtio/vhost_user_net_backend.ts";
import type { Activation } from "../devices/virtio/pci_transport.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";

const bit = (n: number) => featureBit(n);

Deno.test("vhost-user-net back-end options: Cloud Hypervisor's keys and defaults, refusals by name", () => {
  const o = parseNetBackend("socket=/tmp/x.sock");
  assert.deepEqual(o, {
    ip: "192.168.100.1",
    mask: "255.255.255.0",
    socket: "/tmp/x.sock",
    numQueues: 2,
    queueSize: 256,
    tap: undefined,
    hostMac: undefined,
    mtu: undefined,
  });
  const p = parseNetBackend(
    "ip=10.0.0.1,mask=255.0.0.0,socket=/s,num_queues=4,queue_size=1024,tap=t0,mtu=9000",
  );
  assert.equal(p.numQueues, 4);
  assert.equal(p.queueSize, 1024);
  assert.equal(p.tap, "t0");
  assert.equal(p.mtu, 9000);
  assert.throws(() => parseNetBackend("ip=10.0.0.1"), /socket is required/);
  assert.throws(() => parseNetBackend("socket=/s,client=on"), /client=on .* not implemented/);
  assert.throws(() => parseNetBackend("socket=/s,mac=12:34:56:78:9a:bc"), /mac= is not implemented/);
  assert.throws(() => parseNetBackend("socket=/s,num_queues=3"), /num_queues=3/);
  assert.throws(() => parseNetBackend("socket=/s,queue_size=100"), /queue_size=100/);
  assert.throws(() => parseNetBackend("socket=/s,ip=1.2.3"), /bad IPv4/);
  assert.throws(() => parseNetBackend("socket=/s,bogus=1"), /unknown parameter 'bogus'/);
});

/** Whether this process may create taps (root with /dev/net/tun). */
function canTap(): boolean {
  try {
    Deno.statSync("/dev/net/tun");
    return Deno.uid() === 0;
  } catch {
    return false;
  }
}

function ipv4Checksum(h: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < h.length; i += 2) sum += (h[i] << 8) | h[i + 1];
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** A vnet header (12 zero bytes) and an Ethernet/IPv4/UDP frame (UDP checksum 0: none). */
function udpFrame(
  dstMac: Uint8Array,
  srcMac: Uint8Array,
  src: number[],
  dst: number[],
  dport: number,
  payload: Uint8Array,
): Uint8Array {
  const f = new Uint8Array(12 + 14 + 20 + 8 + payload.length);
  const v = new DataView(f.buffer);
  f.set(dstMac, 12);
  f.set(srcMac, 18);
  v.setUint16(24, 0x0800);
  const ip = 26;
  f[ip] = 0x45;
  v.setUint16(ip + 2, 20 + 8 + payload.length);
  f[ip + 8] = 64;
  f[ip + 9] = 17;
  f.set(src, ip + 12);
  f.set(dst, ip + 16);
  v.setUint16(ip + 10, ipv4Checksum(f.subarray(ip, ip + 20)));
  const udp = ip + 20;
  v.setUint16(udp, 40000);
  v.setUint16(udp + 2, dport);
  v.setUint16(udp + 4, 8 + payload.length);
  f.set(payload, udp + 8);
  return f;
}

async function waitFor(what: string, ok: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test({
  name: "vhost-user-net: dvmm's front-end and dvmm's back-end over a socket, frames through a real tap",
  ignore: !canTap(),
  sanitizeResources: false,
  async fn() {
    const dir = Deno.makeTempDirSync({ prefix: "dvmm-vun-" });
    const sock = `${dir}/net.sock`;
    const tapName = `dvmmvu${Deno.pid % 1000}`;
    const root = new URL("..", import.meta.url).pathname;
    const backend = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--quiet",
        `${root}main.ts`,
        "vhost-user-net",
        "--net-backend",
        `ip=10.199.77.1,mask=255.255.255.0,socket=${sock},num_queues=2,queue_size=256,tap=${tapName}`,
      ],
      stderr: "piped",
      stdout: "null",
    }).spawn();
    let errText = "";
    const errDone = (async () => {
      const dec = new TextDecoder();
      for await (const chunk of backend.stderr) errText += dec.decode(chunk);
    })();
    const mem = mapMemfd(0x40000, "vun-test");
    const kick = [0, 1, 2].map(() => EventFd.create(EFD_NONBLOCK));
    const call = [0, 1, 2, 3].map(() => EventFd.create(EFD_NONBLOCK));
    let listener: dgram.Socket | null = null;
    try {
      const GPA = 0x100000;
      const ram = [{ gpa: GPA, size: 0x40000, hostAddr: mem.hostAddr, fd: mem.fd }];
      const gm = GuestMemory.fromHost(ram);
      const mac = new Uint8Array([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
      // ---- negotiation (connect retries while the back-end starts)
      const { spec, vhostUser } = connectVhostUser({
        kind: "net",
        id: "_net0",
        socket: sock,
        queueSizes: [256, 256],
        ram,
        net: { mac, csum: true, tso: false, ufo: true },
      });
      assert.equal(spec.type, VIRTIO_ID.NET);
      assert.equal(spec.numQueues, 3, "two data rings and dvmm's control queue");
      assert.equal(vhostUser.netPairs, 1);
      for (
        const b of [F.VERSION_1, NET_F.MAC, NET_F.STATUS, NET_F.CTRL_VQ, NET_F.MQ, NET_F.CSUM, NET_F.HOST_UFO]
      ) {
        assert.ok(spec.features & bit(b), `feature ${b} offered`);
      }
      for (const b of [NET_F.HOST_TSO4, NET_F.GUEST_TSO4, NET_F.CTRL_GUEST_OFFLOADS]) {
        assert.equal(spec.features & bit(b), 0n, `feature ${b} not offered (offload_tso=off / not served)`);
      }
      assert.deepEqual(Array.from(spec.config.subarray(0, 10)), [...mac, 1, 0, 1, 0]);
      // ---- activation: rx 0, tx 1, control queue 2 (dvmm's)
      const rx = new FakeDriverQueue(gm, GPA + 0x1000, 256);
      const tx = new FakeDriverQueue(gm, GPA + 0x6000, 256);
      const ctrlRing = new FakeDriverQueue(gm, GPA + 0xb000, 64);
      const features = bit(F.VERSION_1) | bit(NET_F.MAC) | bit(NET_F.STATUS) | bit(NET_F.CTRL_VQ) |
        bit(NET_F.MQ);
      const q = (index: number, d: FakeDriverQueue) => ({
        index,
        ...d.config,
        msixVector: index + 1,
        notifyOffset: 0,
      });
      const a: Activation = {
        features,
        eventIdx: false,
        indirect: false,
        configMsixVector: 0,
        queues: [q(0, rx), q(1, tx), q(2, ctrlRing)],
      };
      const split = splitNetQueues(a, 1);
      assert.deepEqual(split.data.map((x) => x.index), [0, 1]);
      assert.equal(split.ctrl?.index, 2);
      const fe = new VhostUserFrontend(vhostUser.socketFd, { protocolFeatures: vhostUser.protocolFeatures });
      const ctl = new VhostUserControl(
        fe,
        ram,
        kick.map((e) => e.fd),
        call.map((e) => e.fd),
        vhostUser.backendFeatures,
      );
      ctl.start({ ...a, queues: split.data });
      assert.deepEqual(ctl.running, [0, 1]);

      // ---- TX: a bad descriptor (dropped), then a UDP datagram to the host
      const l = dgram.createSocket("udp4");
      listener = l;
      const datagrams: Uint8Array[] = [];
      l.on("message", (m: Uint8Array) => datagrams.push(new Uint8Array(m)));
      await new Promise<void>((res) => l.bind(0, "10.199.77.1", () => res()));
      const port = l.address().port;
      const tapMac = Deno.readTextFileSync(`/sys/class/net/${tapName}/address`).trim().split(":").map((h) =>
        parseInt(h, 16)
      );
      const payload = new TextEncoder().encode("hello-from-the-guest-ring");
      const frame = udpFrame(new Uint8Array(tapMac), mac, [10, 199, 77, 2], [10, 199, 77, 1], port, payload);
      tx.setDesc(0, 0x7fff_0000_0000, 100); // outside guest memory
      tx.publish(0);
      gm.write(GPA + 0x20000, frame);
      tx.setDesc(1, GPA + 0x20000, frame.length);
      tx.publish(1);
      kick[1].write(1n);
      await waitFor(`a datagram (back-end: ${errText})`, () => datagrams.length > 0);
      assert.equal(new TextDecoder().decode(datagrams[0]), "hello-from-the-guest-ring");
      await waitFor("TX used entries", () => tx.usedIdx() === 2);
      assert.deepEqual(tx.used(0), { id: 0, len: 0 });
      assert.equal(tx.used(1).id, 1);
      assert.ok(call[2].read() > 0n, "TX call eventfd (vector 2) signalled");

      // ---- RX: buffers posted, the host sends a datagram to the guest's address (the host may send
      // its own IPv6 frames first: router solicitations, MLD)
      for (let i = 0; i < 16; i++) {
        rx.setDesc(i, GPA + 0x28000 + 0x1000 * i, 2048, 2 /* WRITE */);
        rx.publish(i);
      }
      kick[0].write(1n);
      const macText = Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join(":");
      const neigh = await new Deno.Command("ip", {
        args: ["neigh", "replace", "10.199.77.2", "lladdr", macText, "dev", tapName],
      }).output();
      assert.ok(neigh.success, new TextDecoder().decode(neigh.stderr));
      await new Promise<void>((res, rej) =>
        l.send(
          new TextEncoder().encode("hello-from-the-host"),
          40000,
          "10.199.77.2",
          (e) => e ? rej(e) : res(),
        )
      );
      const ipv4 = () => {
        for (let k = 0; k < rx.usedIdx(); k++) {
          const u = rx.used(k);
          const f = gm.slice(GPA + 0x28000 + 0x1000 * u.id, u.len);
          if ((f[12 + 12] << 8 | f[12 + 13]) === 0x0800) return f;
        }
        return null;
      };
      await waitFor("an IPv4 frame in the RX ring", () => ipv4() !== null);
      const rxFrame = ipv4()!;
      assert.deepEqual(Array.from(rxFrame.subarray(12, 18)), Array.from(mac), "to the guest's MAC");
      assert.equal(new TextDecoder().decode(rxFrame.subarray(12 + 14 + 20 + 8)), "hello-from-the-host");
      assert.ok(call[1].read() > 0n, "RX call eventfd (vector 1) signalled");

      // ---- a driver that breaks its TX ring: the ring stops, the back-end goes on answering
      tx.setAvailIdx(tx.availIdx + 1000);
      kick[1].write(1n);
      await waitFor("the back-end's log of the broken ring", () => /ring 1 stopped/.test(errText));
      const bases = ctl.stop();
      assert.equal(bases.get(0), rx.usedIdx(), "RX: the chains used");
      assert.equal(bases.get(1), 2, "TX: two chains used before the break");
      // ---- hang up; a second front-end is served
      fe.close();
      await waitFor("the back-end's log of the hang-up", () => /front-end disconnected/.test(errText));
      const again = connectVhostUser({
        kind: "net",
        id: "_net0",
        socket: sock,
        queueSizes: [256, 256],
        ram,
        net: { mac, csum: false, tso: false, ufo: false },
      });
      assert.equal(again.spec.features & bit(NET_F.CSUM), 0n, "offload_csum=off masks the back-end's CSUM");
      // ---- a front-end's bad requests are refused (REPLY_ACK says so), the back-end goes on
      const fd2 = again.vhostUser.socketFd;
      const pf = again.vhostUser.protocolFeatures;
      const fresh = () => new VhostUserFrontend(fd2, { protocolFeatures: pf });
      const region = { guestPhysAddr: BigInt(GPA), userAddr: mem.hostAddr, mmapOffset: 0n, fd: mem.fd! };
      assert.throws(() => fresh().setMemTable([{ ...region, size: 0x100000n }]), /answered failure/);
      assert.throws(() => fresh().setVringNum(0, 100), /answered failure/);
      assert.throws(
        () => fresh().setVringAddr({ index: 7, desc: 0n, used: 0n, avail: 0n }),
        /answered failure/,
      );
      assert.equal(fresh().getQueueNum(), 2, "still answering");
      fresh().setMemTable([{ ...region, size: 0x40000n }]);
      // A request whose own reply cannot be given ends the connection.
      assert.throws(() => fresh().getVringBase(9), /closed the connection/);
      await waitFor("the back-end's log", () => /ring 9 \(the device has 2\)/.test(errText));
      shim().kvs_close(fd2);
    } finally {
      listener?.close();
      try {
        backend.kill("SIGTERM");
      } catch { /* exited */ }
      await backend.status;
      await errDone;
      unmap(mem);
      for (const e of [...kick, ...call]) e.close();
      Deno.removeSync(dir, { recursive: true });
    }
  },
});
