// Python bindings of the trajectory buffer core (module otca_fast._C, or the JIT-built equivalent).
// The user-facing class is otca_fast.buffer.TrajectoryBuffer, which normalises arguments and then
// calls into this one.
// pybind11 plus torch's casters for Tensor, ScalarType and Device, without the whole C++ frontend
// that <torch/extension.h> pulls in (about a minute of compile time on two cores).
#include <torch/csrc/utils/pybind.h>

#include "trajectory_buffer.h"

namespace py = pybind11;

// Digest of csrc/ at build time (build_config.sources_hash), passed as a bare token.
#define OTCA_STRINGIFY_(x) #x
#define OTCA_STRINGIFY(x) OTCA_STRINGIFY_(x)
#ifndef OTCA_SOURCES_HASH
#define OTCA_SOURCES_HASH unknown
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "otca_fast trajectory buffer core (host storage, written mask, async copies)";
#ifdef OTCA_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("SOURCES_HASH") = OTCA_STRINGIFY(OTCA_SOURCES_HASH);
  // Every call that copies or waits releases the GIL: the copies are long (a Wan latent row is 4 MB)
  // and the core serialises its own state with a mutex.
  using Release = py::call_guard<py::gil_scoped_release>;
  // module_local: a stale otca_fast._C and its just-in-time replacement may both be loaded in one
  // process (see otca_fast.buffer._find_or_build); pybind11 would otherwise refuse to register the
  // same C++ type twice.
  py::class_<otca::TrajectoryBuffer>(m, "TrajectoryBuffer", py::module_local())
      .def(py::init<int64_t, int64_t, std::vector<int64_t>, at::ScalarType, at::Device, bool>(),
           py::arg("num_samples"), py::arg("num_states"), py::arg("latent_shape"), py::arg("dtype"),
           py::arg("device"), py::arg("pin_memory"), Release())
      .def("put", &otca::TrajectoryBuffer::put, py::arg("state"), py::arg("start"), py::arg("latents"), Release())
      .def("gather", &otca::TrajectoryBuffer::gather, py::arg("sample_index"), py::arg("state_index"), Release())
      .def("prefetch", &otca::TrajectoryBuffer::prefetch, py::arg("sample_index"), py::arg("state_index"),
           Release())
      .def("reset", &otca::TrajectoryBuffer::reset, Release())
      .def("synchronize", &otca::TrajectoryBuffer::synchronize, Release())
      .def("close", &otca::TrajectoryBuffer::close, Release())
      .def_property_readonly("closed", &otca::TrajectoryBuffer::closed)
      .def_property_readonly("pinned", &otca::TrajectoryBuffer::pinned)
      .def_property_readonly("nbytes", &otca::TrajectoryBuffer::nbytes)
      .def_property_readonly("backend", &otca::TrajectoryBuffer::backend)
      .def("num_pending", &otca::TrajectoryBuffer::num_pending);
}
