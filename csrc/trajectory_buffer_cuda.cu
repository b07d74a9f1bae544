// CUDA copy engine of the trajectory buffer: pinned host storage and asynchronous device<->host
// copies on a dedicated copy stream, ordered against the caller's streams with events.
//
// Every transfer goes through cudaMemcpy(2D)Async, i.e. the GPU's copy engines, not through a kernel:
// a gather kernel reading mapped host memory would occupy SMs for the whole PCIe transfer, and the
// point of this buffer is that a gather overlapped with the training step costs (nearly) nothing.
//
// Stream protocol (P = the caller's current stream, C = this engine's copy stream):
//   put:    P waits for slot k's previous D2H      (slot.free, recorded on C)
//           P: slot k <- latents                   (device-to-device, any strides)
//           C waits for P                          (ready_)
//           C: host rows <- slot k                 (one cudaMemcpy2DAsync, D2H)
//           record slot.free on C
//     The caller's tensor is only read by the D2D copy on P, so any later write to it (on P, or on
//     another stream after the usual cross-stream sync with P) happens after that read: the caller may
//     overwrite or free it as soon as put() returns. P never waits for the PCIe transfer itself, only
//     for a slot to come free, so sampling keeps running while trajectories drain to the host.
//   gather: out <- caching allocator on P; C waits for P (out's block may have just been freed by P
//           with reads still queued); C: out <- host rows (H2D); record done on C. wait(): the stream
//           that uses `out` waits for done. Puts and gathers share C, so a gather issued after a put
//           of the same rows reads the new values and a put issued after a gather cannot overwrite rows
//           the gather has not copied yet.
#include "trajectory_buffer.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <optional>

namespace otca {

namespace {

using c10::cuda::CUDAStream;

// cudaEvent_t without timing (cheaper to record and wait on). block() before any record() is a no-op,
// which is what a slot that has never been copied from needs.
class Event {
 public:
  explicit Event(c10::DeviceIndex device) : device_(device) {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~Event() {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_IGNORE_ERROR(cudaEventDestroy(event_));
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(const CUDAStream& stream) {
    C10_CUDA_CHECK(cudaEventRecord(event_, stream.stream()));
    recorded_ = true;
  }
  void block(const CUDAStream& stream) const {
    if (recorded_) C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), event_, 0));
  }

 private:
  c10::DeviceIndex device_;
  cudaEvent_t event_ = nullptr;
  bool recorded_ = false;
};

// cudaMemcpy2D rejects pitches above cudaDeviceProp::memPitch, 2^31 - 1 bytes on every GPU so far;
// strided runs with a larger pitch are issued row by row instead.
constexpr int64_t kMaxPitch = 2147483647;

// Tells the caching allocator that `t`'s block is used on `stream`, so that freeing `t` does not hand
// the block to another allocation before the work queued on `stream` has finished with it.
void record_stream(const at::Tensor& t, const CUDAStream& stream) {
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

}  // namespace

struct CudaTicket {
  CudaTicket(c10::DeviceIndex device, CUDAStream alloc) : done(device), alloc_stream(alloc) {}
  Event done;
  CUDAStream alloc_stream;
};

namespace {

class CudaEngine final : public CopyEngine {
 public:
  explicit CudaEngine(c10::DeviceIndex device)
      : device_(device),
        copy_stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)),
        ready_(device),
        alloc_ready_(device) {
    for (auto& slot : slots_) slot = std::make_unique<Slot>(device);
  }

  ~CudaEngine() override {
    // The slots and tickets may still be read by queued copies; the caching allocator knows (they
    // were recorded on the copy stream), but events and pinned pages must outlive the queue.
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_IGNORE_ERROR(cudaStreamSynchronize(copy_stream_.stream()));
  }

  std::string name() const override { return "cuda"; }

  at::Tensor allocate(int64_t numel, at::ScalarType dtype, bool pinned) override {
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
    if (!pinned) return at::empty({numel}, options);
    // cudaHostAlloc with the exact size and a deleter that returns the pages to the OS: torch's
    // pinned caching allocator would round a 1 GB trajectory group up to the next power of two and
    // keep it cached after close().
    c10::cuda::CUDAGuard guard(device_);
    void* ptr = nullptr;
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
    C10_CUDA_CHECK(cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable));
    return at::from_blob(ptr, {numel}, [](void* p) { C10_CUDA_IGNORE_ERROR(cudaFreeHost(p)); }, options);
  }

  void put(const at::Tensor& storage, int64_t num_states, int64_t state, int64_t start,
           const at::Tensor& latents) override {
    const int64_t n = latents.size(0);
    const int64_t row_bytes = static_cast<int64_t>(latents.numel() / n) * latents.element_size();
    char* host = static_cast<char*>(storage.data_ptr());
    if (latents.is_cpu()) {
      // A host source is copied by this thread: queued gathers may still read these rows and queued
      // puts may still write them, so drain the copy stream first.
      synchronize();
      const at::Tensor src = latents.contiguous();
      const char* from = static_cast<const char*>(src.data_ptr());
      parallel_row_copy(
          n, row_bytes, [&](int64_t i) { return host + ((start + i) * num_states + state) * row_bytes; },
          [&](int64_t i) { return from + i * row_bytes; });
      return;
    }
    c10::cuda::CUDAGuard guard(device_);
    const CUDAStream producer = c10::cuda::getCurrentCUDAStream(device_);
    Slot& slot = *slots_[next_slot_];
    next_slot_ = (next_slot_ + 1) % slots_.size();
    const int64_t numel = latents.numel();
    if (!slot.mem.defined() || slot.mem.numel() < numel || slot.mem.scalar_type() != latents.scalar_type()) {
      // The old block (if any) was recorded on the copy stream, so the allocator keeps it until the
      // last D2H out of it has finished.
      slot.mem = at::empty({numel}, latents.options().memory_format(at::MemoryFormat::Contiguous));
      slot.alloc_stream.emplace(producer);
      record_stream(slot.mem, copy_stream_);
    }
    slot.free.block(producer);
    if (*slot.alloc_stream != producer) record_stream(slot.mem, producer);
    // Runs on the producer stream (current stream): after whatever wrote `latents`, before whatever
    // overwrites it next.
    slot.mem.narrow(0, 0, numel).view(latents.sizes()).copy_(latents);
    ready_.record(producer);
    ready_.block(copy_stream_);
    // Sample i of the put lands at row (start + i) * T + state: rows T * row_bytes apart.
    char* dst = host + (start * num_states + state) * row_bytes;
    const char* src = static_cast<const char*>(slot.mem.data_ptr());
    const int64_t pitch = num_states * row_bytes;
    if (n == 1 || pitch > kMaxPitch) {
      for (int64_t i = 0; i < n; ++i) {
        C10_CUDA_CHECK(cudaMemcpyAsync(dst + i * pitch, src + i * row_bytes, static_cast<size_t>(row_bytes),
                                       cudaMemcpyDeviceToHost, copy_stream_.stream()));
      }
    } else {
      C10_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<size_t>(pitch), src, static_cast<size_t>(row_bytes),
                                       static_cast<size_t>(row_bytes), static_cast<size_t>(n),
                                       cudaMemcpyDeviceToHost, copy_stream_.stream()));
    }
    slot.free.record(copy_stream_);
  }

  Ticket gather(const at::Tensor& storage, const std::vector<int64_t>& rows, const std::vector<int64_t>& out_sizes,
                bool /*background: device copies are always asynchronous*/) override {
    c10::cuda::CUDAGuard guard(device_);
    const CUDAStream consumer = c10::cuda::getCurrentCUDAStream(device_);
    Ticket ticket;
    ticket.out = at::empty(out_sizes, storage.options().device(at::Device(at::kCUDA, device_)));
    ticket.cuda = std::make_shared<CudaTicket>(device_, consumer);
    const int64_t m = static_cast<int64_t>(rows.size());
    if (m > 0) {
      alloc_ready_.record(consumer);
      alloc_ready_.block(copy_stream_);
      record_stream(ticket.out, copy_stream_);
      issue_h2d(static_cast<const char*>(storage.data_ptr()), static_cast<char*>(ticket.out.data_ptr()), rows,
                static_cast<int64_t>(ticket.out.nbytes()) / m);
    }
    ticket.cuda->done.record(copy_stream_);
    return ticket;
  }

  void wait(Ticket& ticket) override {
    if (!ticket.cuda) return;
    c10::cuda::CUDAGuard guard(device_);
    const CUDAStream current = c10::cuda::getCurrentCUDAStream(device_);
    ticket.cuda->done.block(current);
    // The caller uses `out` on `current`; if that is not where it was allocated, tell the allocator,
    // or freeing `out` could recycle the block under the caller's queued reads.
    if (current != ticket.cuda->alloc_stream && ticket.out.numel() > 0) record_stream(ticket.out, current);
  }

  // `out` was recorded on the copy stream when the copy was issued, so dropping it cannot recycle
  // its block under the copy; the storage it reads is only freed after synchronize().
  void retire(Ticket& /*ticket*/) override {}

  void synchronize() override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamSynchronize(copy_stream_.stream()));
  }

 private:
  struct Slot {
    explicit Slot(c10::DeviceIndex device) : free(device) {}
    at::Tensor mem;                         // device staging for one put
    std::optional<CUDAStream> alloc_stream;  // stream `mem` was allocated on
    Event free;                             // recorded after the last D2H out of `mem`
  };

  // One copy per maximal run of rows in arithmetic progression: a run of consecutive rows is one
  // linear copy, a run with a constant stride (all samples of one state: stride T) one 2D copy, so
  // the usual training batches cost a handful of calls rather than one per (sample, state) pair.
  void issue_h2d(const char* host, char* dst, const std::vector<int64_t>& rows, int64_t row_bytes) {
    const size_t m = rows.size();
    size_t i = 0;
    while (i < m) {
      size_t len = 1;
      int64_t stride = 0;
      if (i + 1 < m && rows[i + 1] > rows[i] && (rows[i + 1] - rows[i]) * row_bytes <= kMaxPitch) {
        stride = rows[i + 1] - rows[i];
        len = 2;
        while (i + len < m && rows[i + len] - rows[i + len - 1] == stride) ++len;
      }
      const char* src = host + rows[i] * row_bytes;
      char* to = dst + static_cast<int64_t>(i) * row_bytes;
      if (len == 1 || stride == 1) {
        C10_CUDA_CHECK(cudaMemcpyAsync(to, src, len * static_cast<size_t>(row_bytes), cudaMemcpyHostToDevice,
                                       copy_stream_.stream()));
      } else {
        C10_CUDA_CHECK(cudaMemcpy2DAsync(to, static_cast<size_t>(row_bytes), src, static_cast<size_t>(stride * row_bytes),
                                         static_cast<size_t>(row_bytes), len, cudaMemcpyHostToDevice,
                                         copy_stream_.stream()));
      }
      i += len;
    }
  }

  const c10::DeviceIndex device_;
  const CUDAStream copy_stream_;
  // Two staging slots: a put can fill one while the previous one drains over PCIe.
  std::array<std::unique_ptr<Slot>, 2> slots_;
  size_t next_slot_ = 0;
  Event ready_;        // producer -> copy stream, per put
  Event alloc_ready_;  // consumer -> copy stream, per gather
};

}  // namespace

std::unique_ptr<CopyEngine> make_cuda_engine(c10::DeviceIndex device) {
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "cuda device index ", static_cast<int>(device),
                    " is outside [0, ", static_cast<int>(c10::cuda::device_count()), ")");
  return std::make_unique<CudaEngine>(device);
}

}  // namespace otca
