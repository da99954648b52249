/**
 * The endpoints of the API, named as in the REST path (`/api/v1/<name>`) and in the control loop's
 * request kinds, with the method and the body schema of each. REST and D-Bus both serve this table.
 */
import type { z } from "zod";
import type { RequestKind } from "../vmm/control.ts";
import {
  DeviceConfigSchema,
  DiskConfigSchema,
  FsConfigSchema,
  GenericVhostUserConfigSchema,
  NetConfigSchema,
  PmemConfigSchema,
  ReceiveMigrationDataSchema,
  RestoreConfigSchema,
  SendMigrationDataSchema,
  VdpaConfigSchema,
  VmAddUserDeviceSchema,
  VmConfigSchema,
  VmCoredumpDataSchema,
  VmRemoveDeviceSchema,
  VmResizeDiskSchema,
  VmResizeSchema,
  VmResizeZoneSchema,
  VmSnapshotConfigSchema,
  VsockConfigSchema,
} from "../vmm/vm_config.ts";

export const API_PREFIX = "/api/v1/";
/** Largest accepted request body. */
export const MAX_BODY_BYTES = 1024 * 1024;

export interface Route {
  method: "GET" | "PUT";
  /** Schema of the JSON body, for endpoints that take one. */
  body?: z.ZodTypeAny;
  /** Name of the body's schema in the OpenAPI document. */
  bodyName?: string;
}

/** Every endpoint; the name is also the control request kind. */
export const ROUTES: Record<RequestKind, Route> = {
  "vmm.ping": { method: "GET" },
  "vmm.shutdown": { method: "PUT" },
  "vm.info": { method: "GET" },
  "vm.counters": { method: "GET" },
  "vm.create": { method: "PUT", body: VmConfigSchema, bodyName: "VmConfig" },
  "vm.delete": { method: "PUT" },
  "vm.boot": { method: "PUT" },
  "vm.pause": { method: "PUT" },
  "vm.resume": { method: "PUT" },
  "vm.shutdown": { method: "PUT" },
  "vm.reboot": { method: "PUT" },
  "vm.power-button": { method: "PUT" },
  "vm.nmi": { method: "PUT" },
  "vm.resize": { method: "PUT", body: VmResizeSchema, bodyName: "VmResize" },
  "vm.resize-disk": { method: "PUT", body: VmResizeDiskSchema, bodyName: "VmResizeDisk" },
  "vm.resize-zone": { method: "PUT", body: VmResizeZoneSchema, bodyName: "VmResizeZone" },
  "vm.add-device": { method: "PUT", body: DeviceConfigSchema, bodyName: "DeviceConfig" },
  "vm.remove-device": { method: "PUT", body: VmRemoveDeviceSchema, bodyName: "VmRemoveDevice" },
  "vm.add-disk": { method: "PUT", body: DiskConfigSchema, bodyName: "DiskConfig" },
  "vm.add-fs": { method: "PUT", body: FsConfigSchema, bodyName: "FsConfig" },
  "vm.add-generic-vhost-user": {
    method: "PUT",
    body: GenericVhostUserConfigSchema,
    bodyName: "GenericVhostUserConfig",
  },
  "vm.add-pmem": { method: "PUT", body: PmemConfigSchema, bodyName: "PmemConfig" },
  "vm.add-net": { method: "PUT", body: NetConfigSchema, bodyName: "NetConfig" },
  "vm.add-vsock": { method: "PUT", body: VsockConfigSchema, bodyName: "VsockConfig" },
  "vm.add-vdpa": { method: "PUT", body: VdpaConfigSchema, bodyName: "VdpaConfig" },
  "vm.add-user-device": { method: "PUT", body: VmAddUserDeviceSchema, bodyName: "VmAddUserDevice" },
  "vm.snapshot": { method: "PUT", body: VmSnapshotConfigSchema, bodyName: "VmSnapshotConfig" },
  "vm.coredump": { method: "PUT", body: VmCoredumpDataSchema, bodyName: "VmCoredumpData" },
  "vm.restore": { method: "PUT", body: RestoreConfigSchema, bodyName: "RestoreConfig" },
  "vm.receive-migration": {
    method: "PUT",
    body: ReceiveMigrationDataSchema,
    bodyName: "ReceiveMigrationData",
  },
  "vm.send-migration": { method: "PUT", body: SendMigrationDataSchema, bodyName: "SendMigrationData" },
};
