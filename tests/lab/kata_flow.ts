/**
 * Runs inside the KVM lab: drives a dvmm API socket the way Kata Containers' Cloud Hypervisor driver
 * does: vm.create, then vm.add-net with a tap the client opened itself and sends as SCM_RIGHTS, then
 * vm.boot. Prints what the test checks: each call's status, the VMM's thread names, and once the
 * guest has pinged the tap's host side, that tap's packet counters and the VM's net counters.
 *
 *   deno run -A tests/lab/kata_flow.ts API_SOCKET GUEST_CMDLINE DVMM_OUTPUT_FILE
 */
import { apiRequest } from "../../api/client.ts";
import { openTap } from "../../devices/virtio/tap.ts";
import { closeFd } from "../../ffi/socket.ts";

const [socket, cmdline, outFile] = Deno.args;
const V1 = "/api/v1/";
const TAP = "katatap0";

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
const ping = JSON.parse((await call("GET", "vmm.ping")).body);

await call("PUT", "vm.create", {
  cpus: { boot_vcpus: 2, max_vcpus: 2, kvm_hyperv: false, nested: true },
  memory: { size: 384 << 20, shared: true, hugepages: false, mergeable: false, prefault: false, thp: true },
  payload: { kernel: "/lab/vmlinuz", initramfs: "/lab/initramfs.gz", cmdline },
  rng: { iommu: false, src: "/dev/urandom" },
  serial: { iommu: false, mode: "Tty" },
  console: { iommu: false, mode: "Off" },
  iommu: false,
  pvpanic: false,
  watchdog: false,
  landlock_enable: false,
});

// The client's own tap, with the host side addressed; only the descriptor goes to the VMM.
const tap = openTap({ name: TAP, ip: "192.168.250.1", mask: "255.255.255.0" });
await call("PUT", "vm.add-net", { mac: "52:54:00:12:34:57", iommu: false, num_queues: 2, queue_size: 256 }, [
  tap.fd,
]);
closeFd(tap.fd); // the VMM holds its own copy now
await call("PUT", "vm.boot");

const comm = [...Deno.readDirSync(`/proc/${ping.pid}/task`)].map((t) => {
  try {
    return Deno.readTextFileSync(`/proc/${ping.pid}/task/${t.name}/comm`).trim();
  } catch {
    return "?";
  }
});
console.log(`THREADS ${comm.join(" ")}`);

let out = "";
for (let i = 0; i < 1800 && !/^ping-rc /m.test(out); i++) {
  await new Promise((r) => setTimeout(r, 500));
  out = await Deno.readTextFile(outFile).catch(() => "");
}
const stat = (name: string) => Deno.readTextFileSync(`/sys/class/net/${TAP}/statistics/${name}`).trim();
console.log(`TAP ${TAP} rx_packets ${stat("rx_packets")} tx_packets ${stat("tx_packets")}`);
console.log(`OTHER-TAPS ${[...Deno.readDirSync("/sys/class/net")].map((e) => e.name).join(" ")}`);
await call("GET", "vm.counters");
await call("GET", "vm.info");
await call("PUT", "vmm.shutdown");
