/** Test helper: a small seeded pseudo-random generator (xorshift32), so a failing fuzz run replays. */
export interface Seeded {
  u32(): number;
  below(n: number): number;
  chance(p: number): boolean;
}

export function seeded(seed: number): Seeded {
  let x = seed >>> 0 || 1;
  const u32 = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  return { u32, below: (n) => u32() % n, chance: (p) => u32() / 2 ** 32 < p };
}
