/*
 * randread DEVICE SECONDS [BLOCK]: random aligned reads of BLOCK bytes (default 4096) from DEVICE opened
 * O_DIRECT, one at a time (queue depth 1), for SECONDS; prints "randread: N reads in T s = IOPS iops".
 * The lab guest has busybox only (no fio): tests/bench/io uses this for its random-read IOPS figure.
 * Offsets come from a fixed-seed xorshift, so every VMM gets the same sequence.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: randread DEVICE SECONDS [BLOCK]\n");
    return 2;
  }
  double secs = atof(argv[2]);
  size_t block = argc > 3 ? (size_t)atol(argv[3]) : 4096;
  int fd = open(argv[1], O_RDONLY | O_DIRECT);
  if (fd < 0) {
    perror("randread: open");
    return 1;
  }
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) size = (uint64_t)lseek(fd, 0, SEEK_END);
  uint64_t blocks = size / block;
  if (blocks == 0 || block % 512 != 0) {
    fprintf(stderr, "randread: bad size %llu or block %zu\n", (unsigned long long)size, block);
    return 1;
  }
  void *buf;
  if (posix_memalign(&buf, 4096, block) != 0) return 1;
  uint64_t x = 0x9e3779b97f4a7c15ull, n = 0;
  double t0 = now(), t = t0;
  while (t - t0 < secs) {
    for (int i = 0; i < 64; i++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      if (pread(fd, buf, block, (off_t)((x % blocks) * block)) != (ssize_t)block) {
        perror("randread: pread");
        return 1;
      }
      n++;
    }
    t = now();
  }
  printf("randread: %llu reads in %.2f s = %.0f iops\n", (unsigned long long)n, t - t0, n / (t - t0));
  return 0;
}
