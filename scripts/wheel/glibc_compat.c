/* Linked into the native modules of a wheel by scripts/build_wheel.sh (never into a development
 * build). The wheel links libstdc++ statically and against glibc 2.17 link stubs, so it runs on any
 * glibc >= 2.17. Three objects of the static libstdc++ (GCC >= 11) refer to glibc functions newer
 * than that; they get local, hidden definitions here, so the module imports nothing newer:
 *
 *   __libc_single_threaded (glibc 2.32)  read by libstdc++ to skip atomic reference counts in
 *       single-threaded processes; 0 means "maybe threaded": the atomic path, always correct.
 *   getentropy (2.25), arc4random (2.36)  used only by std::random_device, which this code never
 *       constructs (its object file comes along with the string instantiations); implemented with
 *       the getrandom system call (Linux >= 3.17) anyway, so they are correct if ever called.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MEMFT_LOCAL __attribute__((visibility("hidden")))

MEMFT_LOCAL char __libc_single_threaded = 0;

static int fill_random(void* buffer, size_t length) {
  unsigned char* p = (unsigned char*)buffer;
  while (length > 0) {
    long got = syscall(SYS_getrandom, p, length, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += got;
    length -= (size_t)got;
  }
  return 0;
}

MEMFT_LOCAL int getentropy(void* buffer, size_t length) {
  if (length > 256) {
    errno = EIO;
    return -1;
  }
  return fill_random(buffer, length);
}

MEMFT_LOCAL uint32_t arc4random(void) {
  uint32_t value = 0;
  while (fill_random(&value, sizeof value) != 0) {
  }
  return value;
}
