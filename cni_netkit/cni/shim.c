/*
 * The production `netkit` executable: a thin client of the node agent.
 *
 * It does exactly what cni_netkit/cni/client.py's relay() does, without the
 * cost of starting an interpreter (~0.3 s in the test VM, against ~70 ms for a
 * whole Go plugin): read stdin, offer the request to the agent's unix socket,
 * and either print the agent's answer with its exit status, or exec the
 * Python plugin (same process, same pid) to run the command itself.  It holds
 * no plugin logic and parses no JSON; the wire format and the decision table
 * are documented at the top of client.py, and tests/unit/test_shim.py holds
 * this file to every row of it.
 *
 *   no socket file (ENOENT)                  -> run it in the plugin, quietly
 *   anything else before GO (refused
 *   connection, timeout, REFUSED, garbage)   -> run it in the plugin, one JSON note on stderr
 *   after GO, agent closed the connection    -> DEL/GC/CHECK/STATUS/VERSION/unknown: plugin;
 *                                               ADD: "agent lost" (error 11)
 *   after GO, agent silent for SILENCE_LIMIT -> CHECK/STATUS/VERSION/unknown: plugin;
 *                                               ADD/DEL/GC: "agent lost" (error 11)
 *
 * "The plugin" is <dir of /proc/self/exe>/netkit-plugin (the PyInstaller
 * build next to this file in the artifact), or $CNI_NETKIT_PLUGIN_EXE.  It
 * gets the stdin bytes read here again (a memfd on fd 0) and
 * CNI_NETKIT_NO_AGENT=1; for "agent lost" also CNI_NETKIT_AGENT_LOST=<why>,
 * on which cni_netkit.cni.entry answers error 11 without doing any work.
 *
 * Build: scripts/build-shim (cc -O2 -static, C11 + POSIX/Linux calls only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "wire.h" /* the wire format's constants, generated from cni/client.py */

extern char **environ;

#define DEFAULT_SOCKET WIRE_DEFAULT_SOCKET
#define PLUGIN_NAME "netkit-plugin"
/* client.READY_TIMEOUT and client.SILENCE_LIMIT (tests compile shorter ones in) */
#ifndef READY_TIMEOUT_MS
#define READY_TIMEOUT_MS WIRE_READY_TIMEOUT_MS
#endif
#ifndef SILENCE_LIMIT_MS
#define SILENCE_LIMIT_MS WIRE_SILENCE_LIMIT_MS
#endif
#define MAX_STDIN WIRE_MAX_STDIN
#define MAX_META WIRE_MAX_META
#define MAX_REFUSAL WIRE_MAX_REFUSAL
#define MAX_REPLY WIRE_MAX_REPLY

/* What happened to the request. */
enum outcome {
    NO_AGENT = 1,  /* no socket: fall back quietly (0: committed) */
    UNUSABLE,  /* failed before GO: fall back with a note */
    CLOSED,    /* after GO: the agent closed the connection */
    SILENT,    /* after GO: nothing for SILENCE_LIMIT */
};

static const char *sock_path;
static char *input;          /* stdin as read */
static size_t input_len;
static int input_ok;         /* 0: stdin unreadable or a terminal: leave fd 0 to the plugin */
static char why[1024];       /* the reason of the last failure */
/* SIGPIPE is ignored while we run (a closed stderr must not kill us before the
 * fallback; a closed stdout means exit 1, as for the Python client) and put
 * back as inherited for the plugin. */
static struct sigaction inherited_sigpipe, ignore_sigpipe = {.sa_handler = SIG_IGN};

static void reason(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
}

/* The last failure's reason behind "prefix: " (copied first: why is source and target). */
static void prefix_reason(const char *prefix)
{
    char tmp[sizeof why];
    memcpy(tmp, why, sizeof tmp);
    reason("%s: %s", prefix, tmp);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- output ---- */

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A JSON string literal of s (valid UTF-8 passes, other bytes become U+FFFD), cut to fit cap. */
static size_t json_str(char *out, size_t cap, const char *s)
{
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)s;
    out[o++] = '"';
    while (*p) {
        char unit[8];
        size_t n = 0, used = 1;
        unsigned char c = *p;
        if (c == '"' || c == '\\') {
            unit[n++] = '\\';
            unit[n++] = (char)c;
        } else if (c < 0x20) {
            n = (size_t)snprintf(unit, sizeof unit, "\\u%04x", c);
        } else if (c < 0x80) {
            unit[n++] = (char)c;
        } else {
            size_t len = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
            int ok = len > 0;
            for (size_t i = 1; ok && i < len; i++)
                ok = (p[i] & 0xc0) == 0x80;
            if (ok) {
                memcpy(unit, p, len);
                n = used = len;
            } else {
                memcpy(unit, "\\ufffd", 6);
                n = 6;
            }
        }
        if (o + n + 2 > cap)
            break; /* room for the closing quote and NUL */
        memcpy(out + o, unit, n);
        o += n;
        p += used;
    }
    out[o++] = '"';
    out[o] = '\0';
    return o;
}

/* One JSON line on stderr, as client._note writes it: why the agent was not used. */
static void note(const char *text)
{
    char r[2200], s[2200], line[4800];
    json_str(r, sizeof r, text);
    json_str(s, sizeof s, sock_path);
    int n = snprintf(line, sizeof line,
                     "{\"level\": \"warning\", \"event\": \"node agent not used, running the "
                     "command in this process\", \"reason\": %s, \"socket\": %s, \"pid\": %d}\n",
                     r, s, (int)getpid());
    if (n > 0)
        (void)write_all(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* ------------------------------------------------------------------ stdin ---- */

/* 0: read (or none to read); -1: unreadable, the plugin must read fd 0 itself and report it. */
static int read_stdin(void)
{
    input = malloc(MAX_STDIN);
    if (!input || isatty(0))
        return 0; /* a terminal is a person, not a runtime: the plugin sees no config either */
    while (input_len < MAX_STDIN) {
        ssize_t n = read(0, input + input_len, MAX_STDIN - input_len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            input_len = 0;
            /* no fd 0 at all is no stdin (Python's sys.stdin is None): relayed as empty */
            return errno == EBADF ? 0 : -1;
        }
        if (n == 0)
            break;
        input_len += (size_t)n;
    }
    input_ok = 1;
    return 0;
}

/* ----------------------------------------------------------- the plugin ---- */

static int env_named(const char *entry, const char *key)
{
    size_t k = strlen(key);
    return strncmp(entry, key, k) == 0 && entry[k] == '=';
}

/* Exec the Python plugin with stdin re-supplied and `extra` (NULL-terminated) in its environment. */
static void __attribute__((noreturn)) run_plugin(const char *lost)
{
    char target[PATH_MAX + 32], problem[2 * PATH_MAX + 128];
    const char *exe = getenv("CNI_NETKIT_PLUGIN_EXE");
    if (!exe || !*exe) {
        ssize_t n = readlink("/proc/self/exe", target, PATH_MAX);
        char *slash = n > 0 ? memrchr(target, '/', (size_t)n) : NULL;
        if (!slash) {
            snprintf(problem, sizeof problem, "%s", "/proc/self/exe is unreadable");
            goto fail;
        }
        strcpy(slash + 1, PLUGIN_NAME);
        exe = target;
    }
    if (input_ok) {
        int fd = memfd_create("netkit-stdin", MFD_CLOEXEC);
        if (fd < 0 || write_all(fd, input, input_len) < 0 || lseek(fd, 0, SEEK_SET) < 0 ||
            dup2(fd, 0) < 0) {
            snprintf(problem, sizeof problem, "cannot replay stdin to the plugin: %s",
                     strerror(errno));
            goto fail;
        }
        close(fd);
    }
    size_t n = 0;
    for (char **e = environ; *e; e++)
        n++;
    char **env = calloc(n + 3, sizeof *env);
    char *lost_entry = NULL;
    if (!env)
        goto nomem;
    size_t j = 0;
    for (char **e = environ; *e; e++)
        if (!env_named(*e, "CNI_NETKIT_NO_AGENT") && !env_named(*e, "CNI_NETKIT_AGENT_LOST"))
            env[j++] = *e;
    env[j++] = "CNI_NETKIT_NO_AGENT=1";
    if (lost) {
        size_t len = strlen("CNI_NETKIT_AGENT_LOST=") + strlen(lost) + 1;
        lost_entry = malloc(len);
        if (!lost_entry)
            goto nomem;
        snprintf(lost_entry, len, "CNI_NETKIT_AGENT_LOST=%s", lost);
        env[j++] = lost_entry;
    }
    env[j] = NULL;
    char *argv[] = {(char *)exe, NULL};
    sigaction(SIGPIPE, &inherited_sigpipe, NULL); /* the plugin starts as we were started */
    execve(exe, argv, env);
    sigaction(SIGPIPE, &ignore_sigpipe, NULL);
    snprintf(problem, sizeof problem, "cannot execute %s: %s", exe, strerror(errno));
    goto fail;
nomem:
    snprintf(problem, sizeof problem, "%s", "out of memory");
fail:;
    /* What entry.py answers when it cannot tell the request's version: the newest. */
    char msg[64], details[2 * PATH_MAX + 300], out[2 * PATH_MAX + 500];
    json_str(msg, sizeof msg, "cannot run the netkit plugin");
    json_str(details, sizeof details, problem);
    int len = snprintf(out, sizeof out,
                       "{\"cniVersion\": \"1.1.0\", \"code\": 999, \"msg\": %s, \"details\": %s}\n",
                       msg, details);
    if (len > 0)
        (void)write_all(1, out, (size_t)len);
    _exit(1);
}

/* ------------------------------------------------------------- protocol ---- */

/* Wait for `events` on fd until deadline (ms, monotonic): 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, left > INT_MAX ? INT_MAX : (int)left);
        if (r > 0)
            return 1;
        if (r == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* 0 sent, -1 error (why set), -2 timed out. */
static int send_all(int fd, const void *buf, size_t len, int64_t deadline)
{
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n >= 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            reason("%s", strerror(errno));
            return -1;
        }
        int w = wait_fd(fd, POLLOUT, deadline);
        if (w == 0)
            return -2;
        if (w < 0) {
            reason("%s", strerror(errno));
            return -1;
        }
    }
    return 0;
}

/*
 * Exactly len bytes. deadline: an absolute one (before GO); silence_ms > 0
 * instead restarts the clock at every byte received (after GO).
 * 0 got them, -1 closed or error (why set), -2 timed out.
 */
static int recv_exactly(int fd, void *buf, size_t len, int64_t deadline, int silence_ms)
{
    char *p = buf;
    while (len) {
        int64_t until = silence_ms > 0 ? now_ms() + silence_ms : deadline;
        int w = wait_fd(fd, POLLIN, until);
        if (w == 0)
            return -2;
        if (w < 0) {
            reason("%s", strerror(errno));
            return -1;
        }
        ssize_t n = recv(fd, p, len, 0);
        if (n == 0) {
            reason("connection closed");
            return -1;
        }
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            reason("%s", strerror(errno));
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static uint32_t get_u32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static void put_u32(unsigned char *b, uint32_t v)
{
    b[0] = (unsigned char)(v >> 24);
    b[1] = (unsigned char)(v >> 16);
    b[2] = (unsigned char)(v >> 8);
    b[3] = (unsigned char)v;
}

/* A length-prefixed block of at most limit bytes into a fresh buffer (NUL-terminated). */
static int recv_block(int fd, char **out, uint32_t *len, uint32_t limit, int64_t deadline,
                      int silence_ms)
{
    unsigned char head[4];
    int r = recv_exactly(fd, head, 4, deadline, silence_ms);
    if (r)
        return r;
    *len = get_u32(head);
    if (*len > limit) {
        reason("block of %u bytes exceeds %u", *len, limit);
        return -1;
    }
    *out = malloc((size_t)*len + 1);
    if (!*out) {
        reason("out of memory");
        return -1;
    }
    (*out)[*len] = '\0';
    return recv_exactly(fd, *out, *len, deadline, silence_ms);
}

/* A growable byte buffer for the request. */
struct buf {
    char *data;
    size_t len, cap;
};

static int put(struct buf *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static int put_str(struct buf *b, const char *s)
{
    return put(b, s, strlen(s));
}

/*
 * Reserve a u32 length in front of what follows; end_frame fills it in.
 * 0 when the allocation failed (a frame's content never starts before byte 4):
 * end_frame then fails too, and never writes in front of the buffer.
 */
static size_t begin_frame(struct buf *b)
{
    unsigned char zero[4] = {0};
    if (put(b, zero, 4))
        return 0;
    return b->len;
}

static int end_frame(struct buf *b, size_t start)
{
    if (!b->data || start < 4 || start > b->len)
        return -1;
    put_u32((unsigned char *)b->data + start - 4, (uint32_t)(b->len - start));
    return 0;
}

/* client.ns_id: "dev:ino" of path (stat follows links), "-" when there is none. */
static void ns_id(const char *path, char *out, size_t cap)
{
    struct stat st;
    if (!path || !*path || stat(path, &st) != 0)
        snprintf(out, cap, "-");
    else
        snprintf(out, cap, "%llu:%llu", (unsigned long long)st.st_dev,
                 (unsigned long long)st.st_ino);
}

/* client.path_id: "probe=dev:ino" of path or of its nearest existing ancestor. */
static int put_path_id(struct buf *b, const char *path)
{
    char *probe = strdup(path);
    char id[64];
    if (!probe)
        return -1;
    for (;;) {
        ns_id(probe, id, sizeof id);
        if (strcmp(id, "-") != 0 || strcmp(probe, "/") == 0 || !*probe)
            break;
        char *slash = strrchr(probe, '/');
        if (!slash)
            break; /* relative: the agent sends none */
        if (slash == probe)
            slash[1] = '\0';
        else
            *slash = '\0';
    }
    int r = put_str(b, probe) || put_str(b, "=") || put_str(b, id);
    free(probe);
    return r ? -1 : 0;
}

/* The request: MAGIC, env block, identity block, stdin block. */
static int build_request(struct buf *b)
{
    char id[64];
    int bad = put(b, WIRE_MAGIC, 4);
    size_t start = begin_frame(b);
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e)
            continue;
        size_t klen = (size_t)(eq - *e);
        if (!(strncmp(*e, "CNI_", 4) == 0 || (klen == 4 && strncmp(*e, "PATH", 4) == 0)))
            continue;
        /* os.environ keeps the first of duplicate names: so do we */
        int dup = 0;
        for (char **f = environ; f < e && !dup; f++)
            dup = strncmp(*f, *e, klen + 1) == 0;
        if (!dup)
            bad |= put(b, *e, strlen(*e) + 1);
    }
    bad |= end_frame(b, start);
    start = begin_frame(b);
    ns_id("/proc/self/ns/net", id, sizeof id);
    bad |= put_str(b, "netns=") || put(b, id, strlen(id) + 1);
    ns_id(getenv("CNI_NETNS"), id, sizeof id);
    bad |= put_str(b, "cni_netns=") || put(b, id, strlen(id) + 1);
    bad |= end_frame(b, start);
    start = begin_frame(b);
    bad |= put(b, input ? input : "", input_len);
    bad |= end_frame(b, start);
    return bad || !b->data ? -1 : 0;
}

/* Answer VIEW: the paths block in, "key=path_id(path)\0..." framed out. */
static int answer_view(int fd, int64_t deadline)
{
    char *paths = NULL;
    uint32_t len = 0;
    struct buf ids = {0};
    int r = recv_block(fd, &paths, &len, MAX_META, deadline, 0);
    if (r)
        goto out;
    r = -1;
    if (len && paths[len - 1] != '\0') {
        reason("view block not NUL-terminated");
        goto out;
    }
    size_t start = begin_frame(&ids);
    if (!start) {
        reason("out of memory");
        goto out;
    }
    for (char *item = paths; item < paths + len; item += strlen(item) + 1) {
        char *eq = strchr(item, '=');
        if (!eq || eq == item) {
            reason("malformed view entry");
            goto out;
        }
        if (put(&ids, item, (size_t)(eq - item) + 1) || put_path_id(&ids, eq + 1) ||
            put(&ids, "", 1)) {
            reason("out of memory");
            goto out;
        }
    }
    if (end_frame(&ids, start)) {
        reason("out of memory");
        goto out;
    }
    r = send_all(fd, ids.data, ids.len, deadline);
out:
    free(paths);
    free(ids.data);
    return r;
}

/* Connect, offer, wait for READY, send GO. 0 committed; else NO_AGENT or UNUSABLE (why set). */
static int offer(int fd)
{
    int64_t deadline = now_ms() + READY_TIMEOUT_MS;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof addr.sun_path) {
        reason("agent unusable: socket path too long");
        return UNUSABLE;
    }
    strcpy(addr.sun_path, sock_path);
    /* Non-blocking: a full listen backlog fails at once (EAGAIN) rather than waiting. */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (errno == ENOENT)
            return NO_AGENT;
        if (errno != EINPROGRESS) {
            reason("agent unusable: %s", strerror(errno));
            return UNUSABLE;
        }
        int w = wait_fd(fd, POLLOUT, deadline);
        int err = 0;
        socklen_t elen = sizeof err;
        if (w == 0)
            goto timeout;
        if (w < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0 || err) {
            reason("agent unusable: %s", strerror(err ? err : errno));
            return UNUSABLE;
        }
    }
    struct buf req = {0};
    if (build_request(&req)) {
        free(req.data);
        reason("agent unusable: out of memory");
        return UNUSABLE;
    }
    int r = send_all(fd, req.data, req.len, deadline);
    free(req.data);
    char verdict;
    if (!r)
        r = recv_exactly(fd, &verdict, 1, deadline, 0);
    if (!r && verdict == WIRE_VIEW) {
        r = answer_view(fd, deadline);
        if (!r)
            r = recv_exactly(fd, &verdict, 1, deadline, 0);
    }
    if (r == -2)
        goto timeout;
    if (r) {
        prefix_reason("agent unusable");
        return UNUSABLE;
    }
    if (verdict == WIRE_REFUSED) {
        char *text = NULL;
        uint32_t len = 0;
        r = recv_block(fd, &text, &len, MAX_REFUSAL, deadline, 0);
        if (r == -2)
            goto timeout;
        if (r) {
            prefix_reason("agent unusable");
        } else {
            for (uint32_t i = 0; i < len; i++) /* the reason is text: no NULs in the note */
                if (!text[i])
                    text[i] = '?';
            reason("agent refused: %s", text);
        }
        free(text);
        return UNUSABLE;
    }
    if (verdict != WIRE_READY) {
        reason("agent answered %s instead of ready",
               verdict >= 0x20 && verdict < 0x7f ? (char[]){verdict, 0} : "a stray byte");
        return UNUSABLE;
    }
    /* The commit point: once GO is in the agent's receive queue, it runs the command. */
    r = send_all(fd, (char[]){WIRE_GO}, 1, deadline);
    if (r == -2)
        goto timeout;
    if (r) {
        prefix_reason("agent unusable");
        return UNUSABLE;
    }
    return 0;
timeout:
    reason("agent not ready within %gs", READY_TIMEOUT_MS / 1000.0);
    return UNUSABLE;
}

/* After GO: heartbeats, then the answer; prints it and exits, or returns CLOSED/SILENT. */
static int answer(int fd)
{
    unsigned char kind, status[4];
    char *text = NULL;
    uint32_t len = 0;
    int r;
    do
        r = recv_exactly(fd, &kind, 1, 0, SILENCE_LIMIT_MS);
    while (!r && kind == WIRE_BEAT);
    if (!r && kind != WIRE_ANSWER) {
        reason("stray byte instead of an answer");
        r = -1;
    }
    if (!r)
        r = recv_exactly(fd, status, 4, 0, SILENCE_LIMIT_MS);
    if (!r)
        r = recv_block(fd, &text, &len, MAX_REPLY, 0, SILENCE_LIMIT_MS);
    if (r == -2) {
        reason("agent silent for %gs mid-request", SILENCE_LIMIT_MS / 1000.0);
        return SILENT;
    }
    if (r) {
        prefix_reason("agent ended mid-request");
        return CLOSED;
    }
    close(fd);
    if (write_all(1, text, len) < 0) /* a runtime that stopped reading: exit 1, as the client does */
        _exit(1);
    _exit((int)(get_u32(status) & 0xff));
}

static int member(const char *command, const char *const *set)
{
    for (; *set; set++)
        if (strcmp(command, *set) == 0)
            return 1;
    return 0;
}

int main(void)
{
    static const char *const known[] = {"ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", NULL};
    static const char *const redo_if_closed[] = {"DEL", "GC", "CHECK", "STATUS", "VERSION", NULL};
    static const char *const redo_if_silent[] = {"CHECK", "STATUS", "VERSION", NULL};

    sigaction(SIGPIPE, &ignore_sigpipe, &inherited_sigpipe);
    if (read_stdin() < 0)
        run_plugin(NULL);
    const char *off = getenv("CNI_NETKIT_NO_AGENT");
    if (off && (!strcasecmp(off, "1") || !strcasecmp(off, "true") || !strcasecmp(off, "yes")))
        run_plugin(NULL);
    sock_path = getenv("CNI_NETKIT_AGENT_SOCKET");
    if (!sock_path || !*sock_path)
        sock_path = DEFAULT_SOCKET;
    const char *command = getenv("CNI_COMMAND");
    if (!command)
        command = "";

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        reason("agent unusable: %s", strerror(errno));
        note(why);
        run_plugin(NULL);
    }
    int r = offer(fd);
    if (r == NO_AGENT) {
        close(fd);
        run_plugin(NULL);
    }
    if (r == UNUSABLE) {
        close(fd); /* withdrawn: the agent never acts without GO */
        note(why);
        run_plugin(NULL);
    }
    r = answer(fd);
    close(fd);
    const char *const *redo = r == SILENT ? redo_if_silent : redo_if_closed;
    if (member(command, redo) || !member(command, known)) {
        char text[sizeof why + 64];
        snprintf(text, sizeof text, "%s; running %s here", why, *command ? command : "the command");
        note(text);
        run_plugin(NULL);
    }
    run_plugin(why);
}
