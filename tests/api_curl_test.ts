/**
 * The REST examples of Cloud Hypervisor's API document, run verbatim with curl against dvmm's server
 * (on the same socket path the examples use; the VM behind it is a test double).
 */
import assert from "node:assert/strict";
import { startApiServer } from "../api/server.ts";
import { ControlLoop } from "../vmm/control.ts";
import { fakeFactory } from "../api/testing.ts";

const SOCKET = "/tmp/cloud-hypervisor.sock";

const CREATE = `curl --unix-socket /tmp/cloud-hypervisor.sock -i \\
     -X PUT 'http://localhost/api/v1/vm.create'  \\
     -H 'Accept: application/json'               \\
     -H 'Content-Type: application/json'         \\
     -d '{
         "cpus":{"boot_vcpus": 4, "max_vcpus": 4},
         "payload":{"kernel":"/opt/clh/kernel/vmlinux-virtio-fs-virtio-iommu", "cmdline":"console=ttyS0 console=hvc0 root=/dev/vda1 rw"},
         "disks":[{"path":"/opt/clh/images/focal-server-cloudimg-amd64.raw"}],
         "rng":{"src":"/dev/urandom"},
         "net":[{"ip":"192.168.10.10", "mask":"255.255.255.0", "mac":"12:34:56:78:90:01"}]
         }'`;
const BOOT = `curl --unix-socket /tmp/cloud-hypervisor.sock -i -X PUT 'http://localhost/api/v1/vm.boot'`;
const INFO = `curl --unix-socket /tmp/cloud-hypervisor.sock -i \\
     -X GET 'http://localhost/api/v1/vm.info' \\
     -H 'Accept: application/json'`;
const REBOOT = `curl --unix-socket /tmp/cloud-hypervisor.sock -i -X PUT 'http://localhost/api/v1/vm.reboot'`;
const SHUTDOWN =
  `curl --unix-socket /tmp/cloud-hypervisor.sock -i -X PUT 'http://localhost/api/v1/vm.shutdown'`;

async function sh(script: string): Promise<{ status: number; body: string }> {
  const out = await new Deno.Command("bash", { args: ["-c", `#!/usr/bin/env bash\n${script}`] }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  const m = /^HTTP\/1\.1 (\d{3})/.exec(text);
  assert.ok(m, `no HTTP status in: ${text}`);
  return { status: Number(m[1]), body: text.split("\r\n\r\n").slice(1).join("\r\n\r\n") };
}

const haveCurl = (await new Deno.Command("bash", { args: ["-c", "command -v curl"] }).output()).code === 0;

Deno.test({
  name: "api: the API document's curl examples work verbatim",
  ignore: !haveCurl,
  fn: async () => {
    const { factory, made } = fakeFactory();
    const loop = new ControlLoop({ factory });
    const server = await startApiServer({ path: SOCKET }, loop);
    try {
      assert.equal((await sh(CREATE)).status, 204);
      assert.equal((await sh(BOOT)).status, 204);
      const info = await sh(INFO);
      assert.equal(info.status, 200);
      const vm = JSON.parse(info.body);
      assert.equal(vm.state, "Running");
      assert.equal(vm.config.cpus.boot_vcpus, 4);
      assert.equal(vm.config.net[0].mac, "12:34:56:78:90:01");
      assert.equal(vm.config.disks[0].path, "/opt/clh/images/focal-server-cloudimg-amd64.raw");
      assert.equal((await sh(REBOOT)).status, 204);
      assert.equal(made.length, 2);
      assert.equal((await sh(SHUTDOWN)).status, 204);
      assert.deepEqual(made[1].calls, ["boot", "shutdown"]);
    } finally {
      await server.close();
    }
  },
});
