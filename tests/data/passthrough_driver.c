/* A minimal driver image for tests (ABI v1, see docs/driver-abi.md). Built with
 * cc -shared -fPIC -DNAME='"x"' -DVERSION='"1.0.0"' -DABI=1 -DON_WRITE=0 [-DNO_FINI].
 * ON_WRITE is the verdict for writes: 0 pass, 1 FD_FAIL, negative an internal error.
 * With -DMARKER='"/path"', a constructor creates that file when the module is loaded.
 * With -DBOUNCE, it asks for write data (WANTS_WRITE_DATA) and stores it unchanged. */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct fd_driver_info { uint32_t abi_version, flags; const char *name, *version; };
struct fd_host { uint32_t abi_version, queues; uint64_t capacity;
                 const char *volume, *instance, *context_json, *config_json; };
struct fd_request { uint32_t op, queue; uint64_t offset, len; const void *iov;
                    uint32_t iovcnt, reserved; uint8_t *bounce; };
#ifdef BOUNCE
#include <sys/uio.h>
#define FLAGS 1
#else
#define FLAGS 0
#endif
static const struct fd_driver_info INFO = { ABI, FLAGS, NAME, VERSION };
const struct fd_driver_info *ferrodisk_driver_info(void) { return &INFO; }
void *ferrodisk_driver_init(const struct fd_host *h, char *err, size_t n) {
    if (strstr(h->config_json, "fail_init")) {
        snprintf(err, n, "%s refuses instance %s as configured", NAME, h->instance);
        return NULL;
    }
    return calloc(1, 16);
}
int32_t ferrodisk_driver_submit(void *inst, const struct fd_request *r, uint64_t *delay) {
    (void)inst; (void)delay;
#ifdef BOUNCE
    if (r->op == 1 && r->bounce) {
        const struct iovec *v = r->iov;
        uint64_t at = 0;
        for (uint32_t i = 0; i < r->iovcnt && at < r->len; i++) {
            uint64_t n = v[i].iov_len < r->len - at ? v[i].iov_len : r->len - at;
            memcpy(r->bounce + at, v[i].iov_base, n);
            at += n;
        }
    }
#endif
    if (r->op == 1) return ON_WRITE;
    return 0;
}
int32_t ferrodisk_driver_complete(void *inst, const struct fd_request *r, int32_t st) {
    (void)inst; (void)r; (void)st; return 0;
}
#ifndef NO_FINI
void ferrodisk_driver_fini(void *inst) { free(inst); }
#endif
#ifdef MARKER
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void marker(void) {
    int fd = open(MARKER, O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
}
#endif
