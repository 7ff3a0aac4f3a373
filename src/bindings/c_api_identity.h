// What both runtime libraries say about themselves (c_api.h): the ABI version and the sources they
// were built from. Included by exactly one source of each library (c_api_cpu.cc, c_api_cuda.cu),
// which defines these functions for it.
#pragma once

#include "src/bindings/c_api.h"

#if __has_include("src/source_hash.h")  // Bazel generates it (:source_hash); the Python build passes -D
#include "src/source_hash.h"
#endif

#define MAGA_STR2(x) #x
#define MAGA_STR(x) MAGA_STR2(x)

MAGA_API int maga_abi_version(void) { return MAGA_ABI_VERSION; }

// The hash of src/ the library was built from (ops/_compiled.py source_hash, src/hash_sources.py):
// the loader refuses a bundled binary built from other sources than the ones beside it.
MAGA_API const char* maga_source_hash(void) {
#ifdef MAGA_SOURCE_HASH
  return MAGA_SOURCE_HASH;
#else
  return "";
#endif
}
