/**
 * virtio-pci modern (virtio 1.x, "Virtio Over PCI Bus") register-level model.
 *
 * One 64-bit memory BAR (BAR 0) holds every structure:
 *   0x0000 common configuration   0x1000 ISR status   0x2000 device configuration
 *   0x3000 notifications (queue i at 0x3000 + 4*i)   0x8000 MSI-X table   0x10000 MSI-X PBA
 * Capabilities: MSI-X, then vendor capabilities for COMMON, NOTIFY (multiplier 4), ISR, DEVICE and
 * the PCI_CFG access window.
 *
 * All guest-visible state (PCI config space, MSI-X table, virtio registers) lives in
 * SharedArrayBuffers ({@link VirtioPciDevice.shared}) so each vCPU worker can rebuild the device with
 * `new VirtioPciDevice(spec, shared)`. Callers serialise accesses (devices/shared.ts lock). Callbacks
 * run in the thread that performed the access.
 */

import { PciConfigSpace } from "../pci/config.ts";
import { Msix } from "../pci/msix.ts";
import type { PciFunction } from "../pci/bus.ts";
import {
  F,
  featureBit,
  ISR_CONFIG,
  ISR_QUEUE,
  MAX_QUEUE_SIZE,
  STATUS,
  VIRTIO_ID,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_CAP,
} from "./constants.ts";

export const VIRTIO_PCI_VENDOR = 0x1af4;
export const VIRTIO_PCI_DEVICE_BASE = 0x1040;
export const BAR_INDEX = 0;
export const BAR_SIZE = 0x20000;
export const COMMON_OFFSET = 0x0000;
export const COMMON_LENGTH = 0x40;
export const ISR_OFFSET = 0x1000;
export const DEVICE_CFG_OFFSET = 0x2000;
export const DEVICE_CFG_MAX = 0x1000;
export const NOTIFY_OFFSET = 0x3000;
export const NOTIFY_MULTIPLIER = 4;
export const MSIX_TABLE_OFFSET = 0x8000;
export const MSIX_PBA_OFFSET = 0x10000;
const MAX_QUEUES = 1024; // notify area 0x3000..0x4000, 4 bytes per queue

/** What a virtio device contributes to its transport. */
export interface VirtioDeviceSpec {
  /** virtio device type (VIRTIO_ID.*). */
  type: number;
  /** Offered feature bits (VERSION_1 is added if missing). */
  features: bigint;
  numQueues: number;
  /** Largest queue size per queue (power of two). */
  maxQueueSize: number;
  /** Initial device configuration space bytes. */
  config: Uint8Array;
  /** MSI-X vectors (default numQueues + 1). */
  msixVectors?: number;
  /** PCI class code (default derived from the type). */
  classCode?: number;
}

/** One queue's configuration, as handed to the device worker at activation. */
export interface QueueActivation {
  index: number;
  size: number;
  descAddr: number;
  driverAddr: number;
  deviceAddr: number;
  /** MSI-X vector, or VIRTIO_MSI_NO_VECTOR. */
  msixVector: number;
  /** Notification address offset inside BAR 0 (for the ioeventfd). */
  notifyOffset: number;
}

export interface Activation {
  /** Negotiated features. */
  features: bigint;
  eventIdx: boolean;
  indirect: boolean;
  /** Enabled queues only. */
  queues: QueueActivation[];
  configMsixVector: number;
}

/** The SharedArrayBuffers that make up one device's state (structured-cloneable). */
export interface VirtioPciShared {
  pci: SharedArrayBuffer | ArrayBuffer;
  msix: SharedArrayBuffer | ArrayBuffer;
  virtio: SharedArrayBuffer | ArrayBuffer;
}

// virtio register state layout
const S_DFSEL = 0, S_GFSEL = 4, S_GF_LO = 8, S_GF_HI = 12, S_CFGVEC = 16, S_STATUS = 18, S_GEN = 19;
const S_QSEL = 20, S_ISR = 22, S_ACTIVE = 23, S_QUEUES = 32, Q_STRIDE = 32;
// per queue: size u16 @0, vector u16 @2, enable u16 @4, desc lo/hi @8/12, driver @16/20, device @24/28

function defaultClass(type: number): number {
  if (type === VIRTIO_ID.BLOCK) return 0x018000;
  if (type === VIRTIO_ID.NET) return 0x020000;
  return 0xff0000;
}

export class VirtioPciDevice implements PciFunction {
  readonly config: PciConfigSpace;
  readonly msix: Msix;
  readonly shared: VirtioPciShared;
  readonly features: bigint;
  readonly numQueues: number;
  readonly configLength: number;
  /** DRIVER_OK with features accepted: start the device worker with these queues. */
  onActivate: ((a: Activation) => void) | null = null;
  /** Driver reset the device (status 0) after activation: stop the worker before returning. */
  onReset: (() => void) | null = null;
  /** A notify-area write reached us (no ioeventfd registered for it). */
  onNotify: ((queue: number) => void) | null = null;
  /** The driver wrote the device configuration (offset in device config, bytes written). */
  onConfigWrite: ((offset: number, data: Uint8Array) => void) | null = null;
  readonly #v: DataView;
  readonly #devCfg: Uint8Array;
  readonly #pciCfgCap: number;

  constructor(readonly spec: VirtioDeviceSpec, shared?: VirtioPciShared) {
    if (spec.numQueues < 1 || spec.numQueues > MAX_QUEUES) throw new Error("bad queue count");
    const mq = spec.maxQueueSize;
    if (mq < 1 || mq > MAX_QUEUE_SIZE || (mq & (mq - 1))) throw new Error("bad max queue size");
    if (spec.config.length > DEVICE_CFG_MAX) throw new Error("device config too large");
    this.features = spec.features | featureBit(F.VERSION_1);
    this.numQueues = spec.numQueues;
    this.configLength = spec.config.length;
    const vectors = spec.msixVectors ?? spec.numQueues + 1;
    const fresh = shared === undefined;
    this.config = new PciConfigSpace({
      vendorId: VIRTIO_PCI_VENDOR,
      deviceId: VIRTIO_PCI_DEVICE_BASE + spec.type,
      revision: 1,
      classCode: spec.classCode ?? defaultClass(spec.type),
      subsystemVendorId: VIRTIO_PCI_VENDOR,
      subsystemId: 0x40,
      bars: [{ index: BAR_INDEX, size: BAR_SIZE, kind: "mem64" }],
    }, shared?.pci);
    this.msix = new Msix(this.config, {
      vectors,
      bar: BAR_INDEX,
      tableOffset: MSIX_TABLE_OFFSET,
      pbaOffset: MSIX_PBA_OFFSET,
    }, shared?.msix);
    this.shared = shared ?? {
      pci: this.config.state,
      msix: this.msix.state,
      virtio: new SharedArrayBuffer(S_QUEUES + Q_STRIDE * spec.numQueues + DEVICE_CFG_MAX),
    };
    this.#v = new DataView(this.shared.virtio);
    this.#devCfg = new Uint8Array(this.shared.virtio, S_QUEUES + Q_STRIDE * spec.numQueues, DEVICE_CFG_MAX);
    this.#addVirtioCap(VIRTIO_PCI_CAP.COMMON_CFG, COMMON_OFFSET, COMMON_LENGTH);
    this.#addVirtioCap(
      VIRTIO_PCI_CAP.NOTIFY_CFG,
      NOTIFY_OFFSET,
      NOTIFY_MULTIPLIER * spec.numQueues,
      NOTIFY_MULTIPLIER,
    );
    this.#addVirtioCap(VIRTIO_PCI_CAP.ISR_CFG, ISR_OFFSET, 4);
    if (spec.config.length > 0) {
      this.#addVirtioCap(VIRTIO_PCI_CAP.DEVICE_CFG, DEVICE_CFG_OFFSET, spec.config.length);
    }
    this.#pciCfgCap = this.#addVirtioCap(VIRTIO_PCI_CAP.PCI_CFG, 0, 0, 0, true);
    this.config.addWriteHook((off, size) => this.#pciCfgAccess(off, size, true));
    this.config.addReadHook((off, size) => this.#pciCfgAccess(off, size, false));
    if (fresh) {
      this.#devCfg.set(spec.config);
      this.#reset();
    }
  }

  /** Appends a virtio vendor capability; returns its config offset. */
  #addVirtioCap(type: number, offset: number, length: number, multiplier?: number, window = false): number {
    const extra = multiplier !== undefined || window ? 4 : 0;
    const body = new Uint8Array(14 + extra);
    const v = new DataView(body.buffer);
    body[0] = 16 + extra; // cap_len
    body[1] = type;
    body[2] = BAR_INDEX;
    v.setUint32(6, offset, true);
    v.setUint32(10, length, true);
    if (multiplier !== undefined) v.setUint32(14, multiplier, true);
    let writable: Uint8Array | undefined;
    if (window) {
      writable = new Uint8Array(body.length);
      writable[2] = 0xff; // bar
      writable.fill(0xff, 6, 18); // offset, length, data
    }
    return this.config.addCapability(0x09, body, writable);
  }

  /** VIRTIO_PCI_CAP_PCI_CFG: an access window into the BAR through config space. */
  #pciCfgAccess(off: number, size: number, isWrite: boolean): void {
    const cap = this.#pciCfgCap;
    const data = cap + 16;
    if (off + size <= data || off >= data + 4) return;
    const b = this.config.bytes;
    const cv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const bar = b[cap + 4];
    const barOff = cv.getUint32(cap + 8, true);
    const len = cv.getUint32(cap + 12, true);
    if (bar !== BAR_INDEX || (len !== 1 && len !== 2 && len !== 4) || barOff % len !== 0) return;
    const window = b.subarray(data, data + len);
    if (isWrite) this.mmioWrite(barOff, window.slice());
    else this.mmioRead(barOff, window);
  }

  // ---------------------------------------------------------------- registers

  #q(i: number): number {
    return S_QUEUES + Q_STRIDE * i;
  }
  get status(): number {
    return this.#v.getUint8(S_STATUS);
  }
  /** Features the driver acknowledged (meaningful once FEATURES_OK is set). */
  get driverFeatures(): bigint {
    return (BigInt(this.#v.getUint32(S_GF_HI, true)) << 32n) | BigInt(this.#v.getUint32(S_GF_LO, true));
  }
  get configMsixVector(): number {
    return this.#v.getUint16(S_CFGVEC, true);
  }
  queueMsixVector(q: number): number {
    return this.#v.getUint16(this.#q(q) + 2, true);
  }
  get activated(): boolean {
    return this.#v.getUint8(S_ACTIVE) !== 0;
  }

  #reset(): void {
    const v = this.#v;
    for (const o of [S_DFSEL, S_GFSEL, S_GF_LO, S_GF_HI]) v.setUint32(o, 0, true);
    v.setUint16(S_CFGVEC, VIRTIO_MSI_NO_VECTOR, true);
    v.setUint8(S_STATUS, 0);
    v.setUint16(S_QSEL, 0, true);
    v.setUint8(S_ISR, 0);
    v.setUint8(S_ACTIVE, 0);
    for (let i = 0; i < this.numQueues; i++) {
      const q = this.#q(i);
      for (let j = 0; j < Q_STRIDE; j += 4) v.setUint32(q + j, 0, true);
      v.setUint16(q, this.spec.maxQueueSize, true);
      v.setUint16(q + 2, VIRTIO_MSI_NO_VECTOR, true);
    }
  }

  /** Common-config register at `off`: [start, width] or null. */
  #commonReg(off: number): [number, number] | null {
    if (off < 0x10) return [off & ~3, 4];
    if (off < 0x14) return [off & ~1, 2];
    if (off < 0x16) return [off, 1];
    if (off < 0x20) return [off & ~1, 2];
    if (off < 0x38) return [off & ~3, 4]; // 64-bit addresses as two dwords
    if (off < 0x3c) return [off & ~1, 2];
    return null;
  }

  #commonRegRead(start: number): number {
    const v = this.#v;
    const sel = v.getUint16(S_QSEL, true);
    const qv = sel < this.numQueues;
    const q = this.#q(sel);
    switch (start) {
      case 0x00:
        return v.getUint32(S_DFSEL, true);
      case 0x04: {
        const s = v.getUint32(S_DFSEL, true);
        return s < 2 ? Number((this.features >> BigInt(32 * s)) & 0xffffffffn) : 0;
      }
      case 0x08:
        return v.getUint32(S_GFSEL, true);
      case 0x0c: {
        const s = v.getUint32(S_GFSEL, true);
        return s === 0 ? v.getUint32(S_GF_LO, true) : s === 1 ? v.getUint32(S_GF_HI, true) : 0;
      }
      case 0x10:
        return v.getUint16(S_CFGVEC, true);
      case 0x12:
        return this.numQueues;
      case 0x14:
        return v.getUint8(S_STATUS);
      case 0x15:
        return v.getUint8(S_GEN);
      case 0x16:
        return sel;
      case 0x18:
        return qv ? v.getUint16(q, true) : 0;
      case 0x1a:
        return qv ? v.getUint16(q + 2, true) : VIRTIO_MSI_NO_VECTOR;
      case 0x1c:
        return qv ? v.getUint16(q + 4, true) : 0;
      case 0x1e:
        return qv ? sel : 0;
      case 0x20:
      case 0x24:
      case 0x28:
      case 0x2c:
      case 0x30:
      case 0x34:
        return qv ? v.getUint32(q + 8 + (start - 0x20), true) : 0;
      default:
        return 0; // queue_notif_config_data, queue_reset: not offered
    }
  }

  #commonRead(off: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const r = this.#commonReg(off + i);
      data[i] = r === null ? 0 : (this.#commonRegRead(r[0]) >>> (8 * (off + i - r[0]))) & 0xff;
    }
  }

  #commonWrite(off: number, data: Uint8Array): void {
    const size = data.length;
    if (size === 8 && off >= 0x20 && off < 0x38 && off % 8 === 0) {
      this.#commonWrite(off, data.subarray(0, 4));
      this.#commonWrite(off + 4, data.subarray(4));
      return;
    }
    const r = this.#commonReg(off);
    if (r === null || r[0] !== off || r[1] !== size) return; // only whole-register writes
    let val = 0;
    for (let i = size - 1; i >= 0; i--) val = val * 256 + data[i];
    const v = this.#v;
    const status = v.getUint8(S_STATUS);
    const sel = v.getUint16(S_QSEL, true);
    const q = this.#q(sel);
    const queueWritable = sel < this.numQueues && !(status & STATUS.DRIVER_OK) &&
      v.getUint16(q + 4, true) === 0;
    switch (off) {
      case 0x00:
        v.setUint32(S_DFSEL, val, true);
        break;
      case 0x08:
        v.setUint32(S_GFSEL, val, true);
        break;
      case 0x0c: {
        if (status & STATUS.FEATURES_OK) break;
        const s = v.getUint32(S_GFSEL, true);
        if (s === 0) v.setUint32(S_GF_LO, val, true);
        else if (s === 1) v.setUint32(S_GF_HI, val, true);
        break;
      }
      case 0x10:
        v.setUint16(S_CFGVEC, this.#checkVector(val), true);
        break;
      case 0x14:
        this.#writeStatus(val);
        break;
      case 0x16:
        v.setUint16(S_QSEL, val, true);
        break;
      case 0x18:
        if (queueWritable) v.setUint16(q, val, true);
        break;
      case 0x1a:
        if (sel < this.numQueues) v.setUint16(q + 2, this.#checkVector(val), true);
        break;
      case 0x1c:
        if (queueWritable && val === 1) this.#enableQueue(sel);
        break;
      case 0x20:
      case 0x24:
      case 0x28:
      case 0x2c:
      case 0x30:
      case 0x34:
        if (queueWritable) v.setUint32(q + 8 + (off - 0x20), val, true);
        break;
    }
  }

  /** A vector beyond the MSI-X table is refused: the register then reads NO_VECTOR. */
  #checkVector(val: number): number {
    return val < this.msix.vectors ? val : VIRTIO_MSI_NO_VECTOR;
  }

  #queueAddr(q: number, field: number): number {
    return this.#v.getUint32(q + field + 4, true) * 0x1_0000_0000 + this.#v.getUint32(q + field, true);
  }

  #enableQueue(i: number): void {
    const q = this.#q(i);
    const size = this.#v.getUint16(q, true);
    const ok = size > 0 && size <= this.spec.maxQueueSize && (size & (size - 1)) === 0 &&
      this.#queueAddr(q, 8) % 16 === 0 && this.#queueAddr(q, 16) % 2 === 0 &&
      this.#queueAddr(q, 24) % 4 === 0;
    if (ok) this.#v.setUint16(q + 4, 1, true);
    else this.setNeedsReset();
  }

  #writeStatus(val: number): void {
    const v = this.#v;
    const old = v.getUint8(S_STATUS);
    if (val === 0) {
      const wasActive = this.activated;
      this.#reset();
      if (wasActive) this.onReset?.();
      return;
    }
    let next = (val & 0xff & ~STATUS.DEVICE_NEEDS_RESET) | (old & STATUS.DEVICE_NEEDS_RESET);
    if ((next & STATUS.FEATURES_OK) && !(old & STATUS.FEATURES_OK) && !this.#featuresAcceptable()) {
      next &= ~STATUS.FEATURES_OK;
    }
    v.setUint8(S_STATUS, next);
    if (
      (next & STATUS.DRIVER_OK) && !(old & STATUS.DRIVER_OK) && (next & STATUS.FEATURES_OK) &&
      !(next & STATUS.FAILED) && !this.activated
    ) {
      v.setUint8(S_ACTIVE, 1);
      this.onActivate?.(this.activation());
    }
  }

  #featuresAcceptable(): boolean {
    const f = this.driverFeatures;
    return (f & ~this.features) === 0n && (f & featureBit(F.VERSION_1)) !== 0n;
  }

  /** The queue configuration as of now (what onActivate receives). */
  activation(): Activation {
    const features = this.driverFeatures;
    const queues: QueueActivation[] = [];
    for (let i = 0; i < this.numQueues; i++) {
      const q = this.#q(i);
      if (this.#v.getUint16(q + 4, true) !== 1) continue;
      queues.push({
        index: i,
        size: this.#v.getUint16(q, true),
        descAddr: this.#queueAddr(q, 8),
        driverAddr: this.#queueAddr(q, 16),
        deviceAddr: this.#queueAddr(q, 24),
        msixVector: this.#v.getUint16(q + 2, true),
        notifyOffset: NOTIFY_OFFSET + NOTIFY_MULTIPLIER * i,
      });
    }
    return {
      features,
      eventIdx: (features & featureBit(F.EVENT_IDX)) !== 0n,
      indirect: (features & featureBit(F.INDIRECT_DESC)) !== 0n,
      queues,
      configMsixVector: this.configMsixVector,
    };
  }

  // ---------------------------------------------------------------- BAR 0 (MmioDevice)

  /** BAR 0 read (offset relative to the BAR). */
  mmioRead(offset: number, data: Uint8Array): void {
    if (offset >= COMMON_OFFSET && offset < COMMON_OFFSET + COMMON_LENGTH) {
      this.#commonRead(offset - COMMON_OFFSET, data);
    } else if (offset >= ISR_OFFSET && offset < ISR_OFFSET + 4) {
      data.fill(0);
      if (offset === ISR_OFFSET) {
        data[0] = this.#v.getUint8(S_ISR); // reading clears
        this.#v.setUint8(S_ISR, 0);
      }
    } else if (offset >= DEVICE_CFG_OFFSET && offset < DEVICE_CFG_OFFSET + DEVICE_CFG_MAX) {
      const o = offset - DEVICE_CFG_OFFSET;
      for (let i = 0; i < data.length; i++) data[i] = o + i < this.configLength ? this.#devCfg[o + i] : 0;
    } else if (offset >= MSIX_TABLE_OFFSET && offset < MSIX_TABLE_OFFSET + this.msix.tableSize) {
      this.msix.tableRead(offset - MSIX_TABLE_OFFSET, data);
    } else if (offset >= MSIX_PBA_OFFSET && offset < MSIX_PBA_OFFSET + this.msix.pbaSize) {
      this.msix.pbaRead(offset - MSIX_PBA_OFFSET, data);
    } else {
      data.fill(0);
    }
  }

  /** BAR 0 write (offset relative to the BAR). */
  mmioWrite(offset: number, data: Uint8Array): void {
    if (offset >= COMMON_OFFSET && offset < COMMON_OFFSET + COMMON_LENGTH) {
      this.#commonWrite(offset - COMMON_OFFSET, data);
    } else if (offset >= NOTIFY_OFFSET && offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * this.numQueues) {
      const q = Math.floor((offset - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER);
      this.onNotify?.(q);
    } else if (offset >= DEVICE_CFG_OFFSET && offset < DEVICE_CFG_OFFSET + this.configLength) {
      this.onConfigWrite?.(offset - DEVICE_CFG_OFFSET, data);
    } else if (offset >= MSIX_TABLE_OFFSET && offset < MSIX_TABLE_OFFSET + this.msix.tableSize) {
      this.msix.tableWrite(offset - MSIX_TABLE_OFFSET, data);
    }
  }

  // ---------------------------------------------------------------- device side

  /** Guest-physical notification address of queue q (for KVM_IOEVENTFD), or -1 if BAR 0 is unmapped. */
  notifyAddress(q: number): number {
    const base = this.config.barAddress(BAR_INDEX);
    return base < 0 ? -1 : base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q;
  }

  /**
   * Raise the used-buffer interrupt of queue q. Returns the MSI-X vector the caller must signal
   * (irqfd), or -1 when nothing is to be signalled now (no vector, or masked → pending bit set).
   */
  queueInterrupt(q: number): number {
    this.#v.setUint8(S_ISR, this.#v.getUint8(S_ISR) | ISR_QUEUE);
    return this.#vectorToSignal(this.queueMsixVector(q));
  }

  /** Raise a configuration-change interrupt; same return convention as queueInterrupt. */
  configInterrupt(): number {
    this.#v.setUint8(S_ISR, this.#v.getUint8(S_ISR) | ISR_CONFIG);
    return this.#vectorToSignal(this.configMsixVector);
  }

  #vectorToSignal(vec: number): number {
    if (vec === VIRTIO_MSI_NO_VECTOR || !this.msix.enabled) return -1; // INTx is not modelled
    return this.msix.trigger(vec) ? vec : -1;
  }

  /** The device configuration space (shared with every thread; write through updateDeviceConfig). */
  deviceConfig(): DataView {
    return new DataView(this.#devCfg.buffer, this.#devCfg.byteOffset, this.#devCfg.byteLength);
  }

  /** Replaces device configuration bytes and bumps config_generation (then call configInterrupt). */
  updateDeviceConfig(offset: number, bytes: Uint8Array): void {
    this.#devCfg.set(bytes, offset);
    this.#v.setUint8(S_GEN, (this.#v.getUint8(S_GEN) + 1) & 0xff);
  }

  /** Flags DEVICE_NEEDS_RESET (e.g. a queue was broken by the driver); then call configInterrupt. */
  setNeedsReset(): void {
    const s = this.#v.getUint8(S_STATUS);
    if (s & STATUS.DRIVER_OK) this.#v.setUint8(S_STATUS, s | STATUS.DEVICE_NEEDS_RESET);
  }
}
