/* libkvmshim: see kvmshim.h. */
#define _GNU_SOURCE
#include "kvmshim.h"
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define RET(expr) do { long _r = (long)(expr); return _r < 0 ? -(int64_t)errno : (int64_t)_r; } while (0)

int64_t kvs_open(const char *path, int32_t flags, int32_t mode) { RET(open(path, flags | O_CLOEXEC, mode)); }
int64_t kvs_close(int32_t fd) { RET(close(fd)); }
int64_t kvs_ioctl(int32_t fd, uint64_t request, void *arg) { RET(ioctl(fd, (unsigned long)request, arg)); }
int64_t kvs_ioctl_val(int32_t fd, uint64_t request, uint64_t value) {
  RET(ioctl(fd, (unsigned long)request, (unsigned long)value));
}
/* Hot-path variants with 32-bit and double parameters only. V8's fast FFI call takes a u64/i64 parameter
 * as a BigInt: a JIT-compiled caller that passes a plain number there is deoptimized on every call, and
 * re-optimized, for ever. Sizes fit in 32 bits (Linux moves at most 0x7ffff000 bytes per call), file
 * offsets in a double (exact below 2^53). */
int32_t kvs_ioctl32(int32_t fd, uint32_t request, void *arg) {
  int r = ioctl(fd, (unsigned long)request, arg);
  return r < 0 ? -errno : r;
}
int32_t kvs_read32(int32_t fd, void *buf, uint32_t len) {
  ssize_t r = read(fd, buf, len);
  return r < 0 ? -errno : (int32_t)r;
}
int32_t kvs_write32(int32_t fd, const void *buf, uint32_t len) {
  ssize_t r = write(fd, buf, len);
  return r < 0 ? -errno : (int32_t)r;
}
int32_t kvs_pread_at(int32_t fd, void *buf, uint32_t len, double off) {
  ssize_t r = pread(fd, buf, len, (off_t)off);
  return r < 0 ? -errno : (int32_t)r;
}
int32_t kvs_pwrite_at(int32_t fd, const void *buf, uint32_t len, double off) {
  ssize_t r = pwrite(fd, buf, len, (off_t)off);
  return r < 0 ? -errno : (int32_t)r;
}
int32_t kvs_preadv_at(int32_t fd, const void *iov, int32_t n, double off) {
  ssize_t r = preadv(fd, (const struct iovec *)iov, n, (off_t)off);
  return r < 0 ? -errno : (int32_t)r;
}
int32_t kvs_pwritev_at(int32_t fd, const void *iov, int32_t n, double off) {
  ssize_t r = pwritev(fd, (const struct iovec *)iov, n, (off_t)off);
  return r < 0 ? -errno : (int32_t)r;
}
int32_t kvs_madvise_at(double addr, double len, int32_t advice) {
  return madvise((void *)(uintptr_t)addr, (size_t)len, advice) < 0 ? -errno : 0;
}
/* KVM_RUN on a vCPU fd: 0 or -errno. Only 32-bit values cross: JIT-compiled callers pass plain numbers
 * (a u64 parameter wants a BigInt in V8's fast call, and a number there deoptimizes the caller). */
int32_t kvs_run(int32_t fd) { return ioctl(fd, 0xAE80 /* KVM_RUN = _IO(0xAE, 0x80) */, 0) < 0 ? -errno : 0; }

int64_t kvs_mmap(uint64_t addr, uint64_t len, int32_t prot, int32_t flags, int32_t fd, int64_t offset) {
  void *p = mmap((void *)(uintptr_t)addr, (size_t)len, prot, flags, fd, (off_t)offset);
  if (p == MAP_FAILED) return -(int64_t)errno;
  return (int64_t)(uintptr_t)p;
}
int64_t kvs_munmap(uint64_t addr, uint64_t len) { RET(munmap((void *)(uintptr_t)addr, (size_t)len)); }
int64_t kvs_madvise(uint64_t addr, uint64_t len, int32_t advice) {
  RET(madvise((void *)(uintptr_t)addr, (size_t)len, advice));
}
int64_t kvs_memfd(const char *name, uint32_t flags) { RET(memfd_create(name, flags)); }
int64_t kvs_ftruncate(int32_t fd, int64_t len) { RET(ftruncate(fd, (off_t)len)); }
int64_t kvs_eventfd(uint32_t initval, int32_t flags) { RET(eventfd(initval, flags)); }
int64_t kvs_lseek(int32_t fd, int64_t off, int32_t whence) { RET(lseek(fd, (off_t)off, whence)); }
int64_t kvs_fd_size(int32_t fd) {
  struct stat st;
  if (fstat(fd, &st) < 0) return -errno;
  return (int64_t)st.st_size;
}
int64_t kvs_read(int32_t fd, void *buf, uint64_t len) { RET(read(fd, buf, (size_t)len)); }
int64_t kvs_write(int32_t fd, const void *buf, uint64_t len) { RET(write(fd, buf, (size_t)len)); }
int64_t kvs_pread(int32_t fd, void *buf, uint64_t len, int64_t off) { RET(pread(fd, buf, (size_t)len, (off_t)off)); }
int64_t kvs_pwrite(int32_t fd, const void *buf, uint64_t len, int64_t off) {
  RET(pwrite(fd, buf, (size_t)len, (off_t)off));
}
int64_t kvs_readv(int32_t fd, const void *iov, int32_t n) { RET(readv(fd, (const struct iovec *)iov, n)); }
int64_t kvs_writev(int32_t fd, const void *iov, int32_t n) { RET(writev(fd, (const struct iovec *)iov, n)); }
int64_t kvs_preadv(int32_t fd, const void *iov, int32_t n, int64_t off) {
  RET(preadv(fd, (const struct iovec *)iov, n, (off_t)off));
}
int64_t kvs_pwritev(int32_t fd, const void *iov, int32_t n, int64_t off) {
  RET(pwritev(fd, (const struct iovec *)iov, n, (off_t)off));
}
int64_t kvs_fsync(int32_t fd) { RET(fsync(fd)); }
int64_t kvs_fdatasync(int32_t fd) { RET(fdatasync(fd)); }
int64_t kvs_fcntl(int32_t fd, int32_t cmd, int64_t arg) { RET(fcntl(fd, cmd, (long)arg)); }
int64_t kvs_dup(int32_t fd) { RET(fcntl(fd, F_DUPFD_CLOEXEC, 0)); }
int64_t kvs_dup2(int32_t fd, int32_t target) { RET(dup3(fd, target, O_CLOEXEC)); }

int64_t kvs_epoll_create(void) { RET(epoll_create1(EPOLL_CLOEXEC)); }
/* The tag (data) is 32 bits: callers pass numbers (see the hot-path note below). */
int32_t kvs_epoll_ctl(int32_t epfd, int32_t op, int32_t fd, uint32_t events, uint32_t data) {
  struct epoll_event ev = {.events = events, .data.u64 = data};
  return epoll_ctl(epfd, op, fd, &ev) < 0 ? -errno : 0;
}
int64_t kvs_epoll_wait(int32_t epfd, uint64_t *out, int32_t max, int32_t timeout_ms) {
  struct epoll_event evs[64];
  if (max > 64) max = 64;
  int n = epoll_wait(epfd, evs, max, timeout_ms);
  if (n < 0) return -(int64_t)errno;
  for (int i = 0; i < n; i++) out[i] = evs[i].data.u64;
  return n;
}
int64_t kvs_poll1(int32_t fd, int32_t events, int32_t timeout_ms) {
  struct pollfd p = {.fd = fd, .events = (short)events};
  int n = poll(&p, 1, timeout_ms);
  if (n < 0) return -(int64_t)errno;
  return n == 0 ? 0 : p.revents;
}

int64_t kvs_socket(int32_t domain, int32_t type, int32_t protocol) {
  RET(socket(domain, type | SOCK_CLOEXEC, protocol));
}

static int unix_addr(const char *path, struct sockaddr_un *a) {
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof a->sun_path) { errno = ENAMETOOLONG; return -1; }
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  memcpy(a->sun_path, path, n);
  return 0;
}
/* `mode` >= 0: the socket file is created with these permissions (a socket's inode mode, set before bind,
 * is what bind gives the file, less the umask), so no client can connect while it is wider. */
int64_t kvs_unix_listen_mode(const char *path, int32_t backlog, int32_t mode) {
  struct sockaddr_un a;
  if (unix_addr(path, &a) < 0) return -(int64_t)errno;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -(int64_t)errno;
  if ((mode >= 0 && fchmod(fd, (mode_t)mode) < 0) || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
      listen(fd, backlog) < 0) {
    int e = errno;
    close(fd);
    return -(int64_t)e;
  }
  return fd;
}
int64_t kvs_unix_listen(const char *path, int32_t backlog) { return kvs_unix_listen_mode(path, backlog, -1); }
int64_t kvs_unix_connect(const char *path) {
  struct sockaddr_un a;
  if (unix_addr(path, &a) < 0) return -(int64_t)errno;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -(int64_t)errno;
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    int e = errno;
    close(fd);
    return -(int64_t)e;
  }
  return fd;
}
/* TCP (live migration): `host` numeric or a name (getaddrinfo), "" for any address when listening. */
static int tcp_socket(const char *host, int32_t port, int passive, struct addrinfo **res) {
  struct addrinfo hints;
  char svc[16];
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  snprintf(svc, sizeof svc, "%d", port);
  int r = getaddrinfo(host[0] ? host : NULL, svc, &hints, res);
  if (r != 0) return r == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
  return 0;
}
int64_t kvs_tcp_listen(const char *host, int32_t port, int32_t backlog) {
  struct addrinfo *res, *ai;
  int r = tcp_socket(host, port, 1, &res), e = EADDRNOTAVAIL;
  if (r < 0) return r;
  for (ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), one = 1;
    if (fd < 0) { e = errno; continue; }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) { freeaddrinfo(res); return fd; }
    e = errno;
    close(fd);
  }
  freeaddrinfo(res);
  return -(int64_t)e;
}
int64_t kvs_tcp_connect(const char *host, int32_t port) {
  struct addrinfo *res, *ai;
  int r = tcp_socket(host, port, 0, &res), e = EHOSTUNREACH;
  if (r < 0) return r;
  for (ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0) { e = errno; continue; }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      freeaddrinfo(res);
      return fd;
    }
    e = errno;
    close(fd);
  }
  freeaddrinfo(res);
  return -(int64_t)e;
}
int64_t kvs_accept(int32_t fd) { RET(accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)); }
int64_t kvs_sockopt_int(int32_t fd, int32_t opt) {
  int v = 0;
  socklen_t len = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, opt, &v, &len) < 0) return -(int64_t)errno;
  return v;
}
#define KVS_MAX_FDS 253 /* SCM_MAX_FD */
int64_t kvs_recv_fds(int32_t fd, void *buf, uint64_t len, int32_t *fds, int32_t max_fds) {
  union { char b[CMSG_SPACE(KVS_MAX_FDS * sizeof(int))]; struct cmsghdr align; } ctl;
  if (max_fds > KVS_MAX_FDS) max_fds = KVS_MAX_FDS;
  if (max_fds < 0) max_fds = 0;
  struct iovec iov = {.iov_base = buf, .iov_len = (size_t)len};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                     .msg_controllen = CMSG_SPACE((size_t)max_fds * sizeof(int))};
  ssize_t n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (n < 0) return -(int64_t)errno;
  int count = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *in = (int *)CMSG_DATA(c);
    for (int i = 0; i < k; i++) {
      if (count < max_fds) fds[1 + count++] = in[i];
      else close(in[i]);
    }
  }
  fds[0] = (m.msg_flags & MSG_CTRUNC) ? -1 : count;
  if (fds[0] < 0) { for (int i = 0; i < count; i++) close(fds[1 + i]); }
  return n;
}
int64_t kvs_send_fds(int32_t fd, const void *buf, uint64_t len, const int32_t *fds, int32_t nfds) {
  union { char b[CMSG_SPACE(KVS_MAX_FDS * sizeof(int))]; struct cmsghdr align; } ctl;
  if (nfds < 0 || nfds > KVS_MAX_FDS) return -EINVAL;
  struct iovec iov = {.iov_base = (void *)buf, .iov_len = (size_t)len};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    m.msg_control = ctl.b;
    m.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
  }
  RET(sendmsg(fd, &m, MSG_NOSIGNAL));
}
int64_t kvs_set_thread_name(const char *name) { RET(prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0)); }

static void kick_handler(int sig) { (void)sig; }
int32_t kvs_kick_signal(void) { return SIGRTMIN + 1; }
int64_t kvs_kick_init(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN returns EINTR */
  sigemptyset(&sa.sa_mask);
  RET(sigaction(SIGRTMIN + 1, &sa, NULL));
}
uint64_t kvs_thread_self(void) { return (uint64_t)pthread_self(); }
int64_t kvs_kick(uint64_t thread) {
  int r = pthread_kill((pthread_t)thread, SIGRTMIN + 1);
  return r ? -(int64_t)r : 0;
}
int64_t kvs_gettid(void) { return (int64_t)syscall(SYS_gettid); }
int64_t kvs_kick_tid(int32_t tid) { RET(syscall(SYS_tgkill, getpid(), tid, SIGRTMIN + 1)); }
uint64_t kvs_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
int64_t kvs_unix_connect_nb(const char *path) {
  struct sockaddr_un a;
  if (unix_addr(path, &a) < 0) return -(int64_t)errno;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -(int64_t)errno;
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    int e = errno;
    close(fd);
    return -(int64_t)e;
  }
  return fd;
}
int64_t kvs_shutdown(int32_t fd, int32_t how) { RET(shutdown(fd, how)); }
