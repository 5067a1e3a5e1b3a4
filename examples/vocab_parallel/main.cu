// vocab_parallel: one LM-head training step with the classifier W sharded by vocabulary rows
// across processes, one per GPU (lce::nccl::forward_backward): each rank holds the full X and
// targets and its rows of W; it prints its time, memory and the loss, which every rank gets.
//
// Rendezvous: rank, world size and local rank from RANK, WORLD_SIZE, LOCAL_RANK (as torchrun and
// launch.sh set them); the NCCL unique id from LCE_NCCL_ID (256 hex digits) or through the file
// LCE_NCCL_ID_FILE, which rank 0 writes and the others wait for (on a shared file system, this
// works across nodes the same way). launch.sh starts one process per visible GPU.
//
//   vocab_parallel [--n 8192] [--d 2304] [--v 256000] [--dtype bf16|fp16|fp32] [--uneven]
//                  [--reduce-scatter] [--iters 10] [--seed 1234]
//
// Every rank generates the same X, W and targets from the seed (lm family of
// examples/common/data.cuh) and keeps its rows of W. Rank 0 also runs the single-GPU
// lce::forward on the full W and prints the difference of the losses.
// Exit status: 0 on success, 2 when the sharded loss differs from the single-GPU one beyond
// rounding, 1 on an error.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <lce/lce.cuh>
#include <lce/nccl/vocab_parallel.cuh>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/cuda_check.cuh"
#include "common/data.cuh"

namespace {

using namespace lce_example;

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}

struct settings {
  lce::problem shape{8192, 2304, 256000};
  std::string dtype = "bf16";
  bool uneven = false;
  bool reduce_scatter = false;
  int iters = 10;
  std::uint64_t seed = 1234;  // the same on every rank: every rank generates the same data
};

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

std::string to_hex(const ncclUniqueId& id) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (const char c : id.internal) {
    const auto byte = static_cast<unsigned char>(c);
    out += digits[byte >> 4];
    out += digits[byte & 15];
  }
  return out;
}

ncclUniqueId from_hex(const std::string& text) {
  ncclUniqueId id{};
  if (text.size() != 2 * sizeof(id.internal)) throw std::runtime_error("LCE_NCCL_ID: bad length");
  for (std::size_t i = 0; i < sizeof(id.internal); ++i)
    id.internal[i] = static_cast<char>(std::stoi(text.substr(2 * i, 2), nullptr, 16));
  return id;
}

/// The communicator's unique id: from LCE_NCCL_ID, or created by rank 0 and passed through the
/// file LCE_NCCL_ID_FILE (written under a temporary name, then renamed: readers never see a
/// partial id).
ncclUniqueId rendezvous(int rank) {
  if (const char* hex = std::getenv("LCE_NCCL_ID"); hex != nullptr && *hex != '\0')
    return from_hex(hex);
  const char* path = std::getenv("LCE_NCCL_ID_FILE");
  if (path == nullptr || *path == '\0')
    throw std::runtime_error("set LCE_NCCL_ID or LCE_NCCL_ID_FILE (launch.sh does)");
  if (rank == 0) {
    ncclUniqueId id{};
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    const std::string tmp = std::string(path) + ".tmp." + std::to_string(getpid());
    std::ofstream(tmp) << to_hex(id) << "\n";
    if (std::rename(tmp.c_str(), path) != 0) throw std::runtime_error("cannot write the id file");
    return id;
  }
  for (int waited_ms = 0; waited_ms < 300000; waited_ms += 50) {
    std::ifstream in(path);
    std::string hex;
    if (in >> hex && hex.size() == 2 * sizeof(ncclUniqueId::internal)) return from_hex(hex);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw std::runtime_error(std::string("no NCCL id in ") + path + " after 300 s");
}

/// Rows [begin, end) of rank r: equal shares, or with --uneven shares proportional to r + 1.
std::pair<std::int64_t, std::int64_t> shard_rows(std::int64_t v, int rank, int world, bool uneven) {
  auto edge = [&](int r) {
    if (!uneven) return v * r / world;
    const std::int64_t weight = static_cast<std::int64_t>(r) * (r + 1) / 2;  // Σ_{j<r} (j + 1)
    const std::int64_t total = static_cast<std::int64_t>(world) * (world + 1) / 2;
    return v * weight / total;
  };
  return {edge(rank), edge(rank + 1)};
}

template <class Element>
int run(const settings& s, int rank, int world, int local_rank) {
  LCE_EXAMPLE_CHECK(cudaSetDevice(local_rank));
  const ncclUniqueId id = rendezvous(rank);
  ncclComm_t comm = nullptr;
  check_nccl(ncclCommInitRank(&comm, world, id, rank), "ncclCommInitRank");
  const lce::problem& p = s.shape;
  const auto [v_begin, v_end] = shard_rows(p.v, rank, world, s.uneven);
  const std::int64_t rows = v_end - v_begin;
  cuda_stream stream;
  cublas_handle handle;
  const std::size_t free_at_start = free_device_bytes();

  // The same data on every rank; each keeps its rows of W.
  device_buffer<Element> x(static_cast<std::size_t>(p.n * p.d));
  device_buffer<std::int64_t> targets(static_cast<std::size_t>(p.n));
  device_buffer<Element> w(static_cast<std::size_t>(rows * p.d));
  float single_gpu_loss = NAN;
  {
    device_buffer<Element> full_w(static_cast<std::size_t>(p.v * p.d));
    generate(data_family::lm, p, s.seed, x.data(), full_w.data(), targets.data(), stream);
    LCE_EXAMPLE_CHECK(cudaMemcpyAsync(w.data(), full_w.data() + v_begin * p.d, w.bytes(),
                                      cudaMemcpyDeviceToDevice, stream));
    if (rank == 0) {  // the single-GPU reference of the loss
      device_buffer<float> loss(1);
      lce::forward_args<Element> a;
      a.x = x.data();
      a.w = full_w.data();
      a.targets = targets.data();
      a.loss = loss.data();
      std::size_t bytes = 0;
      LCE_EXAMPLE_CHECK(lce::forward(nullptr, bytes, a, p, {}, stream));
      device_buffer<unsigned char> ws(bytes);
      LCE_EXAMPLE_CHECK(lce::forward(ws.data(), bytes, a, p, {}, stream));
      LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
      single_gpu_loss = loss.read();
    }
    LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
  }

  lce::nccl::vocab_shard shard;
  shard.comm = comm;
  shard.v_begin = v_begin;
  shard.v_end = v_end;
  shard.dx = s.reduce_scatter ? lce::nccl::dx_reduction::reduce_scatter
                              : lce::nccl::dx_reduction::all_reduce;
  const std::int64_t dx_rows = s.reduce_scatter ? p.n / world : p.n;
  device_buffer<float> loss(1), lse(static_cast<std::size_t>(p.n));
  device_buffer<Element> dx(static_cast<std::size_t>(dx_rows * p.d));
  device_buffer<Element> dw(static_cast<std::size_t>(rows * p.d));
  lce::forward_backward_args<Element, Element> a;
  a.x = x.data();
  a.w = w.data();
  a.targets = targets.data();
  a.loss = loss.data();
  a.lse = lse.data();
  a.dx = dx.data();
  a.dw = dw.data();
  const lce::loss_options options{};
  const lce::backward_options bopt{};
  std::size_t bytes = 0;
  LCE_EXAMPLE_CHECK(
      lce::nccl::forward_backward(nullptr, bytes, a, p, shard, options, bopt, handle));
  device_buffer<unsigned char> workspace(bytes);
  l2_flusher flusher;
  const std::size_t free_before = free_device_bytes();
  const std::vector<double> ms = time_runs(
      [&](cudaStream_t st) {
        LCE_EXAMPLE_CHECK(lce::nccl::forward_backward(workspace.data(), bytes, a, p, shard, options,
                                                      bopt, handle, st));
      },
      2, s.iters, stream, flusher);
  const std::size_t free_after = free_device_bytes();
  const float sharded_loss = loss.read();
  const lce::nccl::communication_volume volume = lce::nccl::communication_bytes(
      lce::forward_args<Element>{a.x, a.w, nullptr, a.targets, a.loss, nullptr, a.lse}, p, options);

  // Every rank must hold the same loss: compare its min and max over the ranks.
  device_buffer<float> spread(2);
  LCE_EXAMPLE_CHECK(
      cudaMemcpyAsync(spread.data(), loss.data(), 4, cudaMemcpyDeviceToDevice, stream));
  LCE_EXAMPLE_CHECK(
      cudaMemcpyAsync(spread.data() + 1, loss.data(), 4, cudaMemcpyDeviceToDevice, stream));
  check_nccl(ncclAllReduce(spread.data(), spread.data(), 1, ncclFloat32, ncclMin, comm, stream),
             "min");
  check_nccl(
      ncclAllReduce(spread.data() + 1, spread.data() + 1, 1, ncclFloat32, ncclMax, comm, stream),
      "max");
  LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
  const bool identical = spread.read(0) == spread.read(1);

  std::printf(
      "[rank %d/%d] device %d, W rows [%lld, %lld) (%lld): forward_backward %.3f ms (median of "
      "%d); memory: workspace %.1f MiB, %.1f MiB in use in all (inputs, gradients, workspace, "
      "L2 flush buffer, NCCL and cuBLAS), %.1f MiB grown during the steps; loss %.6f (%s on "
      "every rank); sends %zu B/row forward + %zu B/row for dX\n",
      rank, world, local_rank, static_cast<long long>(v_begin), static_cast<long long>(v_end),
      static_cast<long long>(rows), median(ms), s.iters, mib(bytes),
      mib(free_at_start - free_after), mib(free_before > free_after ? free_before - free_after : 0),
      static_cast<double>(sharded_loss), identical ? "identical" : "DIFFERENT",
      volume.forward_bytes_per_row, volume.backward_bytes_per_row);
  int status = identical ? 0 : 2;
  if (rank == 0) {
    const double rel = std::fabs(static_cast<double>(sharded_loss) - single_gpu_loss) /
                       std::fabs(static_cast<double>(single_gpu_loss));
    std::printf("[rank 0] single-GPU lce::forward loss %.6f, relative difference %.2e\n",
                static_cast<double>(single_gpu_loss), rel);
    if (!(rel <= 1e-4)) status = 2;
  }
  std::fflush(stdout);
  check_nccl(ncclCommDestroy(comm), "ncclCommDestroy");
  return status;
}

void usage() {
  std::printf(
      "usage: vocab_parallel [--n N] [--d D] [--v V] [--dtype bf16|fp16|fp32] [--uneven]\n"
      "                      [--reduce-scatter] [--iters K] [--seed S]\n"
      "env: RANK, WORLD_SIZE, LOCAL_RANK; LCE_NCCL_ID or LCE_NCCL_ID_FILE (see launch.sh)\n");
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + arg);
      return argv[++i];
    };
    try {
      if (arg == "--n")
        s.shape.n = std::stoll(next());
      else if (arg == "--d")
        s.shape.d = std::stoll(next());
      else if (arg == "--v")
        s.shape.v = std::stoll(next());
      else if (arg == "--dtype")
        s.dtype = next();
      else if (arg == "--uneven")
        s.uneven = true;
      else if (arg == "--reduce-scatter")
        s.reduce_scatter = true;
      else if (arg == "--iters")
        s.iters = std::stoi(next());
      else if (arg == "--seed")
        s.seed = std::stoull(next());
      else if (arg == "--help" || arg == "-h") {
        usage();
        return 0;
      } else {
        usage();
        return 1;
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "vocab_parallel: %s\n", e.what());
      return 1;
    }
  }
  const int rank = env_int("RANK", 0);
  const int world = env_int("WORLD_SIZE", 1);
  const int local_rank = env_int("LOCAL_RANK", rank);
  if (const std::string why = cuda_device_problem(); !why.empty()) {
    std::fprintf(stderr, "vocab_parallel: no usable CUDA device: %s\n", why.c_str());
    return 1;
  }
  try {
    if (s.dtype == "bf16") return run<__nv_bfloat16>(s, rank, world, local_rank);
    if (s.dtype == "fp16") return run<__half>(s, rank, world, local_rank);
    if (s.dtype == "fp32") return run<float>(s, rank, world, local_rank);
    std::fprintf(stderr, "vocab_parallel: unknown --dtype %s\n", s.dtype.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] vocab_parallel: %s\n", rank, e.what());
  }
  return 1;
}
