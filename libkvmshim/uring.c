/* libkvmshim: a minimal io_uring for batched disk I/O (see kvmshim.h). A ring belongs to the one thread
 * that made it (a device worker): no locking beyond the slot table. Which requests to batch, and what a
 * result means for the guest, is decided in TypeScript (devices/virtio/device_blk.ts). */
#define _GNU_SOURCE
#include "kvmshim.h"
#include <errno.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_RINGS 256

struct ring {
  int fd; /* -1: slot free */
  unsigned entries;
  unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
  struct io_uring_sqe *sqes;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_cqe *cqes;
  void *sq_map, *cq_map;
  size_t sq_len, cq_len, sqes_len;
  unsigned tail; /* our copy of the SQ tail: entries prepared, published at submit */
};

static struct ring rings[MAX_RINGS];
static int rings_ready;
static pthread_mutex_t rings_lock = PTHREAD_MUTEX_INITIALIZER;

static struct ring *ring_at(int32_t h) {
  if (h < 0 || h >= MAX_RINGS || rings[h].fd < 0) return NULL;
  return &rings[h];
}

static void unmap(struct ring *r) {
  if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_len);
  if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_len);
  if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_len);
}

int32_t kvs_uring_create(uint32_t entries) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  int fd = (int)syscall(SYS_io_uring_setup, entries, &p);
  if (fd < 0) return -errno;
  struct ring r;
  memset(&r, 0, sizeof r);
  r.fd = fd;
  r.entries = p.sq_entries;
  r.sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r.cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single && r.cq_len > r.sq_len) r.sq_len = r.cq_len;
  r.sq_map = mmap(NULL, r.sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  r.cq_map = single ? r.sq_map
                    : mmap(NULL, r.cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
  r.sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
  r.sqes = mmap(NULL, r.sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (r.sq_map == MAP_FAILED || r.cq_map == MAP_FAILED || r.sqes == MAP_FAILED) {
    int e = errno;
    unmap(&r);
    close(fd);
    return -e;
  }
  char *sq = r.sq_map, *cq = r.cq_map;
  r.sq_head = (unsigned *)(sq + p.sq_off.head);
  r.sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r.sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  r.sq_array = (unsigned *)(sq + p.sq_off.array);
  r.cq_head = (unsigned *)(cq + p.cq_off.head);
  r.cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r.cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  r.cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  r.tail = *r.sq_tail;
  pthread_mutex_lock(&rings_lock);
  if (!rings_ready) {
    for (int i = 0; i < MAX_RINGS; i++) rings[i].fd = -1;
    rings_ready = 1;
  }
  int h = -EMFILE;
  for (int i = 0; i < MAX_RINGS; i++) {
    if (rings[i].fd < 0) {
      rings[i] = r;
      h = i;
      break;
    }
  }
  pthread_mutex_unlock(&rings_lock);
  if (h < 0) {
    unmap(&r);
    close(fd);
  }
  return h;
}

int32_t kvs_uring_prep(int32_t h, int32_t op, int32_t fd, const void *iov, int32_t n, double off, uint32_t tag) {
  struct ring *r = ring_at(h);
  if (!r) return -EBADF;
  if (r->tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->entries) return -EBUSY;
  unsigned i = r->tail & *r->sq_mask;
  struct io_uring_sqe *e = &r->sqes[i];
  memset(e, 0, sizeof *e);
  switch (op) {
  case KVS_URING_READV: e->opcode = IORING_OP_READV; break;
  case KVS_URING_WRITEV: e->opcode = IORING_OP_WRITEV; break;
  case KVS_URING_FDATASYNC:
    e->opcode = IORING_OP_FSYNC;
    e->fsync_flags = IORING_FSYNC_DATASYNC;
    break;
  default: return -EINVAL;
  }
  e->fd = fd;
  if (op != KVS_URING_FDATASYNC) {
    e->addr = (uint64_t)(uintptr_t)iov;
    e->len = (uint32_t)n;
    e->off = (uint64_t)off;
  }
  e->user_data = tag;
  r->sq_array[i] = i;
  r->tail++;
  return 0;
}

int32_t kvs_uring_submit_wait(int32_t h, uint32_t wait) {
  struct ring *r = ring_at(h);
  if (!r) return -EBADF;
  __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
  for (;;) {
    unsigned pending = r->tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    unsigned ready = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) - *r->cq_head;
    unsigned want = ready >= wait ? 0 : wait - ready;
    if (pending == 0 && want == 0) return 0;
    long n = syscall(SYS_io_uring_enter, r->fd, pending, want, want ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) return -errno;
  }
}

int32_t kvs_uring_reap(int32_t h, int32_t *out, int32_t max) {
  struct ring *r = ring_at(h);
  if (!r) return -EBADF;
  unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
  int32_t n = 0;
  while (head != tail && n < max) {
    struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
    out[2 * n] = (int32_t)(uint32_t)c->user_data;
    out[2 * n + 1] = c->res;
    n++;
    head++;
  }
  __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
  return n;
}

int32_t kvs_uring_destroy(int32_t h) {
  pthread_mutex_lock(&rings_lock);
  struct ring *r = ring_at(h);
  if (!r) {
    pthread_mutex_unlock(&rings_lock);
    return -EBADF;
  }
  struct ring copy = *r;
  r->fd = -1;
  pthread_mutex_unlock(&rings_lock);
  unmap(&copy);
  close(copy.fd);
  return 0;
}
