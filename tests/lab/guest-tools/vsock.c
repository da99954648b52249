/* vsock: a small AF_VSOCK tool for the lab's default guest (busybox has none). Built static by
 * tests/lab/images.sh into the guest initramfs as /bin/vsock; it also runs in the lab itself.
 *
 *   vsock listen PORT            echo server: every connection (one process each) gets its bytes back
 *                                until it shuts its write side; prints "listening PORT" once bound
 *   vsock wait PORT              accepts one connection, copies what it sends to stdout, exits at its end
 *   vsock connect CID PORT       copies stdin to the connection and the connection to stdout; at stdin's
 *                                end shuts the write side and goes on until the peer closes
 *   vsock unix-connect PATH PORT the same through a hybrid vsock's UNIX socket (CONNECT PORT / OK ...)
 *   vsock echo-test CID PORT MIB sends MIB MiB of a pattern while reading the echo back, checks it byte
 *                                for byte; prints "echo-test MIB MiB ok SECONDS s RATE MiB/s"
 *   vsock unix-echo-test PATH PORT MIB
 *                                the same through a hybrid vsock's UNIX socket
 * Exit status 0 on success, 1 on any failure (with a message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CHUNK 65536

static void die(const char *what) {
	fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int write_all(int fd, const char *p, size_t n) {
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR) continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int vsock_connect(unsigned cid, unsigned port) {
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0) die("socket(AF_VSOCK)");
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
	return fd;
}

/* A hybrid vsock's host side: connect to PATH, "CONNECT PORT\n", expect "OK <n>\n" (read bytewise). */
static int unix_connect(const char *path, unsigned port) {
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0) die("socket(AF_UNIX)");
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
	char line[64];
	int n = snprintf(line, sizeof line, "CONNECT %u\n", port);
	if (write_all(fd, line, (size_t)n) < 0) die("write CONNECT");
	size_t got = 0;
	while (got < sizeof line - 1) {
		ssize_t r = read(fd, line + got, 1);
		if (r <= 0) {
			fprintf(stderr, "vsock: no OK for CONNECT %u (%s)\n", port, r == 0 ? "closed" : strerror(errno));
			exit(1);
		}
		if (line[got++] == '\n') break;
	}
	line[got] = 0;
	if (strncmp(line, "OK ", 3) != 0) {
		fprintf(stderr, "vsock: unexpected answer to CONNECT: %s", line);
		exit(1);
	}
	return fd;
}

static void echo(int fd) {
	static char buf[CHUNK];
	for (;;) {
		ssize_t r = read(fd, buf, sizeof buf);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0) break;
		if (write_all(fd, buf, (size_t)r) < 0) break;
	}
	close(fd);
}

static int cmd_listen(unsigned port) {
	int l = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (l < 0) die("socket(AF_VSOCK)");
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
	if (listen(l, 128) < 0) die("listen");
	signal(SIGCHLD, SIG_IGN); /* no zombies */
	printf("listening %u\n", port);
	fflush(stdout);
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED) continue;
			die("accept");
		}
		pid_t p = fork();
		if (p == 0) {
			close(l);
			echo(c);
			_exit(0);
		}
		close(c);
	}
}

static int cmd_wait(unsigned port) {
	static char buf[CHUNK];
	int l = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (l < 0) die("socket(AF_VSOCK)");
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
	if (listen(l, 1) < 0) die("listen");
	int c;
	while ((c = accept(l, NULL, NULL)) < 0)
		if (errno != EINTR && errno != ECONNABORTED) die("accept");
	for (;;) {
		ssize_t r = read(c, buf, sizeof buf);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0) break;
		if (write_all(1, buf, (size_t)r) < 0) break;
	}
	return 0;
}

static int cmd_connect(int fd) {
	static char buf[CHUNK];
	struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
	int in_open = 1;
	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR) continue;
			die("poll");
		}
		if (in_open && (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t r = read(0, buf, sizeof buf);
			if (r <= 0) {
				in_open = 0;
				p[0].fd = -1;
				shutdown(fd, SHUT_WR);
			} else if (write_all(fd, buf, (size_t)r) < 0) die("write to the connection");
		}
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t r = read(fd, buf, sizeof buf);
			if (r < 0 && errno == EINTR) continue;
			if (r < 0) die("read from the connection");
			if (r == 0) return 0;
			if (write_all(1, buf, (size_t)r) < 0) die("write to stdout");
		}
	}
}

static uint8_t pattern(uint64_t i) { return (uint8_t)((i * 2654435761u) >> 13); }

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Sends `mib` MiB while reading the echo (poll: neither side may block the other), checks every byte. */
static int echo_test(int fd, unsigned mib) {
	static uint8_t out[CHUNK], in[CHUNK];
	const uint64_t total = (uint64_t)mib << 20;
	uint64_t sent = 0, got = 0;
	double t0 = now();
	struct pollfd p = {.fd = fd};
	while (got < total) {
		p.events = POLLIN | (sent < total ? POLLOUT : 0);
		if (poll(&p, 1, 60000) <= 0) {
			fprintf(stderr, "vsock: echo stalled at sent %llu got %llu\n", (unsigned long long)sent,
				(unsigned long long)got);
			return 1;
		}
		if (sent < total && (p.revents & POLLOUT)) {
			size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
			for (size_t i = 0; i < n; i++) out[i] = pattern(sent + i);
			ssize_t w = send(fd, out, n, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (w < 0 && errno != EAGAIN && errno != EINTR) die("send");
			if (w > 0) sent += (uint64_t)w;
			if (sent == total) shutdown(fd, SHUT_WR);
		}
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t r = recv(fd, in, sizeof in, MSG_DONTWAIT);
			if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
			if (r < 0) die("recv");
			if (r == 0) {
				fprintf(stderr, "vsock: echo ended early at %llu of %llu bytes\n", (unsigned long long)got,
					(unsigned long long)total);
				return 1;
			}
			for (ssize_t i = 0; i < r; i++) {
				if (in[i] != pattern(got + (uint64_t)i)) {
					fprintf(stderr, "vsock: echo differs at byte %llu\n", (unsigned long long)(got + i));
					return 1;
				}
			}
			got += (uint64_t)r;
		}
	}
	double s = now() - t0;
	printf("echo-test %u MiB ok %.2f s %.2f MiB/s\n", mib, s, mib / s);
	close(fd);
	return 0;
}

int main(int argc, char **argv) {
	signal(SIGPIPE, SIG_IGN);
	if (argc == 3 && !strcmp(argv[1], "listen")) return cmd_listen((unsigned)strtoul(argv[2], 0, 10));
	if (argc == 3 && !strcmp(argv[1], "wait")) return cmd_wait((unsigned)strtoul(argv[2], 0, 10));
	if (argc == 4 && !strcmp(argv[1], "connect"))
		return cmd_connect(vsock_connect((unsigned)strtoul(argv[2], 0, 10), (unsigned)strtoul(argv[3], 0, 10)));
	if (argc == 4 && !strcmp(argv[1], "unix-connect"))
		return cmd_connect(unix_connect(argv[2], (unsigned)strtoul(argv[3], 0, 10)));
	if (argc == 5 && !strcmp(argv[1], "echo-test"))
		return echo_test(vsock_connect((unsigned)strtoul(argv[2], 0, 10), (unsigned)strtoul(argv[3], 0, 10)),
				 (unsigned)strtoul(argv[4], 0, 10));
	if (argc == 5 && !strcmp(argv[1], "unix-echo-test"))
		return echo_test(unix_connect(argv[2], (unsigned)strtoul(argv[3], 0, 10)), (unsigned)strtoul(argv[4], 0, 10));
	fprintf(stderr, "usage: vsock listen PORT | wait PORT | connect CID PORT | unix-connect PATH PORT |"
			" echo-test CID PORT MIB | unix-echo-test PATH PORT MIB\n");
	return 2;
}
