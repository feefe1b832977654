// Argument parsing shared by the CPU op and the CUDA twin (torch-dependent; step_math.h is not).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace sage_fast {

struct StepFlags {
  bool gaussian;  // full Gaussian log-density; false for cps (its authors' -red(r^2))
  bool mean;      // reduction "mean" (else "sum")
};

inline StepFlags parse_flags(c10::string_view sde_type, c10::string_view reduction) {
  const std::string type(sde_type), red(reduction);
  TORCH_CHECK(type == "sage_grpo" || type == "flow_grpo" || type == "dance_grpo" || type == "cps" || type == "ode",
              "sde_type must be one of sage_grpo, flow_grpo, dance_grpo, cps, ode; got ", type);
  TORCH_CHECK(red == "mean" || red == "sum", "reduction must be one of mean, sum; got ", red);
  return {type != "cps", red == "mean"};
}

}  // namespace sage_fast
