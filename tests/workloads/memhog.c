/*
 * memhog: a stateful test workload for live migration.
 *
 *   memhog RESIDENT_MIB REWRITE_MB_PER_S STATUS_FILE [FORK_EVERY_MS]
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
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096

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

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: memhog RESIDENT_MIB REWRITE_MB_PER_S STATUS_FILE [FORK_EVERY_MS]\n");
        return 2;
    }
    uint64_t fork_every_us = argc == 5 ? (uint64_t)atoll(argv[4]) * 1000 : 0;
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
        while (owed >= 1.0 && pages) { /* rewrite pages round-robin at the requested rate */
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
                             " children=%llu max_gap_end_us=%llu\n",
                             (unsigned long long)beats, (unsigned long long)max_gap, (unsigned long long)t, verified,
                             (unsigned long long)pages, (unsigned long long)forks, (unsigned long long)fork_errors,
                             (unsigned long long)(forks - reaped), (unsigned long long)max_gap_end);
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
        usleep(1000);
    }
}
