// A thread pool for the int8 kernel whose caller never waits for a helper that has not started.
//
// OpenMP's parallel-for (what at::parallel_for runs on) gives each thread a fixed share and ends with a barrier,
// so a region lasts as long as its slowest thread. On a shared CPU (a DAW, a browser, a second server beside us)
// one of our threads is often descheduled for a whole time slice (~3 ms), and every one of the ~150 regions of
// a decoder step waits for it: one busy core made a step 4-5x slower on the 2-core EPYC. Here the work is cut
// into chunks that threads claim one at a time; the caller claims chunks too and, once none are left, waits
// only for the chunks other threads have claimed and not finished. A helper that is not running just does less.
//
// Helpers spin for `spin_us` after their last chunk (the next region of a step follows within microseconds),
// then sleep on a condition variable. The caller spins for the same time, then sleeps too, which frees its core
// for a descheduled helper to be moved onto, so a claimed chunk never waits long for the scheduler.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MUSICGEN_PAUSE() _mm_pause()
#else
#define MUSICGEN_PAUSE() std::this_thread::yield()
#endif

namespace musicgen {

class ElasticPool {
 public:
  // The one pool of the process (helpers are never joined: it lives until exit).
  static ElasticPool& instance() {
    static ElasticPool* pool = [] {
      auto* created = new ElasticPool();
      pthread_atfork(nullptr, nullptr, [] { instance().forked_ = true; });  // a child has no helpers
      return created;
    }();
    return *pool;
  }

  // Total threads that run a region, the caller included (1 = the caller alone). Fewer than before parks the
  // extra helpers; they are not destroyed.
  void set_threads(int threads) {
    std::lock_guard<std::mutex> running(run_mutex_);
    threads = std::max(1, threads);
    while (static_cast<int>(helpers_.size()) < threads - 1) {
      const int index = static_cast<int>(helpers_.size());
      helpers_.emplace_back([this, index] { helper_loop(index); });
      helpers_.back().detach();
    }
    active_helpers_.store(threads - 1);
    wake_helpers();
  }
  int threads() const { return active_helpers_.load() + 1; }

  void set_spin_us(int spin_us) { spin_us_.store(std::max(0, spin_us)); }
  int spin_us() const { return spin_us_.load(); }

  // body(begin, end) over [0, n) in chunks of `chunk`; returns when every chunk has run, rethrowing the first
  // exception one threw. Called while another region runs (a second Python thread) or in a forked child, the
  // caller runs it all alone. Helpers do not carry the caller's torch thread-local state (grad and inference
  // mode): a body that calls torch sets it (at::ThreadLocalStateGuard).
  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    chunk = std::max<int64_t>(1, chunk);
    const int64_t chunks = (n + chunk - 1) / chunk;
    std::unique_lock<std::mutex> running(run_mutex_, std::try_to_lock);
    if (!running.owns_lock() || forked_ || active_helpers_.load() == 0 || chunks == 1 || chunks > kFieldMask) {
      body(0, n);
      return;
    }
    body_.store(&body);
    n_.store(n);
    chunk_.store(chunk);
    finished_.store(0);
    const uint64_t generation = (generation_of(counter_.load()) + 1) & kGenerationMask;
    // seq_cst, against the helpers' sleepers_ (see wake_helpers)
    counter_.store(generation << kGenerationShift | static_cast<uint64_t>(chunks) << kChunksShift);
    wake_helpers();
    work(generation);
    wait_finished(chunks);
    std::exception_ptr error;
    std::swap(error, error_);  // every chunk has finished: no helper touches error_ now
    if (error) std::rethrow_exception(error);
  }

 private:
  ElasticPool() = default;

  // The one word threads claim chunks from: generation (24 bits) | the region's chunk count (20) | next chunk
  // to claim (20). The count is in the word, not beside it: a thread that saw an old region in full must not
  // claim against a new region's count before that region's generation is published (that over-counted
  // `finished_` and hung the caller under load).
  static constexpr int kChunksShift = 20, kGenerationShift = 40;
  static constexpr uint64_t kFieldMask = (1u << 20) - 1, kGenerationMask = (1u << 24) - 1;
  static uint64_t generation_of(uint64_t word) { return word >> kGenerationShift; }
  static int64_t chunks_of(uint64_t word) { return static_cast<int64_t>(word >> kChunksShift & kFieldMask); }
  static int64_t next_of(uint64_t word) { return static_cast<int64_t>(word & kFieldMask); }

  // Claims and runs chunks of the region `generation` until none are left (or a newer region began).
  void work(uint64_t generation) {
    uint64_t seen = counter_.load();
    while (generation_of(seen) == generation && next_of(seen) < chunks_of(seen)) {
      if (!counter_.compare_exchange_weak(seen, seen + 1)) continue;  // seen is reloaded
      // A claim in this generation: the caller is still waiting for it, so the region's fields (written before
      // the generation was published) cannot change until this chunk is counted finished.
      const int64_t chunk = chunk_.load(), chunks = chunks_of(seen), begin = next_of(seen) * chunk;
      try {
        (*body_.load())(begin, std::min(n_.load(), begin + chunk));
      } catch (...) {  // kept for the caller to rethrow: an exception must not end a helper (or the process)
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (finished_.fetch_add(1) + 1 == chunks && caller_waiting_.load()) {
        std::lock_guard<std::mutex> lock(done_mutex_);
        done_.notify_one();
      }
      seen = counter_.load();
    }
  }

  void wait_finished(int64_t chunks) {
    if (spin_until([&] { return finished_.load() == chunks; })) return;
    std::unique_lock<std::mutex> lock(done_mutex_);
    caller_waiting_.store(true);
    done_.wait(lock, [&] { return finished_.load() == chunks; });
    caller_waiting_.store(false);
  }

  void helper_loop(int index) {
    uint64_t seen_generation = 0;
    for (;;) {
      auto new_region = [&] {
        return generation_of(counter_.load()) != seen_generation && index < active_helpers_.load();
      };
      if (!spin_until(new_region)) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, new_region);
        sleepers_.fetch_sub(1);
      }
      seen_generation = generation_of(counter_.load());
      work(seen_generation);
    }
  }

  void wake_helpers() {
    if (sleepers_.load() == 0) return;
    std::lock_guard<std::mutex> lock(wake_mutex_);
    wake_.notify_all();
  }

  // Spins (with pause) until ready() or spin_us passes; whether ready() came true.
  template <class Ready>
  bool spin_until(const Ready& ready) const {
    if (ready()) return true;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_.load());
    for (int i = 1;; ++i) {
      MUSICGEN_PAUSE();
      if (ready()) return true;
      if ((i & 63) == 0 && std::chrono::steady_clock::now() >= deadline) return false;
    }
  }

  std::mutex run_mutex_;                      // one region at a time
  std::atomic<uint64_t> counter_{0};          // generation | chunks | next chunk (see kChunksShift)
  std::atomic<const std::function<void(int64_t, int64_t)>*> body_{nullptr};  // the current region's
  std::atomic<int64_t> n_{0}, chunk_{1};
  std::atomic<int64_t> finished_{0};          // chunks of the current region that have run
  std::atomic<int> active_helpers_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_waiting_{false};
  std::atomic<int> spin_us_{20};  // threads.KERNEL_SPIN_US, set again at load
  std::atomic<bool> forked_{false};
  std::vector<std::thread> helpers_;
  std::mutex wake_mutex_, done_mutex_, error_mutex_;
  std::exception_ptr error_;                  // the first exception a chunk threw in this region
  std::condition_variable wake_, done_;
};

}  // namespace musicgen
