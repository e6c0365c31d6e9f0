/* loadstage: a stage of the scaling bench's pipeline, with a request metrics endpoint.
 *
 *   loadstage PORT WORK_US [START_MS]
 *
 * It listens START_MS milliseconds after it starts (0 by default): a stage with an initialisation,
 * so a replica's cold start is that long plus the platform's.
 * HTTP/1.1 on PORT, one request per connection (Connection: close: each request is a new
 * connection, so the kernel's balancer spreads requests, not long connections), a thread each:
 *   GET  /healthz   200 ok
 *   POST /work      burns WORK_US microseconds of this thread's CPU time (so a CPU limit on the
 *                   container slows it down: a replica short of CPU answers late), 200 "done";
 *                   503 when more than MAX_IN_FLIGHT requests are in progress (counted as an error)
 *   GET  /metrics   Prometheus text: requests_total, request_errors_total and the summary
 *                   request_duration_seconds (_sum, _count) of the /work requests since it started
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_IN_FLIGHT 256

static long work_us;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long requests, errors, in_flight;
static double duration_sum;

static double now_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void answer(int fd, const char *status, const char *body) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                     status, strlen(body));
    if (write(fd, head, n) < 0 || write(fd, body, strlen(body)) < 0) {
        /* the client went away: nothing to do */
    }
}

static void burn(void) {
    double until = now_s(CLOCK_THREAD_CPUTIME_ID) + work_us / 1e6;
    volatile unsigned long x = 0;
    while (now_s(CLOCK_THREAD_CPUTIME_ID) < until) {
        for (int i = 0; i < 1000; i++) x += i;
    }
}

static void *serve(void *arg) {
    int fd = (int)(long)arg;
    char req[4096];
    ssize_t got = 0, n;
    while (got < (ssize_t)sizeof req - 1 && (n = read(fd, req + got, sizeof req - 1 - got)) > 0) {
        got += n;
        req[got] = 0;
        if (strstr(req, "\r\n\r\n")) break;
    }
    req[got > 0 ? got : 0] = 0;
    if (strncmp(req, "POST /work", 10) == 0) {
        double began = now_s(CLOCK_MONOTONIC);
        pthread_mutex_lock(&lock);
        int refused = in_flight >= MAX_IN_FLIGHT;
        if (!refused) in_flight++;
        pthread_mutex_unlock(&lock);
        if (refused) {
            answer(fd, "503 Service Unavailable", "busy\n");
        } else {
            burn();
            answer(fd, "200 OK", "done\n");
        }
        double took = now_s(CLOCK_MONOTONIC) - began;
        pthread_mutex_lock(&lock);
        requests++;
        if (refused) errors++;
        else in_flight--;
        duration_sum += took;
        pthread_mutex_unlock(&lock);
    } else if (strncmp(req, "GET /metrics", 12) == 0) {
        char body[1024];
        pthread_mutex_lock(&lock);
        snprintf(body, sizeof body,
                 "# TYPE requests_total counter\nrequests_total %llu\n"
                 "# TYPE request_errors_total counter\nrequest_errors_total %llu\n"
                 "# TYPE request_duration_seconds summary\nrequest_duration_seconds_sum %.6f\n"
                 "request_duration_seconds_count %llu\n",
                 requests, errors, duration_sum, requests);
        pthread_mutex_unlock(&lock);
        answer(fd, "200 OK", body);
    } else if (strncmp(req, "GET /healthz", 12) == 0) {
        answer(fd, "200 OK", "ok\n");
    } else {
        answer(fd, "404 Not Found", "not found\n");
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: loadstage PORT WORK_US [START_MS]\n");
        return 2;
    }
    work_us = atol(argv[2]);
    if (argc == 4) usleep(atol(argv[3]) * 1000L);
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 1024) < 0) {
        perror("listen");
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    for (;;) {
        int fd = accept(s, NULL, NULL);
        if (fd < 0) continue;
        pthread_t t;
        if (pthread_create(&t, &attr, serve, (void *)(long)fd) != 0) close(fd);
    }
}
