// Typed KVM objects in the style of rust-vmm's kvm-ioctls: one object per fd (Kvm → VmFd → VcpuFd), plus
// the kvm_run view, host memory mappings, eventfds and the vCPU kick.
//
// Threading: fds and mmaps are process-wide, so every object here can be rebuilt in any Worker from a plain
// structured-cloneable descriptor (VmFd.fromDescriptor, VcpuFd.fromDescriptor, EventFd.fromFd). Only the
// owner (normally the main thread) should call close().

import * as C from "./kvm_constants.ts";
import { addressOf, check, checkBig, cstr, EAGAIN, hostBytes, OsError, shim } from "./shim.ts";
import {
  type CpuidEntry,
  decodeClockData,
  decodeCpuid2,
  decodeFpu,
  decodeMsrs,
  decodeRegs,
  decodeSregs,
  encodeClockData,
  encodeCpuid2,
  encodeEnableCap,
  encodeFpu,
  encodeIoeventfd,
  encodeIrqfd,
  encodeIrqLevel,
  encodeIrqRouting,
  encodeMsi,
  encodeMsrs,
  encodeRegs,
  encodeSregs,
  encodeUserMemoryRegion,
  type IrqRoutingEntry,
  type KvmClockData,
  type KvmFpu,
  type KvmRegs,
  type KvmSregs,
  type MsrEntry,
  newStruct,
  RUN,
  SIZES,
  type UserMemoryRegion,
} from "./structs.ts";

export type {
  CpuidEntry,
  IrqRoutingEntry,
  KvmClockData,
  KvmFpu,
  KvmRegs,
  KvmSregs,
  MsrEntry,
  UserMemoryRegion,
};

/** ioctl with an integer argument; throws OsError on failure. */
function ioctlVal(fd: number, req: number, val: number | bigint, what: string): number {
  return check(shim().kvs_ioctl_val(fd, req, val), what);
}
/** ioctl with a struct argument; throws OsError on failure. */
function ioctlBuf(fd: number, req: number, buf: Uint8Array, what: string): number {
  return check(shim().kvs_ioctl(fd, req, buf), what);
}

// ---------------------------------------------------------------------------------------------------
// /dev/kvm

export class Kvm {
  readonly fd: number;
  #mmapSize = -1;

  private constructor(fd: number) {
    this.fd = fd;
  }

  static open(path = "/dev/kvm"): Kvm {
    return new Kvm(check(shim().kvs_open(cstr(path), C.O_RDWR, 0), `open ${path}`));
  }

  apiVersion(): number {
    return ioctlVal(this.fd, C.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION");
  }

  /** KVM_CHECK_EXTENSION: 0 when unsupported, else a positive (capability-specific) value. */
  checkExtension(cap: number): number {
    return ioctlVal(this.fd, C.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION");
  }

  vcpuMmapSize(): number {
    if (this.#mmapSize < 0) {
      this.#mmapSize = ioctlVal(this.fd, C.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    }
    return this.#mmapSize;
  }

  /** KVM_GET_SUPPORTED_CPUID (grows the buffer on E2BIG). */
  supportedCpuid(): CpuidEntry[] {
    return this.#cpuidList(C.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID");
  }

  /** KVM_GET_EMULATED_CPUID */
  emulatedCpuid(): CpuidEntry[] {
    return this.#cpuidList(C.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID");
  }

  #cpuidList(req: number, what: string): CpuidEntry[] {
    for (let cap = 128; cap <= 8192; cap *= 2) {
      const buf = encodeCpuid2([], cap);
      const r = shim().kvs_ioctl(this.fd, req, buf);
      if (r === -7n) continue; // E2BIG
      check(r, what);
      return decodeCpuid2(buf);
    }
    throw new OsError(7, what);
  }

  /** KVM_GET_MSR_INDEX_LIST: the MSRs KVM_GET/SET_MSRS accept. */
  msrIndexList(): number[] {
    return this.#msrList(C.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST");
  }

  /** KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs readable with KVM_GET_MSRS on the system fd. */
  msrFeatureIndexList(): number[] {
    return this.#msrList(C.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST");
  }

  #msrList(req: number, what: string): number[] {
    for (let cap = 256; cap <= 16384; cap *= 2) {
      const { bytes, view } = newStruct(SIZES.kvm_msr_list + cap * 4);
      view.setUint32(0, cap, true);
      const r = shim().kvs_ioctl(this.fd, req, bytes);
      if (r === -7n) continue;
      check(r, what);
      const n = view.getUint32(0, true);
      const out: number[] = [];
      for (let i = 0; i < n; i++) out.push(view.getUint32(4 + i * 4, true));
      return out;
    }
    throw new OsError(7, what);
  }

  /** KVM_CREATE_VM (type 0: the default x86 VM). */
  createVm(type = 0): VmFd {
    const fd = ioctlVal(this.fd, C.KVM_CREATE_VM, type, "KVM_CREATE_VM");
    return new VmFd(fd, this.vcpuMmapSize());
  }

  close(): void {
    check(shim().kvs_close(this.fd), "close /dev/kvm");
  }
}

// ---------------------------------------------------------------------------------------------------
// VM

export interface VmDescriptor {
  fd: number;
  vcpuMmapSize: number;
}

export interface IrqfdOptions {
  deassign?: boolean;
  /** eventfd signalled by KVM when a level-triggered interrupt is EOI'd (KVM_IRQFD_FLAG_RESAMPLE). */
  resamplefd?: number;
}

export interface IoeventfdOptions {
  /** Guest physical address (MMIO) or port (PIO). */
  addr: number | bigint;
  /** Access width in bytes (1, 2, 4, 8; 0 = any length, if KVM_CAP_IOEVENTFD_ANY_LENGTH). */
  len: number;
  eventfd: number;
  /** Only signal when the written value equals this. */
  datamatch?: number | bigint;
  pio?: boolean;
  deassign?: boolean;
}

export interface MsiMessage {
  addressLo: number;
  addressHi: number;
  data: number;
  devid?: number;
}

export class VmFd {
  readonly fd: number;
  readonly vcpuMmapSize: number;
  // Preallocated argument buffers for calls that devices make from hot paths.
  readonly #irqLevel = newStruct(SIZES.kvm_irq_level);
  readonly #msi = newStruct(SIZES.kvm_msi);
  readonly #ioctl = shim().kvs_ioctl_i32;

  constructor(fd: number, vcpuMmapSize: number) {
    this.fd = fd;
    this.vcpuMmapSize = vcpuMmapSize;
  }

  static fromDescriptor(d: VmDescriptor): VmFd {
    return new VmFd(d.fd, d.vcpuMmapSize);
  }

  descriptor(): VmDescriptor {
    return { fd: this.fd, vcpuMmapSize: this.vcpuMmapSize };
  }

  /** KVM_CHECK_EXTENSION on the VM fd (per-VM answers, KVM_CAP_CHECK_EXTENSION_VM). */
  checkExtension(cap: number): number {
    return ioctlVal(this.fd, C.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION(vm)");
  }

  /** KVM_SET_USER_MEMORY_REGION (memorySize 0 deletes the slot). */
  setUserMemoryRegion(r: UserMemoryRegion): void {
    const { bytes, view } = newStruct(SIZES.kvm_userspace_memory_region);
    encodeUserMemoryRegion(view, r);
    ioctlBuf(this.fd, C.KVM_SET_USER_MEMORY_REGION, bytes, `KVM_SET_USER_MEMORY_REGION slot ${r.slot}`);
  }

  createIrqchip(): void {
    ioctlVal(this.fd, C.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
  }

  /** KVM_CREATE_PIT2 (flags: KVM_PIT_SPEAKER_DUMMY). */
  createPit2(flags = 0): void {
    const { bytes, view } = newStruct(SIZES.kvm_pit_config);
    view.setUint32(0, flags >>> 0, true);
    ioctlBuf(this.fd, C.KVM_CREATE_PIT2, bytes, "KVM_CREATE_PIT2");
  }

  setTssAddr(addr: number): void {
    ioctlVal(this.fd, C.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR");
  }

  setIdentityMapAddr(addr: number | bigint): void {
    const { bytes, view } = newStruct(8);
    view.setBigUint64(0, BigInt(addr), true);
    ioctlBuf(this.fd, C.KVM_SET_IDENTITY_MAP_ADDR, bytes, "KVM_SET_IDENTITY_MAP_ADDR");
  }

  /** KVM_IRQ_LINE: drive GSI `irq` to `level` (0/1). Does not allocate unless it fails. */
  irqLine(irq: number, level: number): void {
    encodeIrqLevel(this.#irqLevel.view, irq, level);
    const r = this.#ioctl(this.fd, C.KVM_IRQ_LINE, this.#irqLevel.bytes);
    if (r < 0) throw new OsError(-r, `KVM_IRQ_LINE ${irq}=${level}`);
  }

  /** KVM_SIGNAL_MSI: inject one MSI. Returns >0 if delivered, 0 if the guest blocked it. */
  signalMsi(m: MsiMessage): number {
    encodeMsi(this.#msi.view, m);
    const r = this.#ioctl(this.fd, C.KVM_SIGNAL_MSI, this.#msi.bytes);
    if (r < 0) throw new OsError(-r, "KVM_SIGNAL_MSI");
    return r;
  }

  /**
   * KVM_REGISTER_COALESCED_MMIO (or, with `on` false, KVM_UNREGISTER_COALESCED_MMIO): guest writes to
   * `size` bytes at `addr` (I/O ports when `pio`) no longer exit; KVM appends them to the ring shared
   * with every vCPU's mmap (see CoalescedRing), and userspace replays them in order.
   */
  coalescedZone(on: boolean, addr: number, size: number, pio: boolean): void {
    const { bytes, view } = newStruct(SIZES.kvm_coalesced_mmio_zone);
    view.setBigUint64(0, BigInt(addr), true);
    view.setUint32(8, size, true);
    view.setUint32(12, pio ? 1 : 0, true);
    const req = on ? C.KVM_REGISTER_COALESCED_MMIO : C.KVM_UNREGISTER_COALESCED_MMIO;
    const r = this.#ioctl(this.fd, req, bytes);
    if (r < 0) {
      throw new OsError(
        -r,
        `KVM_${on ? "" : "UN"}REGISTER_COALESCED_MMIO ${pio ? "port" : "address"} 0x${addr.toString(16)}`,
      );
    }
  }

  /** KVM_SET_GSI_ROUTING: replaces the whole routing table. */
  setGsiRouting(entries: IrqRoutingEntry[]): void {
    ioctlBuf(this.fd, C.KVM_SET_GSI_ROUTING, encodeIrqRouting(entries), "KVM_SET_GSI_ROUTING");
  }

  /** KVM_IRQFD: writes to `eventfd` raise `gsi` (or stop doing so with deassign). */
  irqfd(eventfd: number, gsi: number, opts: IrqfdOptions = {}): void {
    const { bytes, view } = newStruct(SIZES.kvm_irqfd);
    let flags = 0;
    if (opts.deassign) flags |= C.KVM_IRQFD_FLAG_DEASSIGN;
    if (opts.resamplefd !== undefined) flags |= C.KVM_IRQFD_FLAG_RESAMPLE;
    encodeIrqfd(view, { fd: eventfd, gsi, flags, resamplefd: opts.resamplefd });
    ioctlBuf(this.fd, C.KVM_IRQFD, bytes, `KVM_IRQFD gsi ${gsi}`);
  }

  /** KVM_IOEVENTFD: guest writes to addr/port signal `eventfd` without exiting to userspace. */
  ioeventfd(o: IoeventfdOptions): void {
    const { bytes, view } = newStruct(SIZES.kvm_ioeventfd);
    let flags = 0;
    if (o.datamatch !== undefined) flags |= C.KVM_IOEVENTFD_FLAG_DATAMATCH;
    if (o.pio) flags |= C.KVM_IOEVENTFD_FLAG_PIO;
    if (o.deassign) flags |= C.KVM_IOEVENTFD_FLAG_DEASSIGN;
    encodeIoeventfd(view, { datamatch: o.datamatch ?? 0, addr: o.addr, len: o.len, fd: o.eventfd, flags });
    ioctlBuf(this.fd, C.KVM_IOEVENTFD, bytes, `KVM_IOEVENTFD 0x${o.addr.toString(16)}`);
  }

  /** KVM_ENABLE_CAP on the VM. */
  enableCap(cap: number, args: (number | bigint)[] = [], flags = 0): void {
    const { bytes, view } = newStruct(SIZES.kvm_enable_cap);
    encodeEnableCap(view, cap, args, flags);
    ioctlBuf(this.fd, C.KVM_ENABLE_CAP, bytes, `KVM_ENABLE_CAP ${cap}`);
  }

  getClock(): KvmClockData {
    const { bytes, view } = newStruct(SIZES.kvm_clock_data);
    ioctlBuf(this.fd, C.KVM_GET_CLOCK, bytes, "KVM_GET_CLOCK");
    return decodeClockData(view);
  }

  setClock(c: Partial<KvmClockData> & { clock: bigint }): void {
    const { bytes, view } = newStruct(SIZES.kvm_clock_data);
    encodeClockData(view, c);
    ioctlBuf(this.fd, C.KVM_SET_CLOCK, bytes, "KVM_SET_CLOCK");
  }

  /** KVM_GET_IRQCHIP: the raw kvm_irqchip of chip `id` (0 PIC master, 1 PIC slave, 2 IOAPIC), 520 bytes. */
  getIrqchip(id: number): Uint8Array {
    const { bytes, view } = newStruct(SIZES.kvm_irqchip);
    view.setUint32(0, id, true);
    ioctlBuf(this.fd, C.KVM_GET_IRQCHIP, bytes, `KVM_GET_IRQCHIP ${id}`);
    return bytes;
  }
  /** KVM_SET_IRQCHIP with a kvm_irqchip from getIrqchip (its first word names the chip). */
  setIrqchip(bytes: Uint8Array): void {
    if (bytes.length !== SIZES.kvm_irqchip) {
      throw new RangeError(`setIrqchip: need ${SIZES.kvm_irqchip} bytes`);
    }
    ioctlBuf(this.fd, C.KVM_SET_IRQCHIP, bytes.slice(), "KVM_SET_IRQCHIP");
  }
  /**
   * KVM_GET_DIRTY_LOG: fills `bitmap` (one bit per page of the slot, in 64-bit words) with the pages
   * written since the last call, and clears KVM's record (the slot needs KVM_MEM_LOG_DIRTY_PAGES).
   */
  getDirtyLog(slot: number, bitmap: BigUint64Array<ArrayBuffer>): void {
    const { bytes, view } = newStruct(SIZES.kvm_dirty_log);
    view.setUint32(0, slot, true);
    view.setBigUint64(8, addressOf(bitmap), true);
    ioctlBuf(this.fd, C.KVM_GET_DIRTY_LOG, bytes, `KVM_GET_DIRTY_LOG slot ${slot}`);
  }

  /** KVM_GET_PIT2: the raw kvm_pit_state2 (112 bytes). */
  getPit2(): Uint8Array {
    const { bytes } = newStruct(SIZES.kvm_pit_state2);
    ioctlBuf(this.fd, C.KVM_GET_PIT2, bytes, "KVM_GET_PIT2");
    return bytes;
  }
  setPit2(bytes: Uint8Array): void {
    if (bytes.length !== SIZES.kvm_pit_state2) {
      throw new RangeError(`setPit2: need ${SIZES.kvm_pit_state2} bytes`);
    }
    ioctlBuf(this.fd, C.KVM_SET_PIT2, bytes.slice(), "KVM_SET_PIT2");
  }

  /** KVM_CREATE_VCPU and mmap of its kvm_run. */
  createVcpu(id: number): VcpuFd {
    const fd = ioctlVal(this.fd, C.KVM_CREATE_VCPU, id, `KVM_CREATE_VCPU ${id}`);
    const size = this.vcpuMmapSize;
    const r = shim().kvs_mmap(0, size, C.PROT_READ | C.PROT_WRITE, C.MAP_SHARED, fd, 0);
    if (r < 0n) {
      shim().kvs_close(fd);
      throw new OsError(-Number(r), `mmap kvm_run of vCPU ${id}`);
    }
    return new VcpuFd({ fd, id, runAddr: r, runSize: size });
  }

  close(): void {
    check(shim().kvs_close(this.fd), "close VM fd");
  }
}

// ---------------------------------------------------------------------------------------------------
// kvm_run

/**
 * View over a vCPU's mmap'd kvm_run, built once per vCPU per thread. Getters read the shared page directly
 * and allocate nothing (mmioPhysAddr may box a double above 2^31 when not optimized).
 */
export class KvmRun {
  /** The whole mmap'd region (kvm_run + PIO data page): PIO data lives at `ioDataOffset`. */
  readonly data: Uint8Array<ArrayBuffer>;
  /** The 8 mmio.data bytes, a view INTO kvm_run (read them on MMIO writes, fill them on MMIO reads). */
  readonly mmioData: Uint8Array<ArrayBuffer>;
  readonly #v: DataView<ArrayBuffer>;

  constructor(addr: bigint, size: number) {
    this.data = hostBytes(addr, size);
    this.mmioData = this.data.subarray(RUN.mmioData, RUN.mmioData + 8);
    this.#v = new DataView(this.data.buffer, this.data.byteOffset, size);
  }

  get exitReason(): number {
    return this.#v.getUint32(RUN.exitReason, true);
  }
  get immediateExit(): number {
    return this.data[RUN.immediateExit];
  }
  set immediateExit(v: number) {
    this.data[RUN.immediateExit] = v;
  }
  get requestInterruptWindow(): number {
    return this.data[RUN.requestInterruptWindow];
  }
  set requestInterruptWindow(v: number) {
    this.data[RUN.requestInterruptWindow] = v;
  }
  get readyForInterruptInjection(): number {
    return this.data[RUN.readyForInterruptInjection];
  }
  get ifFlag(): number {
    return this.data[RUN.ifFlag];
  }
  get cr8(): bigint {
    return this.#v.getBigUint64(RUN.cr8, true);
  }
  get apicBase(): bigint {
    return this.#v.getBigUint64(RUN.apicBase, true);
  }

  // KVM_EXIT_IO
  /** KVM_EXIT_IO_IN (0) or KVM_EXIT_IO_OUT (1). */
  get ioDirection(): number {
    return this.data[RUN.ioDirection];
  }
  get ioSize(): number {
    return this.data[RUN.ioSize];
  }
  get ioPort(): number {
    return this.#v.getUint16(RUN.ioPort, true);
  }
  get ioCount(): number {
    return this.#v.getUint32(RUN.ioCount, true);
  }
  /** Offset of the PIO data (count * size bytes) in `data`. Always < 4 GiB in practice (one page in). */
  get ioDataOffset(): number {
    return this.#v.getUint32(RUN.ioDataOffset, true);
  }

  // KVM_EXIT_MMIO
  get mmioPhysAddr(): number {
    return this.#v.getUint32(RUN.mmioPhysAddr, true) +
      this.#v.getUint32(RUN.mmioPhysAddr + 4, true) * 2 ** 32;
  }
  get mmioLen(): number {
    return this.#v.getUint32(RUN.mmioLen, true);
  }
  get mmioIsWrite(): boolean {
    return this.data[RUN.mmioIsWrite] !== 0;
  }

  // KVM_EXIT_SYSTEM_EVENT
  get systemEventType(): number {
    return this.#v.getUint32(RUN.systemEventType, true);
  }
  get systemEventNdata(): number {
    return this.#v.getUint32(RUN.systemEventNdata, true);
  }
  systemEventData(i: number): bigint {
    return this.#v.getBigUint64(RUN.systemEventData + i * 8, true);
  }

  // KVM_EXIT_INTERNAL_ERROR
  get internalSuberror(): number {
    return this.#v.getUint32(RUN.internalSuberror, true);
  }
  get internalNdata(): number {
    return this.#v.getUint32(RUN.internalNdata, true);
  }
  internalData(i: number): bigint {
    return this.#v.getBigUint64(RUN.internalData + i * 8, true);
  }

  // KVM_EXIT_FAIL_ENTRY
  get failEntryReason(): bigint {
    return this.#v.getBigUint64(RUN.failEntryReason, true);
  }
  get failEntryCpu(): number {
    return this.#v.getUint32(RUN.failEntryCpu, true);
  }

  // KVM_EXIT_EXCEPTION
  get exceptionNumber(): number {
    return this.#v.getUint32(RUN.exceptionException, true);
  }
  get exceptionErrorCode(): number {
    return this.#v.getUint32(RUN.exceptionErrorCode, true);
  }
}

// ---------------------------------------------------------------------------------------------------
// vCPU

/** Structured-cloneable identity of a vCPU: enough to rebuild a VcpuFd in a Worker. */
export interface VcpuDescriptor {
  fd: number;
  id: number;
  runAddr: bigint;
  runSize: number;
}

/** The vCPU state structs {@link VcpuFd.getRaw} reads. */
export type VcpuRawState = keyof typeof RAW_STATE;
const RAW_STATE = {
  regs: [C.KVM_GET_REGS, C.KVM_SET_REGS, SIZES.kvm_regs],
  sregs: [C.KVM_GET_SREGS, C.KVM_SET_SREGS, SIZES.kvm_sregs],
  fpu: [C.KVM_GET_FPU, C.KVM_SET_FPU, SIZES.kvm_fpu],
  lapic: [C.KVM_GET_LAPIC, C.KVM_SET_LAPIC, SIZES.kvm_lapic_state],
  mp_state: [C.KVM_GET_MP_STATE, C.KVM_SET_MP_STATE, SIZES.kvm_mp_state],
  events: [C.KVM_GET_VCPU_EVENTS, C.KVM_SET_VCPU_EVENTS, SIZES.kvm_vcpu_events],
  xsave: [C.KVM_GET_XSAVE, C.KVM_SET_XSAVE, SIZES.kvm_xsave],
  xcrs: [C.KVM_GET_XCRS, C.KVM_SET_XCRS, SIZES.kvm_xcrs],
  debugregs: [C.KVM_GET_DEBUGREGS, C.KVM_SET_DEBUGREGS, SIZES.kvm_debugregs],
} as const;

export class VcpuFd {
  readonly fd: number;
  readonly id: number;
  readonly runAddr: bigint;
  readonly runSize: number;
  /** The kvm_run view (one per VcpuFd object). */
  readonly kvmRun: KvmRun;

  readonly #runFn = shim().kvs_run;
  readonly #ioctl = shim().kvs_ioctl_i32;
  readonly #regs = newStruct(SIZES.kvm_regs);
  readonly #sregs = newStruct(SIZES.kvm_sregs);
  readonly #fpu = newStruct(SIZES.kvm_fpu);
  readonly #lapic = newStruct(SIZES.kvm_lapic_state);
  readonly #mp = newStruct(SIZES.kvm_mp_state);

  constructor(d: VcpuDescriptor) {
    this.fd = d.fd;
    this.id = d.id;
    this.runAddr = d.runAddr;
    this.runSize = d.runSize;
    this.kvmRun = new KvmRun(d.runAddr, d.runSize);
  }

  static fromDescriptor(d: VcpuDescriptor): VcpuFd {
    return new VcpuFd(d);
  }

  descriptor(): VcpuDescriptor {
    return { fd: this.fd, id: this.id, runAddr: this.runAddr, runSize: this.runSize };
  }

  /**
   * KVM_RUN. Returns 0 after an exit (see kvmRun.exitReason) or a negative errno (-EINTR after a kick or
   * with immediate_exit set, -EAGAIN...). Never throws and allocates nothing.
   */
  run(): number {
    return this.#runFn(this.fd);
  }

  #get(req: number, buf: Uint8Array, what: string): void {
    const r = this.#ioctl(this.fd, req, buf);
    if (r < 0) throw new OsError(-r, `${what} (vCPU ${this.id})`);
  }

  getRegs(): KvmRegs {
    this.#get(C.KVM_GET_REGS, this.#regs.bytes, "KVM_GET_REGS");
    return decodeRegs(this.#regs.view);
  }
  setRegs(regs: KvmRegs): void {
    encodeRegs(this.#regs.view, regs);
    this.#get(C.KVM_SET_REGS, this.#regs.bytes, "KVM_SET_REGS");
  }

  getSregs(): KvmSregs {
    this.#get(C.KVM_GET_SREGS, this.#sregs.bytes, "KVM_GET_SREGS");
    return decodeSregs(this.#sregs.view);
  }
  setSregs(s: KvmSregs): void {
    encodeSregs(this.#sregs.view, s);
    this.#get(C.KVM_SET_SREGS, this.#sregs.bytes, "KVM_SET_SREGS");
  }

  getFpu(): KvmFpu {
    this.#get(C.KVM_GET_FPU, this.#fpu.bytes, "KVM_GET_FPU");
    return decodeFpu(this.#fpu.view);
  }
  /** KVM_SET_FPU. Fields not given keep their current values (read with KVM_GET_FPU first). */
  setFpu(f: Partial<KvmFpu>): void {
    this.#get(C.KVM_GET_FPU, this.#fpu.bytes, "KVM_GET_FPU");
    encodeFpu(this.#fpu.view, f);
    this.#get(C.KVM_SET_FPU, this.#fpu.bytes, "KVM_SET_FPU");
  }

  setCpuid2(entries: CpuidEntry[]): void {
    this.#get(C.KVM_SET_CPUID2, encodeCpuid2(entries), "KVM_SET_CPUID2");
  }
  /** KVM_GET_CPUID2: the CPUID table last set on this vCPU. */
  getCpuid2(max = 256): CpuidEntry[] {
    const buf = encodeCpuid2([], max);
    this.#get(C.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2");
    return decodeCpuid2(buf);
  }

  /** KVM_GET_MSRS: returns the entries KVM could read (a prefix of `indices`). */
  getMsrs(indices: number[]): MsrEntry[] {
    const buf = encodeMsrs(indices.map((index) => ({ index })));
    const r = this.#ioctl(this.fd, C.KVM_GET_MSRS, buf);
    if (r < 0) throw new OsError(-r, `KVM_GET_MSRS (vCPU ${this.id})`);
    return decodeMsrs(buf, r);
  }
  /** KVM_SET_MSRS: returns how many entries were set (KVM stops at the first one it rejects). */
  setMsrs(entries: MsrEntry[]): number {
    const r = this.#ioctl(this.fd, C.KVM_SET_MSRS, encodeMsrs(entries));
    if (r < 0) throw new OsError(-r, `KVM_SET_MSRS (vCPU ${this.id})`);
    return r;
  }

  /** KVM_GET_LAPIC: a copy of the 1024-byte local APIC register page. */
  getLapic(): Uint8Array {
    this.#get(C.KVM_GET_LAPIC, this.#lapic.bytes, "KVM_GET_LAPIC");
    return this.#lapic.bytes.slice();
  }
  setLapic(bytes: Uint8Array): void {
    if (bytes.length !== SIZES.kvm_lapic_state) throw new RangeError("setLapic: need 1024 bytes");
    this.#lapic.bytes.set(bytes);
    this.#get(C.KVM_SET_LAPIC, this.#lapic.bytes, "KVM_SET_LAPIC");
  }

  getMpState(): number {
    this.#get(C.KVM_GET_MP_STATE, this.#mp.bytes, "KVM_GET_MP_STATE");
    return this.#mp.view.getUint32(0, true);
  }
  setMpState(state: number): void {
    this.#mp.view.setUint32(0, state, true);
    this.#get(C.KVM_SET_MP_STATE, this.#mp.bytes, "KVM_SET_MP_STATE");
  }

  /** Raw kvm_vcpu_events (64 bytes), for save/restore. */
  getVcpuEvents(): Uint8Array {
    const b = new Uint8Array(SIZES.kvm_vcpu_events);
    this.#get(C.KVM_GET_VCPU_EVENTS, b, "KVM_GET_VCPU_EVENTS");
    return b;
  }
  setVcpuEvents(b: Uint8Array): void {
    this.#get(C.KVM_SET_VCPU_EVENTS, b, "KVM_SET_VCPU_EVENTS");
  }
  /**
   * One piece of the vCPU's state as KVM's raw struct (a copy), for save/restore: `regs`, `sregs`, `fpu`,
   * `lapic`, `mp_state`, `events`, `xsave`, `xcrs`, `debugregs`.
   */
  getRaw(what: VcpuRawState): Uint8Array {
    const [get, , size] = RAW_STATE[what];
    const b = new Uint8Array(size);
    this.#get(get, b, `KVM_GET ${what}`);
    return b;
  }
  /** Loads a raw struct from {@link getRaw}; the size must match. */
  setRaw(what: VcpuRawState, bytes: Uint8Array): void {
    const [, set, size] = RAW_STATE[what];
    if (bytes.length !== size) throw new RangeError(`vCPU ${what}: ${bytes.length} bytes, need ${size}`);
    this.#get(set, bytes.slice(), `KVM_SET ${what}`);
  }

  /** Raw kvm_debugregs (128 bytes), for save/restore. */
  getDebugRegs(): Uint8Array {
    const b = new Uint8Array(SIZES.kvm_debugregs);
    this.#get(C.KVM_GET_DEBUGREGS, b, "KVM_GET_DEBUGREGS");
    return b;
  }
  setDebugRegs(b: Uint8Array): void {
    this.#get(C.KVM_SET_DEBUGREGS, b, "KVM_SET_DEBUGREGS");
  }
  /** Raw kvm_xsave (4096 bytes, legacy size), for save/restore. */
  getXsave(): Uint8Array {
    const b = new Uint8Array(SIZES.kvm_xsave);
    this.#get(C.KVM_GET_XSAVE, b, "KVM_GET_XSAVE");
    return b;
  }
  setXsave(b: Uint8Array): void {
    this.#get(C.KVM_SET_XSAVE, b, "KVM_SET_XSAVE");
  }
  /** Raw kvm_xcrs (392 bytes). */
  getXcrs(): Uint8Array {
    const b = new Uint8Array(SIZES.kvm_xcrs);
    this.#get(C.KVM_GET_XCRS, b, "KVM_GET_XCRS");
    return b;
  }
  setXcrs(b: Uint8Array): void {
    this.#get(C.KVM_SET_XCRS, b, "KVM_SET_XCRS");
  }
  getTscKhz(): number {
    return ioctlVal(this.fd, C.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ");
  }
  setTscKhz(khz: number): void {
    ioctlVal(this.fd, C.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ");
  }
  /** KVM_INTERRUPT: queue an external interrupt vector (only without an in-kernel irqchip). */
  interrupt(vector: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, vector, true);
    this.#get(C.KVM_INTERRUPT, b, "KVM_INTERRUPT");
  }
  nmi(): void {
    ioctlVal(this.fd, C.KVM_NMI, 0, "KVM_NMI");
  }

  /** Unmaps kvm_run and closes the vCPU fd. Call once, from the owner, after the vCPU thread stopped. */
  close(): void {
    check(shim().kvs_munmap(this.runAddr, this.runSize), "munmap kvm_run");
    check(shim().kvs_close(this.fd), "close vCPU fd");
  }
}

// ---------------------------------------------------------------------------------------------------
// host memory

export interface HostMapping {
  hostAddr: bigint;
  size: number;
  /** The memfd backing the mapping, when there is one. */
  fd?: number;
}

export interface MapOptions {
  /** MAP_HUGETLB / MFD_HUGETLB (needs configured hugetlbfs pages; fails with ENOMEM otherwise). */
  hugepages?: boolean;
  /** MAP_NORESERVE for a shared mapping (hotplug space: huge pages are not reserved up front). */
  noReserve?: boolean;
}

/** Private anonymous RAM (MAP_NORESERVE: pages are allocated on first touch). */
export function mapAnonymous(size: number, opts: MapOptions = {}): HostMapping {
  let flags = C.MAP_PRIVATE | C.MAP_ANONYMOUS | C.MAP_NORESERVE;
  if (opts.hugepages) flags |= C.MAP_HUGETLB;
  const addr = checkBig(
    shim().kvs_mmap(0, size, C.PROT_READ | C.PROT_WRITE, flags, -1, 0),
    `mmap anonymous ${size} bytes`,
  );
  return { hostAddr: addr, size };
}

/** Shared RAM backed by a memfd (shareable with other processes, e.g. vhost-user backends). */
export function mapMemfd(size: number, name: string, opts: MapOptions = {}): HostMapping {
  let mfd = C.MFD_CLOEXEC;
  if (opts.hugepages) mfd |= C.MFD_HUGETLB;
  const fd = check(shim().kvs_memfd(cstr(name), mfd), `memfd_create ${name}`);
  try {
    check(shim().kvs_ftruncate(fd, size), `ftruncate memfd ${name}`);
    return { ...mapFd(fd, size, 0, opts.noReserve), fd };
  } catch (e) {
    shim().kvs_close(fd);
    throw e;
  }
}

/** MAP_SHARED mapping of `size` bytes of `fd` at `offset` (does not take ownership of fd). */
export function mapFd(fd: number, size: number, offset = 0, noReserve = false): HostMapping {
  const addr = checkBig(
    shim().kvs_mmap(
      0,
      size,
      C.PROT_READ | C.PROT_WRITE,
      C.MAP_SHARED | (noReserve ? C.MAP_NORESERVE : 0),
      fd,
      offset,
    ),
    `mmap fd ${fd}`,
  );
  return { hostAddr: addr, size };
}

/**
 * Copy-on-write mapping of `size` bytes of a file at `offset` (MAP_PRIVATE): pages are read from the file
 * when first touched and writes stay in this process. Does not take ownership of fd.
 */
export function mapFilePrivate(fd: number, size: number, offset = 0): HostMapping {
  const addr = checkBig(
    shim().kvs_mmap(0, size, C.PROT_READ | C.PROT_WRITE, C.MAP_PRIVATE | C.MAP_NORESERVE, fd, offset),
    `mmap (private) fd ${fd}`,
  );
  return { hostAddr: addr, size };
}

/** Unmaps, and closes the memfd if the mapping has one (unless closeFd is false). */
export function unmap(m: HostMapping, closeFd = true): void {
  check(shim().kvs_munmap(m.hostAddr, m.size), "munmap");
  if (closeFd && m.fd !== undefined) check(shim().kvs_close(m.fd), "close memfd");
}

/** A Uint8Array over a whole mapping (zero-copy; valid until unmap). */
export function mappingBytes(m: HostMapping): Uint8Array<ArrayBuffer> {
  return hostBytes(m.hostAddr, m.size);
}

// ---------------------------------------------------------------------------------------------------
// eventfd

export class EventFd {
  readonly fd: number;
  readonly #word = new BigUint64Array(1);
  readonly #bytes = new Uint8Array(this.#word.buffer);
  readonly #read = shim().kvs_read_i32;
  readonly #write = shim().kvs_write_i32;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /** eventfd(0, flags | EFD_CLOEXEC); flags: EFD_NONBLOCK, EFD_SEMAPHORE. */
  static create(flags = 0): EventFd {
    return new EventFd(check(shim().kvs_eventfd(0, flags | C.EFD_CLOEXEC), "eventfd"));
  }

  /** Wraps an eventfd received from another thread (no ownership change). */
  static fromFd(fd: number): EventFd {
    return new EventFd(fd);
  }

  /** Adds n to the counter. Throws OsError (EAGAIN when it would overflow on a non-blocking eventfd). */
  write(n: bigint = 1n): void {
    this.#word[0] = n;
    const r = this.#write(this.fd, this.#bytes, 8);
    if (r < 0) throw new OsError(-r, "eventfd write");
  }

  /**
   * Reads and resets the counter (or decrements by 1 with EFD_SEMAPHORE). On a non-blocking eventfd whose
   * counter is zero it returns 0n (a successful read never returns 0).
   */
  read(): bigint {
    const r = this.#read(this.fd, this.#bytes, 8);
    if (r < 0) {
      if (r === -EAGAIN) return 0n;
      throw new OsError(-r, "eventfd read");
    }
    return this.#word[0];
  }

  close(): void {
    check(shim().kvs_close(this.fd), "close eventfd");
  }
}

// ---------------------------------------------------------------------------------------------------
// vCPU kick

/**
 * Installs the process-wide kick signal handler (no SA_RESTART, so KVM_RUN fails with EINTR). Idempotent;
 * call it in the vCPU Worker before its first run().
 */
export function kickInit(): void {
  check(shim().kvs_kick_init(), "kick init");
}

/** pthread_t of the calling thread (pass it to the thread that will kick). */
export function threadSelf(): bigint {
  return shim().kvs_thread_self();
}

/**
 * Sends the kick signal to `thread`. The thread must still be alive. To make the kick race-free, set
 * kvm_run.immediate_exit = 1 first: a vCPU that was not yet inside KVM_RUN then returns -EINTR at once.
 */
export function kick(thread: bigint): void {
  const r = shim().kvs_kick(thread);
  if (r < 0n) throw new OsError(-Number(r), "pthread_kill (kick)");
}

/** Kernel thread id of the calling thread. */
export function threadId(): number {
  return Number(shim().kvs_gettid());
}

/**
 * Kicks the thread with kernel id `tid` in this process (tgkill). Unlike {@link kick}, a thread that has
 * already exited is harmless: the call returns false (ESRCH) instead of touching freed memory.
 */
export function kickTid(tid: number): boolean {
  const r = shim().kvs_kick_tid(tid);
  if (r === -3n) return false;
  if (r < 0n) throw new OsError(-Number(r), "tgkill (kick)");
  return true;
}

/** The signal number used for kicks (SIGRTMIN+1). */
export function kickSignal(): number {
  return shim().kvs_kick_signal();
}

/** CLOCK_MONOTONIC in nanoseconds. */
export function nowNs(): bigint {
  return shim().kvs_now_ns();
}
