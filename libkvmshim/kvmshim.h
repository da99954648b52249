/* libkvmshim: thin syscall wrappers for dvmm. Every call returns a non-negative result or -errno.
 * No policy lives here: ioctl numbers and struct layouts are defined in TypeScript (ffi/). */
#ifndef KVMSHIM_H
#define KVMSHIM_H
#include <stdint.h>
#include <stddef.h>

int64_t kvs_open(const char *path, int32_t flags, int32_t mode);
int64_t kvs_close(int32_t fd);
int64_t kvs_ioctl(int32_t fd, uint64_t request, void *arg);
int64_t kvs_ioctl_val(int32_t fd, uint64_t request, uint64_t value);
int32_t kvs_run(int32_t fd);
int32_t kvs_ioctl32(int32_t fd, uint32_t request, void *arg);
int32_t kvs_read32(int32_t fd, void *buf, uint32_t len);
int32_t kvs_write32(int32_t fd, const void *buf, uint32_t len);
int32_t kvs_pread_at(int32_t fd, void *buf, uint32_t len, double off);
int32_t kvs_pwrite_at(int32_t fd, const void *buf, uint32_t len, double off);
int32_t kvs_preadv_at(int32_t fd, const void *iov, int32_t n, double off);
int32_t kvs_pwritev_at(int32_t fd, const void *iov, int32_t n, double off);
int32_t kvs_madvise_at(double addr, double len, int32_t advice);
int64_t kvs_mmap(uint64_t addr, uint64_t len, int32_t prot, int32_t flags, int32_t fd, int64_t offset);
int64_t kvs_munmap(uint64_t addr, uint64_t len);
int64_t kvs_madvise(uint64_t addr, uint64_t len, int32_t advice);
int64_t kvs_memfd(const char *name, uint32_t flags);
int64_t kvs_ftruncate(int32_t fd, int64_t len);
int64_t kvs_eventfd(uint32_t initval, int32_t flags);
/* fstat st_size (a memfd's length), or -errno. */
int64_t kvs_fd_size(int32_t fd);
/* lseek(2); SEEK_DATA/SEEK_HOLE find a sparse file's (or memfd's) data. */
int64_t kvs_lseek(int32_t fd, int64_t off, int32_t whence);
int64_t kvs_read(int32_t fd, void *buf, uint64_t len);
int64_t kvs_write(int32_t fd, const void *buf, uint64_t len);
int64_t kvs_pread(int32_t fd, void *buf, uint64_t len, int64_t off);
int64_t kvs_pwrite(int32_t fd, const void *buf, uint64_t len, int64_t off);
int64_t kvs_readv(int32_t fd, const void *iov, int32_t iovcnt);
int64_t kvs_writev(int32_t fd, const void *iov, int32_t iovcnt);
int64_t kvs_preadv(int32_t fd, const void *iov, int32_t iovcnt, int64_t off);
int64_t kvs_pwritev(int32_t fd, const void *iov, int32_t iovcnt, int64_t off);
int64_t kvs_fsync(int32_t fd);
int64_t kvs_fdatasync(int32_t fd);
int64_t kvs_fcntl(int32_t fd, int32_t cmd, int64_t arg);
int64_t kvs_dup(int32_t fd);
/* dup3(fd, target, O_CLOEXEC): `target` now refers to what `fd` refers to (atomically). */
int64_t kvs_dup2(int32_t fd, int32_t target);
int64_t kvs_epoll_create(void);
int32_t kvs_epoll_ctl(int32_t epfd, int32_t op, int32_t fd, uint32_t events, uint32_t data);
/* Waits for events; stores each event's data word in out[i]. Returns the count (0 on timeout). */
int64_t kvs_epoll_wait(int32_t epfd, uint64_t *out, int32_t max, int32_t timeout_ms);
int64_t kvs_poll1(int32_t fd, int32_t events, int32_t timeout_ms);
/* socket(2) with SOCK_CLOEXEC added (e.g. an AF_INET datagram socket for interface ioctls). */
int64_t kvs_socket(int32_t domain, int32_t type, int32_t protocol);

/* UNIX stream sockets for the API (CLOEXEC). A listening socket bound at `path` (non-blocking). */
int64_t kvs_unix_listen(const char *path, int32_t backlog);
int64_t kvs_unix_listen_mode(const char *path, int32_t backlog, int32_t mode);
/* A connected socket (blocking). */
int64_t kvs_unix_connect(const char *path);
/* accept4 with SOCK_NONBLOCK|SOCK_CLOEXEC. */
/* TCP listen/connect (live migration); host numeric or a name, "" = any when listening. */
int64_t kvs_tcp_listen(const char *host, int32_t port, int32_t backlog);
int64_t kvs_tcp_connect(const char *host, int32_t port);
int64_t kvs_accept(int32_t fd);
/* getsockopt(SOL_SOCKET, opt) of an int option (e.g. SO_ACCEPTCONN, SO_TYPE, SO_DOMAIN). */
int64_t kvs_sockopt_int(int32_t fd, int32_t opt);
/* recvmsg of up to `len` bytes and up to `max_fds` SCM_RIGHTS descriptors (CLOEXEC): fds[0] receives
 * the count, fds[1..] the descriptors; fds[0] is -1 when the kernel dropped some (MSG_CTRUNC). */
int64_t kvs_recv_fds(int32_t fd, void *buf, uint64_t len, int32_t *fds, int32_t max_fds);
/* sendmsg of `len` bytes with `nfds` SCM_RIGHTS descriptors (none when nfds is 0); never SIGPIPE. */
int64_t kvs_send_fds(int32_t fd, const void *buf, uint64_t len, const int32_t *fds, int32_t nfds);
/* Names the calling thread (at most 15 bytes are kept), as /proc/PID/task/TID/comm shows it. */
int64_t kvs_set_thread_name(const char *name);

/* vCPU kick: a no-op SIGRTMIN+1 handler without SA_RESTART, so a thread blocked in KVM_RUN returns EINTR. */
int64_t kvs_kick_init(void);
int32_t kvs_kick_signal(void);
uint64_t kvs_thread_self(void);
int64_t kvs_kick(uint64_t thread);
int64_t kvs_gettid(void);
/* Kicks a thread of this process by kernel tid (tgkill): safe even when the thread has exited (ESRCH). */
int64_t kvs_kick_tid(int32_t tid);

/* Monotonic clock in nanoseconds. */
uint64_t kvs_now_ns(void);
/* virtio-vsock's host side: a connected non-blocking UNIX stream socket (CLOEXEC); -EAGAIN when the
 * listener's backlog is full, -ECONNREFUSED / -ENOENT when nobody listens at `path`. */
int64_t kvs_unix_connect_nb(const char *path);
/* shutdown(2) of a socket (how: SHUT_RD 0, SHUT_WR 1, SHUT_RDWR 2). */
int64_t kvs_shutdown(int32_t fd, int32_t how);
/* Sandbox (sandbox.c). Seccomp: `setup` is called once by the main thread before any filter: the mode
 * (1 trap: report the call and end the process; 2 log: report each call once and carry it out; 3 errno)
 * and the system call names (NUL-separated, by number) for the reports; it installs the SIGSYS handler.
 * `install` loads a classic-BPF filter (`count` sock_filter entries) on the calling thread (with `tsync`:
 * on every thread of the process), naming the thread's kind for reports. Log-mode filters allow the one
 * system call instruction whose return address `escape_ip` gives (the handler carries calls out there). */
int64_t kvs_seccomp_setup(int32_t mode, const char *names, uint64_t len);
int32_t kvs_seccomp_mode(void);
int64_t kvs_seccomp_install(const void *insns, uint32_t count, int32_t kind, const char *kind_name, int32_t tsync);
uint64_t kvs_seccomp_escape_ip(void);
/* Landlock's three system calls, as the kernel defines them (restrict_self also sets no_new_privs). */
int64_t kvs_landlock_create_ruleset(const void *attr, uint64_t size, uint32_t flags);
int64_t kvs_landlock_add_rule(int32_t ruleset, int32_t type, const void *attr);
int64_t kvs_landlock_restrict_self(int32_t ruleset);
/* io_uring for batched disk I/O (uring.c). A ring is a small handle (not an fd), used by one thread.
 * `prep` queues one request (op: KVS_URING_*; `iov` is a struct iovec array that must stay valid until
 * its completion is reaped; `tag` comes back with the result); -EBUSY when the ring is full.
 * `submit_wait` submits what was queued and waits until at least `wait` results are ready; `reap` moves
 * up to `max` results into out as (tag, result) pairs and returns how many. */
#define KVS_URING_READV 0
#define KVS_URING_WRITEV 1
#define KVS_URING_FDATASYNC 2
int32_t kvs_uring_create(uint32_t entries);
int32_t kvs_uring_prep(int32_t h, int32_t op, int32_t fd, const void *iov, int32_t n, double off, uint32_t tag);
int32_t kvs_uring_submit_wait(int32_t h, uint32_t wait);
int32_t kvs_uring_reap(int32_t h, int32_t *out, int32_t max);
int32_t kvs_uring_destroy(int32_t h);

#endif
