/* Whole-file xxh3_128 for runner/_fast/_hashing.pyx, called with the GIL released.

   runner_hash_fd_serial: read(2) into `buf` and hash it, chunk after chunk, on this thread.
   runner_hash_fd_overlapped: the same digest with two buffers of `size` bytes; a helper
   thread reads the next chunk into one buffer while this thread hashes the other.  Falls
   back to the serial loop when the thread cannot be started.
   Both return 0, or the errno of the read that failed; `state` must be freshly reset. */
#ifndef RUNNER_FILEHASH_H
#define RUNNER_FILEHASH_H
#include <stddef.h>
#include "xxh3_file.h"

int runner_hash_fd_serial(int fd, char *buf, size_t size, XXH3_state_t *state);
int runner_hash_fd_overlapped(int fd, char *buf0, char *buf1, size_t size, XXH3_state_t *state);
#endif
