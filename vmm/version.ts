/** dvmm's version, reported by `--version` and `/vmm.ping`. */
export const DVMM_VERSION = "0.1.0";
