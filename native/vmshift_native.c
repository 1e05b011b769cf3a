/*
 * vmshift_native: the few Linux file syscalls Node does not expose, for FileDevice.
 *
 *   seekData(fd, offset)        lseek(SEEK_DATA); -1 when there is no data at or after offset
 *   seekHole(fd, offset)        lseek(SEEK_HOLE); -1 when offset is at or past the end
 *   punchHole(fd, offset, len)  fallocate(PUNCH_HOLE | KEEP_SIZE): deallocate, reads as zeroes
 *   zeroRange(fd, offset, len)  fallocate(ZERO_RANGE | KEEP_SIZE): reads as zeroes, stays allocated
 *   blockDeviceSize(fd)         ioctl(BLKGETSIZE64): the size of a block device in bytes
 *   writeInline(fd, buffer, offset) -> blockedMs
 *                               pwrite all of buffer on the calling (event-loop) thread; how
 *                               long it slept for it, 0 when it did not (see below)
 *   readInline(fd, buffer, offset) -> blockedMs, -1 or -2
 *                               fill buffer from the page cache only (preadv2 RWF_NOWAIT);
 *                               -1 when not all of it is cached, -2 when the file cannot say
 *                               (no RWF_NOWAIT): the caller reads in the pool
 *   copyRanges(src, dst, ranges, destIsZero, writeback, dropOffset, dropLength) -> Promise<counts>
 *                               copy ranges file-to-file in a libuv worker thread (below)
 *   sendFileBatch(sock, fd, headers, items) -> Promise<{ items, bytes, stop }>
 *                               NBD READ replies straight from the page cache (header, then
 *                               sendfile of the range) in a worker thread (below)
 *   sendable(fd, offset, len)   0 when sendFileBatch would send that range (all data, cached)
 *   dupSocket(fd) -> fd         a descriptor of a socket of its own, for sendFileBatch (below)
 *   setSendBuffer(sock, bytes)  setsockopt(SO_SNDBUF)
 *   lockDisk(fd, exclusive) -> bool
 *                               take vmshift's OFD lock on a disk (below); false when another
 *                               open file holds a conflicting one
 *
 * All calls but copyRanges and sendFileBatch are synchronous: each is one short syscall (writeInline: one
 * pwrite that normally only copies into the page cache). Failures throw an Error whose `code`
 * is the errno name (EOPNOTSUPP, EINVAL, ...), as Node's own fs errors do, so callers map
 * them the same way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <stdlib.h>
#include <node_api.h>

/* Offsets travel as JS numbers: exact up to 2^53, which covers any real disk. */
#define MAX_SAFE ((int64_t)9007199254740991LL)

static napi_value throw_errno(napi_env env, const char *what, int err) {
  char msg[160];
  const char *name = strerrorname_np(err);
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, name ? name : "EIO", msg);
  return NULL;
}

/* Reads argc integer arguments (fd, offsets, lengths) into out[]; throws on bad input. */
static int get_ints(napi_env env, napi_callback_info info, size_t argc, int64_t *out, const char *fn) {
  napi_value argv[3];
  size_t got = 3;
  if (napi_get_cb_info(env, info, &got, argv, NULL, NULL) != napi_ok) return 0;
  if (got < argc) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s: expected %zu arguments, got %zu", fn, argc, got);
    napi_throw_type_error(env, "EINVAL", msg);
    return 0;
  }
  for (size_t i = 0; i < argc; i++) {
    double d;
    if (napi_get_value_double(env, argv[i], &d) != napi_ok || d != (double)(int64_t)d || d < 0 || d > (double)MAX_SAFE) {
      char msg[96];
      snprintf(msg, sizeof msg, "%s: argument %zu must be a non-negative safe integer", fn, i);
      napi_throw_type_error(env, "EINVAL", msg);
      return 0;
    }
    out[i] = (int64_t)d;
  }
  return 1;
}

static napi_value number(napi_env env, int64_t v) {
  napi_value r;
  napi_create_double(env, (double)v, &r);
  return r;
}

static napi_value seek(napi_env env, napi_callback_info info, int whence, const char *fn) {
  int64_t a[2];
  if (!get_ints(env, info, 2, a, fn)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], whence);
  if (r < 0) {
    if (errno == ENXIO) return number(env, -1); /* no data (or offset past the end) */
    return throw_errno(env, fn, errno);
  }
  return number(env, (int64_t)r);
}

static napi_value SeekData(napi_env env, napi_callback_info info) { return seek(env, info, SEEK_DATA, "seekData"); }
static napi_value SeekHole(napi_env env, napi_callback_info info) { return seek(env, info, SEEK_HOLE, "seekHole"); }

static napi_value falloc(napi_env env, napi_callback_info info, int mode, const char *fn) {
  int64_t a[3];
  if (!get_ints(env, info, 3, a, fn)) return NULL;
  if (a[2] == 0) return NULL;
  int r;
  do r = fallocate((int)a[0], mode, (off_t)a[1], (off_t)a[2]);
  while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, fn, errno);
  return NULL;
}

static napi_value PunchHole(napi_env env, napi_callback_info info) {
  return falloc(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "punchHole");
}
static napi_value ZeroRange(napi_env env, napi_callback_info info) {
  return falloc(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "zeroRange");
}

static napi_value BlockDeviceSize(napi_env env, napi_callback_info info) {
  int64_t fd;
  if (!get_ints(env, info, 1, &fd, "blockDeviceSize")) return NULL;
  uint64_t size = 0;
  if (ioctl((int)fd, BLKGETSIZE64, &size) < 0) return throw_errno(env, "blockDeviceSize", errno);
  return number(env, (int64_t)size);
}

/* One writeInline or readInline call: its arguments, and when and how it started. */
typedef struct {
  int fd;
  void *data;
  size_t len;
  off_t off;
  struct rusage before;
  struct timespec t0;
} inline_req;

/* Reads the (fd, Buffer, offset) arguments and starts the clock; throws on bad input. */
static int inline_start(napi_env env, napi_callback_info info, const char *fn, inline_req *r) {
  napi_value argv[3];
  size_t argc = 3;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  double fd_d, off_d;
  bool is_buffer = false;
  if (argc < 3 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || fd_d != (double)(int)fd_d || fd_d < 0 ||
      napi_is_buffer(env, argv[1], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[1], &r->data, &r->len) != napi_ok ||
      napi_get_value_double(env, argv[2], &off_d) != napi_ok || off_d != (double)(int64_t)off_d || off_d < 0 ||
      off_d + (double)r->len > (double)MAX_SAFE) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s: expected (fd, Buffer, non-negative safe offset)", fn);
    napi_throw_type_error(env, "EINVAL", msg);
    return 0;
  }
  r->fd = (int)fd_d;
  r->off = (off_t)off_d;
  getrusage(RUSAGE_THREAD, &r->before);
  clock_gettime(CLOCK_MONOTONIC, &r->t0);
  return 1;
}

/* Milliseconds since the start if the thread slept since (voluntary switches), else 0. */
static napi_value inline_slept_ms(napi_env env, const inline_req *r) {
  struct rusage after;
  getrusage(RUSAGE_THREAD, &after);
  if (after.ru_nvcsw == r->before.ru_nvcsw) return number(env, 0);
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  napi_value ms;
  napi_create_double(env, (double)(t1.tv_sec - r->t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - r->t0.tv_nsec) / 1e6, &ms);
  return ms;
}

/*
 * writeInline: a guest's small write made on the event loop instead of through the thread
 * pool (FileDevice decides when; see src/block/file.ts). A buffered 4 KiB pwrite is a copy
 * into the page cache, a few microseconds; the thread-pool round trip around it (a futex
 * wake-up there, an eventfd wake-up back) costs more CPU than the write, and on a busy
 * host each wake-up is another wait for a CPU. Returns 0 when the thread did not sleep
 * during the write, else how long the write took in milliseconds: it slept when its
 * voluntary context switches went up (dirty-page throttling, a journal or page lock wait,
 * reclaim), and the event loop waited that long. Being preempted for a CPU is not counted:
 * that is not the write's doing. Buffer and offset are validated here; fd is the caller's.
 */
static napi_value WriteInline(napi_env env, napi_callback_info info) {
  inline_req r;
  if (!inline_start(env, info, "writeInline", &r)) return NULL;
  for (size_t done = 0; done < r.len;) {
    ssize_t n = pwrite(r.fd, (const char *)r.data + done, r.len - done, r.off + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return throw_errno(env, "writeInline", errno);
    if (n == 0) return throw_errno(env, "writeInline", EIO);
    done += (size_t)n;
  }
  return inline_slept_ms(env, &r);
}

/*
 * readInline: the read side of writeInline. RWF_NOWAIT makes the kernel answer from the
 * page cache or not at all (EAGAIN), so an uncached read never waits for the disk on the
 * event loop: it returns -1 and FileDevice reads it through the thread pool. So does a
 * partly cached range (a short read). A file without RWF_NOWAIT (EOPNOTSUPP: NFS, FUSE,
 * an older kernel) returns -2, and FileDevice stops asking.
 * Other errors throw, as a pool read would.
 */
static napi_value ReadInline(napi_env env, napi_callback_info info) {
  inline_req r;
  if (!inline_start(env, info, "readInline", &r)) return NULL;
  struct iovec iov = { r.data, r.len };
  ssize_t n;
  do n = preadv2(r.fd, &iov, 1, r.off, RWF_NOWAIT);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) return number(env, -1);
  if (n < 0 && errno == EOPNOTSUPP) return number(env, -2);
  if (n < 0) return throw_errno(env, "readInline", errno);
  if ((size_t)n < r.len) return number(env, -1);
  return inline_slept_ms(env, &r);
}

/*
 * copyRanges: the migration copier's file-to-file fast path. One call copies a batch of
 * ranges (a Float64Array of offset, length pairs: one chunk of a full pass, or up to a few
 * hundred scattered dirty blocks) of src to the same ranges of dst, all in one worker
 * thread; a thread-pool round trip per 4 KiB dirty block capped dirty passes at ~24 MiB/s
 * (measured). In each range, holes in the source (SEEK_DATA/SEEK_HOLE) and 64 KiB blocks
 * that read as zeroes become holes on the destination (punched, or skipped when
 * destIsZero); data is written with pwrite, 64 KiB at a time. With writeback set,
 * sync_file_range(SYNC_FILE_RANGE_WRITE) then starts writing the batch back without
 * waiting; a drop-behind span (dropOffset, dropLength: an earlier call's span, or 0, 0) is
 * waited for and dropped from the page cache. Why native: in JavaScript each chunk is a
 * Buffer and its lseeks and zero checks run on the event loop that also serves the guest's
 * NBD requests; here the event loop sees one completion per batch.
 * Not O_DIRECT (measured): direct reads of the source take ext4's inode lock for the whole
 * disk read, which stalls every guest write behind them; direct writes to the destination
 * made each chunk wait for the disk and the job 20-60% slower than page cache + writeback.
 * The promise resolves to { dataBytes, zeroBytes, skippedBytes } or rejects with an Error
 * whose code is the errno name and whose `side` is "source" or "destination".
 */
#define ZERO_BLOCK (64 * 1024)
static char zeroes[ZERO_BLOCK];

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int src, dst, dest_is_zero, writeback;
  int64_t *ranges; /* offset, length pairs */
  size_t count;
  int64_t lo, hi;              /* span of all ranges */
  int64_t drop_at, drop_len;   /* an earlier call's span to drop from the page cache (len 0: none) */
  /* results */
  int err;
  const char *side, *op;
  int64_t err_at;
  int64_t data_bytes, zero_bytes, skipped_bytes;
} copy_req;

static int fail(copy_req *r, const char *side, const char *op, int64_t at, int err) {
  r->side = side;
  r->op = op;
  r->err_at = at;
  r->err = err;
  return -1;
}

static int read_full(copy_req *r, char *buf, int64_t len, int64_t at) {
  for (int64_t done = 0; done < len;) {
    ssize_t n = pread(r->src, buf + done, (size_t)(len - done), (off_t)(at + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(r, "source", "read", at + done, errno);
    if (n == 0) return fail(r, "source", "read", at + done, EIO); /* file shorter than the range */
    done += n;
  }
  return 0;
}

static int write_full(copy_req *r, const char *buf, int64_t len, int64_t at) {
  for (int64_t done = 0; done < len;) {
    ssize_t n = pwrite(r->dst, buf + done, (size_t)(len - done), (off_t)(at + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(r, "destination", "write", at + done, errno);
    done += n;
  }
  return 0;
}

/* Zero [at, at+len) on the destination as a hole if it can; what FileDevice.writeZeroes does. */
static int zero_dest(copy_req *r, int64_t at, int64_t len) {
  if (len <= 0) return 0;
  if (r->dest_is_zero) {
    r->skipped_bytes += len;
    return 0;
  }
  int modes[2] = { FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE };
  for (int i = 0; i < 2; i++) {
    int rc;
    do rc = fallocate(r->dst, modes[i], (off_t)at, (off_t)len);
    while (rc < 0 && errno == EINTR);
    if (rc == 0) {
      r->zero_bytes += len;
      return 0;
    }
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL && errno != ENOTTY)
      return fail(r, "destination", "write-zeroes", at, errno);
  }
  for (int64_t done = 0; done < len;) { /* no fallocate here: real zeroes */
    int64_t n = len - done < ZERO_BLOCK ? len - done : ZERO_BLOCK;
    if (write_full(r, zeroes, n, at + done) < 0) return -1;
    done += n;
  }
  r->zero_bytes += len;
  return 0;
}

static int is_zero(const char *p, size_t n) {
  /* The first 16 bytes, then the block against itself shifted by 16: memcmp's speed. */
  size_t head = n < 16 ? n : 16;
  for (size_t i = 0; i < head; i++)
    if (p[i]) return 0;
  return n <= 16 || memcmp(p, p + 16, n - 16) == 0;
}

/*
 * Data extent [at, at+len), one 64 KiB block at a time: read it, and write it, or add it to
 * the run of zero blocks that becomes one hole. Small reads and writes are what keep the
 * guest's own writes fast while this runs (measured, docs/storage-migration.md): each syscall
 * holds the files' page-cache locks and a CPU for a few microseconds instead of a
 * millisecond, and the kernel's read-ahead keeps the source streaming all the same.
 */
static int copy_data(copy_req *r, char *buf, int64_t at, int64_t len) {
  int64_t zero_from = -1; /* start of the pending zero run */
  for (int64_t pos = at; pos < at + len; pos += ZERO_BLOCK) {
    int64_t n = at + len - pos < ZERO_BLOCK ? at + len - pos : ZERO_BLOCK;
    if (read_full(r, buf, n, pos) < 0) return -1;
    if (is_zero(buf, (size_t)n)) {
      if (zero_from < 0) zero_from = pos;
      continue;
    }
    if (zero_from >= 0 && zero_dest(r, zero_from, pos - zero_from) < 0) return -1;
    zero_from = -1;
    if (write_full(r, buf, n, pos) < 0) return -1;
    r->data_bytes += n;
  }
  return zero_from >= 0 ? zero_dest(r, zero_from, at + len - zero_from) : 0;
}

/* One range: holes in the source zero the destination, data extents are copied. */
static int copy_range(copy_req *r, char *buf, int64_t offset, int64_t length) {
  int64_t end = offset + length;
  for (int64_t pos = offset; pos < end;) {
    off_t d = lseek(r->src, (off_t)pos, SEEK_DATA);
    if (d < 0 && errno == ENXIO) d = end;                 /* only a hole follows */
    else if (d < 0 && errno == EINVAL) d = pos;           /* no SEEK_DATA here (block device): all data */
    else if (d < 0) return fail(r, "source", "block-status", pos, errno);
    if (d > end) d = end;
    if (d > pos) {
      if (zero_dest(r, pos, d - pos) < 0) return -1;
      pos = d;
      continue;
    }
    off_t h = lseek(r->src, (off_t)pos, SEEK_HOLE);
    if (h < 0 && (errno == ENXIO || errno == EINVAL)) h = end;
    else if (h < 0) return fail(r, "source", "block-status", pos, errno);
    if (h > end) h = end;
    if (h <= pos) h = end;                                /* defensive: never loop in place */
    if (copy_data(r, buf, pos, h - pos) < 0) return -1;
    pos = h;
  }
  return 0;
}

static void copy_execute(napi_env env, void *data) {
  (void)env;
  copy_req *r = data;
  char *buf = malloc(ZERO_BLOCK);
  if (!buf) {
    fail(r, "source", "read", r->lo, ENOMEM);
    return;
  }
  for (size_t i = 0; i < r->count; i++)
    if (copy_range(r, buf, r->ranges[2 * i], r->ranges[2 * i + 1]) < 0) break;
  free(buf);
  if (r->err) return;
  if (r->writeback && r->data_bytes > 0)
    sync_file_range(r->dst, (off_t)r->lo, (off_t)(r->hi - r->lo), SYNC_FILE_RANGE_WRITE); /* advisory */
  if (r->drop_len > 0) {
    /*
     * Drop-behind: the span an earlier call wrote is on its way to disk by now. Wait for it,
     * then let its pages go, so the copy recycles a few megabytes of page cache instead of
     * filling fresh memory with the whole disk (measured: faster, and gentler on the guest).
     * The wait reports a write-back error, and consumes it for this fd: it must fail the copy
     * here, or the job's final flush would not see it.
     */
    if (sync_file_range(r->dst, (off_t)r->drop_at, (off_t)r->drop_len,
                        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) < 0) {
      fail(r, "destination", "write-back", r->drop_at, errno);
      return;
    }
    posix_fadvise(r->dst, (off_t)r->drop_at, (off_t)r->drop_len, POSIX_FADV_DONTNEED); /* advisory */
  }
}

static void set_num(napi_env env, napi_value obj, const char *key, int64_t v) {
  napi_set_named_property(env, obj, key, number(env, v));
}

static void copy_complete(napi_env env, napi_status status, void *data) {
  copy_req *r = data;
  if (status != napi_ok && !r->err) fail(r, "source", "read", r->lo, ECANCELED);
  if (r->err) {
    char msg[200];
    snprintf(msg, sizeof msg, "%s %lld: %s", r->op, (long long)r->err_at, strerror(r->err));
    const char *name = strerrorname_np(r->err);
    napi_value code, text, err, side;
    napi_create_string_utf8(env, name ? name : "EIO", NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text);
    napi_create_error(env, code, text, &err);
    napi_create_string_utf8(env, r->side, NAPI_AUTO_LENGTH, &side);
    napi_set_named_property(env, err, "side", side);
    napi_reject_deferred(env, r->deferred, err);
  } else {
    napi_value obj;
    napi_create_object(env, &obj);
    set_num(env, obj, "dataBytes", r->data_bytes);
    set_num(env, obj, "zeroBytes", r->zero_bytes);
    set_num(env, obj, "skippedBytes", r->skipped_bytes);
    napi_resolve_deferred(env, r->deferred, obj);
  }
  napi_delete_async_work(env, r->work);
  free(r->ranges);
  free(r);
}

/* Largest range one call may copy (the job's --chunk-size limit), and most ranges per call. */
#define COPY_MAX (64 * 1024 * 1024)
#define RANGES_MAX 4096

static napi_value CopyRanges(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  size_t argc = 7;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 7) {
    napi_throw_type_error(env, "EINVAL", "copyRanges: expected 7 arguments");
    return NULL;
  }
  int64_t drop[2];
  for (int i = 0; i < 2; i++) {
    double d;
    if (napi_get_value_double(env, argv[5 + i], &d) != napi_ok || d != (double)(int64_t)d || d < 0 || d > (double)MAX_SAFE) {
      napi_throw_type_error(env, "EINVAL", "copyRanges: the drop-behind offset and length must be non-negative safe integers");
      return NULL;
    }
    drop[i] = (int64_t)d;
  }
  int64_t fds[2];
  for (int i = 0; i < 2; i++) {
    double d;
    if (napi_get_value_double(env, argv[i], &d) != napi_ok || d != (double)(int)d || d < 0) {
      napi_throw_type_error(env, "EINVAL", "copyRanges: fds must be non-negative integers");
      return NULL;
    }
    fds[i] = (int64_t)d;
  }
  bool is_typed = false;
  napi_is_typedarray(env, argv[2], &is_typed);
  napi_typedarray_type type;
  size_t n = 0;
  void *raw = NULL;
  if (!is_typed || napi_get_typedarray_info(env, argv[2], &type, &n, &raw, NULL, NULL) != napi_ok ||
      type != napi_float64_array || n == 0 || n % 2 || n / 2 > RANGES_MAX) {
    napi_throw_type_error(env, "EINVAL", "copyRanges: ranges must be a Float64Array of 1 to 4096 offset, length pairs");
    return NULL;
  }
  copy_req *r = calloc(1, sizeof *r);
  if (r) r->ranges = malloc(n * sizeof(int64_t));
  if (!r || !r->ranges) {
    free(r);
    return throw_errno(env, "copyRanges", ENOMEM);
  }
  /* Copied out of the array now: the worker thread must not touch JavaScript memory. */
  const double *v = raw;
  r->lo = MAX_SAFE;
  for (size_t i = 0; i < n; i += 2) {
    double off = v[i], len = v[i + 1];
    if (off != (double)(int64_t)off || len != (double)(int64_t)len || off < 0 || len < 1 || len > COPY_MAX || off + len > (double)MAX_SAFE) {
      free(r->ranges);
      free(r);
      napi_throw_range_error(env, "EINVAL", "copyRanges: each range needs a safe offset and a length of 1 byte to 64 MiB");
      return NULL;
    }
    r->ranges[i] = (int64_t)off;
    r->ranges[i + 1] = (int64_t)len;
    if (r->ranges[i] < r->lo) r->lo = r->ranges[i];
    if (r->ranges[i] + r->ranges[i + 1] > r->hi) r->hi = r->ranges[i] + r->ranges[i + 1];
  }
  r->count = n / 2;
  bool dest_is_zero = false, writeback = false;
  napi_get_value_bool(env, argv[3], &dest_is_zero);
  napi_get_value_bool(env, argv[4], &writeback);
  r->src = (int)fds[0];
  r->dst = (int)fds[1];
  r->dest_is_zero = dest_is_zero;
  r->writeback = writeback;
  r->drop_at = drop[0];
  r->drop_len = drop[1];
  napi_value promise, name;
  napi_create_promise(env, &r->deferred, &promise);
  napi_create_string_utf8(env, "vmshift.copyRanges", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, copy_execute, copy_complete, r, &r->work);
  napi_queue_async_work(env, r->work);
  return promise;
}

/*
 * sendFileBatch: READ replies from the page cache to the socket without copying them into
 * user space. A reply's bytes would otherwise go through the CPU twice in the server (pread
 * into a buffer, then the socket write out of it: ~45% of the shim's CPU under nbdcopy;
 * docs/performance.md); sendfile hands the socket the file's pages and the reader's recv
 * copies out of them. One worker-thread job sends a batch of replies (each its header, then
 * its range of fd), so the event loop sees one completion per batch, and the batches of
 * several connections run on several threads, as qemu-nbd's and nbdkit's I/O does.
 * The socket is non-blocking (libuv's): the batch stops at the first reply that does not go
 * whole, and says how far it got, for the caller to send the rest its usual way (stop 1:
 * the socket is full; an errno: it failed). A reply whose range is not all data (a hole
 * in it: the caller answers with its own zero detection) or not all in the page cache
 * (sendfile would wait for the disk) is not started (stop 2); stop 3: this kernel cannot
 * tell what is cached (cachestat, Linux 6.5), the caller stops asking.
 * The caller keeps fd open and writes nothing else on the socket until the promise settles.
 * Resolves to { items: sent whole, bytes: sent of the next, stop }.
 */
struct vm_cachestat_range { uint64_t off, len; };
struct vm_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
#define SENDFILE_ITEMS_MAX 1024

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int sock, fd;
  char *headers;
  size_t headers_len;
  int64_t *items; /* header offset, header length, file offset, length */
  size_t count;
  int64_t done_items, done_bytes;
  int stop;
} sendfile_req;

/* 0 when [off, off+len) is all data and all in the page cache; else the stop code. */
static int sendable(int fd, int64_t off, int64_t len) {
  off_t hole = lseek(fd, (off_t)off, SEEK_HOLE);
  if (hole < 0 || hole < (off_t)(off + len)) return 2;
  struct vm_cachestat_range range = { (uint64_t)off, (uint64_t)len };
  struct vm_cachestat cs;
  if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0) return errno == ENOSYS ? 3 : 2;
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  uint64_t pages = ((uint64_t)(off + len) + page - 1) / page - (uint64_t)off / page;
  return cs.nr_cache < pages ? 2 : 0;
}

/*
 * sendable(fd, offset, length) -> 0, 2 or 3: the same test on the event loop (an lseek and a
 * cachestat, a few microseconds), before a READ joins a batch: a range that would not be
 * sent then costs no worker round trip, and holds no other reply behind it.
 */
static napi_value Sendable(napi_env env, napi_callback_info info) {
  int64_t a[3];
  if (!get_ints(env, info, 3, a, "sendable")) return NULL;
  if (a[2] < 1 || a[1] > MAX_SAFE - a[2]) {
    napi_throw_range_error(env, "EINVAL", "sendable: expected a safe offset and a length of at least 1 byte");
    return NULL;
  }
  return number(env, sendable((int)a[0], a[1], a[2]));
}

static void sendfile_execute(napi_env env, void *data) {
  (void)env;
  sendfile_req *r = data;
  for (size_t i = 0; i < r->count; i++) {
    const int64_t *it = r->items + 4 * i;
    size_t hlen = (size_t)it[1], len = (size_t)it[3];
    r->done_bytes = 0;
    if ((r->stop = sendable(r->fd, it[2], it[3])) != 0) return;
    size_t sent = 0;
    while (sent < hlen) {
      ssize_t n = send(r->sock, r->headers + it[0] + sent, hlen - sent, MSG_DONTWAIT | MSG_NOSIGNAL | MSG_MORE);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) { r->stop = errno == EAGAIN ? 1 : errno; r->done_bytes = (int64_t)sent; return; }
      sent += (size_t)n;
    }
    off_t pos = (off_t)it[2];
    while (sent < hlen + len) {
      ssize_t n = sendfile(r->sock, r->fd, &pos, hlen + len - sent);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) { r->stop = n == 0 ? EIO : errno == EAGAIN ? 1 : errno; r->done_bytes = (int64_t)sent; return; }
      sent += (size_t)n;
    }
    r->done_items++;
  }
  r->stop = 0;
}

static void sendfile_complete(napi_env env, napi_status status, void *data) {
  sendfile_req *r = data;
  if (status != napi_ok && r->stop == 0 && r->done_items < (int64_t)r->count) r->stop = ECANCELED;
  napi_value obj;
  napi_create_object(env, &obj);
  set_num(env, obj, "items", r->done_items);
  set_num(env, obj, "bytes", r->done_bytes);
  set_num(env, obj, "stop", r->stop);
  napi_resolve_deferred(env, r->deferred, obj);
  napi_delete_async_work(env, r->work);
  free(r->headers);
  free(r->items);
  free(r);
}

static napi_value SendFileBatch(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double sock_d, fd_d;
  bool is_buffer = false, is_typed = false;
  void *headers = NULL, *raw = NULL;
  size_t hbytes = 0, n = 0;
  napi_typedarray_type type;
  if (argc < 4 || napi_get_value_double(env, argv[0], &sock_d) != napi_ok || sock_d != (double)(int)sock_d || sock_d < 0 ||
      napi_get_value_double(env, argv[1], &fd_d) != napi_ok || fd_d != (double)(int)fd_d || fd_d < 0 ||
      napi_is_buffer(env, argv[2], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[2], &headers, &hbytes) != napi_ok ||
      napi_is_typedarray(env, argv[3], &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, argv[3], &type, &n, &raw, NULL, NULL) != napi_ok ||
      type != napi_float64_array || n == 0 || n % 4 || n / 4 > SENDFILE_ITEMS_MAX) {
    napi_throw_type_error(env, "EINVAL", "sendFileBatch: expected (socket fd, file fd, headers Buffer, Float64Array of 1 to 1024 items)");
    return NULL;
  }
  sendfile_req *r = calloc(1, sizeof *r);
  if (r) r->items = malloc(n * sizeof(int64_t));
  if (r) r->headers = malloc(hbytes ? hbytes : 1);
  if (!r || !r->items || !r->headers) {
    if (r) { free(r->items); free(r->headers); }
    free(r);
    return throw_errno(env, "sendFileBatch", ENOMEM);
  }
  /* Copied now: the worker thread must not touch JavaScript memory. */
  memcpy(r->headers, headers, hbytes);
  const double *v = raw;
  for (size_t i = 0; i < n; i += 4) {
    int ok = 1;
    for (int k = 0; k < 4; k++) ok &= v[i + k] == (double)(int64_t)v[i + k] && v[i + k] >= 0 && v[i + k] <= (double)MAX_SAFE;
    ok = ok && v[i] + v[i + 1] <= (double)hbytes && v[i + 3] >= 1 && v[i + 3] <= (double)(1 << 30);
    if (!ok) {
      free(r->items);
      free(r->headers);
      free(r);
      napi_throw_range_error(env, "EINVAL", "sendFileBatch: each item needs a header inside headers and a safe offset and a length of 1 byte to 1 GiB");
      return NULL;
    }
    for (int k = 0; k < 4; k++) r->items[i + k] = (int64_t)v[i + k];
  }
  r->count = n / 4;
  r->headers_len = hbytes;
  r->sock = (int)sock_d;
  r->fd = (int)fd_d;
  napi_value promise, name;
  napi_create_promise(env, &r->deferred, &promise);
  napi_create_string_utf8(env, "vmshift.sendFileBatch", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, sendfile_execute, sendfile_complete, r, &r->work);
  napi_queue_async_work(env, r->work);
  return promise;
}

/*
 * dupSocket(fd) -> fd: a second descriptor of the socket for sendFileBatch's worker thread.
 * Node closes its own descriptor whenever the connection is destroyed; a worker still
 * sending on that number could then write into whatever the number is reused for (another
 * client's connection). A descriptor of its own cannot be reused while the worker has it.
 */
static napi_value DupSocket(napi_env env, napi_callback_info info) {
  int64_t fd;
  if (!get_ints(env, info, 1, &fd, "dupSocket")) return NULL;
  int r = fcntl((int)fd, F_DUPFD_CLOEXEC, 3);
  if (r < 0) return throw_errno(env, "dupSocket", errno);
  return number(env, r);
}

/* setSendBuffer(sock, bytes): SO_SNDBUF (the kernel caps it at net.core.wmem_max, and doubles it). */
static napi_value SetSendBuffer(napi_env env, napi_callback_info info) {
  int64_t a[2];
  if (!get_ints(env, info, 2, a, "setSendBuffer")) return NULL;
  int bytes = a[1] > (1 << 30) ? (1 << 30) : (int)a[1];
  if (setsockopt((int)a[0], SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) < 0) return throw_errno(env, "setSendBuffer", errno);
  return NULL;
}

/*
 * One writer per disk: a shim holds an OFD lock (fcntl F_OFD_SETLK, owned by the open file,
 * released when it is closed or the process dies) on one byte of the disk file, write-locked
 * when it serves read-write, read-locked when read-only. QEMU locks bytes 100+ and 200+ of
 * the images it opens (file-posix.c, one byte per permission) and only tests those bytes, so
 * this byte is left alone by QEMU and QEMU's are left alone by vmshift: detach can hand the
 * file back to QEMU while the shim still holds it. flock() would not do: on NFS it becomes a
 * whole-file POSIX lock and conflicts with QEMU's. Locks past the end of a file are allowed.
 */
#define VMSHIFT_LOCK_BYTE 0x766d7368LL /* "vmsh" */

static napi_value LockDisk(napi_env env, napi_callback_info info) {
  int64_t a[2];
  if (!get_ints(env, info, 2, a, "lockDisk")) return NULL;
  struct flock fl = { .l_type = a[1] ? F_WRLCK : F_RDLCK, .l_whence = SEEK_SET, .l_start = VMSHIFT_LOCK_BYTE, .l_len = 1, .l_pid = 0 };
  napi_value r;
  if (fcntl((int)a[0], F_OFD_SETLK, &fl) == 0) {
    napi_get_boolean(env, true, &r);
    return r;
  }
  if (errno == EAGAIN || errno == EACCES) {
    napi_get_boolean(env, false, &r);
    return r;
  }
  return throw_errno(env, "lockDisk", errno);
}

/*
 * alignedBuffer(length): a Buffer of its own pages (mmap), page-aligned, unmapped when the GC
 * frees it. The NBD server's pool buffers (src/nbd/buffer-pool.ts): the kernel copies into
 * and out of them (pread, socket reads, pwrite), and its copy runs ~2.4x the CPU when the
 * destination is 16 bytes off a cache line, as every large malloc'd (mmapped) chunk is
 * (docs/performance.md). Their own mapping also gives their memory back to the system the
 * moment they are freed, whatever malloc's thresholds are.
 */
static void unmap_buffer(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

static napi_value AlignedBuffer(napi_env env, napi_callback_info info) {
  int64_t len;
  if (!get_ints(env, info, 1, &len, "alignedBuffer")) return NULL;
  if (len <= 0 || len > ((int64_t)1 << 32)) {
    napi_throw_range_error(env, "EINVAL", "alignedBuffer: length must be from 1 byte to 4 GiB");
    return NULL;
  }
  void *p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return throw_errno(env, "alignedBuffer: mmap", errno);
  napi_value buf;
  if (napi_create_external_buffer(env, (size_t)len, p, unmap_buffer, (void *)(uintptr_t)len, &buf) != napi_ok) {
    munmap(p, (size_t)len);
    napi_throw_error(env, "ENOMEM", "alignedBuffer: cannot wrap the mapping in a Buffer");
    return NULL;
  }
  return buf;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "seekData", NULL, SeekData, NULL, NULL, NULL, napi_enumerable, NULL },
    { "seekHole", NULL, SeekHole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_enumerable, NULL },
    { "blockDeviceSize", NULL, BlockDeviceSize, NULL, NULL, NULL, napi_enumerable, NULL },
    { "writeInline", NULL, WriteInline, NULL, NULL, NULL, napi_enumerable, NULL },
    { "readInline", NULL, ReadInline, NULL, NULL, NULL, napi_enumerable, NULL },
    { "copyRanges", NULL, CopyRanges, NULL, NULL, NULL, napi_enumerable, NULL },
    { "sendFileBatch", NULL, SendFileBatch, NULL, NULL, NULL, napi_enumerable, NULL },
    { "sendable", NULL, Sendable, NULL, NULL, NULL, napi_enumerable, NULL },
    { "dupSocket", NULL, DupSocket, NULL, NULL, NULL, napi_enumerable, NULL },
    { "setSendBuffer", NULL, SetSendBuffer, NULL, NULL, NULL, napi_enumerable, NULL },
    { "lockDisk", NULL, LockDisk, NULL, NULL, NULL, napi_enumerable, NULL },
    { "alignedBuffer", NULL, AlignedBuffer, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
