/* The xxh3 API for runner/_fast/_hashing.pyx: on x86, through xxHash's run-time dispatcher
   (the widest vector unit the CPU has); elsewhere the portable build. */
#ifndef RUNNER_XXH3_FILE_H
#define RUNNER_XXH3_FILE_H
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#  include "vendor/xxhash/xxh_x86dispatch.h"
#else
#  include "vendor/xxhash/xxhash.h"
#endif
#endif
