// Trajectory buffer: host storage for num_samples x num_states x latent_shape rollout latents, with
// asynchronous device<->host copies on a dedicated copy stream (CUDA variant) or multi-threaded
// host copies (CPU variant). See otca_fast/buffer.py for the user-facing contract.
#pragma once

// Narrow ATen headers rather than <ATen/ATen.h>: the full header set triples the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace otca {

// Copies `nrows` rows of `row_bytes` bytes each, dst_row(i) <- src_row(i), split across the intra-op
// thread pool by *bytes* rather than by rows: a Wan latent row is 4 MB, so a batch of one or two rows
// must still use every core.
template <typename DstRow, typename SrcRow>
void parallel_row_copy(int64_t nrows, int64_t row_bytes, DstRow dst_row, SrcRow src_row) {
  const int64_t total = nrows * row_bytes;
  constexpr int64_t kGrainBytes = int64_t{1} << 20;
  at::parallel_for(0, total, kGrainBytes, [&](int64_t begin, int64_t end) {
    int64_t pos = begin;
    while (pos < end) {
      const int64_t row = pos / row_bytes;
      const int64_t offset = pos - row * row_bytes;
      const int64_t len = std::min(end, (row + 1) * row_bytes) - pos;
      std::memcpy(static_cast<char*>(dst_row(row)) + offset, static_cast<const char*>(src_row(row)) + offset,
                  static_cast<size_t>(len));
      pos += len;
    }
  });
}

struct CudaTicket;  // completion event of an asynchronous gather; defined in trajectory_buffer_cuda.cu

// An issued gather: `out` is filled once `cpu_done` (CPU engine) or the CUDA event (CUDA engine)
// completes. Nothing may read `out` before the owning engine's wait() returned.
struct Ticket {
  at::Tensor out;
  std::shared_future<void> cpu_done;
  std::shared_ptr<CudaTicket> cuda;
};

// Moves bytes between the host storage and the buffer's device. The storage layout is [N, T, D]
// (D = prod(latent_shape)), so each (sample, state) pair is one contiguous row of row_bytes.
class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  virtual std::string name() const = 0;
  // Host storage of `numel` elements; pinned when the engine and the caller ask for it.
  virtual at::Tensor allocate(int64_t numel, at::ScalarType dtype, bool pinned) = 0;
  // storage rows (start + i) * T + state <- latents[i] for i < n. On return the caller may overwrite
  // `latents` (how each engine guarantees it is documented at its implementation).
  virtual void put(const at::Tensor& storage, int64_t num_states, int64_t state, int64_t start,
                   const at::Tensor& latents) = 0;
  // out[i] <- storage row rows[i]; `background` asks for the copy to overlap the caller's work.
  virtual Ticket gather(const at::Tensor& storage, const std::vector<int64_t>& rows,
                        const std::vector<int64_t>& out_sizes, bool background) = 0;
  // Makes `ticket.out` safe to use from the caller (host wait or current-stream wait).
  virtual void wait(Ticket& ticket) = 0;
  // Called before a ticket nobody will read is dropped: its copy must not outlive what it reads and
  // writes (CPU engine: joins the worker; CUDA engine: nothing, the allocator already knows that the
  // copy stream uses `out`, and the storage is only freed after synchronize()).
  virtual void retire(Ticket& ticket) = 0;
  // Blocks the host until every copy this engine issued has completed.
  virtual void synchronize() = 0;
};

std::unique_ptr<CopyEngine> make_cpu_engine();
#ifdef OTCA_WITH_CUDA
std::unique_ptr<CopyEngine> make_cuda_engine(c10::DeviceIndex device);
#endif

class TrajectoryBuffer {
 public:
  TrajectoryBuffer(int64_t num_samples, int64_t num_states, std::vector<int64_t> latent_shape,
                   at::ScalarType dtype, at::Device device, bool pin_memory);
  ~TrajectoryBuffer();
  TrajectoryBuffer(const TrajectoryBuffer&) = delete;
  TrajectoryBuffer& operator=(const TrajectoryBuffer&) = delete;

  void put(int64_t state, int64_t start, const at::Tensor& latents);
  at::Tensor gather(const at::Tensor& sample_index, const at::Tensor& state_index);
  void prefetch(const at::Tensor& sample_index, const at::Tensor& state_index);
  void reset();
  void synchronize();
  void close();

  bool closed() const;
  bool pinned() const;
  int64_t nbytes() const;
  int64_t num_pending() const;
  std::string backend() const;

 private:
  struct Pending {
    std::vector<int64_t> samples;
    std::vector<int64_t> states;
    Ticket ticket;
  };

  void check_open(const char* op) const;
  void check_pairs(const char* op, const at::Tensor& sample_index, const at::Tensor& state_index,
                   std::vector<int64_t>* samples, std::vector<int64_t>* states,
                   std::vector<int64_t>* rows) const;
  std::vector<int64_t> out_sizes(int64_t m) const;
  void drop_all_pending();

  const int64_t num_samples_;
  const int64_t num_states_;
  const std::vector<int64_t> latent_shape_;
  const int64_t row_numel_;
  const at::ScalarType dtype_;
  const at::Device device_;
  bool pinned_ = false;
  bool closed_ = false;
  std::string backend_name_;
  std::unique_ptr<CopyEngine> engine_;
  at::Tensor storage_;            // [N * T * D] host memory
  std::vector<uint8_t> written_;  // [N * T]: 1 once put() covered the pair since the last reset()
  std::deque<Pending> pending_;   // issued prefetches, oldest first
  mutable std::mutex mutex_;      // the Python bindings release the GIL around every call
};

// Prefetches kept in flight at once: one batch being consumed plus one being copied is double
// buffering; a third prefetch retires the oldest.
constexpr size_t kMaxPending = 2;

}  // namespace otca
