/**
 * Raw disk images for virtio-blk through the shim: the main thread opens the image (kvs_open, so a
 * bad path fails the boot), the device worker reads and writes it with pread/pwrite straight into the
 * guest-memory views the queue hands out (no copy), and flushes with fdatasync.
 */
import { addressOf, check, cstr, EINTR, OsError, shim } from "../../ffi/shim.ts";
import { O_CLOEXEC, O_DIRECT, O_RDONLY, O_RDWR } from "../../ffi/kvm_constants.ts";
import type { Disk, DiskBatch } from "./blk.ts";

export interface DiskOpenOptions {
  readonly?: boolean;
  /** O_DIRECT: guest buffers must then be suitably aligned (misaligned requests fail with IOERR). */
  direct?: boolean;
}

/** Most buffers one preadv/pwritev takes (Linux's UIO_MAXIOV). */
const IOV_MAX = 1024;

/** Opens an image; returns its fd and size in bytes (block devices included). */
export function openDiskImage(
  path: string,
  o: DiskOpenOptions = {},
): { fd: number; size: number; format: ImageFormat } {
  let size: number;
  let format: ImageFormat;
  {
    // A FIFO would block this open forever, a character device never ends: images are files or disks.
    const st = Deno.statSync(path);
    if (!st.isFile && !st.isBlockDevice) throw new Error("not a regular file or a block device");
    const f = Deno.openSync(path, { read: true });
    try {
      const head = new Uint8Array(8);
      let got = 0;
      while (got < head.length) {
        const n = f.readSync(head.subarray(got));
        if (n === null) break;
        got += n;
      }
      format = imageFormat(head.subarray(0, got));
      size = f.seekSync(0, Deno.SeekMode.End);
    } finally {
      f.close();
    }
  }
  const flags = (o.readonly ? O_RDONLY : O_RDWR) | (o.direct ? O_DIRECT : 0) | O_CLOEXEC;
  const fd = check(shim().kvs_open(cstr(path), flags, 0), `open disk image ${path}`);
  try {
    lockImage(fd, !o.readonly);
  } catch (e) {
    shim().kvs_close(fd);
    throw e;
  }
  return { fd, size, format };
}

const F_OFD_SETLK = 37;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;

/**
 * Locks an open image as Cloud Hypervisor does (an open-file-description lock over the whole file): a
 * writable disk takes a write lock, a read-only one a read lock, so no two VMMs write one image and no
 * VMM writes an image another is reading. The lock goes with the descriptor.
 */
export function lockImage(fd: number, write: boolean): void {
  // struct flock: l_type (short), l_whence (short), l_start (off_t @8), l_len (off_t @16), l_pid (@24).
  const lock = new Uint8Array(32);
  const v = new DataView(lock.buffer);
  v.setInt16(0, write ? F_WRLCK : F_RDLCK, true);
  const ptr = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(lock)));
  const r = Number(shim().kvs_fcntl(fd, F_OFD_SETLK, ptr));
  if (r === -11 || r === -13) {
    throw new Error(
      `the image is locked by another process (another VM ${write ? "using" : "writing"} it?)`,
    );
  }
  if (r < 0) throw new Error(`locking the image failed (errno ${-r})`);
}

/** Lets go of the lock {@link lockImage} took (a migration hands the image to the destination). */
export function unlockImage(fd: number): void {
  const lock = new Uint8Array(32);
  new DataView(lock.buffer).setInt16(0, F_UNLCK, true);
  const ptr = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(lock)));
  const r = Number(shim().kvs_fcntl(fd, F_OFD_SETLK, ptr));
  if (r < 0) throw new Error(`unlocking the image failed (errno ${-r})`);
}

/** An image's format as Cloud Hypervisor names it (its `image_type`). */
export type ImageFormat = "Raw" | "Qcow2" | "Vhdx";

/** The format an image's first bytes announce: QCOW2 and VHDX carry a signature, anything else is raw. */
export function imageFormat(head: Uint8Array): ImageFormat {
  const text = new TextDecoder("latin1").decode(head);
  if (text.startsWith("QFI\xfb")) return "Qcow2";
  if (text.startsWith("vhdxfile")) return "Vhdx";
  return "Raw";
}

/** A Disk over an fd this object does not own (the main thread closes it after the worker stops). */
export class ShimFileDisk implements Disk {
  constructor(
    readonly fd: number,
    readonly size: number,
    readonly readonly: boolean,
    readonly id: string,
  ) {}

  /** pread/pwrite until `buf` is done, the disk ends (short count) or an error other than EINTR. */
  #transfer(write: boolean, buf: Uint8Array, off: number): number {
    const s = shim();
    let done = 0;
    while (done < buf.length) {
      const view = done === 0 ? buf : buf.subarray(done);
      const n = write
        ? s.kvs_pwrite_at(this.fd, view, view.length, off + done)
        : s.kvs_pread_at(this.fd, view, view.length, off + done);
      if (n === -EINTR) continue;
      if (n < 0) throw new OsError(-n, write ? "disk pwrite" : "disk pread");
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  readAt(buf: Uint8Array, off: number): number {
    return this.#transfer(false, buf, off);
  }

  writeAt(buf: Uint8Array, off: number): number {
    if (this.readonly) throw new Error("read-only disk");
    return this.#transfer(true, buf, off);
  }

  /** struct iovec[IOV_MAX]: base address and length per buffer, reused for every request. */
  readonly #iovec = new BigUint64Array(2 * IOV_MAX);

  #vectored(write: boolean, bufs: readonly Uint8Array[], off: number): number {
    if (bufs.length > IOV_MAX) return -1;
    const iov = this.#iovec;
    for (let i = 0; i < bufs.length; i++) {
      iov[2 * i] = addressOf(bufs[i] as Uint8Array<ArrayBuffer>); // guest RAM views: never shared buffers
      iov[2 * i + 1] = BigInt(bufs[i].length);
    }
    const s = shim();
    for (;;) {
      const n = write
        ? s.kvs_pwritev_at(this.fd, iov, bufs.length, off)
        : s.kvs_preadv_at(this.fd, iov, bufs.length, off);
      if (n === -EINTR) continue;
      if (n < 0) throw new OsError(-n, write ? "disk pwritev" : "disk preadv");
      return n; // a short transfer makes the device redo the request buffer by buffer
    }
  }

  readvAt(bufs: readonly Uint8Array[], off: number): number {
    return this.#vectored(false, bufs, off);
  }

  writevAt(bufs: readonly Uint8Array[], off: number): number {
    if (this.readonly) throw new Error("read-only disk");
    return this.#vectored(true, bufs, off);
  }

  iovAt(write: boolean, iov: Uint8Array, count: number, off: number): number {
    if (count > IOV_MAX) return -1;
    if (write && this.readonly) throw new Error("read-only disk");
    const s = shim();
    for (;;) {
      const n = write
        ? s.kvs_pwritev_at(this.fd, iov, count, off)
        : s.kvs_preadv_at(this.fd, iov, count, off);
      if (n === -EINTR) continue;
      if (n < 0) throw new OsError(-n, write ? "disk pwritev" : "disk preadv");
      return n; // short: the device redoes the request buffer by buffer
    }
  }

  flush(): void {
    if (this.readonly) return;
    const r = Number(shim().kvs_fdatasync(this.fd));
    if (r < 0) throw new OsError(-r, "disk fdatasync");
  }
}

/** kvs_uring_prep operations (libkvmshim/kvmshim.h). */
const URING_READV = 0;
const URING_WRITEV = 1;

/**
 * A {@link DiskBatch} over an io_uring of the shim: the requests one notify brings go to the kernel
 * together and run side by side (an O_DIRECT disk gets them all in flight at once, as QEMU's and Cloud
 * Hypervisor's asynchronous back ends do), and the worker waits once for all of them.
 */
export class UringBatch implements DiskBatch {
  readonly capacity: number;
  readonly results: Int32Array;
  #h: number;
  #queued = 0;

  private constructor(h: number, readonly fd: number, capacity: number) {
    this.#h = h;
    this.capacity = capacity;
    this.results = new Int32Array(2 * capacity);
  }

  /** Why the last {@link open} gave null: the errno of io_uring_setup (or of mapping its rings). */
  static lastErrno = 0;

  /** A batch of up to `capacity` requests on `fd`, or null when this kernel (or sandbox) has no io_uring. */
  static open(fd: number, capacity: number): UringBatch | null {
    const h = shim().kvs_uring_create(capacity);
    UringBatch.lastErrno = h < 0 ? -h : 0;
    return h < 0 ? null : new UringBatch(h, fd, capacity);
  }

  queue(write: boolean, iov: Uint8Array, count: number, off: number, tag: number): boolean {
    if (this.#h < 0 || this.#queued === this.capacity) return false;
    const r = shim().kvs_uring_prep(
      this.#h,
      write ? URING_WRITEV : URING_READV,
      this.fd,
      iov,
      count,
      off,
      tag,
    );
    if (r < 0) return false;
    this.#queued++;
    return true;
  }

  run(): number {
    const s = shim();
    const want = this.#queued;
    this.#queued = 0;
    const r = s.kvs_uring_submit_wait(this.#h, want);
    if (r < 0) {
      // Nothing can be trusted of this ring any more: drop it (what it still held goes with it).
      this.close();
      throw new OsError(-r, "io_uring_enter");
    }
    let got = 0;
    while (got < want) {
      const n = s.kvs_uring_reap(this.#h, this.results.subarray(2 * got), want - got);
      if (n <= 0) break;
      got += n;
    }
    return got;
  }

  close(): void {
    if (this.#h < 0) return;
    shim().kvs_uring_destroy(this.#h);
    this.#h = -1;
  }
}
