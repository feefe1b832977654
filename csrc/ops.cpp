// sage_fast._C: schemas of the fused step ops, and the Python module stub that loads them.
//
// The ops mirror the Python-registered `sage_fast::` ops of kernels/ops.py name for name and
// argument for argument (packed coefficients `coef` = float32 [3, B] rows a, b, c; `rng` =
// int64 [2] (seed, offset)). They live in the namespace `sage_fast_cpp` because `sage_fast`
// is already defined from Python (torch.library allows one definition per name); the
// dispatcher in kernels/dispatch.py routes `sage_fast::` calls on CPU tensors here.
// Implementations: cpu/sde_cpu.cpp (CPU), cuda/sde_cuda.cpp (CUDA twin, CUDA builds only).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sage_fast_cpp, m) {
  m.def(
      "sde_step(Tensor x, Tensor v, Tensor coef, Tensor? noise, Tensor? rng, str sde_type, str reduction)"
      " -> (Tensor, Tensor)");
  m.def(
      "sde_logprob(Tensor x, Tensor v, Tensor x_next, Tensor coef, Tensor? v_ref, str sde_type, str reduction)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "sde_logprob_backward(Tensor x, Tensor v, Tensor x_next, Tensor coef, Tensor? v_ref, Tensor grad_logp,"
      " Tensor grad_kl, str sde_type, str reduction) -> Tensor");
}

// `import sage_fast._C` loads this library, which registers the ops above; the module itself
// exposes nothing else.
static struct PyModuleDef sage_fast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                                "sage_fast fused step ops (registered as torch.ops.sage_fast_cpp)",
                                                -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sage_fast_c_module); }
