// plan_table: the memory each strategy of lce::forward_backward takes on the LM-head shapes, from
// the library's own plan (lce::choose_forward_backward), as a Markdown table. Needs no GPU: the
// plan is a pure function of the shape and the options (the device is consulted only for which
// kernel recomputes, which this table does not print).
//
// "Workspace" is what lce asks for (accumulators included); "fp32 dW" is the caller's fp32 dW
// buffer that row_chunked and stored row chunks add to (v·d·4 bytes), which a bf16 training
// loop holds besides its bf16 parameters (the PyTorch binding allocates it and casts).
#include <cstdint>
#include <cstdio>
#include <lce/lce.cuh>
#include <string>

namespace {

struct shape_row {
  const char* name;
  lce::problem shape;
};

struct strategy_row {
  const char* name;
  lce::backward_strategy strategy;
  std::size_t budget_mib;
  bool fp32_dw;
  std::int64_t n = 8192;  ///< tokens: the shapes' 8192, or a micro-batch of 8 × 4096
};

double mib(std::size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

}  // namespace

int main() {
  using bf16 = __nv_bfloat16;
  const shape_row shapes[] = {{"Gemma 2", {8192, 2304, 256000}},
                              {"Llama 3", {8192, 4096, 128256}},
                              {"Qwen 2.5", {8192, 3584, 152064}}};
  const strategy_row strategies[] = {
      {"default (automatic, 256 MiB), bf16 dW", lce::backward_strategy::automatic, 256, false},
      {"automatic, 256 MiB, fp32 dW", lce::backward_strategy::automatic, 256, true},
      {"row_chunked, 1 GiB, fp32 dW", lce::backward_strategy::row_chunked, 1024, true},
      {"row_chunked, 4 GiB, fp32 dW", lce::backward_strategy::row_chunked, 4096, true},
      {"stored (all rows), bf16 dW", lce::backward_strategy::stored, 256, false},
      {"automatic, 1 GiB, fp32 dW", lce::backward_strategy::automatic, 1024, true},
      {"automatic, 4 GiB, bf16 dW", lce::backward_strategy::automatic, 4096, false},
      // n = 32768: the default gives the fp32 dX accumulator its own allowance; where the
      // stored values of all rows do not fit, a bf16 dW takes row chunks with fp32 dW/db
      // accumulators (v·(d+1)·4 bytes) inside the budget
      {"default (automatic, 256 MiB), bf16 dW, n = 32768", lce::backward_strategy::automatic, 256,
       false, 32768},
      {"automatic, 4 GiB, bf16 dW, n = 32768", lce::backward_strategy::automatic, 4096, false,
       32768},
  };
  std::printf(
      "| forward_backward, bf16 X and W | shape | runs | chunk | workspace MiB | of which "
      "fp32 accumulator | fp32 dW MiB | total MiB |\n|---|---|---|---|---|---|---|---|\n");
  for (const strategy_row& st : strategies) {
    for (shape_row sh : shapes) {
      sh.shape.n = st.n;
      lce::backward_options bopt;
      bopt.strategy = st.strategy;
      bopt.memory_budget = st.budget_mib << 20;
      const lce::backward_choice c = st.fp32_dw
                                         ? lce::choose_forward_backward<bf16, float>(sh.shape, bopt)
                                         : lce::choose_forward_backward<bf16, bf16>(sh.shape, bopt);
      const std::size_t dw32 = st.fp32_dw ? static_cast<std::size_t>(sh.shape.v) *
                                                static_cast<std::size_t>(sh.shape.d) * 4
                                          : 0;
      const std::string chunk =
          c.strategy == lce::backward_strategy::stored && c.chunk == 0
              ? "all rows"
              : std::to_string(c.chunk) +
                    (c.strategy == lce::backward_strategy::vocab_chunked ? " columns" : " rows");
      std::printf("| %s | %s | %s | %s | %.1f | %.1f | %.1f | %.1f |\n", st.name, sh.name,
                  lce::to_string(c.strategy), chunk.c_str(), mib(c.workspace_bytes),
                  mib(c.accumulator_bytes), mib(dw32), mib(c.workspace_bytes + dw32));
    }
  }
  return 0;
}
