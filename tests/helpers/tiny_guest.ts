/**
 * Tiny hand-assembled guests packaged as ELF files with a PVH entry note, so the whole VM path
 * (loader, vCPU workers, serial, ACPI power-off register) can run on any /dev/kvm, PVM included.
 */

/**
 * 32-bit code loaded at 0x100000: prints `message` on COM1 (port 0x3f8) one byte at a time, then writes
 * SLP_EN|S5 (0x34) to the ACPI sleep control register at port 0x600 and halts.
 *
 *   mov dx, 0x3f8 ; mov esi, msg ; 1: lodsb ; test al, al ; jz 2f ; out dx, al ; jmp 1b
 *   2: mov dx, 0x600 ; mov al, 0x34 ; out dx, al ; 3: hlt ; jmp 3b ; msg: .asciz "..."
 */
export function printAndPoweroffCode(message: string, loadAddr = 0x100000): Uint8Array {
  const head = [
    0x66,
    0xba,
    0xf8,
    0x03, // mov dx, 0x3f8
    0xbe,
    0,
    0,
    0,
    0, // mov esi, imm32 (patched)
    0xac, // lodsb
    0x84,
    0xc0, // test al, al
    0x74,
    0x03, // jz +3
    0xee, // out dx, al
    0xeb,
    0xf8, // jmp -8
    0x66,
    0xba,
    0x00,
    0x06, // mov dx, 0x600
    0xb0,
    0x34, // mov al, 0x34
    0xee, // out dx, al
    0xf4, // hlt
    0xeb,
    0xfd, // jmp -3
  ];
  const msg = new TextEncoder().encode(message + "\0");
  const code = new Uint8Array(head.length + msg.length);
  code.set(head);
  code.set(msg, head.length);
  new DataView(code.buffer).setUint32(5, loadAddr + head.length, true);
  return code;
}

/** Wraps 32-bit code into an ELF64 executable with one PT_LOAD at `loadAddr` and a Xen PVH entry note. */
export function pvhElf(code: Uint8Array, loadAddr = 0x100000): Uint8Array {
  const phoff = 64;
  const noteOff = phoff + 2 * 56;
  const noteSize = 12 + 4 + 4; // header, "Xen\0", 4-byte entry
  const codeOff = 0x1000;
  const out = new Uint8Array(codeOff + code.length);
  const v = new DataView(out.buffer);
  out.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]); // ELF, 64-bit, little-endian, version 1
  v.setUint16(16, 2, true); // ET_EXEC
  v.setUint16(18, 0x3e, true); // EM_X86_64
  v.setUint32(20, 1, true);
  v.setBigUint64(24, BigInt(loadAddr), true); // e_entry
  v.setBigUint64(32, BigInt(phoff), true);
  v.setUint16(52, 64, true); // e_ehsize
  v.setUint16(54, 56, true); // e_phentsize
  v.setUint16(56, 2, true); // e_phnum
  const ph = (
    i: number,
    type: number,
    flags: number,
    off: number,
    addr: number,
    size: number,
    align: number,
  ) => {
    const b = phoff + i * 56;
    v.setUint32(b, type, true);
    v.setUint32(b + 4, flags, true);
    v.setBigUint64(b + 8, BigInt(off), true);
    v.setBigUint64(b + 16, BigInt(addr), true);
    v.setBigUint64(b + 24, BigInt(addr), true);
    v.setBigUint64(b + 32, BigInt(size), true);
    v.setBigUint64(b + 40, BigInt(size), true);
    v.setBigUint64(b + 48, BigInt(align), true);
  };
  ph(0, 1, 5, codeOff, loadAddr, code.length, 0x1000); // PT_LOAD r-x
  ph(1, 4, 4, noteOff, 0, noteSize, 4); // PT_NOTE
  v.setUint32(noteOff, 4, true); // namesz
  v.setUint32(noteOff + 4, 4, true); // descsz
  v.setUint32(noteOff + 8, 18, true); // XEN_ELFNOTE_PHYS32_ENTRY
  out.set([0x58, 0x65, 0x6e, 0], noteOff + 12); // "Xen\0"
  v.setUint32(noteOff + 16, loadAddr, true);
  out.set(code, codeOff);
  return out;
}

/** Where {@link countingGuest} counts (a little-endian dword). */
export const COUNTER = 0x200000;

/** The count at {@link COUNTER} in a VM's guest memory (read from the host). */
export function guestCounter(
  vm: { memory?: { regions: readonly { gpa: number; bytes: Uint8Array }[] } },
): number {
  const r = vm.memory!.regions.find((x) => x.gpa <= COUNTER && COUNTER < x.gpa + x.bytes.length)!;
  return new DataView(r.bytes.buffer, r.bytes.byteOffset).getUint32(COUNTER - r.gpa, true);
}

/**
 * 32-bit guest: counts in the dword at 0x200000 forever; each turn reads COM1's line status, echoes a
 * received byte, and powers off on 'q'.
 *
 *   l: inc dword [0x200000] ; mov dx, 0x3fd ; in al, dx ; test al, 1 ; jz l
 *      mov dx, 0x3f8 ; in al, dx ; cmp al, 'q' ; je p ; out dx, al ; jmp l
 *   p: mov dx, 0x600 ; mov al, 0x34 ; out dx, al ; h: hlt ; jmp h
 */
export function countingGuest(): Uint8Array {
  return new Uint8Array([
    0xff,
    0x05,
    0x00,
    0x00,
    0x20,
    0x00, // 0: inc dword [0x200000]
    0x66,
    0xba,
    0xfd,
    0x03, // 6: mov dx, 0x3fd
    0xec, // 10: in al, dx
    0xa8,
    0x01, // 11: test al, 1
    0x74,
    0xf1, // 13: jz 0
    0x66,
    0xba,
    0xf8,
    0x03, // 15: mov dx, 0x3f8
    0xec, // 19: in al, dx
    0x3c,
    0x71, // 20: cmp al, 'q'
    0x74,
    0x03, // 22: je 27
    0xee, // 24: out dx, al
    0xeb,
    0xe5, // 25: jmp 0
    0x66,
    0xba,
    0x00,
    0x06, // 27: mov dx, 0x600
    0xb0,
    0x34, // 31: mov al, 0x34
    0xee, // 33: out dx, al
    0xf4, // 34: hlt
    0xeb,
    0xfd, // 35: jmp 34
  ]);
}

/**
 * 32-bit guest that dirties memory as fast as it can, with no exits: counts at {@link COUNTER} and writes
 * each count into one of 256 pages from 0x300000 in turn.
 *
 *   l: inc dword [0x200000] ; mov eax, [0x200000] ; mov ebx, eax ; and ebx, 0xff ; shl ebx, 12
 *      mov [ebx + 0x300000], eax ; jmp l
 */
export function dirtyingGuest(): Uint8Array {
  return new Uint8Array([
    0xff,
    0x05,
    0x00,
    0x00,
    0x20,
    0x00, // 0: inc dword [0x200000]
    0xa1,
    0x00,
    0x00,
    0x20,
    0x00, // 6: mov eax, [0x200000]
    0x89,
    0xc3, // 11: mov ebx, eax
    0x81,
    0xe3,
    0xff,
    0x00,
    0x00,
    0x00, // 13: and ebx, 0xff
    0xc1,
    0xe3,
    0x0c, // 19: shl ebx, 12
    0x89,
    0x83,
    0x00,
    0x00,
    0x30,
    0x00, // 22: mov [ebx + 0x300000], eax
    0xeb,
    0xe2, // 28: jmp 0
  ]);
}

/**
 * 32-bit code that writes the UART as Linux's console does and then powers off. In order:
 * `polled[0]` byte by byte, each after polling the line status register for THRE (IER = 0); the same
 * for `polled[1]` with the THR-empty interrupt enabled (IER = 2; MCR's OUT2 stays off, so no interrupt
 * reaches the CPU); `polled[2]` polled again with IER = 0; then `burst` written back to back with no
 * status read in between; then the ACPI sleep register (port 0x600). Messages must not contain NUL.
 */
export function serialConsoleCode(
  polled: [string, string, string],
  burst: string,
  loadAddr = 0x100000,
): Uint8Array {
  const code: number[] = [];
  const fix: [number, string][] = []; // rel32 call sites → label
  const labels = new Map<string, number>();
  const absFix: [number, string][] = []; // imm32 absolute → label
  const emit = (...b: number[]) => code.push(...b);
  const movEsi = (label: string) => {
    emit(0xbe, 0, 0, 0, 0);
    absFix.push([code.length - 4, label]);
  };
  const call = (label: string) => {
    emit(0xe8, 0, 0, 0, 0);
    fix.push([code.length - 4, label]);
  };
  const outIer = (v: number) => emit(0x66, 0xba, 0xf9, 0x03, 0xb0, v, 0xee); // mov dx,0x3f9; mov al,v; out dx,al
  emit(0xbc, 0x00, 0x00, 0x20, 0x00); // mov esp, 0x200000
  movEsi("m0");
  call("poll");
  outIer(2);
  movEsi("m1");
  call("poll");
  outIer(0);
  movEsi("m2");
  call("poll");
  movEsi("m3");
  call("raw");
  emit(0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd); // out 0x600, 0x34; hlt; jmp hlt
  // poll: lodsb; test al,al; jz done; mov bl,al; mov dx,0x3fd; w: in al,dx; test al,0x20; jz w;
  //       mov dx,0x3f8; mov al,bl; out dx,al; jmp poll; done: ret
  labels.set("poll", code.length);
  emit(0xac, 0x84, 0xc0, 0x74, 0x14, 0x88, 0xc3, 0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb);
  emit(0x66, 0xba, 0xf8, 0x03, 0x88, 0xd8, 0xee, 0xeb, 0xe7, 0xc3);
  // raw: mov dx,0x3f8; r: lodsb; test al,al; jz d; out dx,al; jmp r; d: ret
  labels.set("raw", code.length);
  emit(0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xc3);
  [...polled, burst].forEach((m, i) => {
    labels.set(`m${i}`, code.length);
    emit(...new TextEncoder().encode(m), 0);
  });
  const out = new Uint8Array(code);
  const v = new DataView(out.buffer);
  for (const [at, l] of fix) v.setInt32(at, labels.get(l)! - (at + 4), true);
  for (const [at, l] of absFix) v.setUint32(at, loadAddr + labels.get(l)!, true);
  return out;
}

/**
 * 32-bit code that prints `line` on COM1 for ever, as Linux's console does (poll the line status register
 * for THRE, then write the byte; IER = 0): two port exits per byte, one of them coalesced. For runs that
 * keep a vCPU's exit loop busy.
 *
 *   0: mov esi, msg ; 1: lodsb ; test al, al ; jz 0b ; mov bl, al ; mov dx, 0x3fd
 *   2: in al, dx ; test al, 0x20 ; jz 2b ; mov dx, 0x3f8 ; mov al, bl ; out dx, al ; jmp 1b
 */
export function serialFloodCode(line: string, loadAddr = 0x100000): Uint8Array {
  const code: number[] = [0xbe, 0, 0, 0, 0];
  const loop = code.length;
  code.push(0xac, 0x84, 0xc0, 0x74, 0x00);
  const jz = code.length - 1;
  code[jz] = (0 - code.length) & 0xff;
  code.push(0x88, 0xc3, 0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb);
  code.push(0x66, 0xba, 0xf8, 0x03, 0x88, 0xd8, 0xee, 0xeb, 0x00);
  code[code.length - 1] = (loop - code.length) & 0xff;
  const msg = loadAddr + code.length;
  for (const c of line) code.push(c.charCodeAt(0) & 0x7f || 0x3f);
  code.push(0);
  for (let i = 0; i < 4; i++) code[1 + i] = (msg >>> (8 * i)) & 0xff;
  return new Uint8Array(code);
}
