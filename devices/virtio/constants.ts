/**
 * Numbers from the virtio 1.x specification shared by the transport, the queues and the devices.
 */

/** Device type ids (virtio spec, "Device Types"); the PCI device id is 0x1040 + type. */
export const VIRTIO_ID = {
  NET: 1,
  BLOCK: 2,
  CONSOLE: 3,
  RNG: 4,
  BALLOON: 5,
  SCSI: 8,
  NINEP: 9,
  GPU: 16,
  INPUT: 18,
  VSOCK: 19,
  IOMMU: 23,
  MEM: 24,
  FS: 26,
  PMEM: 27,
} as const;

/** Device status bits (common configuration `device_status`). */
export const STATUS = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Reserved (device-independent) feature bit numbers. */
export const F = {
  INDIRECT_DESC: 28,
  EVENT_IDX: 29,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
  IN_ORDER: 35,
  ORDER_PLATFORM: 36,
  SR_IOV: 37,
  NOTIFICATION_DATA: 38,
  RING_RESET: 40,
} as const;

/** `1n << bit` as a bigint feature mask. */
export function featureBit(bit: number): bigint {
  return 1n << BigInt(bit);
}

/** Descriptor flags. */
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
/** avail.flags: the driver asks not to be interrupted (ignored when EVENT_IDX is negotiated). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used.flags: the device asks not to be notified (ignored by drivers using EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;
/** Largest split-queue size allowed by the spec. */
export const MAX_QUEUE_SIZE = 32768;
/** "No MSI-X vector" in config_msix_vector / queue_msix_vector. */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** virtio-pci capability cfg_type values. */
export const VIRTIO_PCI_CAP = {
  COMMON_CFG: 1,
  NOTIFY_CFG: 2,
  ISR_CFG: 3,
  DEVICE_CFG: 4,
  PCI_CFG: 5,
  SHARED_MEMORY_CFG: 8,
  VENDOR_CFG: 9,
} as const;

/** ISR status bits. */
export const ISR_QUEUE = 1;
export const ISR_CONFIG = 2;

/** virtio-blk feature bits. */
export const BLK_F = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
  LIFETIME: 15,
  SECURE_ERASE: 16,
} as const;

/** virtio-blk request types. */
export const BLK_T = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

/** virtio-blk request status values. */
export const BLK_S = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** Length of the serial returned by VIRTIO_BLK_T_GET_ID. */
export const BLK_ID_BYTES = 20;
/** virtio-blk always counts in 512-byte sectors, whatever blk_size says. */
export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 512;

/** virtio-net feature bits. */
export const NET_F = {
  CSUM: 0,
  GUEST_CSUM: 1,
  CTRL_GUEST_OFFLOADS: 2,
  MTU: 3,
  MAC: 5,
  GUEST_TSO4: 7,
  GUEST_TSO6: 8,
  GUEST_ECN: 9,
  GUEST_UFO: 10,
  HOST_TSO4: 11,
  HOST_TSO6: 12,
  HOST_ECN: 13,
  HOST_UFO: 14,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
  CTRL_RX: 18,
  CTRL_VLAN: 19,
  GUEST_ANNOUNCE: 21,
  MQ: 22,
  CTRL_MAC_ADDR: 23,
} as const;

/** virtio-console feature bits. */
export const CONSOLE_F = { SIZE: 0, MULTIPORT: 1, EMERG_WRITE: 2 } as const;
