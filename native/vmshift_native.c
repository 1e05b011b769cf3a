/*
 * vmshift_native: the few Linux file syscalls Node does not expose, for FileDevice.
 *
 *   seekData(fd, offset)        lseek(SEEK_DATA); -1 when there is no data at or after offset
 *   seekHole(fd, offset)        lseek(SEEK_HOLE); -1 when offset is at or past the end
 *   punchHole(fd, offset, len)  fallocate(PUNCH_HOLE | KEEP_SIZE): deallocate, reads as zeroes
 *   zeroRange(fd, offset, len)  fallocate(ZERO_RANGE | KEEP_SIZE): reads as zeroes, stays allocated
 *   blockDeviceSize(fd)         ioctl(BLKGETSIZE64): the size of a block device in bytes
 *
 * All calls are synchronous: each is one short syscall. Failures throw an Error whose `code`
 * is the errno name (EOPNOTSUPP, EINVAL, ...), as Node's own fs errors do, so callers map
 * them the same way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
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

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "seekData", NULL, SeekData, NULL, NULL, NULL, napi_enumerable, NULL },
    { "seekHole", NULL, SeekHole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_enumerable, NULL },
    { "blockDeviceSize", NULL, BlockDeviceSize, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
