// vocab_parallel_bench: strong scaling of the vocabulary-parallel loss (lce::nccl). The same
// total shape (default Gemma 2's head, 8192 × 2304 × 256000, bf16, lm data) on 1, 2 and 4 GPUs
// of this machine: forward + backward time per step (lce::nccl::forward_backward: forward, then
// the vocab_chunked backward with dX all-reduced in fp32), the forward alone, the bytes each
// rank contributes to the collectives per row, and the memory. The baseline is the single-GPU
// lce::forward_backward on the full W, measured in the same binary; the target of issue 6 is
// T_k ≤ 1.15 · T_1 / k.
//
// One process, one host thread per GPU, communicators from ncclCommInitAll. A step is timed
// on every rank by CUDA events (after a barrier of the host threads and an L2 flush); its time
// is the slowest rank's, and the table reports the median over the steps.
//
//   vocab_parallel_bench [--n 8192] [--d 2304] [--v 256000] [--gpus 1,2,4] [--iters 10]
//
// Without enough GPUs it prints which counts it skipped, and exits 0.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <nccl.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <lce/lce.cuh>
#include <lce/nccl/vocab_parallel.cuh>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/cuda_check.cuh"
#include "common/data.cuh"

namespace {

using namespace lce_example;
using bf16 = __nv_bfloat16;

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}

struct settings {
  lce::problem shape{8192, 2304, 256000};
  std::vector<int> gpus{1, 2, 4};
  int iters = 10;
  int warmup = 2;
  std::uint64_t seed = 1234;
};

/// A reusable barrier of `count` host threads (C++17 has none).
class barrier {
 public:
  explicit barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long long generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int waiting_ = 0;
  long long generation_ = 0;
};

/// What one rank measured.
struct rank_times {
  std::vector<double> step_ms;     ///< forward_backward, per timed step
  std::vector<double> forward_ms;  ///< forward alone, per timed step
  std::size_t workspace_bytes = 0;
  std::size_t in_use_bytes = 0;  ///< device memory in use at the end (all buffers)
  std::size_t forward_bytes_per_row = 0, backward_bytes_per_row = 0;
  float loss = 0.0f;
  std::string error;
};

/// Rows [begin, end) of rank r of k: equal shares (the last rank takes the remainder).
std::pair<std::int64_t, std::int64_t> shard_of(std::int64_t v, int r, int k) {
  return {v * r / k, v * (r + 1) / k};
}

/// One rank: generates the data (the same on every rank), keeps its rows of W, then times
/// `iters` steps. `comm` null: the single-GPU lce::forward_backward on the full W.
void run_rank(const settings& s, int rank, int k, ncclComm_t comm, barrier& sync, rank_times& out) {
  try {
    LCE_EXAMPLE_CHECK(cudaSetDevice(rank));
    const lce::problem& p = s.shape;
    const auto [v_begin, v_end] = shard_of(p.v, rank, k);
    const std::int64_t rows = v_end - v_begin;
    cuda_stream stream;
    cublas_handle handle;
    device_buffer<bf16> x(static_cast<std::size_t>(p.n * p.d));
    device_buffer<std::int64_t> targets(static_cast<std::size_t>(p.n));
    device_buffer<bf16> w(static_cast<std::size_t>(rows * p.d));
    {
      device_buffer<bf16> full_w(static_cast<std::size_t>(p.v * p.d));
      generate(data_family::lm, p, s.seed, x.data(), full_w.data(), targets.data(), stream);
      LCE_EXAMPLE_CHECK(cudaMemcpyAsync(w.data(), full_w.data() + v_begin * p.d, w.bytes(),
                                        cudaMemcpyDeviceToDevice, stream));
      LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
    }
    device_buffer<float> loss(1), lse(static_cast<std::size_t>(p.n));
    device_buffer<bf16> dx(static_cast<std::size_t>(p.n * p.d)),
        dw(static_cast<std::size_t>(rows * p.d));
    lce::forward_backward_args<bf16, bf16> a;
    a.x = x.data();
    a.w = w.data();
    a.targets = targets.data();
    a.loss = loss.data();
    a.lse = lse.data();
    a.dx = dx.data();
    a.dw = dw.data();
    lce::forward_args<bf16> fa;
    fa.x = x.data();
    fa.w = w.data();
    fa.targets = targets.data();
    fa.loss = loss.data();
    fa.lse = lse.data();
    const lce::loss_options options{};
    const lce::backward_options bopt{};
    lce::nccl::vocab_shard shard;
    shard.comm = comm;
    shard.v_begin = v_begin;
    shard.v_end = v_end;

    std::size_t step_bytes = 0, forward_bytes = 0;
    if (comm != nullptr) {
      LCE_EXAMPLE_CHECK(
          lce::nccl::forward_backward(nullptr, step_bytes, a, p, shard, options, bopt, handle));
      LCE_EXAMPLE_CHECK(lce::nccl::forward(nullptr, forward_bytes, fa, p, shard, options));
      const auto volume = lce::nccl::communication_bytes(fa, p, options);
      out.forward_bytes_per_row = volume.forward_bytes_per_row;
      out.backward_bytes_per_row = volume.backward_bytes_per_row;
    } else {
      LCE_EXAMPLE_CHECK(lce::forward_backward(nullptr, step_bytes, a, p, options, bopt, handle));
      LCE_EXAMPLE_CHECK(lce::forward(nullptr, forward_bytes, fa, p, options));
    }
    device_buffer<unsigned char> workspace(std::max(step_bytes, forward_bytes));
    out.workspace_bytes = workspace.bytes();
    auto step = [&](cudaStream_t st) {
      if (comm != nullptr)
        LCE_EXAMPLE_CHECK(lce::nccl::forward_backward(workspace.data(), step_bytes, a, p, shard,
                                                      options, bopt, handle, st));
      else
        LCE_EXAMPLE_CHECK(
            lce::forward_backward(workspace.data(), step_bytes, a, p, options, bopt, handle, st));
    };
    auto forward = [&](cudaStream_t st) {
      if (comm != nullptr)
        LCE_EXAMPLE_CHECK(
            lce::nccl::forward(workspace.data(), forward_bytes, fa, p, shard, options, st));
      else
        LCE_EXAMPLE_CHECK(lce::forward(workspace.data(), forward_bytes, fa, p, options, st));
    };
    l2_flusher flusher;
    event_timer timer;
    auto timed = [&](auto&& work, std::vector<double>& ms) {
      for (int i = 0; i < s.warmup; ++i) work(static_cast<cudaStream_t>(stream));
      LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
      for (int i = 0; i < s.iters; ++i) {
        flusher.flush(stream);
        LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
        sync.arrive_and_wait();  // the ranks start each step together
        timer.start(stream);
        work(static_cast<cudaStream_t>(stream));
        timer.stop(stream);
        ms.push_back(timer.elapsed_ms());
      }
    };
    timed(step, out.step_ms);
    timed(forward, out.forward_ms);
    out.loss = loss.read();
    std::size_t free = 0, total = 0;
    LCE_EXAMPLE_CHECK(cudaMemGetInfo(&free, &total));
    out.in_use_bytes = total - free;
  } catch (const std::exception& e) {
    out.error = e.what();
  }
}

/// Median over the steps of the slowest rank's time.
double slowest_median(const std::vector<rank_times>& ranks, bool forward_only) {
  std::vector<double> per_step;
  for (std::size_t i = 0; i < ranks[0].step_ms.size(); ++i) {
    double slowest = 0.0;
    for (const rank_times& r : ranks)
      slowest = std::max(slowest, forward_only ? r.forward_ms[i] : r.step_ms[i]);
    per_step.push_back(slowest);
  }
  return median(per_step);
}

struct row {
  std::string label;
  int k = 0;
  double step_ms = 0, forward_ms = 0;
  std::size_t forward_bytes = 0, backward_bytes = 0, workspace = 0, in_use = 0;
  float loss = 0;
};

/// Runs k ranks (comm: vocab-parallel; k = 1 without comm: the single-GPU library call).
bool measure(const settings& s, int k, bool with_comm, row& result) {
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(k), nullptr);
  if (with_comm) {
    std::vector<int> devices(static_cast<std::size_t>(k));
    for (int i = 0; i < k; ++i) devices[static_cast<std::size_t>(i)] = i;
    check_nccl(ncclCommInitAll(comms.data(), k, devices.data()), "ncclCommInitAll");
  }
  std::vector<rank_times> times(static_cast<std::size_t>(k));
  barrier sync(k);
  std::vector<std::thread> threads;
  for (int r = 0; r < k; ++r)
    threads.emplace_back(run_rank, std::cref(s), r, k, comms[static_cast<std::size_t>(r)],
                         std::ref(sync), std::ref(times[static_cast<std::size_t>(r)]));
  for (std::thread& t : threads) t.join();
  for (ncclComm_t c : comms)
    if (c != nullptr) (void)ncclCommDestroy(c);
  for (int r = 0; r < k; ++r) {
    if (!times[static_cast<std::size_t>(r)].error.empty()) {
      std::printf("  k=%d rank %d failed: %s\n", k, r,
                  times[static_cast<std::size_t>(r)].error.c_str());
      return false;
    }
  }
  result.k = k;
  result.step_ms = slowest_median(times, false);
  result.forward_ms = slowest_median(times, true);
  result.forward_bytes = times[0].forward_bytes_per_row;
  result.backward_bytes = times[0].backward_bytes_per_row;
  for (const rank_times& t : times) {
    result.workspace = std::max(result.workspace, t.workspace_bytes);
    result.in_use = std::max(result.in_use, t.in_use_bytes);
  }
  result.loss = times[0].loss;
  return true;
}

std::vector<int> parse_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::stoi(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) throw std::runtime_error("missing value after " + arg);
        return argv[++i];
      };
      if (arg == "--n")
        s.shape.n = std::stoll(next());
      else if (arg == "--d")
        s.shape.d = std::stoll(next());
      else if (arg == "--v")
        s.shape.v = std::stoll(next());
      else if (arg == "--gpus")
        s.gpus = parse_list(next());
      else if (arg == "--iters")
        s.iters = std::stoi(next());
      else {
        std::printf(
            "usage: vocab_parallel_bench [--n N] [--d D] [--v V] [--gpus 1,2,4] [--iters K]\n");
        return arg == "--help" ? 0 : 1;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vocab_parallel_bench: %s\n", e.what());
    return 1;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  const lce::problem& p = s.shape;
  std::printf(
      "vocab_parallel_bench: %lld x %lld x %lld bf16, lm data, forward_backward "
      "(vocab_chunked, 256 MiB budget, dX all-reduced in fp32), median of %d steps\n",
      static_cast<long long>(p.n), static_cast<long long>(p.d), static_cast<long long>(p.v),
      s.iters);
  if (devices == 0) {
    std::printf("no CUDA device: nothing measured (this benchmark needs 1, 2 and 4 GPUs)\n");
    return 0;
  }
  std::printf("%d GPU(s) visible\n", devices);

  std::vector<row> rows;
  try {
    row base;
    base.label = "lce (1 GPU, full W)";
    if (!measure(s, 1, false, base)) return 1;
    rows.push_back(base);
    for (const int k : s.gpus) {
      if (k > devices) {
        std::printf("k=%d: skipped (%d GPU(s) visible)\n", k, devices);
        continue;
      }
      row r;
      r.label = "lce::nccl, " + std::to_string(k) + " GPU" + (k > 1 ? "s" : "");
      if (!measure(s, k, true, r)) return 1;
      rows.push_back(r);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vocab_parallel_bench: %s\n", e.what());
    return 1;
  }

  const double t1 = rows[0].step_ms;
  std::printf("\n%-22s %3s %10s %11s %8s %9s %13s %9s %9s %11s %10s %10s\n", "path", "k",
              "fwd [ms]", "step [ms]", "speedup", "T_k*k/T1", "target<=1.15", "fwd B/row",
              "bwd B/row", "workspace", "in use", "loss");
  for (const row& r : rows) {
    const double ratio = r.step_ms * r.k / t1;
    const bool sharded = r.label.rfind("lce::nccl", 0) == 0;
    std::printf("%-22s %3d %10.2f %11.2f %8.2f %9.3f %13s %9s %9s %8.1f MiB %6.1f GiB %10.6f\n",
                r.label.c_str(), r.k, r.forward_ms, r.step_ms, t1 / r.step_ms, ratio,
                sharded ? (ratio <= 1.15 ? "yes" : "NO") : "-",
                sharded ? std::to_string(r.forward_bytes).c_str() : "-",
                sharded ? std::to_string(r.backward_bytes).c_str() : "-", mib(r.workspace),
                gib(r.in_use), static_cast<double>(r.loss));
  }
  std::printf(
      "\nfwd B/row: bytes per row each rank contributes to the forward's all-reductions "
      "(max, sum-exp, target logit: 3 floats);\nbwd B/row: the fp32 dX row all-reduced "
      "in the backward (4·d); a ring all-reduce moves 2(k-1)/k times that per rank.\n");
  return 0;
}
