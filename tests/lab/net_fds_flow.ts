/**
 * Runs inside the KVM lab: an orchestrator's way of giving a multi-queue network device to the VMM.
 * The client opens a multi-queue tap itself (two queues), vm.create's a guest with 2 vCPUs, sends
 * both queue fds with vm.add-net (num_queues=4: one fd per queue pair, as Cloud Hypervisor wants) and
 * an MTU, boots, and once the guest script printed `fds-done`, prints the VM's counters and info.
 *
 *   deno run -A tests/lab/net_fds_flow.ts API_SOCKET GUEST_CMDLINE DVMM_OUTPUT_FILE SCRIPT_DISK
 */
import { apiRequest } from "../../api/client.ts";
import { openTap } from "../../devices/virtio/tap.ts";
import { closeFd } from "../../ffi/socket.ts";

const [socket, cmdline, outFile, disk] = Deno.args;
const V1 = "/api/v1/";
const TAP = "fdmqtap0";

const call = async (method: string, endpoint: string, body?: unknown, fds: number[] = []) => {
  const r = await apiRequest(socket, method, V1 + endpoint, body, fds);
  console.log(`CALL ${endpoint} ${r.status}${r.body ? ` ${r.body}` : ""}`);
  return r;
};

for (let i = 0; i < 600; i++) {
  try {
    await Deno.stat(socket);
    break;
  } catch {
    await new Promise((r) => setTimeout(r, 100));
  }
}

await call("PUT", "vm.create", {
  cpus: { boot_vcpus: 2, max_vcpus: 2 },
  memory: { size: 384 << 20 },
  payload: { kernel: "/lab/vmlinuz", initramfs: "/lab/initramfs.gz", cmdline },
  disks: [{ path: disk, readonly: true }],
  serial: { mode: "Tty" },
  console: { mode: "Off" },
});

const tap = openTap({ name: TAP, queues: 2, ip: "192.168.248.1", mask: "255.255.255.0" });
console.log(`TAP-FLAGS ${Deno.readTextFileSync(`/sys/class/net/${TAP}/tun_flags`).trim()}`);
await call("PUT", "vm.add-net", { mac: "52:54:00:12:34:61", num_queues: 4, mtu: 4000 }, tap.fds);
for (const fd of tap.fds) closeFd(fd); // the VMM holds its own copies now
await call("PUT", "vm.boot");

let out = "";
for (let i = 0; i < 1200 && !/^fds-done$/m.test(out); i++) {
  await new Promise((r) => setTimeout(r, 500));
  out = await Deno.readTextFile(outFile).catch(() => "");
}
console.log(`TAP-MTU ${Deno.readTextFileSync(`/sys/class/net/${TAP}/mtu`).trim()}`);
await call("GET", "vm.counters");
await call("GET", "vm.info");
await call("PUT", "vmm.shutdown");
