// A thread pool for the int8 kernel whose caller never waits for a helper that has not started.
//
// OpenMP's parallel-for (what at::parallel_for runs on) gives each thread a fixed share and ends with a barrier,
// so a region lasts as long as its slowest thread. On a shared CPU (a DAW, a browser, a second server beside us)
// one of our threads is often descheduled for a whole time slice (~3 ms), and every one of the ~150 regions of
// a decoder step waits for it: one busy core made a step 4-5x slower on the 2-core EPYC. Here the work is cut
// into chunks that threads claim one at a time; the caller claims chunks too and, once none are left, waits
// only for the chunks other threads have claimed and not finished. A helper that is not running just does less.
//
// Helpers spin for `spin_us` after their last chunk, then sleep on a condition variable. The caller spins for the
// same time, then sleeps too, which frees its core for a descheduled helper to be moved onto, so a claimed chunk
// never waits long for the scheduler.
//
// Inside a burst (a decoder step: ~150 regions with gaps of 10-100 us between them) the pool is hot: helpers
// spin up to `burst_spin_us` between regions and the caller up to kPreemptedUs for the last claimed chunks, so
// nobody sleeps and wakes ~150 times a step (on the 2-core Xeon a step took 3-4 ms longer that way than with
// OpenMP's spinning team, and a woken thread was now and then placed on the waker's core). A helper that
// finds its clock jumped while it spun or worked (over kPreemptedUs) and its thread switched out by the
// scheduler has met a neighbour that wants its core: once such preemptions take more than a tenth of a window of
// kRepeatUs the pool is contended for kContendedUs, and behaves as outside a burst, so the neighbour gets the core and the helper,
// woken for work, is favoured by the scheduler as a thread that slept. On a machine to itself nothing preempts
// a helper and the pool stays hot for the whole step.
#pragma once

#include <pthread.h>
#include <sys/resource.h>

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
  void set_burst_spin_us(int spin_us) { burst_spin_us_.store(std::max(0, spin_us)); }
  int burst_spin_us() const { return burst_spin_us_.load(); }

  // Bursts nest (a count); the caller of a region need not be the one that opened the burst.
  void begin_burst() { bursts_.fetch_add(1); }
  void end_burst() { bursts_.fetch_sub(1); }
  int bursts() const { return bursts_.load(); }
  // Whether a thread of the pool was seen preempted within the last kContendedUs, and how often that happened.
  bool contended() const { return now_us() < contended_until_us_.load(); }
  bool is_hot() const { return hot(); }
  int64_t preemptions() const { return preemptions_.load(); }
  // Microseconds callers have spent in regions (the rest of a step is the caller's alone).
  int64_t region_us() const { return region_us_.load(); }

  // body(begin, end) over [0, n) in chunks of `chunk`; returns when every chunk has run, rethrowing the first
  // exception one threw. Called while another region runs (a second Python thread) or in a forked child, the
  // caller runs it all alone. Helpers do not carry the caller's torch thread-local state (grad and inference
  // mode): a body that calls torch sets it (at::ThreadLocalStateGuard).
  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    const int64_t entered = now_us();
    struct Account {  // time the callers spent in regions, for benchmarks (region_us)
      std::atomic<int64_t>& total;
      int64_t entered;
      ~Account() { total.fetch_add(now_us() - entered); }
    } account{region_us_, entered};
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
    work(generation, nullptr);
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

  // Claims and runs chunks of the region `generation` until none are left (or a newer region began). A helper
  // passes its count of involuntary switches: a chunk that took over kPreemptedUs (~100x its usual time) is
  // checked for a preemption.
  void work(uint64_t generation, int64_t* switches) {
    uint64_t seen = counter_.load();
    while (generation_of(seen) == generation && next_of(seen) < chunks_of(seen)) {
      if (!counter_.compare_exchange_weak(seen, seen + 1)) continue;  // seen is reloaded
      // A claim in this generation: the caller is still waiting for it, so the region's fields (written before
      // the generation was published) cannot change until this chunk is counted finished.
      const int64_t chunk = chunk_.load(), chunks = chunks_of(seen), begin = next_of(seen) * chunk;
      const int64_t started = switches ? now_us() : 0;
      try {
        (*body_.load())(begin, std::min(n_.load(), begin + chunk));
      } catch (...) {  // kept for the caller to rethrow: an exception must not end a helper (or the process)
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (switches) {
        const int64_t now = now_us();
        if (now - started > kPreemptedUs) check_preempted(now, now - started, *switches);
      }
      if (finished_.fetch_add(1) + 1 == chunks && caller_waiting_.load()) {
        std::lock_guard<std::mutex> lock(done_mutex_);
        done_.notify_one();
      }
      seen = counter_.load();
    }
  }

  void wait_finished(int64_t chunks) {
    // Hot, the last claimed chunks are microseconds away, so the caller spins for them; one still unfinished
    // after kPreemptedUs is held by a helper that was stopped mid-chunk, and the caller sleeps so that the
    // helper may be moved onto its core.
    if (spin_until([&] { return finished_.load() == chunks; }, hot() ? kPreemptedUs : spin_us_.load())) return;
    std::unique_lock<std::mutex> lock(done_mutex_);
    caller_waiting_.store(true);
    done_.wait(lock, [&] { return finished_.load() == chunks; });
    caller_waiting_.store(false);
  }

  void helper_loop(int index) {
    uint64_t seen_generation = 0;
    int64_t switches = involuntary_switches();
    for (;;) {
      auto new_region = [&] {
        return generation_of(counter_.load()) != seen_generation && index < active_helpers_.load();
      };
      if (!spin_helper(new_region, switches)) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, new_region);
        sleepers_.fetch_sub(1);
      }
      seen_generation = generation_of(counter_.load());
      work(seen_generation, &switches);
    }
  }

  void wake_helpers() {
    if (sleepers_.load() == 0) return;
    std::lock_guard<std::mutex> lock(wake_mutex_);
    wake_.notify_all();
  }

  static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
  }

  // Called by a helper that saw `lost` us go by while it spun or worked a chunk (over kPreemptedUs): if this
  // thread was switched out by the scheduler (its count of involuntary switches grew; a stall of the whole
  // virtual CPU by the host does not count, nothing on this machine can help that), another thread wanted this
  // core. What matters is how much of the core it takes: kernel threads that run ~1 ms now and then, or a
  // client's audio and network threads (0.2 ms every 10 ms), take a few percent, and spinning through them
  // costs nothing (the contended mode made such a step 22% slower on the Xeon); a busy process (every other
  // time slice) or a DAW's audio callback (a third of a core) take far more. Over kShareOfWindow of a window of
  // kRepeatUs lost this way, the pool is contended for kContendedUs.
  void check_preempted(int64_t now, int64_t lost, int64_t& switches) {
    const int64_t seen = involuntary_switches();
    if (seen == switches) return;
    switches = seen;
    preemptions_.fetch_add(1);
    std::lock_guard<std::mutex> lock(preemption_mutex_);
    if (now - window_start_us_ > kRepeatUs) {
      window_start_us_ = now;
      window_lost_us_ = 0;
    }
    window_lost_us_ += lost;
    if (window_lost_us_ > kRepeatUs / kShareOfWindow) contended_until_us_.store(now + kContendedUs);
  }

  static int64_t involuntary_switches() {
#ifdef RUSAGE_THREAD
    struct rusage usage;
    if (getrusage(RUSAGE_THREAD, &usage) == 0) return usage.ru_nivcsw;
#endif
    return 0;
  }

  // In a burst, and no helper preempted lately: the next region (or the last claimed chunk) is microseconds away.
  bool hot() const { return bursts_.load() > 0 && now_us() >= contended_until_us_.load(); }

  // Spins (with pause) until ready() or spin_us passes; whether ready() came true.
  template <class Ready>
  bool spin_until(const Ready& ready, int spin_us) const {
    if (ready()) return true;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
    for (int i = 1;; ++i) {
      MUSICGEN_PAUSE();
      if (ready()) return true;
      if ((i & 63) == 0 && std::chrono::steady_clock::now() >= deadline) return false;
    }
  }

  // A helper's spin: spin_us, or burst_spin_us while the pool is hot; the clock jumping while it spins may be
  // a preemption (check_preempted). Whether ready() came true.
  template <class Ready>
  bool spin_helper(const Ready& ready, int64_t& switches) {
    if (ready()) return true;
    const int64_t start = now_us();
    int64_t last = start;
    for (int i = 1;; ++i) {
      MUSICGEN_PAUSE();
      if (ready()) return true;
      if ((i & 63) != 0) continue;
      const int64_t now = now_us();
      if (now - last > kPreemptedUs) check_preempted(now, now - last, switches);
      last = now;
      if (now - start >= (hot() ? burst_spin_us_.load() : spin_us_.load())) return false;
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
  std::atomic<int> burst_spin_us_{1000};  // threads.KERNEL_BURST_SPIN_US, set again at load
  std::atomic<int> bursts_{0};
  // Past a gap this long between two looks at the clock, a spinning helper was preempted (a time slice is
  // ~1-3 ms; timer interrupts and a hypervisor's own work are tens of us); contended for this long after.
  // kShareOfWindow: 1 / the share of a window lost to preemption that makes the pool contended (10%).
  static constexpr int64_t kPreemptedUs = 250, kRepeatUs = 100'000, kShareOfWindow = 10, kContendedUs = 1'000'000;
  std::atomic<int64_t> contended_until_us_{0};
  std::atomic<int64_t> region_us_{0};
  std::mutex preemption_mutex_;
  int64_t window_start_us_ = 0, window_lost_us_ = 0;  // time lost to preemption since window_start_us_
  std::atomic<int64_t> preemptions_{0};
  std::atomic<bool> forked_{false};
  std::vector<std::thread> helpers_;
  std::mutex wake_mutex_, done_mutex_, error_mutex_;
  std::exception_ptr error_;                  // the first exception a chunk threw in this region
  std::condition_variable wake_, done_;
};

}  // namespace musicgen
