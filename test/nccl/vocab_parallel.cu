// GPU tests of the vocabulary-parallel layer on two GPUs (skipped with fewer): W sharded by
// vocabulary rows over ranks 0 and 1 (uneven shards; cases where one rank owns none of the
// targets), every loss option and output, fp32/fp16/bf16, forward, backward (dX all-reduced or
// reduce-scattered; vocab_chunked and row_chunked; several chunks), forward_backward (those and
// stored) and
// accumulate, against the fp64 reference of the full problem (CPU for small shapes, GPU for
// larger ones, on device 0). Every output of every rank is checked; per-row outputs must be the
// same on both ranks.
//
// One process drives both devices: communicators from ncclCommInitAll, one host thread per rank
// for every collective call (a rank's call interleaves kernels and collectives, so the two
// ranks' calls cannot be grouped on one thread). Catch2 assertions run on the main thread only.
// Prints RESULT lines like the other GPU tests (op=nccl_forward, ...).
#include <nccl.h>

#include <functional>
#include <lce/nccl/vocab_parallel.cuh>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "support/harness.cuh"

namespace {

using namespace lce_test;

constexpr int ranks = 2;

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}

/// The communicators of devices 0 and 1, created once per process and never destroyed: a
/// destructor would run after main, when the CUDA runtime may already be torn down.
class communicators {
 public:
  static communicators& get() {
    static communicators* instance = new communicators;
    return *instance;
  }
  ncclComm_t operator[](int rank) const { return comms_[rank]; }

 private:
  communicators() {
    const int devices[ranks] = {0, 1};
    check_nccl(ncclCommInitAll(comms_, ranks, devices), "ncclCommInitAll");
  }
  ncclComm_t comms_[ranks] = {};
};

/// Uneven shards: rank 0 holds about 40% of the vocabulary.
struct shard_range {
  std::int64_t begin, end;
};

std::vector<shard_range> make_shards(std::int64_t v) {
  const std::int64_t split = std::max<std::int64_t>(1, v * 2 / 5);
  return {{0, split}, {split, v}};
}

/// What a rank did: its status and message, or the exception its thread caught.
struct rank_result {
  cudaError_t status = cudaSuccess;
  std::string message;
};

/// Runs `call(rank)` on one host thread per rank with the rank's device current, waits for the
/// rank's stream, and checks (on this thread) that every rank succeeded.
void on_ranks(const std::function<cudaError_t(int)>& call,
              const std::vector<cudaStream_t>& streams) {
  std::vector<rank_result> results(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        LCE_TEST_CUDA(cudaSetDevice(r));
        results[r].status = call(r);
        results[r].message = lce::last_error_message();
        LCE_TEST_CUDA(cudaStreamSynchronize(streams[r]));
        LCE_TEST_CUDA(cudaGetLastError());
      } catch (const std::exception& e) {
        results[r].status = cudaErrorUnknown;
        results[r].message = e.what();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  LCE_TEST_CUDA(cudaSetDevice(0));
  for (int r = 0; r < ranks; ++r) {
    INFO("rank " << r << ": " << results[r].message);
    REQUIRE(results[r].status == cudaSuccess);
  }
}

/// A copy of `count` elements from device 0 onto `device`.
template <class T>
device_buffer<T> copy_to(int device, const T* src, std::size_t count) {
  LCE_TEST_CUDA(cudaSetDevice(device));
  device_buffer<T> out(count);
  if (count != 0) LCE_TEST_CUDA(cudaMemcpyPeer(out.data(), device, src, 0, count * sizeof(T)));
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  LCE_TEST_CUDA(cudaSetDevice(0));
  return out;
}

/// One rank: its device, stream, cuBLAS handle, workspace and its copies of the inputs (full X,
/// targets, class weights, upstream gradient; its rows of W and bias).
template <class Element>
struct rank_state {
  int device;
  shard_range range;
  std::unique_ptr<gpu_context> ctx;
  device_buffer<Element> x, w, bias;
  device_buffer<std::int64_t> targets;
  device_buffer<float> class_weight, upstream;

  rank_state(int r, const shard_range& s, const problem_data<Element>& data) : device(r), range(s) {
    const lce::problem& p = data.shape;
    LCE_TEST_CUDA(cudaSetDevice(r));
    ctx = std::make_unique<gpu_context>();
    x = copy_to(r, data.x.data(), data.x.size());
    w = copy_to(r, data.w.data() + s.begin * p.w_stride(),
                static_cast<std::size_t>((s.end - s.begin) * p.w_stride()));
    if (data.spec.bias)
      bias = copy_to(r, data.bias.data() + s.begin, static_cast<std::size_t>(s.end - s.begin));
    targets = copy_to(r, data.targets.data(), data.targets.size());
    if (data.spec.class_weights)
      class_weight = copy_to(r, data.class_weight.data(), data.class_weight.size());
    refresh_upstream(data);
  }
  void refresh_upstream(const problem_data<Element>& data) {
    upstream = copy_to(device, data.d_upstream.data(), data.d_upstream.size());
  }
  [[nodiscard]] std::int64_t rows() const { return range.end - range.begin; }
  [[nodiscard]] lce::nccl::vocab_shard shard(lce::nccl::dx_reduction dx) const {
    lce::nccl::vocab_shard s;
    s.comm = communicators::get()[device];
    s.v_begin = range.begin;
    s.v_end = range.end;
    s.dx = dx;
    return s;
  }
  [[nodiscard]] const Element* bias_pointer() const { return bias.empty() ? nullptr : bias.data(); }
  [[nodiscard]] const float* class_weight_pointer() const {
    return class_weight.empty() ? nullptr : class_weight.data();
  }
  [[nodiscard]] const float* grad_pointer() const {
    return upstream.empty() ? nullptr : upstream.data();
  }
};

template <class Element>
std::vector<std::unique_ptr<rank_state<Element>>> make_ranks(const problem_data<Element>& data) {
  (void)communicators::get();  // on this thread, before the rank threads use it
  LCE_TEST_CUDA(cudaSetDevice(0));
  const std::vector<shard_range> shards = make_shards(data.spec.v);
  std::vector<std::unique_ptr<rank_state<Element>>> out;
  for (int r = 0; r < ranks; ++r)
    out.push_back(std::make_unique<rank_state<Element>>(r, shards[r], data));
  LCE_TEST_CUDA(cudaSetDevice(0));
  return out;
}

template <class Element>
std::vector<cudaStream_t> streams_of(const std::vector<std::unique_ptr<rank_state<Element>>>& rs) {
  std::vector<cudaStream_t> out;
  for (const auto& r : rs) out.push_back(r->ctx->stream());
  return out;
}

/// Every output of one rank, poisoned (0xFF bytes: NaN, or −1 for int64).
template <class Element, class Grad>
struct rank_outputs {
  device_buffer<float> loss, z_loss, token_loss, lse, token_z_loss, entropy, target_logprob;
  device_buffer<std::int64_t> correct, argmax;
  device_buffer<Element> dx;
  device_buffer<Grad> dw, db;
  std::int64_t dx_rows = 0;

  rank_outputs(int device, const lce::problem& p, std::int64_t shard_rows, std::int64_t dx_rows_)
      : dx_rows(dx_rows_) {
    LCE_TEST_CUDA(cudaSetDevice(device));
    const auto n = static_cast<std::size_t>(p.n);
    loss = device_buffer<float>(1);
    z_loss = device_buffer<float>(1);
    correct = device_buffer<std::int64_t>(1);
    for (auto* b : {&token_loss, &lse, &token_z_loss, &entropy, &target_logprob})
      *b = device_buffer<float>(n);
    argmax = device_buffer<std::int64_t>(n);
    dx = device_buffer<Element>(static_cast<std::size_t>(dx_rows * p.dx_stride()));
    dw = device_buffer<Grad>(static_cast<std::size_t>(shard_rows * p.dw_stride()));
    db = device_buffer<Grad>(static_cast<std::size_t>(shard_rows));
    for (auto* b : {&loss, &z_loss, &token_loss, &lse, &token_z_loss, &entropy, &target_logprob})
      b->poison();
    correct.poison();
    argmax.poison();
    dx.poison();
    dw.poison();
    db.poison();
    LCE_TEST_CUDA(cudaSetDevice(0));
  }
};

/// `count` elements of rank `device`'s buffer, on device 0.
template <class T>
device_buffer<T> to_device0(int device, const T* src, std::size_t count) {
  LCE_TEST_CUDA(cudaSetDevice(0));
  device_buffer<T> out(count);
  if (count != 0) LCE_TEST_CUDA(cudaMemcpyPeer(out.data(), 0, src, device, count * sizeof(T)));
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  return out;
}

/// Concatenates the ranks' row blocks ([rows_r, ld] each) into one [Σ rows_r, ld] on device 0.
template <class T>
device_buffer<T> gather_rows(const std::vector<const T*>& parts,
                             const std::vector<std::int64_t>& rows, std::int64_t ld) {
  std::int64_t total = 0;
  for (std::int64_t r : rows) total += r;
  LCE_TEST_CUDA(cudaSetDevice(0));
  device_buffer<T> out(static_cast<std::size_t>(total * ld));
  std::int64_t at = 0;
  for (int r = 0; r < ranks; ++r) {
    LCE_TEST_CUDA(cudaMemcpyPeer(out.data() + at * ld, 0, parts[r], r,
                                 static_cast<std::size_t>(rows[r] * ld) * sizeof(T)));
    at += rows[r];
  }
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  return out;
}

/// The transformed logit z_ik in fp64 from the device-0 inputs (argmax near-ties).
template <class Element>
double reference_logit(const problem_data<Element>& data, std::int64_t i, std::int64_t k) {
  const lce::problem& s = data.shape;
  std::vector<Element> xr(static_cast<std::size_t>(s.d)), wr(static_cast<std::size_t>(s.d));
  LCE_TEST_CUDA(cudaMemcpy(xr.data(), data.x.data() + i * s.x_stride(), xr.size() * sizeof(Element),
                           cudaMemcpyDeviceToHost));
  LCE_TEST_CUDA(cudaMemcpy(wr.data(), data.w.data() + k * s.w_stride(), wr.size() * sizeof(Element),
                           cudaMemcpyDeviceToHost));
  double acc = 0.0;
  for (std::size_t j = 0; j < xr.size(); ++j) acc += to_double(xr[j]) * to_double(wr[j]);
  if (data.spec.bias) {
    Element b;
    LCE_TEST_CUDA(cudaMemcpy(&b, data.bias.data() + k, sizeof(Element), cudaMemcpyDeviceToHost));
    acc += to_double(b);
  }
  return detail::transform_logit(acc, reference_options_of(data.options));
}

/// Errors of one run, printed as a RESULT line (negative: not measured).
struct errors {
  double loss = -1, z_loss = -1, lse = -1, token_loss = -1, token_z_loss = -1, entropy = -1,
         target_logprob = -1, dx = -1, dw = -1, db = -1;
  long long argmax_mismatch = -1, correct = -1, ref_correct = -1;
};

template <class Element, class Grad>
void print_nccl_result(const char* op, const problem_data<Element>& data, const char* variant,
                       const errors& m) {
  auto count = [](long long c) { return c < 0 ? std::string("-") : std::to_string(c); };
  const std::vector<shard_range> shards = make_shards(data.spec.v);
  std::printf(
      "RESULT op=%s dtype=%s grad=%s shape=%s ranks=%d shards=[0,%lld)+[%lld,%lld) variant=%s"
      " reduction=%s options=%s loss=%s z_loss=%s lse=%s token_loss=%s token_z_loss=%s"
      " entropy=%s target_logprob=%s argmax_mismatch=%s correct=%s/%s dx=%s dw=%s db=%s\n",
      op, element_name<Element>(), element_name<Grad>(), data.spec.shape_string().c_str(), ranks,
      static_cast<long long>(shards[0].end), static_cast<long long>(shards[1].begin),
      static_cast<long long>(shards[1].end), variant, reduction_name(data.spec.reduction),
      data.spec.options_string().c_str(), format_error(m.loss).c_str(),
      format_error(m.z_loss).c_str(), format_error(m.lse).c_str(),
      format_error(m.token_loss).c_str(), format_error(m.token_z_loss).c_str(),
      format_error(m.entropy).c_str(), format_error(m.target_logprob).c_str(),
      count(m.argmax_mismatch).c_str(), count(m.correct).c_str(), count(m.ref_correct).c_str(),
      format_error(m.dx).c_str(), format_error(m.dw).c_str(), format_error(m.db).c_str());
  std::fflush(stdout);
}

/// Every forward output of every rank against the reference (the worst rank's error kept).
template <class Element, class Grad>
void check_forward(const problem_data<Element>& data,
                   const std::vector<std::unique_ptr<rank_outputs<Element, Grad>>>& outs,
                   errors& m) {
  const double tol = loss_tolerance<Element>();
  const std::int64_t n = data.shape.n;
  const auto rows = static_cast<std::size_t>(n);
  const bool reduced = data.spec.reduction != lce::reduction::none;
  auto worst = [](double& slot, double e) { slot = std::max(slot, e); };
  for (int r = 0; r < ranks; ++r) {
    INFO("rank " << r);
    const rank_outputs<Element, Grad>& o = *outs[r];
    if (reduced) {
      const auto loss = to_device0(r, o.loss.data(), 1);
      const auto z_loss = to_device0(r, o.z_loss.data(), 1);
      worst(m.loss, check_loss(loss.data(), data.ref_loss, tol));
      worst(m.z_loss, check_loss(z_loss.data(), data.ref_z_loss, tol));
    }
    auto per_row = [&](const char* name, const float* src, const device_buffer<double>& ref,
                       double& slot) {
      const auto out = to_device0(r, src, rows);
      worst(slot, check_output(name, out.data(), n, 1, 1, ref.data(), tol));
    };
    per_row("token_loss", o.token_loss.data(), data.ref_token_loss, m.token_loss);
    per_row("lse", o.lse.data(), data.ref_lse, m.lse);
    per_row("token_z_loss", o.token_z_loss.data(), data.ref_token_z_loss, m.token_z_loss);
    per_row("entropy", o.entropy.data(), data.ref_entropy, m.entropy);
    per_row("target_logprob", o.target_logprob.data(), data.ref_target_logprob, m.target_logprob);

    // argmax: exact, or a near-tie (within 1e-3 of the reference maximum); correct: the count of
    // valid rows whose argmax is the target.
    std::vector<std::int64_t> argmax(rows);
    std::int64_t correct = -2;
    LCE_TEST_CUDA(cudaMemcpy(argmax.data(), to_device0(r, o.argmax.data(), rows).data(),
                             rows * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
    LCE_TEST_CUDA(cudaMemcpy(&correct, to_device0(r, o.correct.data(), 1).data(),
                             sizeof(std::int64_t), cudaMemcpyDeviceToHost));
    long long mismatches = 0, far = 0;
    std::int64_t expected_correct = 0;
    for (std::size_t i = 0; i < rows; ++i) {
      const std::int64_t y = data.h_effective_targets[i];
      if (y != data.spec.ignore_index && argmax[i] == y) ++expected_correct;
      if (argmax[i] == data.ref_argmax[i]) continue;
      ++mismatches;
      const bool inside = argmax[i] >= 0 && argmax[i] < data.shape.v;
      const double z_max = data.ref_max_logit[i];
      const double gap =
          inside ? z_max - reference_logit(data, static_cast<std::int64_t>(i), argmax[i]) : 1e30;
      if (!(gap <= 1e-3 * std::max(1.0, std::fabs(z_max)))) {
        ++far;
        UNSCOPED_INFO("row " << i << ": argmax " << argmax[i] << ", reference "
                             << data.ref_argmax[i]);
      }
    }
    CHECK(far == 0);
    CHECK(correct == expected_correct);
    CHECK(std::llabs(correct - data.ref_correct) <= mismatches);
    m.argmax_mismatch = std::max(m.argmax_mismatch, mismatches);
    m.correct = correct;
    m.ref_correct = data.ref_correct;
  }
}

__global__ void add_dense_kernel(const double* a, const double* b, double* out,
                                 std::int64_t count) {
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[e] = a[e] + b[e];
}

/// Checks a gradient (on device 0, [rows, ld]) against the reference, or with `base` (the
/// dense prefill) against base + reference, relative to the reference's norm.
template <class T>
double check_gradient(const char* name, const T* d_out, std::int64_t rows, std::int64_t cols,
                      std::int64_t ld, const device_buffer<double>* base, const double* d_ref,
                      double tolerance) {
  if (base == nullptr) return check_output(name, d_out, rows, cols, ld, d_ref, tolerance);
  const std::int64_t count = rows * cols;
  device_buffer<double> expected(static_cast<std::size_t>(count));
  add_dense_kernel<<<gpu_ref::grid_for(count, 256), 256>>>(base->data(), d_ref, expected.data(),
                                                           count);
  LCE_TEST_CUDA(cudaGetLastError());
  const compare_stats s = compare_device(d_out, rows, cols, ld, expected.data());
  const double ref_norm = compare_device(d_ref, rows, cols, cols, d_ref).ref_norm;
  const double abs_err = s.ref_norm > 0.0 ? s.rel * s.ref_norm : s.rel;
  const double err = ref_norm > 0.0 ? abs_err / ref_norm : abs_err;
  INFO(name << " (accumulated): rel to the gradient=" << err << " nonfinite=" << s.nonfinite
            << " padding_written=" << s.padding << " tolerance=" << tolerance);
  CHECK(s.nonfinite == 0);
  CHECK(s.padding == 0);
  CHECK(err <= tolerance);
  return err;
}

/// The prefill of the gradient buffers for accumulate: dense fp64 copies on device 0 of the
/// full dX, dW, db, from which each rank's buffers are filled.
struct prefill {
  device_buffer<double> dx, dw, db;
};

template <class T>
device_buffer<T> random_matrix(std::int64_t rows, std::int64_t cols, std::int64_t ld,
                               std::uint64_t seed) {
  LCE_TEST_CUDA(cudaSetDevice(0));
  device_buffer<T> m(static_cast<std::size_t>(rows * ld));
  fill_normal(m.data(), rows, cols, ld, 0.01, seed);
  return m;
}

/// Fills each rank's gradient buffers from full random matrices (the same dX on every rank,
/// its rows for reduce_scatter; each rank's rows of dW and db) and returns their dense copies.
template <class Element, class Grad>
prefill fill_gradients(const problem_data<Element>& data,
                       const std::vector<std::unique_ptr<rank_state<Element>>>& rs,
                       std::vector<std::unique_ptr<rank_outputs<Element, Grad>>>& outs,
                       bool scatter, std::uint64_t seed) {
  const lce::problem& p = data.shape;
  const auto dx = random_matrix<Element>(p.n, p.d, p.dx_stride(), seed);
  const auto dw = random_matrix<Grad>(p.v, p.d, p.dw_stride(), seed + 1);
  const auto db = random_matrix<Grad>(1, p.v, p.v, seed + 2);
  for (int r = 0; r < ranks; ++r) {
    const std::int64_t dx_row0 = scatter ? r * (p.n / ranks) : 0;
    LCE_TEST_CUDA(cudaMemcpyPeer(outs[r]->dx.data(), r, dx.data() + dx_row0 * p.dx_stride(), 0,
                                 outs[r]->dx.bytes()));
    LCE_TEST_CUDA(cudaMemcpyPeer(outs[r]->dw.data(), r,
                                 dw.data() + rs[r]->range.begin * p.dw_stride(), 0,
                                 outs[r]->dw.bytes()));
    LCE_TEST_CUDA(cudaMemcpyPeer(outs[r]->db.data(), r, db.data() + rs[r]->range.begin, 0,
                                 outs[r]->db.bytes()));
  }
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  return {gpu_to_dense_double(dx.data(), p.n, p.d, p.dx_stride()),
          gpu_to_dense_double(dw.data(), p.v, p.d, p.dw_stride()),
          gpu_to_dense_double(db.data(), 1, p.v, p.v)};
}

/// dX (each rank's, or the ranks' row blocks for reduce_scatter), dW and db (the ranks' rows
/// concatenated) against the reference.
template <class Element, class Grad>
void check_gradients(const problem_data<Element>& data,
                     const std::vector<std::unique_ptr<rank_state<Element>>>& rs,
                     const std::vector<std::unique_ptr<rank_outputs<Element, Grad>>>& outs,
                     bool scatter, const prefill* base, errors& m) {
  const double tol = grad_tolerance<Element>();
  const lce::problem& p = data.shape;
  if (scatter) {
    const auto dx = gather_rows<Element>({outs[0]->dx.data(), outs[1]->dx.data()},
                                         {outs[0]->dx_rows, outs[1]->dx_rows}, p.dx_stride());
    m.dx = check_gradient("dx (reduce_scatter)", dx.data(), p.n, p.d, p.dx_stride(),
                          base ? &base->dx : nullptr, data.ref_dx.data(), tol);
  } else {
    for (int r = 0; r < ranks; ++r) {
      INFO("rank " << r);
      const auto dx = to_device0(r, outs[r]->dx.data(), outs[r]->dx.size());
      m.dx = std::max(m.dx, check_gradient("dx", dx.data(), p.n, p.d, p.dx_stride(),
                                           base ? &base->dx : nullptr, data.ref_dx.data(), tol));
    }
  }
  const auto dw = gather_rows<Grad>({outs[0]->dw.data(), outs[1]->dw.data()},
                                    {rs[0]->rows(), rs[1]->rows()}, p.dw_stride());
  m.dw = check_gradient("dw", dw.data(), p.v, p.d, p.dw_stride(), base ? &base->dw : nullptr,
                        data.ref_dw.data(), tol);
  const auto db = gather_rows<Grad>({outs[0]->db.data(), outs[1]->db.data()},
                                    {rs[0]->rows(), rs[1]->rows()}, 1);
  m.db = check_gradient("db", db.data(), 1, p.v, p.v, base ? &base->db : nullptr,
                        data.ref_db.data(), db_tolerance(data));
}

template <class Element, class Grad>
std::vector<std::unique_ptr<rank_outputs<Element, Grad>>> make_outputs(
    const problem_data<Element>& data, const std::vector<std::unique_ptr<rank_state<Element>>>& rs,
    bool scatter) {
  std::vector<std::unique_ptr<rank_outputs<Element, Grad>>> outs;
  for (int r = 0; r < ranks; ++r)
    outs.push_back(std::make_unique<rank_outputs<Element, Grad>>(
        r, data.shape, rs[r]->rows(), scatter ? data.shape.n / ranks : data.shape.n));
  LCE_TEST_CUDA(cudaSetDevice(0));
  return outs;
}

/// Forward with every output on both ranks.
template <class Element>
void run_forward(const problem_data<Element>& data,
                 const std::vector<std::unique_ptr<rank_state<Element>>>& rs) {
  INFO("nccl forward");
  auto outs = make_outputs<Element, Element>(data, rs, false);
  const bool reduced = data.spec.reduction != lce::reduction::none;
  on_ranks(
      [&](int r) {
        const rank_state<Element>& s = *rs[r];
        rank_outputs<Element, Element>& o = *outs[r];
        lce::forward_args<Element> a;
        a.x = s.x.data();
        a.w = s.w.data();
        a.bias = s.bias_pointer();
        a.targets = s.targets.data();
        a.class_weight = s.class_weight_pointer();
        a.loss = reduced ? o.loss.data() : nullptr;
        a.z_loss = reduced ? o.z_loss.data() : nullptr;
        a.token_loss = o.token_loss.data();
        a.lse = o.lse.data();
        a.token_z_loss = o.token_z_loss.data();
        a.argmax = o.argmax.data();
        a.correct = o.correct.data();
        a.entropy = o.entropy.data();
        a.target_logprob = o.target_logprob.data();
        const lce::nccl::vocab_shard shard = s.shard(lce::nccl::dx_reduction::all_reduce);
        std::size_t bytes = 0;
        LCE_RETURN_IF_ERROR(lce::nccl::forward(nullptr, bytes, a, data.shape, shard, data.options));
        void* ws = s.ctx->workspace(bytes);
        return lce::nccl::forward(ws, bytes, a, data.shape, shard, data.options, s.ctx->stream());
      },
      streams_of(rs));
  errors m;
  check_forward(data, outs, m);
  print_nccl_result<Element, Element>("nccl_forward", data, "-", m);
}

struct variant {
  lce::backward_strategy strategy;
  std::size_t budget;
  lce::nccl::dx_reduction dx;
  std::string label;
};

constexpr std::size_t small_budget = std::size_t{1} << 20;  // several chunks

template <class Element, class Grad>
std::vector<variant> variants(bool scatter_allowed) {
  const std::size_t budget = lce::backward_options{}.memory_budget;
  constexpr auto all = lce::nccl::dx_reduction::all_reduce;
  constexpr auto scatter = lce::nccl::dx_reduction::reduce_scatter;
  std::vector<variant> out;
  if constexpr (std::is_same_v<Grad, float>) {
    out.push_back({lce::backward_strategy::row_chunked, small_budget, all, "row_chunked/1MiB"});
  } else {
    out.push_back({lce::backward_strategy::vocab_chunked, budget, all, "vocab_chunked"});
    out.push_back({lce::backward_strategy::vocab_chunked, small_budget, all, "vocab_chunked/1MiB"});
    if (scatter_allowed)
      out.push_back(
          {lce::backward_strategy::vocab_chunked, budget, scatter, "vocab_chunked/reduce_scatter"});
  }
  return out;
}

lce::backward_options options_of(const variant& how) {
  lce::backward_options bopt;
  bopt.strategy = how.strategy;
  bopt.memory_budget = how.budget;
  return bopt;
}

/// Backward with the harness's random upstream gradient and the reference lse.
template <class Element, class Grad>
void run_backward(const problem_data<Element>& data,
                  const std::vector<std::unique_ptr<rank_state<Element>>>& rs, const variant& how) {
  INFO("nccl backward, " << how.label << " grad=" << element_name<Grad>());
  const bool scatter = how.dx == lce::nccl::dx_reduction::reduce_scatter;
  auto outs = make_outputs<Element, Grad>(data, rs, scatter);
  const std::vector<double> ref_lse = data.ref_lse.download();
  const std::vector<float> lse_host(ref_lse.begin(), ref_lse.end());
  std::vector<device_buffer<float>> lse;
  for (int r = 0; r < ranks; ++r) {
    LCE_TEST_CUDA(cudaSetDevice(r));
    lse.emplace_back(lse_host);
  }
  LCE_TEST_CUDA(cudaSetDevice(0));
  prefill base;
  if (data.options.accumulate) base = fill_gradients(data, rs, outs, scatter, data.seed ^ 0xacc);
  const lce::backward_options bopt = options_of(how);
  on_ranks(
      [&](int r) {
        const rank_state<Element>& s = *rs[r];
        rank_outputs<Element, Grad>& o = *outs[r];
        lce::backward_args<Element, Grad> a;
        a.x = s.x.data();
        a.w = s.w.data();
        a.bias = s.bias_pointer();
        a.targets = s.targets.data();
        a.lse = lse[r].data();
        a.grad = s.grad_pointer();
        a.dx = o.dx.data();
        a.dw = o.dw.data();
        a.db = o.db.data();
        a.class_weight = s.class_weight_pointer();
        const lce::nccl::vocab_shard shard = s.shard(how.dx);
        std::size_t bytes = 0;
        LCE_RETURN_IF_ERROR(lce::nccl::backward(nullptr, bytes, a, data.shape, shard, data.options,
                                                bopt, s.ctx->handle()));
        void* ws = s.ctx->workspace(bytes);
        return lce::nccl::backward(ws, bytes, a, data.shape, shard, data.options, bopt,
                                   s.ctx->handle(), s.ctx->stream());
      },
      streams_of(rs));
  errors m;
  check_gradients(data, rs, outs, scatter, data.options.accumulate ? &base : nullptr, m);
  print_nccl_result<Element, Grad>("nccl_backward", data, how.label.c_str(), m);
}

/// forward_backward (upstream 1) with every output.
template <class Element, class Grad>
void run_forward_backward(const problem_data<Element>& data,
                          const std::vector<std::unique_ptr<rank_state<Element>>>& rs,
                          const variant& how) {
  INFO("nccl forward_backward, " << how.label << " grad=" << element_name<Grad>());
  REQUIRE(data.upstream.empty());
  const bool scatter = how.dx == lce::nccl::dx_reduction::reduce_scatter;
  auto outs = make_outputs<Element, Grad>(data, rs, scatter);
  prefill base;
  if (data.options.accumulate) base = fill_gradients(data, rs, outs, scatter, data.seed ^ 0xfb);
  const lce::backward_options bopt = options_of(how);
  const bool reduced = data.spec.reduction != lce::reduction::none;
  on_ranks(
      [&](int r) {
        const rank_state<Element>& s = *rs[r];
        rank_outputs<Element, Grad>& o = *outs[r];
        lce::forward_backward_args<Element, Grad> a;
        a.x = s.x.data();
        a.w = s.w.data();
        a.bias = s.bias_pointer();
        a.targets = s.targets.data();
        a.class_weight = s.class_weight_pointer();
        a.loss = reduced ? o.loss.data() : nullptr;
        a.z_loss = reduced ? o.z_loss.data() : nullptr;
        a.token_loss = o.token_loss.data();
        a.lse = o.lse.data();
        a.token_z_loss = o.token_z_loss.data();
        a.argmax = o.argmax.data();
        a.correct = o.correct.data();
        a.entropy = o.entropy.data();
        a.target_logprob = o.target_logprob.data();
        a.dx = o.dx.data();
        a.dw = o.dw.data();
        a.db = o.db.data();
        const lce::nccl::vocab_shard shard = s.shard(how.dx);
        std::size_t bytes = 0;
        LCE_RETURN_IF_ERROR(lce::nccl::forward_backward(nullptr, bytes, a, data.shape, shard,
                                                        data.options, bopt, s.ctx->handle()));
        void* ws = s.ctx->workspace(bytes);
        return lce::nccl::forward_backward(ws, bytes, a, data.shape, shard, data.options, bopt,
                                           s.ctx->handle(), s.ctx->stream());
      },
      streams_of(rs));
  errors m;
  check_forward(data, outs, m);
  check_gradients(data, rs, outs, scatter, data.options.accumulate ? &base : nullptr, m);
  print_nccl_result<Element, Grad>("nccl_forward_backward", data, how.label.c_str(), m);
}

/// Where the valid targets go: anywhere, or all into one rank's shard (the other owns none).
enum class targets_in { anywhere, rank0, rank1 };

/// Moves every valid target into the shard of `where` (keeping it valid), then re-uploads.
template <class Element>
void concentrate_targets(problem_data<Element>& data, targets_in where) {
  if (where == targets_in::anywhere) return;
  const shard_range s = make_shards(data.spec.v)[where == targets_in::rank0 ? 0 : 1];
  const std::int64_t size = s.end - s.begin;
  REQUIRE(size >= 2);
  for (std::int64_t& y : data.h_targets) {
    if (y == data.spec.ignore_index) continue;
    std::int64_t moved = s.begin + y % size;
    if (moved == data.spec.ignore_index) moved = s.begin + (y + 1) % size;
    y = moved;
  }
  data.targets.upload(data.h_targets);
  data.h_effective_targets =
      reference_effective_targets(data.h_targets, data.spec.shift_seq_len, data.spec.ignore_index);
}

template <class Element>
void run_case(const case_spec& spec, targets_in where) {
  INFO("targets in " << (where == targets_in::anywhere ? "any shard"
                         : where == targets_in::rank0  ? "rank 0's shard only"
                                                       : "rank 1's shard only"));
  LCE_TEST_CUDA(cudaSetDevice(0));
  problem_data<Element> data(spec, fresh_seed());
  concentrate_targets(data, where);
  data.compute_reference(true);
  INFO(data.describe());
  auto rs = make_ranks(data);
  const bool scatter_allowed = spec.n % ranks == 0;
  run_forward(data, rs);
  for (const variant& how : variants<Element, Element>(scatter_allowed))
    run_backward<Element, Element>(data, rs, how);
  for (const variant& how : variants<Element, float>(scatter_allowed))
    run_backward<Element, float>(data, rs, how);
  data.use_unit_upstream();
  data.compute_reference(true);
  for (auto& r : rs) r->refresh_upstream(data);
  run_forward_backward<Element, Element>(
      data, rs,
      {lce::backward_strategy::vocab_chunked, small_budget,
       scatter_allowed ? lce::nccl::dx_reduction::reduce_scatter
                       : lce::nccl::dx_reduction::all_reduce,
       scatter_allowed ? "vocab_chunked/1MiB/reduce_scatter" : "vocab_chunked/1MiB"});
  run_forward_backward<Element, float>(
      data, rs,
      {lce::backward_strategy::row_chunked, lce::backward_options{}.memory_budget,
       lce::nccl::dx_reduction::all_reduce, "row_chunked"});
  // Each rank stores its shard's values (16-bit, no bias or class weights; else the fallback).
  run_forward_backward<Element, Element>(
      data, rs,
      {lce::backward_strategy::stored, lce::backward_options{}.memory_budget,
       scatter_allowed ? lce::nccl::dx_reduction::reduce_scatter
                       : lce::nccl::dx_reduction::all_reduce,
       scatter_allowed ? "stored/reduce_scatter" : "stored"});
}

/// The option combinations of test/gpu/options.cu, on a base shape (n a multiple of seq_len).
std::vector<case_spec> combinations(const case_spec& base, std::int64_t seq_len,
                                    lce::reduction single) {
  const case_spec b = base.with_reduction(single);
  return {
      b,
      b.smoothing(0.1f),
      b.weighted(),
      b.with_z_loss(1e-2f),
      b.capped(3.0f),
      b.with_temperature(0.7f).sum(),
      b.shifted(seq_len),
      b.ignore_id(2).ignoring(0.3),
      base.smoothing(0.1f).weighted().ignore_id(2).with_z_loss(1e-2f).capped(3.0f).none(),
      base.smoothing(0.2f)
          .weighted()
          .with_z_loss(1e-3f)
          .capped(5.0f)
          .with_temperature(1.5f)
          .shifted(seq_len),
      b.accumulating(),
      base.smoothing(0.1f)
          .weighted()
          .with_z_loss(1e-2f)
          .capped(3.0f)
          .shifted(seq_len)
          .none()
          .accumulating(),
  };
}

const std::vector<case_spec>& small_cases() {
  static const std::vector<case_spec> cases = [] {
    std::vector<case_spec> out =
        combinations(case_spec{64, 72, 1000}.padded(8, 3, 5, 7), 16, lce::reduction::mean);
    for (const case_spec& c : combinations(case_spec{7, 16, 127}.no_bias(), 7, lce::reduction::sum))
      out.push_back(c);
    return out;
  }();
  return cases;
}

}  // namespace

TEMPLATE_TEST_CASE("nccl small: every option on 2 ranks against the fp64 CPU reference",
                   "[gpu][nccl][small]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(small_cases()));
  REQUIRE(spec.nvd() <= cpu_reference_limit);
  run_case<TestType>(spec, targets_in::anywhere);
}

TEMPLATE_TEST_CASE("nccl small: one rank owns none of the targets", "[gpu][nccl][small]", float,
                   __half, __nv_bfloat16) {
  const targets_in where = GENERATE(targets_in::rank0, targets_in::rank1);
  const case_spec spec =
      GENERATE(case_spec{64, 72, 1000}.padded(8, 3, 5, 7), case_spec{64, 72, 1000}
                                                               .smoothing(0.1f)
                                                               .weighted()
                                                               .ignore_id(2)
                                                               .with_z_loss(1e-2f)
                                                               .capped(3.0f)
                                                               .none());
  run_case<TestType>(spec, where);
}

TEMPLATE_TEST_CASE("nccl small: an all-ignored batch gives zeros on every rank",
                   "[gpu][nccl][small]", float, __half, __nv_bfloat16) {
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  run_case<TestType>(case_spec{64, 72, 1000}
                         .with_reduction(red)
                         .smoothing(0.1f)
                         .weighted()
                         .with_z_loss(1e-2f)
                         .ignoring(1.0),
                     targets_in::anywhere);
}

TEMPLATE_TEST_CASE("nccl medium: options on 2 ranks against the fp64 GPU reference",
                   "[gpu][nccl][medium]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(case_spec{300, 1000, 4097}.padded(8, 3, 5, 7),
                                  case_spec{300, 1000, 4097}
                                      .smoothing(0.1f)
                                      .weighted()
                                      .ignore_id(2)
                                      .with_z_loss(1e-2f)
                                      .capped(5.0f)
                                      .none(),
                                  case_spec{300, 1000, 4097}
                                      .no_bias()
                                      .smoothing(0.05f)
                                      .with_temperature(0.8f)
                                      .capped(30.0f)
                                      .shifted(75)
                                      .sum()
                                      .accumulating());
  run_case<TestType>(spec, targets_in::anywhere);
}

TEST_CASE("nccl large: Gemma-like head, bf16, 2 ranks against the fp64 GPU reference",
          "[gpu][nccl][large]") {
  run_case<__nv_bfloat16>(
      case_spec{1030, 2304, 50257}.smoothing(0.1f).weighted().with_z_loss(1e-4f).capped(30.0f),
      targets_in::anywhere);
}
