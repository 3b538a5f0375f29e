/*
 * An LD_PRELOAD fault shim for tests/fault_shim.rs: fails the Nth write, fsync or
 * rename that a process makes on files under one directory.
 *
 * sled's own files bypass instastate's I/O code, so the only way to fail them is to
 * fail the real calls. The test builds this file at run time with
 *     cc -shared -fPIC -O1 -o libfault.so tests/shim/fault.c -ldl
 * and starts a child with LD_PRELOAD pointing at the result.
 *
 * Configuration, read once when the library is loaded:
 *   INSTASTATE_FAULT_OP      write | fsync | rename; unset or empty: the shim does nothing.
 *                            write:  write, pwrite, pwrite64, writev, pwritev, pwritev64,
 *                                    pwritev2, copy_file_range and sendfile (std's
 *                                    fs::copy), ftruncate and fallocate;
 *                            fsync:  fsync, fdatasync, sync_file_range;
 *                            rename: rename, renameat, renameat2.
 *   INSTASTATE_FAULT_NTH     1-based: the Nth matching call fails. 0: none fails, the
 *                            matching calls are only counted (see INSTASTATE_FAULT_LOG).
 *   INSTASTATE_FAULT_ACTION  eio | enospc: the call fails with that errno without
 *                            being made; kill: kill(getpid(), SIGKILL) just before it.
 *   INSTASTATE_FAULT_STICKY  1: every matching call after the Nth fails too (a dead
 *                            disk); otherwise only the Nth does.
 *   INSTASTATE_FAULT_DIR     only calls on files under this absolute directory count:
 *                            fd-based calls resolve their file through
 *                            /proc/self/fd/N, a rename counts if either path is under it.
 *   INSTASTATE_FAULT_LOG     a file that gets one line per injected fault,
 *                                fired <call> <n> <path>
 *                            (the first 16 only) and, when the process exits normally,
 *                                calls <op> <count>
 *                            so that the test knows whether its fault was reached and
 *                            how many matching calls a clean run makes.
 *
 * Matching calls are counted with an atomic counter, since sled writes from several
 * threads. The shim never calls a function it intercepts except through the real
 * function pointer, so it cannot recurse into itself.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum op { OP_NONE, OP_WRITE, OP_FSYNC, OP_RENAME };
enum action { ACTION_EIO, ACTION_ENOSPC, ACTION_KILL };

/* How many faults are logged, so that a sticky fault cannot fill the disk. */
#define LOGGED_FAULTS 16

static pthread_once_t configured = PTHREAD_ONCE_INIT;
static enum op fault_op = OP_NONE;
static long fault_nth = 0;
static enum action fault_action = ACTION_EIO;
static int fault_sticky = 0;
static char fault_dir[PATH_MAX];
static size_t fault_dir_len = 0;
static int log_fd = -1;
static atomic_long matched = 0;
static atomic_long fired = 0;

static ssize_t (*log_write)(int, const void *, size_t);

/* Resolves the real `name` once; `slot` caches it. Returns NULL if libc lacks it. */
static void *real(void *_Atomic *slot, const char *name) {
    void *fn = atomic_load(slot);
    if (fn == NULL) {
        fn = dlsym(RTLD_NEXT, name);
        atomic_store(slot, fn);
    }
    return fn;
}

/* Declares `real_<name>`, the next definition of `name` (libc's), with its type. */
#define REAL(name)                                                     \
    static void *_Atomic real_##name##_slot = NULL;                   \
    __typeof__(&name) real_##name = real(&real_##name##_slot, #name); \
    if (real_##name == NULL) {                                         \
        errno = ENOSYS;                                                \
        return -1;                                                     \
    }

static void configure(void) {
    log_write = (ssize_t(*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    const char *op = getenv("INSTASTATE_FAULT_OP");
    if (op == NULL || log_write == NULL) return;
    if (strcmp(op, "write") == 0) fault_op = OP_WRITE;
    else if (strcmp(op, "fsync") == 0) fault_op = OP_FSYNC;
    else if (strcmp(op, "rename") == 0) fault_op = OP_RENAME;
    else return;
    const char *nth = getenv("INSTASTATE_FAULT_NTH");
    fault_nth = nth == NULL ? 0 : strtol(nth, NULL, 10);
    const char *action = getenv("INSTASTATE_FAULT_ACTION");
    if (action != NULL && strcmp(action, "enospc") == 0) fault_action = ACTION_ENOSPC;
    else if (action != NULL && strcmp(action, "kill") == 0) fault_action = ACTION_KILL;
    else fault_action = ACTION_EIO;
    const char *sticky = getenv("INSTASTATE_FAULT_STICKY");
    fault_sticky = sticky != NULL && strcmp(sticky, "1") == 0;
    const char *dir = getenv("INSTASTATE_FAULT_DIR");
    if (dir != NULL && strlen(dir) < sizeof fault_dir) {
        strcpy(fault_dir, dir);
        fault_dir_len = strlen(fault_dir);
        while (fault_dir_len > 1 && fault_dir[fault_dir_len - 1] == '/') {
            fault_dir[--fault_dir_len] = '\0';
        }
    }
    const char *log = getenv("INSTASTATE_FAULT_LOG");
    if (log != NULL && *log != '\0') {
        log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    }
}

static void ensure_configured(void) { pthread_once(&configured, configure); }

__attribute__((constructor)) static void load(void) { ensure_configured(); }

static const char *op_name(enum op op) {
    switch (op) {
    case OP_WRITE: return "write";
    case OP_FSYNC: return "fsync";
    case OP_RENAME: return "rename";
    default: return "none";
    }
}

__attribute__((destructor)) static void unload(void) {
    if (log_fd < 0 || fault_op == OP_NONE) return;
    char line[128];
    int len = snprintf(line, sizeof line, "calls %s %ld\n", op_name(fault_op),
                       atomic_load(&matched));
    if (len > 0) log_write(log_fd, line, (size_t)len);
}

/* Whether `path` is the fault directory or inside it. */
static int under_dir(const char *path) {
    if (fault_dir_len == 0) return 1;
    if (strncmp(path, fault_dir, fault_dir_len) != 0) return 0;
    char next = path[fault_dir_len];
    return next == '\0' || next == '/' || (fault_dir_len == 1 && fault_dir[0] == '/');
}

/* The path of open file `fd` into `out` (empty if unknown). */
static void fd_path(int fd, char *out, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, out, size - 1);
    out[len < 0 ? 0 : len] = '\0';
}

/* `path` relative to directory fd `dirfd` (or the working directory), made absolute
 * into `out` without touching the file system beyond /proc (it may not exist yet). */
static void at_path(int dirfd, const char *path, char *out, size_t size) {
    if (path == NULL) {
        out[0] = '\0';
        return;
    }
    if (path[0] == '/') {
        snprintf(out, size, "%s", path);
        return;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (getcwd(base, sizeof base) == NULL) base[0] = '\0';
    } else {
        fd_path(dirfd, base, sizeof base);
    }
    snprintf(out, size, "%s/%s", base, path);
}

/*
 * Counts one call of `op` whose file is `path` if it matches, and decides its fate:
 * 0 to make the call, or the errno it fails with. Kills the process for the kill
 * action. `shown` is what the log names.
 */
static int decide(enum op op, const char *call, const char *path, const char *shown) {
    ensure_configured();
    if (fault_op != op || !under_dir(path)) return 0;
    long n = atomic_fetch_add(&matched, 1) + 1;
    int hit = fault_nth > 0 && (n == fault_nth ||
                                (fault_sticky && n > fault_nth && fault_action != ACTION_KILL));
    if (!hit) return 0;
    if (log_fd >= 0 && atomic_fetch_add(&fired, 1) < LOGGED_FAULTS) {
        char line[PATH_MAX * 2 + 96];
        int len = snprintf(line, sizeof line, "fired %s %ld %s\n", call, n, shown);
        if (len > (int)sizeof line - 1) {
            len = (int)sizeof line - 1;
            line[len - 1] = '\n';
        }
        if (len > 0) log_write(log_fd, line, (size_t)len);
    }
    switch (fault_action) {
    case ACTION_KILL:
        kill(getpid(), SIGKILL);
        /* SIGKILL cannot be caught or blocked; wait for it to land. */
        for (;;) pause();
    case ACTION_ENOSPC: return ENOSPC;
    default: return EIO;
    }
}

static int decide_fd(enum op op, const char *call, int fd) {
    ensure_configured();
    if (fault_op != op) return 0;
    char path[PATH_MAX];
    fd_path(fd, path, sizeof path);
    return decide(op, call, path, path);
}

static int decide_rename(const char *call, int olddirfd, const char *oldpath, int newdirfd,
                         const char *newpath) {
    ensure_configured();
    if (fault_op != OP_RENAME) return 0;
    char from[PATH_MAX], to[PATH_MAX];
    at_path(olddirfd, oldpath, from, sizeof from);
    at_path(newdirfd, newpath, to, sizeof to);
    char shown[PATH_MAX * 2 + 8];
    snprintf(shown, sizeof shown, "%s -> %s", from, to);
    return decide(OP_RENAME, call, under_dir(from) ? from : to, shown);
}

/* Fails the call with `err` (returning -1) unless `err` is 0. */
#define FAIL_IF(err)          \
    do {                      \
        int fail_ = (err);    \
        if (fail_ != 0) {     \
            errno = fail_;    \
            return -1;        \
        }                     \
    } while (0)

/* ---- write ---------------------------------------------------------------------- */

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    FAIL_IF(decide_fd(OP_WRITE, "write", fd));
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    FAIL_IF(decide_fd(OP_WRITE, "pwrite", fd));
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64);
    FAIL_IF(decide_fd(OP_WRITE, "pwrite64", fd));
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    FAIL_IF(decide_fd(OP_WRITE, "writev", fd));
    return real_writev(fd, iov, iovcnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(pwritev);
    FAIL_IF(decide_fd(OP_WRITE, "pwritev", fd));
    return real_pwritev(fd, iov, iovcnt, offset);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t offset) {
    REAL(pwritev64);
    FAIL_IF(decide_fd(OP_WRITE, "pwritev64", fd));
    return real_pwritev64(fd, iov, iovcnt, offset);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) {
    REAL(pwritev2);
    FAIL_IF(decide_fd(OP_WRITE, "pwritev2", fd));
    return real_pwritev2(fd, iov, iovcnt, offset, flags);
}

ssize_t copy_file_range(int fd_in, off64_t *off_in, int fd_out, off64_t *off_out, size_t len,
                        unsigned int flags) {
    REAL(copy_file_range);
    FAIL_IF(decide_fd(OP_WRITE, "copy_file_range", fd_out));
    return real_copy_file_range(fd_in, off_in, fd_out, off_out, len, flags);
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
    REAL(sendfile);
    FAIL_IF(decide_fd(OP_WRITE, "sendfile", out_fd));
    return real_sendfile(out_fd, in_fd, offset, count);
}

ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count) {
    REAL(sendfile64);
    FAIL_IF(decide_fd(OP_WRITE, "sendfile64", out_fd));
    return real_sendfile64(out_fd, in_fd, offset, count);
}

int ftruncate(int fd, off_t length) {
    REAL(ftruncate);
    FAIL_IF(decide_fd(OP_WRITE, "ftruncate", fd));
    return real_ftruncate(fd, length);
}

int ftruncate64(int fd, off64_t length) {
    REAL(ftruncate64);
    FAIL_IF(decide_fd(OP_WRITE, "ftruncate64", fd));
    return real_ftruncate64(fd, length);
}

int fallocate(int fd, int mode, off_t offset, off_t len) {
    REAL(fallocate);
    FAIL_IF(decide_fd(OP_WRITE, "fallocate", fd));
    return real_fallocate(fd, mode, offset, len);
}

int fallocate64(int fd, int mode, off64_t offset, off64_t len) {
    REAL(fallocate64);
    FAIL_IF(decide_fd(OP_WRITE, "fallocate64", fd));
    return real_fallocate64(fd, mode, offset, len);
}

/* ---- fsync ---------------------------------------------------------------------- */

int fsync(int fd) {
    REAL(fsync);
    FAIL_IF(decide_fd(OP_FSYNC, "fsync", fd));
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    FAIL_IF(decide_fd(OP_FSYNC, "fdatasync", fd));
    return real_fdatasync(fd);
}

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags) {
    REAL(sync_file_range);
    FAIL_IF(decide_fd(OP_FSYNC, "sync_file_range", fd));
    return real_sync_file_range(fd, offset, nbytes, flags);
}

/* ---- rename --------------------------------------------------------------------- */

int rename(const char *oldpath, const char *newpath) {
    REAL(rename);
    FAIL_IF(decide_rename("rename", AT_FDCWD, oldpath, AT_FDCWD, newpath));
    return real_rename(oldpath, newpath);
}

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    REAL(renameat);
    FAIL_IF(decide_rename("renameat", olddirfd, oldpath, newdirfd, newpath));
    return real_renameat(olddirfd, oldpath, newdirfd, newpath);
}

int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
              unsigned int flags) {
    REAL(renameat2);
    FAIL_IF(decide_rename("renameat2", olddirfd, oldpath, newdirfd, newpath));
    return real_renameat2(olddirfd, oldpath, newdirfd, newpath, flags);
}
