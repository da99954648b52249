// Lab self-test probe (tests/lab/lab_selftest.sh): Deno FFI works inside the lab against the real /dev/kvm.
// Opens the checkout's libkvmshim.so (DVMM_SHIM, else build/libkvmshim.so next to this checkout), calls
// kvs_open("/dev/kvm", O_RDWR, 0) and KVM_GET_API_VERSION (expects 12). Self-contained on purpose (no
// imports), so it tests the lab and not dvmm's ffi/ code.
const path = Deno.env.get("DVMM_SHIM") ?? new URL("../../build/libkvmshim.so", import.meta.url).pathname;
const lib = Deno.dlopen(path, {
  kvs_open: { parameters: ["buffer", "i32", "i32"], result: "i64" },
  kvs_ioctl_val: { parameters: ["i32", "u64", "u64"], result: "i64" },
  kvs_close: { parameters: ["i32"], result: "i64" },
});
const O_RDWR = 2;
const KVM_GET_API_VERSION = 0xae00n;
const fd = Number(lib.symbols.kvs_open(new TextEncoder().encode("/dev/kvm\0"), O_RDWR, 0));
if (fd < 0) {
  console.log(`FFI-PROBE: FAIL kvs_open(/dev/kvm) = ${fd} (-errno)`);
  Deno.exit(1);
}
const api = Number(lib.symbols.kvs_ioctl_val(fd, KVM_GET_API_VERSION, 0n));
lib.symbols.kvs_close(fd);
lib.close();
console.log(
  `FFI-PROBE: ${api === 12 ? "OK" : "FAIL"} shim=${path} kvs_open=${fd} KVM_GET_API_VERSION=${api}`,
);
Deno.exit(api === 12 ? 0 : 1);
