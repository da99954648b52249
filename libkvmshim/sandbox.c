/* libkvmshim sandbox: installing a seccomp filter built in TypeScript (vmm/seccomp.ts) on the calling
 * thread, the SIGSYS handler that reports a forbidden call, and the Landlock system calls. The allow lists
 * and the rule sets are policy and live in TypeScript; this file only has what must run in C (the signal
 * handler and the raw system calls). */
#define _GNU_SOURCE
#include "kvmshim.h"
#include <dlfcn.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define RET(expr) do { long _r = (long)(expr); return _r < 0 ? -(int64_t)errno : (int64_t)_r; } while (0)
#define SC_KINDS 8
#define SC_NRS 512

/* 0: no filter, 1: trap (report and end the process), 2: log (report once, then carry the call out),
 * 3: errno (the call fails with EPERM). Set once by the main thread before any filter exists. */
static int sc_mode;
static char sc_kind_names[SC_KINDS][16];
static const char *sc_names[SC_NRS];
static char sc_name_store[8192];
static uint8_t sc_seen[SC_KINDS][SC_NRS / 8];
/* initial-exec: the handler reads it, and a dynamic TLS access could allocate inside a signal handler */
static __thread int sc_kind __attribute__((tls_model("initial-exec")));

/* Log mode carries a trapped call out from the handler through this one `syscall` instruction, which the
 * log-mode filters allow by instruction pointer. Arguments: nr, a0..a5 (System V order; a5 on the stack). */
int64_t kvs_sc_escape(int64_t nr, int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t a4, int64_t a5);
__asm__(".text\n"
        ".globl kvs_sc_escape\n"
        ".type kvs_sc_escape,@function\n"
        "kvs_sc_escape:\n"
        "  mov %rdi, %rax\n"
        "  mov %rsi, %rdi\n"
        "  mov %rdx, %rsi\n"
        "  mov %rcx, %rdx\n"
        "  mov %r8, %r10\n"
        "  mov %r9, %r8\n"
        "  mov 8(%rsp), %r9\n"
        "  syscall\n"
        "kvs_sc_escape_after:\n"
        "  ret\n"
        ".size kvs_sc_escape, .-kvs_sc_escape\n");
extern char kvs_sc_escape_after[];
uint64_t kvs_seccomp_escape_ip(void) { return (uint64_t)(uintptr_t)kvs_sc_escape_after; }

static size_t sc_put(char *buf, size_t at, size_t cap, const char *s) {
  while (*s && at + 1 < cap) buf[at++] = *s++;
  return at;
}
static size_t sc_put_num(char *buf, size_t at, size_t cap, long v) {
  char tmp[24];
  int n = 0;
  if (v < 0) {
    at = sc_put(buf, at, cap, "-");
    v = -v;
  }
  do tmp[n++] = (char)('0' + v % 10); while ((v /= 10) && n < 23);
  while (n && at + 1 < cap) buf[at++] = tmp[--n];
  return at;
}

static void sc_report(int nr, int fatal, long arg1) {
  char line[256];
  size_t n = 0;
  const char *kind = sc_kind_names[sc_kind][0] ? sc_kind_names[sc_kind] : "vmm";
  const char *name = nr >= 0 && nr < SC_NRS && sc_names[nr] ? sc_names[nr] : "unknown";
  n = sc_put(line, n, sizeof line, "dvmm: seccomp: ");
  n = sc_put(line, n, sizeof line, kind);
  n = sc_put(line, n, sizeof line, " thread ");
  n = sc_put_num(line, n, sizeof line, syscall(SYS_gettid));
  n = sc_put(line, n, sizeof line, " made system call ");
  n = sc_put(line, n, sizeof line, name);
  n = sc_put(line, n, sizeof line, " (");
  n = sc_put_num(line, n, sizeof line, nr);
  if (nr == SYS_ioctl) { /* which request: KVM's are type 0xae, a tap's 0x54 */
    static const char hex[] = "0123456789abcdef";
    char req[16];
    int k = 0;
    unsigned long v = (unsigned long)arg1 & 0xffffffffUL;
    do req[k++] = hex[v & 15]; while ((v >>= 4) && k < 16);
    n = sc_put(line, n, sizeof line, ", request 0x");
    while (k && n + 1 < sizeof line) line[n++] = req[--k];
  }
  n = sc_put(line, n, sizeof line, fatal ? "), which its filter forbids: dvmm stops (--seccomp log lists such calls)\n"
                                         : "), not in its allow list (logged once; --seccomp log)\n");
  (void)!write(2, line, n);
}

static void sc_sigsys(int sig, siginfo_t *si, void *ctx) {
  (void)sig;
  if (si->si_code != 1 /* SYS_SECCOMP */) return;
  greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
  int nr = si->si_syscall;
  if (sc_mode == 2) {
    int first = 1;
    if (nr >= 0 && nr < SC_NRS) {
      uint8_t bit = (uint8_t)(1u << (nr & 7));
      first = !(__atomic_fetch_or(&sc_seen[sc_kind][nr >> 3], bit, __ATOMIC_RELAXED) & bit);
    }
    if (first) sc_report(nr, 0, g[REG_RSI]);
    g[REG_RAX] = kvs_sc_escape(nr, g[REG_RDI], g[REG_RSI], g[REG_RDX], g[REG_R10], g[REG_R8], g[REG_R9]);
    return;
  }
  sc_report(nr, 1, g[REG_RSI]);
  /* The default action of SIGSYS ends the whole process once this handler returns. */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  syscall(SYS_rt_sigaction, SIGSYS, &dfl, NULL, 8);
  syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGSYS);
}

int64_t kvs_seccomp_setup(int32_t mode, const char *names, uint64_t len) {
  if (len >= sizeof sc_name_store) return -E2BIG;
  memcpy(sc_name_store, names, len);
  sc_name_store[len] = 0;
  /* names: NUL-separated, the n-th string is system call n's name (empty when there is none). */
  size_t at = 0;
  for (int nr = 0; nr < SC_NRS && at < len; nr++) {
    sc_names[nr] = sc_name_store[at] ? &sc_name_store[at] : NULL;
    at += strlen(&sc_name_store[at]) + 1;
  }
  sc_mode = mode;
  /* The handler lives in this library: keep it mapped for the life of the process, even when Deno
   * unloads the library at exit while other threads (still filtered) are ending. */
  Dl_info self;
  if (!dladdr((void *)sc_sigsys, &self) || !self.dli_fname ||
      !dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE)) {
    return -ENOENT;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = sc_sigsys;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  RET(sigaction(SIGSYS, &sa, NULL));
}
int32_t kvs_seccomp_mode(void) { return sc_mode; }

int64_t kvs_seccomp_install(const void *insns, uint32_t count, int32_t kind, const char *kind_name, int32_t tsync) {
  if (kind < 0 || kind >= SC_KINDS) return -EINVAL;
  strncpy(sc_kind_names[kind], kind_name, sizeof sc_kind_names[kind] - 1);
  struct sock_fprog prog = {.len = (unsigned short)count, .filter = (struct sock_filter *)insns};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return -(int64_t)errno;
  sc_kind = kind;
  RET(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, tsync ? SECCOMP_FILTER_FLAG_TSYNC : 0, &prog));
}

/* Landlock: the raw calls (glibc has no wrappers). The rule structures are built in TypeScript. */
int64_t kvs_landlock_create_ruleset(const void *attr, uint64_t size, uint32_t flags) {
  RET(syscall(SYS_landlock_create_ruleset, attr, (size_t)size, flags));
}
int64_t kvs_landlock_add_rule(int32_t ruleset, int32_t type, const void *attr) {
  RET(syscall(SYS_landlock_add_rule, ruleset, type, attr, 0));
}
int64_t kvs_landlock_restrict_self(int32_t ruleset) {
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return -(int64_t)errno;
  RET(syscall(SYS_landlock_restrict_self, ruleset, 0));
}
