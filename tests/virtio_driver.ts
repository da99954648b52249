/** Test helper (no tests here): the driver side of a split virtqueue laid out in test memory. */
import type { GuestMemory } from "../vmm/memory.ts";
import { ringSizes } from "../devices/virtio/queue.ts";
import { COMMON_OFFSET, type VirtioPciDevice } from "../devices/virtio/pci_transport.ts";
import { VSOCK_BUF_ALLOC, VSOCK_HOST_CID, VSOCK_TYPE_STREAM } from "../devices/virtio/vsock.ts";

/** Writes a common-config register of a virtio-pci transport, as a driver does (little-endian, `size` bytes). */
export function writeCommon(t: VirtioPciDevice, off: number, size: number, value: number): void {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (value / 2 ** (8 * i)) & 0xff;
  t.mmioWrite(COMMON_OFFSET + off, b);
}

export class FakeDriverQueue {
  readonly descAddr: number;
  readonly driverAddr: number;
  readonly deviceAddr: number;
  availIdx = 0;

  constructor(readonly mem: GuestMemory, base: number, readonly size: number) {
    const s = ringSizes(size);
    this.descAddr = base;
    this.driverAddr = base + s.desc;
    this.deviceAddr = (this.driverAddr + s.avail + 3) & ~3;
    mem.fill(base, this.deviceAddr + s.used - base, 0);
  }

  get config() {
    return {
      size: this.size,
      descAddr: this.descAddr,
      driverAddr: this.driverAddr,
      deviceAddr: this.deviceAddr,
    };
  }

  setDesc(i: number, addr: number, len: number, flags = 0, next = 0): void {
    const o = this.descAddr + 16 * i;
    this.mem.writeU64(o, addr);
    this.mem.writeU32(o + 8, len);
    this.mem.writeU16(o + 12, flags);
    this.mem.writeU16(o + 14, next);
  }

  /** Writes a descriptor into an indirect table at tableAddr. */
  setIndirect(tableAddr: number, i: number, addr: number, len: number, flags = 0, next = 0): void {
    const o = tableAddr + 16 * i;
    this.mem.writeU64(o, addr);
    this.mem.writeU32(o + 8, len);
    this.mem.writeU16(o + 12, flags);
    this.mem.writeU16(o + 14, next);
  }

  /** Makes a chain available and publishes the new avail idx. */
  publish(head: number): void {
    this.mem.writeU16(this.driverAddr + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.driverAddr + 2, this.availIdx);
  }

  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.mem.writeU16(this.driverAddr + 2, this.availIdx);
  }

  setAvailFlags(v: number): void {
    this.mem.writeU16(this.driverAddr, v);
  }

  setUsedEvent(v: number): void {
    this.mem.writeU16(this.driverAddr + 4 + 2 * this.size, v);
  }

  usedIdx(): number {
    return this.mem.readU16(this.deviceAddr + 2);
  }

  usedFlags(): number {
    return this.mem.readU16(this.deviceAddr);
  }

  availEvent(): number {
    return this.mem.readU16(this.deviceAddr + 4 + 8 * this.size);
  }

  used(i: number): { id: number; len: number } {
    const o = this.deviceAddr + 4 + 8 * (i % this.size);
    return { id: this.mem.readU32(o), len: this.mem.readU32(o + 4) };
  }
}

/** A virtio-vsock packet header as a guest's driver fills it; absent fields: a stream packet to the host. */
export interface VsockHeader {
  srcCid: number;
  srcPort: number;
  dstPort: number;
  op: number;
  len?: number;
  type?: number;
  flags?: number;
  bufAlloc?: number;
  fwdCnt?: number;
  dstCid?: number;
}

/** Writes all 44 bytes of a virtio-vsock packet header at `at` (little-endian, as the spec lays it out). */
export function writeVsockHeader(mem: GuestMemory, at: number, h: VsockHeader): void {
  mem.writeU64(at, h.srcCid);
  mem.writeU64(at + 8, h.dstCid ?? VSOCK_HOST_CID);
  mem.writeU32(at + 16, h.srcPort >>> 0);
  mem.writeU32(at + 20, h.dstPort >>> 0);
  mem.writeU32(at + 24, (h.len ?? 0) >>> 0);
  mem.writeU16(at + 28, h.type ?? VSOCK_TYPE_STREAM);
  mem.writeU16(at + 30, h.op);
  mem.writeU32(at + 32, (h.flags ?? 0) >>> 0);
  mem.writeU32(at + 36, (h.bufAlloc ?? VSOCK_BUF_ALLOC) >>> 0);
  mem.writeU32(at + 40, (h.fwdCnt ?? 0) >>> 0);
}
