// The mas_fast custom ops: their schemas, declared once for every device, and the module
// init of mas_fast._C. Kernels register per device: cpu/register.cpp (built into mas_fast._C)
// and cuda/register.cpp (the separate extension mas_fast._C_cuda, so that a failed CUDA build
// never costs the CPU kernels). Fake (meta) implementations and the autograd formula of
// `penalty` live in Python: mas_fast/ops/cpp_registrations.py (set_python_module below).
#include <Python.h>

#include <torch/library.h>

// `import mas_fast._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(mas_fast, m) {
  m.set_python_module("mas_fast.ops.cpp_registrations");
  m.def("penalty(Tensor[] params, Tensor[] theta_star, Tensor[] omega, float lam) -> Tensor");
  m.def("penalty_backward(Tensor grad_out, Tensor[] params, Tensor[] theta_star, Tensor[] omega, float lam)"
        " -> Tensor[]");
  m.def("penalty_and_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] theta_star, Tensor[] omega, "
        "float lam) -> Tensor");
  m.def("merge_(Tensor(a!)[] dst, Tensor[] src, float a, float b) -> ()");
  m.def("running_mean_update_(Tensor(a!)[] means, Tensor(b!)[] compensations, Tensor[] batch_sums, int count, "
        "int batch_count) -> ()");
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] theta_star, "
        "Tensor[] omega, float lam, float lr, float momentum, float dampening, float weight_decay, "
        "bool nesterov, bool maximize, bool init_buffers, bool proximal=False) -> Tensor");
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor[] theta_star, Tensor[] omega, float lam, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
        "bool amsgrad, bool maximize, bool proximal=False) -> Tensor");
  m.def("per_sample_abs_sum(Tensor delta, Tensor? scale) -> Tensor");
  m.def("per_sample_abs_matmul(Tensor delta, Tensor x) -> Tensor");
}
