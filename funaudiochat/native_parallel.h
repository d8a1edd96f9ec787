// parallel_for for the C++ operator libraries (native.py builds them with -fopenmp and this folder on the include
// path): f(begin_chunk, end_chunk) over [begin, end) on the calling thread's OpenMP thread count, in chunks of at
// least `grain`.
//
// Why not at::parallel_for: it first runs ATen's inline lazy thread-count set-up, whose per-thread "done" flag is a
// copy of its own in each library that inlines it. On a thread's first call from this library it sets the thread's
// torch thread count to the process-wide default, the count last set by any thread. In `funaudiochat serve` helper
// threads set one thread, so the engine thread fell to one thread at its first int8 product: every compiled step
// ran on one core (27 against 17 ms a one-row step of the mini, BENCHMARKS.md). The thread's count is already its
// OpenMP one (torch sets both), which this loop reads and leaves as it is.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <exception>

namespace fac {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t chunks = std::max<int64_t>(1, (end - begin + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks == 1 || omp_in_parallel() || omp_get_max_threads() == 1) {
    f(begin, end);
    return;
  }
  std::exception_ptr error;
  // (no num_threads clause, as in ATen: a team whose size changes from region to region makes libgomp stop and start
  // pool threads, pytorch/pytorch#32008; threads past the chunks' count idle through the region)
#pragma omp parallel
  {
    const int64_t n = std::min<int64_t>(omp_get_num_threads(), chunks), size = (end - begin + n - 1) / n;
    const int64_t first = begin + omp_get_thread_num() * size, last = std::min(end, first + size);
    if (first < last) {
      try {
        f(first, last);
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fac
