/**
 * The x86 reset vector without firmware.
 *
 * A guest that restarts "through the BIOS" jumps to f000:fff0 (physical 0xFFFF0). Linux does so when
 * ACPI is hardware-reduced: it prefers EFI reboot, and without EFI falls back to the BIOS entry.
 * With no firmware that address holds zeros and the vCPU would execute them forever. dvmm places a
 * few bytes there that pulse the i8042 reset line, so every path to the reset vector resets the VM.
 */
import type { GuestMemory } from "./memory.ts";

/** Physical address of the reset vector (CS base 0xF0000 + IP 0xFFF0). */
export const RESET_VECTOR = 0xffff0;

/**
 * `mov al, 0xfe ; out 0x64, al ; hlt ; jmp $-3`: the same bytes decode identically in real, 16-bit and
 * 32-bit protected mode, so the stub works whatever mode the guest jumps in.
 */
export const RESET_STUB = new Uint8Array([0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);

/** Writes the reset stub at the reset vector (inside the E820-reserved area below 1 MiB). */
export function writeResetVector(mem: GuestMemory): void {
  mem.write(RESET_VECTOR, RESET_STUB);
}
