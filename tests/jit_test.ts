/**
 * The hot loops stay compiled. V8 gives an FFI call's u64/i64 parameter to compiled code as a BigInt: a
 * JIT-compiled caller that passes a plain number there is deoptimized on that call, compiled again, and
 * deoptimized again, for ever. A vCPU's exit loop did that on every KVM_RUN, which kept a V8 compiler
 * thread about a quarter busy per running vCPU (ffi/shim.ts: hot paths take 32-bit and f64 parameters).
 * Here dvmm runs with V8's deoptimization trace while a guest keeps its vCPU's exit loop busy (a serial
 * flood: a port read and a coalesced port write per byte), and the trace is counted.
 */
import assert from "node:assert/strict";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf, serialFloodCode } from "./helpers/tiny_guest.ts";
import { dvmmCommand, until } from "./helpers/host.ts";

Deno.test({
  name: "jit: a busy vCPU's exit loop is not deoptimized over and over",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-jit-" });
  const out = `${dir}/serial.out`;
  await Deno.writeFile(`${dir}/flood.elf`, pvhElf(serialFloodCode("[    0.000000] a console line\r\n")));
  const child = dvmmCommand(
    ["--kernel", `${dir}/flood.elf`, "--memory", "size=64M", "--serial", `file=${out}`, "--console", "off"],
    ["--v8-flags=--trace-deopt"],
  ).spawn();
  try {
    const size = async () => (await Deno.stat(out).catch(() => ({ size: 0 }))).size;
    // Three seconds of flooding: the loop gets hot and compiled, and stays so (or not).
    await until("the guest's serial flood", async () => (await size()) > 0, 30_000);
    const before = await size();
    await new Promise((r) => setTimeout(r, 3000));
    assert.ok((await size()) > before, "the guest still prints");
  } finally {
    child.kill("SIGTERM");
  }
  const res = await child.output();
  await Deno.remove(dir, { recursive: true });
  const trace = new TextDecoder().decode(res.stdout) + new TextDecoder().decode(res.stderr);
  const perFunction = new Map<string, number>();
  for (const m of trace.matchAll(/\[bailout \(kind: [^,]*, reason: ([^)]*)\)[^\n]*?<JSFunction ([^ >]+)/g)) {
    const key = `${m[2]} (${m[1]})`;
    perFunction.set(key, (perFunction.get(key) ?? 0) + 1);
  }
  const looping = [...perFunction].filter(([, n]) => n > 10).map(([k, n]) => `${k}: ${n}`);
  assert.deepEqual(looping, [], "functions deoptimized more than 10 times");
  assert.doesNotMatch(trace, /reason: not a BigInt[^\n]*runVcpu/, "runVcpu deoptimized at an FFI call");
});
