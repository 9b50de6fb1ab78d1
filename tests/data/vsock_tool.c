/*
 * vsock_tool: the guest's side of tests/test_e2e_vsock.py (AF_VSOCK streams through the example
 * virtio-vsock device). It exists because busybox has no AF_VSOCK; the test builds it with
 * `gcc -static -O2 -Wall -Werror` and puts it in the guest's initramfs.
 *
 *   vsock_tool listen PORT N_CONN sink [PAUSE_MS] accept N_CONN connections on VMADDR_CID_ANY:PORT,
 *                                                 served at once (a process each); each reads to
 *                                                 EOF, then writes back "<bytes> <crc32>\n", closes;
 *                                                 PAUSE_MS: sleep before each read (a slow reader)
 *   vsock_tool listen PORT N_CONN send BYTES SEED the same, each writes the stream (BYTES, SEED)
 *                                                 and closes
 *   vsock_tool connect CID PORT BYTES SEED        connect, write the stream, shutdown(SHUT_WR)
 *                                                 (half-close), read the peer's reply to EOF
 *   vsock_tool cid                                this machine's CID (the device's guest_cid)
 *   vsock_tool selftest BYTES SEED                the stream's crc32, made in odd-sized pieces
 *
 * Every result is one line on stdout, written with one write(): "VSOCK-RESULT TAG WHAT ...",
 * where TAG is $VSOCK_TAG (or "-"), so that lines of concurrent runs stay whole and attributable:
 *
 *   listening PORT                       listen: bound and listening (the peer may connect now)
 *   sink BYTES CRC USEC                  listen sink: one connection read to EOF in USEC us
 *   sent BYTES CRC USEC                  listen send: one connection's stream written
 *   listen-done PORT N_CONN FAILED       listen: every connection served, FAILED of them failed
 *   connected BYTES CRC USEC REPLY...    connect: sent, half-closed and read the reply (USEC: the
 *                                        connect to the reply's EOF)
 *   connect-failed ERRNO_NAME            connect: connect() failed (e.g. ECONNRESET: the device
 *                                        answered RST)
 *   cid CID                              cid
 *   selftest BYTES CRC                   selftest
 *   error WHAT ERRNO_NAME                anything else that failed; exit status 1
 *   timeout                              TIMEOUT_S passed (a hung peer); exit status 2
 *
 * The stream (the same in tests/test_e2e_vsock.py): xorshift64 with state SEED ^
 * 0x9E3779B97F4A7C15 (1 if that is 0); each step x ^= x << 13, x ^= x >> 7, x ^= x << 17 (mod
 * 2**64) gives the next 8 bytes, x little-endian; the stream is their concatenation cut to BYTES.
 * CRC is CRC-32 (IEEE 802.3, zlib's crc32) as 8 lower-case hex digits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define TIMEOUT_S 90
#define CONNECT_TIMEOUT_S 20 /* the kernel's default is 2 s, short for a guest under TCG */

static const char *tag = "-";
static char timeout_line[128];
static uint32_t crc_table[256];

/* --- results ------------------------------------------------------------------------------ */

static void result(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, "VSOCK-RESULT %s ", tag);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    (void)!write(1, line, n);
}

static int fail(const char *what)
{
    const char *name = strerrorname_np(errno);
    result("error %s %s", what, name ? name : "EUNKNOWN");
    return 1;
}

static void on_alarm(int sig)
{
    (void)sig;
    (void)!write(1, timeout_line, strlen(timeout_line));
    _exit(2);
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* --- the checksum and the stream ---------------------------------------------------------- */

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib's crc32(): start with crc = 0, feed the pieces in order */
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

struct stream {
    uint64_t x;
    unsigned char block[8];
    int used; /* bytes of block already handed out */
};

static void stream_init(struct stream *s, uint64_t seed)
{
    s->x = seed ^ 0x9E3779B97F4A7C15ull;
    if (s->x == 0)
        s->x = 1;
    s->used = 8;
}

static void stream_fill(struct stream *s, unsigned char *out, size_t n)
{
    while (n--) {
        if (s->used == 8) {
            s->x ^= s->x << 13;
            s->x ^= s->x >> 7;
            s->x ^= s->x << 17;
            for (int k = 0; k < 8; k++)
                s->block[k] = (unsigned char)(s->x >> (8 * k));
            s->used = 0;
        }
        *out++ = s->block[s->used++];
    }
}

/* --- socket helpers ----------------------------------------------------------------------- */

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* write BYTES of the stream from SEED; its crc in *crc */
static int send_stream(int fd, unsigned long long bytes, uint64_t seed, uint32_t *crc)
{
    static unsigned char buf[65536];
    struct stream s;
    stream_init(&s, seed);
    *crc = 0;
    while (bytes) {
        size_t n = bytes < sizeof buf ? (size_t)bytes : sizeof buf;
        stream_fill(&s, buf, n);
        *crc = crc_update(*crc, buf, n);
        if (write_all(fd, buf, n) < 0)
            return -1;
        bytes -= n;
    }
    return 0;
}

/* read to EOF, pausing `pause_ms` before each read: the byte count and crc, and the first
 * `keep` bytes in `head` (NUL-terminated) */
static int read_to_eof(int fd, unsigned pause_ms, unsigned long long *bytes, uint32_t *crc,
                       char *head, size_t keep)
{
    static unsigned char buf[65536];
    *bytes = 0;
    *crc = 0;
    for (;;) {
        if (pause_ms)
            usleep(pause_ms * 1000);
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        if (head && *bytes < keep) {
            size_t k = keep - *bytes < (size_t)r ? keep - *bytes : (size_t)r;
            memcpy(head + *bytes, buf, k);
        }
        *crc = crc_update(*crc, buf, (size_t)r);
        *bytes += (unsigned long long)r;
    }
    if (head)
        head[*bytes < keep ? *bytes : keep] = '\0';
    return 0;
}

/* --- commands ----------------------------------------------------------------------------- */

/* one accepted connection: sink (pausing pause_ms before each read) or send the stream */
static int serve(int fd, int sink, unsigned pause_ms, unsigned long long bytes, uint64_t seed)
{
    uint64_t t0 = now_us();
    uint32_t crc;
    if (sink) {
        unsigned long long got;
        char reply[64];
        if (read_to_eof(fd, pause_ms, &got, &crc, NULL, 0) < 0)
            return fail("read");
        int n = snprintf(reply, sizeof reply, "%llu %08x\n", got, crc);
        if (write_all(fd, (unsigned char *)reply, (size_t)n) < 0)
            return fail("write-reply");
        result("sink %llu %08x %llu", got, crc, (unsigned long long)(now_us() - t0));
    } else {
        if (send_stream(fd, bytes, seed, &crc) < 0)
            return fail("write");
        result("sent %llu %08x %llu", bytes, crc, (unsigned long long)(now_us() - t0));
    }
    if (close(fd) < 0)
        return fail("close");
    return 0;
}

static int cmd_listen(unsigned port, int conns, int sink, unsigned pause_ms,
                      unsigned long long bytes, uint64_t seed)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (lfd < 0)
        return fail("socket");
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail("bind");
    if (listen(lfd, conns) < 0)
        return fail("listen");
    result("listening %u", port);
    for (int i = 0; i < conns; i++) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            return fail("accept");
        pid_t pid = fork();
        if (pid < 0)
            return fail("fork");
        if (pid == 0) {
            alarm(TIMEOUT_S);
            close(lfd);
            _exit(serve(fd, sink, pause_ms, bytes, seed));
        }
        close(fd);
    }
    close(lfd);
    int failed = 0, status;
    while (wait(&status) > 0)
        failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    result("listen-done %u %d %d", port, conns, failed);
    return failed != 0;
}

static int cmd_connect(unsigned cid, unsigned port, unsigned long long bytes, uint64_t seed)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    struct timeval tv = {.tv_sec = CONNECT_TIMEOUT_S};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket");
    if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv) < 0)
        return fail("setsockopt");
    uint64_t t0 = now_us();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        const char *name = strerrorname_np(errno);
        result("connect-failed %s", name ? name : "EUNKNOWN");
        return 1;
    }
    uint32_t crc, reply_crc;
    unsigned long long reply_bytes;
    char reply[128];
    if (send_stream(fd, bytes, seed, &crc) < 0)
        return fail("write");
    if (shutdown(fd, SHUT_WR) < 0)
        return fail("shutdown");
    if (read_to_eof(fd, 0, &reply_bytes, &reply_crc, reply, sizeof reply - 1) < 0)
        return fail("read");
    reply[strcspn(reply, "\n")] = '\0';
    for (char *c = reply; *c; c++) /* one printable line, whatever came */
        if (*c < ' ' || *c > '~')
            *c = '?';
    result("connected %llu %08x %llu %s", bytes, crc, (unsigned long long)(now_us() - t0), reply);
    if (close(fd) < 0)
        return fail("close");
    return 0;
}

static int cmd_cid(void)
{
    unsigned int cid;
    int fd = open("/dev/vsock", O_RDONLY);
    if (fd < 0)
        return fail("open-dev-vsock");
    if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
        return fail("get-local-cid");
    result("cid %u", cid);
    return 0;
}

static int cmd_selftest(unsigned long long bytes, uint64_t seed)
{
    unsigned char buf[64];
    struct stream s;
    uint32_t crc = 0;
    stream_init(&s, seed);
    for (unsigned long long left = bytes, piece = 1; left; piece = piece % 61 + 1) {
        size_t n = left < piece ? (size_t)left : (size_t)piece; /* pieces of 1..61 bytes */
        stream_fill(&s, buf, n);
        crc = crc_update(crc, buf, n);
        left -= n;
    }
    result("selftest %llu %08x", bytes, crc);
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: vsock_tool listen PORT N_CONN sink [PAUSE_MS]|send BYTES SEED\n"
                    "       vsock_tool connect CID PORT BYTES SEED\n"
                    "       vsock_tool cid\n"
                    "       vsock_tool selftest BYTES SEED\n");
    return 64;
}

int main(int argc, char **argv)
{
    if (getenv("VSOCK_TAG"))
        tag = getenv("VSOCK_TAG");
    snprintf(timeout_line, sizeof timeout_line, "VSOCK-RESULT %s timeout\n", tag);
    signal(SIGALRM, on_alarm);
    signal(SIGPIPE, SIG_IGN);
    alarm(TIMEOUT_S);
    crc_init();
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "listen") == 0 && strcmp(argv[4], "sink") == 0)
        return cmd_listen(atoi(argv[2]), atoi(argv[3]), 1, argc == 6 ? atoi(argv[5]) : 0, 0, 0);
    if (argc == 7 && strcmp(argv[1], "listen") == 0 && strcmp(argv[4], "send") == 0)
        return cmd_listen(atoi(argv[2]), atoi(argv[3]), 0, 0, strtoull(argv[5], NULL, 0),
                          strtoull(argv[6], NULL, 0));
    if (argc == 6 && strcmp(argv[1], "connect") == 0)
        return cmd_connect(atoi(argv[2]), atoi(argv[3]), strtoull(argv[4], NULL, 0),
                           strtoull(argv[5], NULL, 0));
    if (argc == 2 && strcmp(argv[1], "cid") == 0)
        return cmd_cid();
    if (argc == 4 && strcmp(argv[1], "selftest") == 0)
        return cmd_selftest(strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
    return usage();
}
