/* stage: one stage of a test chain, speaking the chains' HTTP state contract (docs/chains.md).
 *
 *   stage NAME PORT SEED_BYTES FAULT [VOLUME]
 *
 * With VOLUME (a chain's shared volume, the `shared_volume` handover) the buffer lives in the file
 * VOLUME/NAME.buffer, mapped shared, all along; the exported state names that file instead of
 * carrying the bytes ({"file": "NAME.buffer", "bytes": N} as the buffer), and the next stage on the
 * same host maps it (private, read-only) to load it: not one byte of the buffer is copied between
 * the two. It writes its transformed buffer to its own file, so the file of the stage before stays
 * as it was, for a rollback.
 *
 * Its state is a counter and a buffer. The first stage of a chain starts with SEED_BYTES of buffer
 * (byte i = i % 251) and the trail NAME; later stages get theirs from the stage before through the
 * contract, and transform it as they load it: every byte of the buffer + 1 (mod 256), NAME appended
 * to the trail. So a test can tell exactly which stages a state went through, and that nothing of it
 * was lost or applied twice.
 *
 * HTTP/1.1 on PORT, one request per connection (Connection: close) unless the request asks for
 * Connection: keep-alive; a thread per connection, one request handled at a time:
 *   GET  /healthz        200 ok (503 with FAULT health)
 *   POST /work           counter + 1; 200 "NAME COUNTER"; 503 while handing over (not counted)
 *   GET  /state          200, the state as MessagePack {counter, buffer, trail}; no side effect
 *   GET  /buffer         200, the buffer's bytes; no side effect
 *   POST /state/export   the same, and the stage is handing over from then on (500 with FAULT export);
 *                        it answers once the answers it gave before have been acknowledged
 *   PUT  /state          load a state exported by another stage (500 with FAULT import; with
 *                        FAULT switch it loads it, answers, and exits: a stage that dies between
 *                        taking the state and getting the address)
 *   POST /state/resume   handing over no more: serve /work again (a rolled-back handover)
 * A live handover (docs/chains.md, "A live handover") adds, with VERSION the number of changes
 * the stage has applied (each counted /work; a loaded state's version carried over):
 *   POST /state/snapshot           the state with "version", the stage serving on
 *   POST /state/export?since=V     the delta since version V: {"since": V, "version": VERSION,
 *                                  "counter": COUNTER} (only /work changes the state, and only the
 *                                  counter); handing over from then on (500 with FAULT export)
 *   PATCH /state                   apply such a delta: 409 unless it is since the version this
 *                                  stage has; 204 without a change if it has that version already
 *                                  (a delta applied twice); 500 with FAULT delta
 * FAULT is "none", "health", "export", "import", "delta" or "switch".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <pthread.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <netinet/tcp.h>
#include <unistd.h>

#define MAX_HEADER 8192
#define MAX_BODY (1024L * 1024 * 1024)

static const char *name;
static const char *fault;
static uint64_t counter;
static uint64_t version;  /* changes applied: the live handover's delta is taken since one */
static unsigned char *buffer;
static size_t buffer_len;
static char trail[4096];
static int handing_over;
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;  /* one request handled at a time */
static __thread int keep_alive;  /* the request being answered asked for Connection: keep-alive */
static const char *volume;   /* NULL: the buffer is in memory and exported by value */
static size_t mapped_len;    /* > 0: buffer is a mapping of VOLUME/<buffer_file> */
static char buffer_file[256];  /* with a volume: the file in it that holds the buffer */

/* A buffer of len bytes: in memory, or (with a volume) a fresh shared mapping of our own file. */
static unsigned char *new_buffer(size_t len) {
    if (!volume) return malloc(len ? len : 1);
    snprintf(buffer_file, sizeof buffer_file, "%s.buffer", name);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.buffer", volume, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return NULL;
    if (ftruncate(fd, (off_t)(len ? len : 1))) { close(fd); return NULL; }
    void *p = mmap(NULL, len ? len : 1, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

static void set_buffer(unsigned char *next, size_t len) {
    if (mapped_len) munmap(buffer, mapped_len);
    else free(buffer);
    buffer = next;
    buffer_len = len;
    mapped_len = volume ? (len ? len : 1) : 0;
}

static void on_term(int sig) { (void)sig; _exit(0); }

/* Open client connections, so that an export can wait until every answer given before it has been
 * acknowledged (see settle_answers). */
#define MAX_CONNS 1024
static int conns[MAX_CONNS];
static int nconns;
static pthread_mutex_t conns_lock = PTHREAD_MUTEX_INITIALIZER;

static void track(int fd, int add) {
    pthread_mutex_lock(&conns_lock);
    if (add && nconns < MAX_CONNS) conns[nconns++] = fd;
    for (int i = 0; !add && i < nconns; i++)
        if (conns[i] == fd) { conns[i] = conns[--nconns]; break; }
    pthread_mutex_unlock(&conns_lock);
}

/* Before handing over: wait (at most 200 ms) until every answer already written to a client has
 * been acknowledged by it. Moving the address next makes the client's next packet meet a stage
 * that has no such connection, which resets it, and a reset drops what the client has received
 * but not read: an answer to a request this stage counted would be lost. Requests wait on
 * state_lock meanwhile, so no new answer is written. */
static void settle_answers(int self) {
    for (int round = 0; round < 400; round++) {
        int pending = 0;
        pthread_mutex_lock(&conns_lock);
        for (int i = 0; i < nconns && !pending; i++) {
            int queued = 0;
            if (conns[i] != self && ioctl(conns[i], SIOCOUTQ, &queued) == 0 && queued > 0) pending = 1;
        }
        pthread_mutex_unlock(&conns_lock);
        if (!pending) return;
        usleep(500);
    }
}

static int write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The head and the body in one writev: written apart, the body's small segment would wait (Nagle)
 * for the client to acknowledge the head, which a client waiting for the whole answer delays by
 * its delayed ACK (40 ms), once per request. */
static void respond(int fd, int status, const char *reason, const char *type, const void *body, size_t len) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: %s\r\n\r\n",
                     status, reason, type, len, keep_alive ? "keep-alive" : "close");
    struct iovec parts[2] = {{head, (size_t)n}, {(void *)body, len}};
    size_t total = (size_t)n + len;
    while (total) {
        ssize_t wrote = writev(fd, parts, len ? 2 : 1);
        if (wrote < 0) {
            if (errno == EINTR) continue;
            return;
        }
        total -= (size_t)wrote;
        if (!total) return;
        /* A partial write (a large state): the rest as plain writes. */
        size_t done = (size_t)wrote;
        if (done < (size_t)n) {
            if (write_all(fd, head + done, (size_t)n - done)) return;
            done = 0;
        } else {
            done -= (size_t)n;
        }
        if (len) write_all(fd, (const char *)body + done, len - done);
        return;
    }
}

static void text(int fd, int status, const char *reason, const char *msg) {
    respond(fd, status, reason, "text/plain", msg, strlen(msg));
}

static void put_be(unsigned char *p, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--, v >>= 8) p[i] = (unsigned char)(v & 0xff);
}

/* {"counter": uint64, "buffer": bin32, "trail": str32}; with a volume the buffer is
 * {"file": str8, "bytes": uint64}, the file in the volume that holds it. */
static unsigned char *encode(size_t *out_len, int with_version) {
    size_t tlen = strlen(trail);
    size_t len = 1 + 8 + 9 + 7 + 5 + (volume ? 1 + 5 + 2 + 255 + 6 + 9 : buffer_len) + 6 + 5 + tlen + 8 + 9;
    unsigned char *out = malloc(len), *p = out;
    if (!out) return NULL;
    *p++ = with_version ? 0x84 : 0x83;
    if (with_version) {
        *p++ = 0xa7; memcpy(p, "version", 7); p += 7;
        *p++ = 0xcf; put_be(p, version, 8); p += 8;
    }
    *p++ = 0xa7; memcpy(p, "counter", 7); p += 7;
    *p++ = 0xcf; put_be(p, counter, 8); p += 8;
    *p++ = 0xa6; memcpy(p, "buffer", 6); p += 6;
    if (volume) {
        size_t flen = strlen(buffer_file);
        *p++ = 0x82;
        *p++ = 0xa4; memcpy(p, "file", 4); p += 4;
        *p++ = 0xd9; *p++ = (unsigned char)flen; memcpy(p, buffer_file, flen); p += flen;
        *p++ = 0xa5; memcpy(p, "bytes", 5); p += 5;
        *p++ = 0xcf; put_be(p, buffer_len, 8); p += 8;
    } else {
        *p++ = 0xc6; put_be(p, buffer_len, 4); p += 4;
        memcpy(p, buffer, buffer_len); p += buffer_len;
    }
    *p++ = 0xa5; memcpy(p, "trail", 5); p += 5;
    *p++ = 0xdb; put_be(p, tlen, 4); p += 4;
    memcpy(p, trail, tlen); p += tlen;
    *out_len = (size_t)(p - out);
    return out;
}

struct reader { const unsigned char *p, *end; };

static int get_be(struct reader *r, int bytes, uint64_t *v) {
    if (r->end - r->p < bytes) return -1;
    *v = 0;
    for (int i = 0; i < bytes; i++) *v = (*v << 8) | *r->p++;
    return 0;
}

/* A str or bin: its bytes and length. */
static int get_bytes(struct reader *r, const unsigned char **data, uint64_t *len) {
    if (r->p >= r->end) return -1;
    unsigned char t = *r->p++;
    if ((t & 0xe0) == 0xa0) *len = t & 0x1f;
    else if (t == 0xd9 || t == 0xc4) { if (get_be(r, 1, len)) return -1; }
    else if (t == 0xda || t == 0xc5) { if (get_be(r, 2, len)) return -1; }
    else if (t == 0xdb || t == 0xc6) { if (get_be(r, 4, len)) return -1; }
    else return -1;
    if ((uint64_t)(r->end - r->p) < *len) return -1;
    *data = r->p;
    r->p += *len;
    return 0;
}

static int get_uint(struct reader *r, uint64_t *v) {
    if (r->p >= r->end) return -1;
    unsigned char t = *r->p++;
    if (t <= 0x7f) { *v = t; return 0; }
    if (t == 0xcc) return get_be(r, 1, v);
    if (t == 0xcd) return get_be(r, 2, v);
    if (t == 0xce) return get_be(r, 4, v);
    if (t == 0xcf) return get_be(r, 8, v);
    return -1;
}

/* Load a state (or leave everything as it was and say what is wrong). */
static const char *load(const unsigned char *body, size_t len) {
    struct reader r = {body, body + len};
    uint64_t fields, count = 0, blen = 0, tlen = 0, loaded_version = 0;
    const unsigned char *bdata = NULL, *tdata = NULL;
    int have = 0;
    char file[256] = "";
    if (r.p >= r.end) return "empty body";
    unsigned char t = *r.p++;
    if ((t & 0xf0) == 0x80) fields = t & 0x0f;
    else if (t == 0xde) { if (get_be(&r, 2, &fields)) return "truncated"; }
    else if (t == 0xdf) { if (get_be(&r, 4, &fields)) return "truncated"; }
    else return "not a MessagePack map";
    for (uint64_t i = 0; i < fields; i++) {
        const unsigned char *key;
        uint64_t klen;
        if (get_bytes(&r, &key, &klen)) return "a key is not a string";
        if (klen == 7 && !memcmp(key, "counter", 7)) {
            if (get_uint(&r, &count)) return "counter: not an unsigned integer";
            have |= 1;
        } else if (klen == 6 && !memcmp(key, "buffer", 6) && r.p < r.end && *r.p == 0x82) {
            /* {"file": NAME, "bytes": N}: a file in the volume (the keys in this order) */
            const unsigned char *k, *f;
            uint64_t kl, fl;
            r.p++;
            if (get_bytes(&r, &k, &kl) || kl != 4 || memcmp(k, "file", 4)) return "buffer: expected file";
            if (get_bytes(&r, &f, &fl) || fl == 0 || fl > 255 || memchr(f, '/', fl)) return "buffer.file: bad name";
            if (get_bytes(&r, &k, &kl) || kl != 5 || memcmp(k, "bytes", 5)) return "buffer: expected bytes";
            if (get_uint(&r, &blen)) return "buffer.bytes: not an unsigned integer";
            memcpy(file, f, fl);
            file[fl] = 0;
            have |= 2;
        } else if (klen == 6 && !memcmp(key, "buffer", 6)) {
            if (get_bytes(&r, &bdata, &blen)) return "buffer: not bytes";
            have |= 2;
        } else if (klen == 5 && !memcmp(key, "trail", 5)) {
            if (get_bytes(&r, &tdata, &tlen)) return "trail: not a string";
            have |= 4;
        } else if (klen == 7 && !memcmp(key, "version", 7)) {
            if (get_uint(&r, &loaded_version)) return "version: not an unsigned integer";
        } else {
            return "unknown field";
        }
    }
    if (have != 7) return "counter, buffer and trail are required";
    if (tlen + strlen(name) + 2 > sizeof trail) return "trail too long";
    void *source = NULL;  /* the stage before's file, mapped */
    if (file[0]) {
        if (!volume) return "buffer: a file in a volume, but this stage has no volume";
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", volume, file);
        int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd < 0) return "buffer.file: cannot open it in the volume";
        if (fstat(fd, &st) || (uint64_t)st.st_size < blen) { close(fd); return "buffer.file: shorter than bytes"; }
        if (blen) {
            source = mmap(NULL, blen, PROT_READ, MAP_PRIVATE, fd, 0);
            if (source == MAP_FAILED) { close(fd); return "buffer.file: cannot map it"; }
        }
        close(fd);
        bdata = source;
    }
    unsigned char *copy = new_buffer(blen);
    if (!copy) { if (source) munmap(source, blen); return "out of memory"; }
    for (uint64_t i = 0; i < blen; i++) copy[i] = (unsigned char)(bdata[i] + 1);
    if (source) munmap(source, blen);
    set_buffer(copy, blen);
    memcpy(trail, tdata, tlen);
    trail[tlen] = 0;
    if (volume) {
        /* The files of the stages before the one handing over are nobody's any more (it loaded
         * from them, and a rollback from here returns to it): removed, so the volume holds two. */
        char *last = strrchr(trail, ',');
        for (char *p = trail; last && p < last;) {
            char *comma = strchr(p, ',');
            char path[256];
            snprintf(path, sizeof path, "%.*s.buffer", (int)(comma - p), p);
            if (strcmp(path, file) && strcmp(path, buffer_file)) {  /* not a file still in use */
                char full[4096];
                snprintf(full, sizeof full, "%s/%s", volume, path);
                unlink(full);
            }
            p = comma + 1;
        }
    }
    strcat(trail, ",");
    strcat(trail, name);
    counter = count;
    version = loaded_version;
    return NULL;
}

/* Apply a live handover's delta {"since": V, "version": W, "counter": C}: NULL when applied (or
 * had already: *status 204), else why, with *status the answer's. */
static const char *apply_delta(const unsigned char *body, size_t len, int *status) {
    struct reader r = {body, body + len};
    uint64_t since = 0, next = 0, count = 0;
    int have = 0;
    *status = 400;
    if (r.p >= r.end || (*r.p & 0xf0) != 0x80) return "not a MessagePack map";
    uint64_t fields = *r.p++ & 0x0f;
    for (uint64_t i = 0; i < fields; i++) {
        const unsigned char *key;
        uint64_t klen;
        if (get_bytes(&r, &key, &klen)) return "a key is not a string";
        if (klen == 5 && !memcmp(key, "since", 5)) { if (get_uint(&r, &since)) return "since: not an unsigned integer"; have |= 1; }
        else if (klen == 7 && !memcmp(key, "version", 7)) { if (get_uint(&r, &next)) return "version: not an unsigned integer"; have |= 2; }
        else if (klen == 7 && !memcmp(key, "counter", 7)) { if (get_uint(&r, &count)) return "counter: not an unsigned integer"; have |= 4; }
        else return "unknown field";
    }
    if (have != 7) return "since, version and counter are required";
    *status = 204;
    if (next <= version) return NULL;  /* had it already */
    if (since != version) { *status = 409; return "the delta is not since the version this stage has"; }
    counter = count;
    version = next;
    return NULL;
}

static void serve_delta(int fd, uint64_t since) {
    unsigned char body[64], *p = body;
    *p++ = 0x83;
    *p++ = 0xa5; memcpy(p, "since", 5); p += 5;
    *p++ = 0xcf; put_be(p, since, 8); p += 8;
    *p++ = 0xa7; memcpy(p, "version", 7); p += 7;
    *p++ = 0xcf; put_be(p, version, 8); p += 8;
    *p++ = 0xa7; memcpy(p, "counter", 7); p += 7;
    *p++ = 0xcf; put_be(p, counter, 8); p += 8;
    respond(fd, 200, "OK", "application/msgpack", body, (size_t)(p - body));
}

static void serve_state(int fd, int with_version) {
    size_t len;
    unsigned char *body = encode(&len, with_version);
    if (!body) { text(fd, 500, "Internal Server Error", "out of memory"); return; }
    respond(fd, 200, "OK", "application/msgpack", body, len);
    free(body);
}

static void handle(int fd, const char *method, const char *path, const unsigned char *body, size_t len) {
    if (!strcmp(path, "/healthz")) {
        if (!strcmp(fault, "health")) text(fd, 503, "Service Unavailable", "sick");
        else text(fd, 200, "OK", "ok");
    } else if (!strcmp(path, "/work") && !strcmp(method, "POST")) {
        if (handing_over) { text(fd, 503, "Service Unavailable", "handing over"); return; }
        char msg[128];
        counter++;
        version++;
        snprintf(msg, sizeof msg, "%s %llu", name, (unsigned long long)counter);
        text(fd, 200, "OK", msg);
    } else if (!strcmp(path, "/buffer") && !strcmp(method, "GET")) {
        respond(fd, 200, "OK", "application/octet-stream", buffer, buffer_len);
    } else if (!strcmp(path, "/state") && !strcmp(method, "GET")) {
        serve_state(fd, 0);
    } else if (!strcmp(path, "/state/snapshot") && !strcmp(method, "POST")) {
        serve_state(fd, 1);
    } else if (!strcmp(path, "/state/export") && !strcmp(method, "POST")) {
        if (!strcmp(fault, "export")) { text(fd, 500, "Internal Server Error", "export refused (fault)"); return; }
        handing_over = 1;
        settle_answers(fd);
        serve_state(fd, 0);
    } else if (!strncmp(path, "/state/export?since=", 20) && !strcmp(method, "POST")) {
        if (!strcmp(fault, "export")) { text(fd, 500, "Internal Server Error", "export refused (fault)"); return; }
        handing_over = 1;
        settle_answers(fd);
        serve_delta(fd, strtoull(path + 20, NULL, 10));
    } else if (!strcmp(path, "/state") && !strcmp(method, "PATCH")) {
        if (!strcmp(fault, "delta")) { text(fd, 500, "Internal Server Error", "delta refused (fault)"); return; }
        int status;
        const char *why = apply_delta(body, len, &status);
        if (why) text(fd, status, status == 409 ? "Conflict" : "Bad Request", why);
        else respond(fd, 204, "No Content", "text/plain", NULL, 0);
    } else if (!strcmp(path, "/state") && !strcmp(method, "PUT")) {
        if (!strcmp(fault, "import")) { text(fd, 500, "Internal Server Error", "import refused (fault)"); return; }
        const char *why = load(body, len);
        if (why) { text(fd, 400, "Bad Request", why); return; }
        respond(fd, 204, "No Content", "text/plain", NULL, 0);
        if (!strcmp(fault, "switch")) { close(fd); _exit(3); }
    } else if (!strcmp(path, "/state/resume") && !strcmp(method, "POST")) {
        handing_over = 0;
        respond(fd, 204, "No Content", "text/plain", NULL, 0);
    } else {
        text(fd, 404, "Not Found", "no such endpoint");
    }
}

/* One request from fd (head holds `*got` bytes read ahead); 1 to read another on this connection. */
static int one_request(int fd, char *head, size_t *got) {
    char *end = strstr(head, "\r\n\r\n");
    while (!end) {
        if (*got == MAX_HEADER) return 0;
        ssize_t n = read(fd, head + *got, MAX_HEADER - *got);
        if (n <= 0) return 0;
        *got += (size_t)n;
        head[*got] = 0;
        end = strstr(head, "\r\n\r\n");
    }
    char method[16], path[256];
    if (sscanf(head, "%15s %255s", method, path) != 2) return 0;
    long length = 0;
    keep_alive = 0;
    for (char *line = strstr(head, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
        if (!strncasecmp(line + 2, "Content-Length:", 15)) length = strtol(line + 17, NULL, 10);
        if (!strncasecmp(line + 2, "Connection: keep-alive", 22)) keep_alive = 1;
    }
    if (length < 0 || length > MAX_BODY) { text(fd, 413, "Payload Too Large", "body too large"); return 0; }
    size_t header_len = (size_t)(end + 4 - head);
    size_t have = *got - header_len;
    size_t extra = have > (size_t)length ? have - (size_t)length : 0;  /* the next request, read ahead */
    unsigned char *body = malloc((size_t)length + 1);
    if (!body) return 0;
    memcpy(body, end + 4, have < (size_t)length ? have : (size_t)length);
    while (have < (size_t)length) {
        ssize_t n = read(fd, body + have, (size_t)length - have);
        if (n <= 0) { free(body); return 0; }
        have += (size_t)n;
    }
    pthread_mutex_lock(&state_lock);
    handle(fd, method, path, body, (size_t)length);
    pthread_mutex_unlock(&state_lock);
    free(body);
    memmove(head, head + header_len + (size_t)length, extra);
    *got = extra;
    head[*got] = 0;
    return keep_alive;
}

/* A connection: one request (Connection: close), or requests until the client closes it when it
 * asks for keep-alive. Each connection has a thread; requests are handled one at a time. */
static void *connection(void *arg) {
    int fd = (int)(intptr_t)arg;
    char head[MAX_HEADER + 1];
    size_t got = 0;
    head[0] = 0;
    track(fd, 1);
    while (one_request(fd, head, &got)) {}
    track(fd, 0);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: stage NAME PORT SEED_BYTES FAULT [VOLUME]\n");
        return 2;
    }
    name = argv[1];
    int port = atoi(argv[2]);
    size_t seed = (size_t)strtoull(argv[3], NULL, 10);
    fault = argv[4];
    volume = argc == 6 ? argv[5] : NULL;
    unsigned char *first = new_buffer(seed);
    if (!first) { perror("stage: buffer"); return 1; }
    set_buffer(first, seed);
    for (size_t i = 0; i < buffer_len; i++) buffer[i] = (unsigned char)(i % 251);
    snprintf(trail, sizeof trail, "%s", name);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGPIPE, SIG_IGN);

    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) || listen(srv, 64)) {
        perror("stage: listen");
        return 1;
    }
    fprintf(stderr, "stage %s: listening on %d, fault %s\n", name, port, fault);
    for (;;) {
        int fd = accept(srv, NULL, NULL);
        if (fd < 0) continue;
        struct timeval tv = {.tv_sec = 5};  /* a client that stops sending does not hold the stage */
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  /* an answer goes out as written */
        pthread_t thread;
        if (pthread_create(&thread, NULL, connection, (void *)(intptr_t)fd)) { close(fd); continue; }
        pthread_detach(thread);
    }
}
