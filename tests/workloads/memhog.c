/*
 * memhog: a stateful test workload for live migration.
 *
 *   memhog RESIDENT_MIB REWRITE_MB_PER_S STATUS_FILE [FORK_EVERY_MS [PORT]]
 *
 * Keeps RESIDENT_MIB of memory whose every page is derived from (page index, generation), rewrites
 * pages at REWRITE_MB_PER_S, and beats every millisecond. Every 100 ms it rewrites STATUS_FILE with:
 *   beats=<n> max_gap_us=<longest pause between beats> last_us=<realtime> verified=<result> pages=<n>
 *   forks=<n> fork_errors=<n> children=<n> max_gap_end_us=<realtime the longest pause ended>
 * When the file STATUS_FILE.verify exists it checks every page against its generation, removes the
 * file and reports verified=ok or verified=corrupt:<page>. The longest gap is the downtime a
 * migration caused; beats keeps counting across a migration when memory survived.
 * Every pause of 5 ms or more also goes to STATUS_FILE.gaps, one "<end realtime us> <gap us>" line
 * each (the last 1024): the stalls after the downtime, e.g. a post-copy's page faults.
 * With FORK_EVERY_MS, it forks that often a child that checks 8 pages spread over the memory and
 * exits 1 if one is wrong: fork_errors counts those (and children killed by a signal), children
 * the ones not reaped yet.
 * With PORT (FORK_EVERY_MS may be 0), it also serves TCP on PORT from the same loop: poll(2) with a
 * 1 ms timeout replaces the sleep. Each request line "<seq> <nonce>\n" is answered with
 * "<seq> <digest> <ok|bad>\n": digest = mix(seq, nonce) in 16 hex digits (the client recomputes it),
 * and ok/bad says whether the page the digest selects matches its generation. Every request thus
 * reads the resident memory, so post-copy faults slow the replies as they would a real server's.
 * The status line then adds served=<requests answered> bad_pages=<of them, bad> conns=<accepted>.
 */
#define _GNU_SOURCE /* accept4 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#include <poll.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define PAGE 4096
#define MAX_CONNS 1024
#define LINE 64

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void fill(uint64_t *page, uint64_t index, uint64_t gen) {
    uint64_t x = (index + 1) * 0x9E3779B97F4A7C15ull ^ (gen * 0xBF58476D1CE4E5B9ull);
    for (int i = 0; i < PAGE / 8; i++) { /* xorshift64*: incompressible, cheap */
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
        page[i] = x * 0x2545F4914F6CDD1Dull;
    }
}

/* splitmix64's finalizer: the reply's digest, which the client recomputes from its request. */
static uint64_t mix(uint64_t seq, uint64_t nonce) {
    uint64_t z = seq * 0x9E3779B97F4A7C15ull ^ nonce;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

struct conn { char buf[LINE]; size_t len; };

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 4096) != 0) {
        perror("listen");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 6) {
        fprintf(stderr, "usage: memhog RESIDENT_MIB REWRITE_MB_PER_S STATUS_FILE [FORK_EVERY_MS [PORT]]\n");
        return 2;
    }
    uint64_t fork_every_us = argc >= 5 ? (uint64_t)atoll(argv[4]) * 1000 : 0;
    int port = argc == 6 ? atoi(argv[5]) : 0;
    uint64_t pages = (uint64_t)atoll(argv[1]) * 1024 * 1024 / PAGE;
    double rate = atof(argv[2]) * 1e6 / PAGE; /* pages per second */
    const char *status = argv[3];
    char verify_path[4096];
    snprintf(verify_path, sizeof verify_path, "%s.verify", status);

    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t *gen = calloc(pages ? pages : 1, sizeof *gen);
    if (mem == MAP_FAILED || !gen) { perror("alloc"); return 1; }
    for (uint64_t p = 0; p < pages; p++) fill(mem + p * (PAGE / 8), p, 0);

    uint64_t beats = 0, max_gap = 0, max_gap_end = 0, last = now_us(), next_status = last, cursor = 0;
    uint64_t forks = 0, fork_errors = 0, reaped = 0, next_fork = last + fork_every_us;
    enum { GAPS = 1024 };
    static uint64_t gap_end[GAPS], gap_len[GAPS];
    uint64_t gaps = 0, gaps_written = 0;
    char gaps_path[4096], gaps_tmp[4096];
    snprintf(gaps_path, sizeof gaps_path, "%s.gaps", status);
    snprintf(gaps_tmp, sizeof gaps_tmp, "%s.gaps.tmp", status);
    uint64_t served = 0, bad_pages = 0, accepted = 0;
    /* fds[0] is the listener; fds[1..nfds) the connections, conns[i] their partial request lines */
    static struct pollfd fds[MAX_CONNS];
    static struct conn conns[MAX_CONNS];
    nfds_t nfds = 0;
    if (port) { fds[0] = (struct pollfd){.fd = listen_on(port), .events = POLLIN}; nfds = 1; }
    double owed = 0;
    char verified[64] = "none";
    printf("memhog ready pages=%llu\n", (unsigned long long)pages);
    fflush(stdout);
    for (;;) {
        uint64_t t = now_us();
        uint64_t gap = t - last;
        if (beats > 0 && gap > max_gap) { max_gap = gap; max_gap_end = t; }
        if (beats > 0 && gap >= 5000) { gap_end[gaps % GAPS] = t; gap_len[gaps % GAPS] = gap; gaps++; }
        owed += rate * (double)gap / 1e6;
        last = t;
        beats++;
        /* A server catches up between requests: at most 2 ms of the rate (at least a page) per pass of
           at most 1 ms, twice the rate, not all that a freeze left owed in one burst (without PORT: all
           of it in one pass, as the heartbeat has always measured it). */
        double batch = port ? (rate / 500 > 1.0 ? rate / 500 : 1.0) : owed;
        for (double done = 0; owed >= 1.0 && done < batch && pages; done += 1.0) { /* round-robin at the rate */
            gen[cursor]++;
            fill(mem + cursor * (PAGE / 8), cursor, gen[cursor]);
            cursor = (cursor + 1) % pages;
            owed -= 1.0;
        }
        if (fork_every_us && pages && t >= next_fork) {
            pid_t child = fork();
            if (child == 0) { /* pages spread over the memory, a different set each time */
                uint64_t tmp[PAGE / 8];
                for (uint64_t k = 0; k < 8; k++) {
                    uint64_t p = (forks * 7919 + k * (pages / 8 + 1)) % pages;
                    fill(tmp, p, gen[p]);
                    if (memcmp(tmp, mem + p * (PAGE / 8), PAGE) != 0) _exit(1);
                }
                _exit(0);
            }
            if (child > 0) forks++;
            next_fork = t + fork_every_us;
        }
        for (int st; fork_every_us && waitpid(-1, &st, WNOHANG) > 0;) {
            reaped++;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fork_errors++;
        }
        if (t >= next_status) {
            if (access(verify_path, F_OK) == 0) {
                uint64_t bad = UINT64_MAX;
                uint64_t tmp[PAGE / 8];
                for (uint64_t p = 0; p < pages && bad == UINT64_MAX; p++) {
                    fill(tmp, p, gen[p]);
                    if (memcmp(tmp, mem + p * (PAGE / 8), PAGE) != 0) bad = p;
                }
                if (bad == UINT64_MAX) snprintf(verified, sizeof verified, "ok");
                else snprintf(verified, sizeof verified, "corrupt:%llu", (unsigned long long)bad);
                unlink(verify_path);
            }
            char line[384];
            int n = snprintf(line, sizeof line,
                             "beats=%llu max_gap_us=%llu last_us=%llu verified=%s pages=%llu forks=%llu fork_errors=%llu"
                             " children=%llu max_gap_end_us=%llu served=%llu bad_pages=%llu conns=%llu\n",
                             (unsigned long long)beats, (unsigned long long)max_gap, (unsigned long long)t, verified,
                             (unsigned long long)pages, (unsigned long long)forks, (unsigned long long)fork_errors,
                             (unsigned long long)(forks - reaped), (unsigned long long)max_gap_end,
                             (unsigned long long)served, (unsigned long long)bad_pages, (unsigned long long)accepted);
            char tmpname[4096];
            snprintf(tmpname, sizeof tmpname, "%s.tmp", status);
            int fd = open(tmpname, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) { if (write(fd, line, n) != n) {} close(fd); rename(tmpname, status); }
            if (gaps != gaps_written) { /* the last GAPS of them, oldest first */
                FILE *g = fopen(gaps_tmp, "w");
                if (g) {
                    for (uint64_t i = gaps > GAPS ? gaps - GAPS : 0; i < gaps; i++)
                        fprintf(g, "%llu %llu\n", (unsigned long long)gap_end[i % GAPS],
                                (unsigned long long)gap_len[i % GAPS]);
                    fclose(g);
                    rename(gaps_tmp, gaps_path);
                }
                gaps_written = gaps;
            }
            next_status = t + 100000;
        }
        if (!nfds) { usleep(1000); continue; }
        if (poll(fds, nfds, 1) <= 0) continue;
        if (fds[0].revents & POLLIN) { /* accept all pending while there is room */
            for (int fd; nfds < MAX_CONNS && (fd = accept4(fds[0].fd, NULL, NULL, SOCK_NONBLOCK)) >= 0;) {
                fds[nfds] = (struct pollfd){.fd = fd, .events = POLLIN};
                conns[nfds].len = 0;
                nfds++;
                accepted++;
            }
        }
        for (nfds_t i = 1; i < nfds; i++) {
            if (!fds[i].revents) continue;
            struct conn *c = &conns[i];
            ssize_t n = recv(fds[i].fd, c->buf + c->len, sizeof c->buf - c->len, 0);
            int drop = n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
            if (n > 0) c->len += (size_t)n;
            char *nl;
            while (!drop && (nl = memchr(c->buf, '\n', c->len)) != NULL) {
                *nl = 0;
                unsigned long long seq, nonce;
                if (sscanf(c->buf, "%llu %llu", &seq, &nonce) != 2) { drop = 1; break; }
                uint64_t digest = mix(seq, nonce);
                int ok = 1;
                if (pages) { /* the page the digest selects must hold its generation's content */
                    uint64_t p = digest % pages, tmp[PAGE / 8];
                    fill(tmp, p, gen[p]);
                    ok = memcmp(tmp, mem + p * (PAGE / 8), PAGE) == 0;
                }
                char reply[LINE];
                int len = snprintf(reply, sizeof reply, "%llu %016llx %s\n", seq, (unsigned long long)digest,
                                   ok ? "ok" : "bad");
                served++;
                if (!ok) bad_pages++;
                /* replies are tiny and the clients read each before the next request: a full send
                   buffer means a broken client, dropped (MSG_NOSIGNAL: a closed peer is no signal) */
                if (send(fds[i].fd, reply, (size_t)len, MSG_NOSIGNAL) != len) drop = 1;
                size_t used = (size_t)(nl - c->buf) + 1;
                memmove(c->buf, c->buf + used, c->len - used);
                c->len -= used;
            }
            if (!drop && c->len == sizeof c->buf) drop = 1; /* a line longer than any request */
            if (drop) { /* the last one takes this slot; look at slot i again */
                close(fds[i].fd);
                nfds--;
                fds[i] = fds[nfds];
                conns[i] = conns[nfds];
                i--;
            }
        }
    }
}
