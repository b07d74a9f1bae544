// Host-side core of the trajectory buffer: storage, argument checks, the written mask, prefetch
// bookkeeping and the CPU copy engine. Device copies live in trajectory_buffer_cuda.cu.
#include "trajectory_buffer.h"

#include <limits>
#include <sstream>
#include <utility>

namespace otca {

namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

// The CPU engine: storage in pageable memory, copies with memcpy. Foreground copies use the
// intra-op thread pool; background copies (prefetch) run on one worker thread so that they overlap
// the caller's compute, which owns the pool, instead of competing with it for every core.
class CpuEngine final : public CopyEngine {
 public:
  std::string name() const override { return "cpp"; }

  at::Tensor allocate(int64_t numel, at::ScalarType dtype, bool pinned) override {
    TORCH_CHECK_VALUE(!pinned, "pinned host memory needs the CUDA variant of otca_fast._C and a CUDA device");
    return at::empty({numel}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  }

  // Synchronous: the rows are in the storage when put() returns, so `latents` is free at once.
  void put(const at::Tensor& storage, int64_t num_states, int64_t state, int64_t start,
           const at::Tensor& latents) override {
    TORCH_CHECK_VALUE(latents.is_cpu(), "the CPU copy engine takes CPU latents, got ", latents.device());
    const at::Tensor src = latents.contiguous();
    const int64_t n = src.size(0);
    const int64_t row_bytes = static_cast<int64_t>(src.nbytes()) / n;
    char* base = static_cast<char*>(storage.data_ptr());
    const char* from = static_cast<const char*>(src.data_ptr());
    parallel_row_copy(
        n, row_bytes, [&](int64_t i) { return base + ((start + i) * num_states + state) * row_bytes; },
        [&](int64_t i) { return from + i * row_bytes; });
  }

  Ticket gather(const at::Tensor& storage, const std::vector<int64_t>& rows,
                const std::vector<int64_t>& out_sizes, bool background) override {
    Ticket ticket;
    const int64_t m = static_cast<int64_t>(rows.size());
    if (m == 0) {
      ticket.out = at::empty(out_sizes, storage.options());
      return ticket;
    }
    ticket.out = output(storage, out_sizes);
    const int64_t row_bytes = static_cast<int64_t>(ticket.out.nbytes()) / m;
    // Raw pointers only: the core waits for every ticket before it frees the storage or writes rows a
    // ticket reads, and the ticket itself keeps `out` alive. (Holding tensor references in the worker
    // would release them on that thread, possibly after `out` was handed to Python.)
    const char* base = static_cast<const char*>(storage.data_ptr());
    char* dst = static_cast<char*>(ticket.out.data_ptr());
    auto copy = [base, dst, rows, row_bytes, background]() {
      const int64_t count = static_cast<int64_t>(rows.size());
      if (background) {
        for (int64_t i = 0; i < count; ++i) {
          std::memcpy(dst + i * row_bytes, base + rows[i] * row_bytes, static_cast<size_t>(row_bytes));
        }
      } else {
        parallel_row_copy(
            count, row_bytes, [&](int64_t i) { return dst + i * row_bytes; },
            [&](int64_t i) { return base + rows[i] * row_bytes; });
      }
    };
    if (background) {
      ticket.cpu_done = std::async(std::launch::async, std::move(copy)).share();
    } else {
      copy();
    }
    return ticket;
  }

  void wait(Ticket& ticket) override {
    if (ticket.cpu_done.valid()) ticket.cpu_done.get();
  }

  void retire(Ticket& ticket) override { wait(ticket); }

  // Foreground copies are synchronous and the core waits for every background ticket itself, so
  // there is nothing in flight that this engine alone knows about.
  void synchronize() override {}

 private:
  // A fresh 60 MB output costs more in page faults (first touch of mmap'd pages) than the copy
  // itself, so outputs are recycled: a pooled block is handed out again (as a new view) only once
  // its storage has no other owner, i.e. the caller dropped every tensor, view or storage object
  // that shared it and no pending prefetch writes it. Nobody else can take a new reference to a
  // block whose only owner is this pool, so the check cannot race.
  at::Tensor output(const at::Tensor& storage, const std::vector<int64_t>& sizes) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    for (const at::Tensor& block : pool_) {
      if (block.storage().use_count() == 1 && block.numel() >= numel) return block.narrow(0, 0, numel).view(sizes);
    }
    at::Tensor fresh = at::empty({numel}, storage.options());
    if (pool_.size() < kPoolSize) {
      pool_.push_back(fresh);
    } else {
      for (at::Tensor& block : pool_) {
        if (block.storage().use_count() == 1) {  // free but too small: keep the larger one
          block = fresh;
          break;
        }
      }
    }
    return fresh.view(sizes);
  }

  // The batch in use, plus up to kMaxPending prefetched ones.
  static constexpr size_t kPoolSize = kMaxPending + 1;
  std::vector<at::Tensor> pool_;
};

}  // namespace

std::unique_ptr<CopyEngine> make_cpu_engine() { return std::make_unique<CpuEngine>(); }

TrajectoryBuffer::TrajectoryBuffer(int64_t num_samples, int64_t num_states, std::vector<int64_t> latent_shape,
                                   at::ScalarType dtype, at::Device device, bool pin_memory)
    : num_samples_(num_samples),
      num_states_(num_states),
      latent_shape_(std::move(latent_shape)),
      row_numel_([this] {
        int64_t numel = 1;
        for (int64_t s : latent_shape_) {
          TORCH_CHECK_VALUE(s > 0, "latent_shape must hold positive sizes, got ", shape_str(latent_shape_));
          TORCH_CHECK_VALUE(numel <= std::numeric_limits<int64_t>::max() / s, "latent_shape ",
                            shape_str(latent_shape_), " overflows int64");
          numel *= s;
        }
        return numel;
      }()),
      dtype_(dtype),
      device_(device) {
  TORCH_CHECK_VALUE(num_samples_ > 0, "num_samples must be positive, got ", num_samples_);
  TORCH_CHECK_VALUE(num_states_ > 0, "num_states must be positive, got ", num_states_);
  TORCH_CHECK_VALUE(!latent_shape_.empty(), "latent_shape must have at least one dimension");
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype_));
  const int64_t limit = std::numeric_limits<int64_t>::max() / elem;
  TORCH_CHECK_VALUE(row_numel_ <= limit / num_samples_ / num_states_, "num_samples x num_states x latent_shape = ",
                    num_samples_, " x ", num_states_, " x ", shape_str(latent_shape_), " overflows int64 bytes");
  if (device_.is_cuda()) {
    TORCH_CHECK_VALUE(device_.has_index(), "device must name its index (e.g. cuda:0), got ", device_);
#ifdef OTCA_WITH_CUDA
    engine_ = make_cuda_engine(device_.index());
#else
    TORCH_CHECK_VALUE(false, "device ", device_, " needs the CUDA variant of otca_fast._C; this build has no CUDA");
#endif
  } else {
    TORCH_CHECK_VALUE(device_.is_cpu(), "device must be cpu or cuda, got ", device_);
    TORCH_CHECK_VALUE(!pin_memory, "pin_memory=True needs a CUDA device: pinned pages only speed up device copies");
    engine_ = make_cpu_engine();
  }
  backend_name_ = engine_->name();
  storage_ = engine_->allocate(num_samples_ * num_states_ * row_numel_, dtype_, pin_memory);
  pinned_ = pin_memory;
  written_.assign(static_cast<size_t>(num_samples_ * num_states_), 0);
}

TrajectoryBuffer::~TrajectoryBuffer() {
  try {
    close();
  } catch (...) {
    // A destructor must not throw; close() only fails on a broken CUDA context, where the memory
    // is lost either way.
  }
}

void TrajectoryBuffer::check_open(const char* op) const {
  TORCH_CHECK_VALUE(!closed_, "TrajectoryBuffer.", op, ": the buffer is closed");
}

std::vector<int64_t> TrajectoryBuffer::out_sizes(int64_t m) const {
  std::vector<int64_t> sizes{m};
  sizes.insert(sizes.end(), latent_shape_.begin(), latent_shape_.end());
  return sizes;
}

void TrajectoryBuffer::check_pairs(const char* op, const at::Tensor& sample_index, const at::Tensor& state_index,
                                   std::vector<int64_t>* samples, std::vector<int64_t>* states,
                                   std::vector<int64_t>* rows) const {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"sample_index", sample_index},
                                std::pair<const char*, const at::Tensor&>{"state_index", state_index}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "TrajectoryBuffer.", op, ": ", name, " must be int64, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.is_cpu(), "TrajectoryBuffer.", op, ": ", name,
                      " must be a 1-D CPU tensor, got shape ", shape_str(t.sizes()), " on ", t.device());
  }
  TORCH_CHECK_VALUE(sample_index.numel() == state_index.numel(), "TrajectoryBuffer.", op,
                    ": sample_index and state_index must have the same length, got ", sample_index.numel(),
                    " and ", state_index.numel());
  const at::Tensor s = sample_index.contiguous();
  const at::Tensor t = state_index.contiguous();
  const int64_t m = s.numel();
  samples->assign(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + m);
  states->assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + m);
  rows->resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t n = (*samples)[i];
    const int64_t k = (*states)[i];
    TORCH_CHECK_VALUE(n >= 0 && n < num_samples_, "TrajectoryBuffer.", op, ": sample_index[", i, "] = ", n,
                      " is outside [0, ", num_samples_, ")");
    TORCH_CHECK_VALUE(k >= 0 && k < num_states_, "TrajectoryBuffer.", op, ": state_index[", i, "] = ", k,
                      " is outside [0, ", num_states_, ")");
    const int64_t row = n * num_states_ + k;
    TORCH_CHECK_VALUE(written_[static_cast<size_t>(row)], "TrajectoryBuffer.", op, ": (sample ", n, ", state ", k,
                      ") was never written since the last reset()");
    (*rows)[i] = row;
  }
}

void TrajectoryBuffer::put(int64_t state, int64_t start, const at::Tensor& latents) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("put");
  TORCH_CHECK_VALUE(state >= 0 && state < num_states_, "TrajectoryBuffer.put: state_index = ", state,
                    " is outside [0, ", num_states_, ")");
  TORCH_CHECK_TYPE(latents.scalar_type() == dtype_, "TrajectoryBuffer.put: latents dtype must be ", dtype_,
                   ", got ", latents.scalar_type());
  const bool shape_ok = latents.dim() == static_cast<int64_t>(latent_shape_.size()) + 1 &&
                        std::equal(latent_shape_.begin(), latent_shape_.end(), latents.sizes().begin() + 1);
  TORCH_CHECK_VALUE(shape_ok, "TrajectoryBuffer.put: latents must have shape (n, *", shape_str(latent_shape_),
                    "), got ", shape_str(latents.sizes()));
  TORCH_CHECK_VALUE(latents.device() == device_ || latents.is_cpu(), "TrajectoryBuffer.put: latents must be on ",
                    device_, " or cpu, got ", latents.device());
  const int64_t n = latents.size(0);
  TORCH_CHECK_VALUE(start >= 0 && n <= num_samples_ - start, "TrajectoryBuffer.put: samples [", start, ", ",
                    start + n, ") are outside the capacity [0, ", num_samples_, ")");
  if (n == 0) return;
  // A prefetch that reads any of these rows would hand back the old values: retire it. On the CPU
  // engine its worker may still be reading, so wait for it before the rows are overwritten (the CUDA
  // engine orders both copies on one stream).
  for (auto it = pending_.begin(); it != pending_.end();) {
    bool overlaps = false;
    for (size_t i = 0; i < it->samples.size() && !overlaps; ++i) {
      overlaps = it->states[i] == state && it->samples[i] >= start && it->samples[i] < start + n;
    }
    if (overlaps) {
      engine_->retire(it->ticket);
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
  engine_->put(storage_, num_states_, state, start, latents);
  for (int64_t i = 0; i < n; ++i) written_[static_cast<size_t>((start + i) * num_states_ + state)] = 1;
}

at::Tensor TrajectoryBuffer::gather(const at::Tensor& sample_index, const at::Tensor& state_index) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("gather");
  std::vector<int64_t> samples, states, rows;
  check_pairs("gather", sample_index, state_index, &samples, &states, &rows);
  for (size_t p = 0; p < pending_.size(); ++p) {
    if (pending_[p].samples == samples && pending_[p].states == states) {
      Ticket ticket = pending_[p].ticket;
      // Prefetches issued before the one consumed here were skipped by the caller: retire them.
      for (size_t q = 0; q <= p; ++q) {
        if (q < p) engine_->retire(pending_.front().ticket);
        pending_.pop_front();
      }
      engine_->wait(ticket);
      return ticket.out;
    }
  }
  Ticket ticket = engine_->gather(storage_, rows, out_sizes(static_cast<int64_t>(rows.size())), false);
  engine_->wait(ticket);
  return ticket.out;
}

void TrajectoryBuffer::prefetch(const at::Tensor& sample_index, const at::Tensor& state_index) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("prefetch");
  std::vector<int64_t> samples, states, rows;
  check_pairs("prefetch", sample_index, state_index, &samples, &states, &rows);
  Ticket ticket = engine_->gather(storage_, rows, out_sizes(static_cast<int64_t>(rows.size())), true);
  pending_.push_back(Pending{std::move(samples), std::move(states), std::move(ticket)});
  while (pending_.size() > kMaxPending) {
    engine_->retire(pending_.front().ticket);
    pending_.pop_front();
  }
}

void TrajectoryBuffer::drop_all_pending() {
  while (!pending_.empty()) {
    engine_->retire(pending_.front().ticket);
    pending_.pop_front();
  }
}

void TrajectoryBuffer::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("reset");
  drop_all_pending();
  // Copies issued before reset() still land in the storage, but the cleared mask keeps anyone from
  // reading them; synchronising makes reset() a clean barrier for timing and for the caller's memory.
  engine_->synchronize();
  std::fill(written_.begin(), written_.end(), 0);
}

void TrajectoryBuffer::synchronize() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("synchronize");
  engine_->synchronize();
}

void TrajectoryBuffer::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) return;
  drop_all_pending();
  // Copies in flight still read or write the storage: wait for them before freeing it.
  engine_->synchronize();
  storage_ = at::Tensor();
  engine_.reset();
  written_.clear();
  written_.shrink_to_fit();
  closed_ = true;
}

bool TrajectoryBuffer::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

bool TrajectoryBuffer::pinned() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pinned_ && !closed_;
}

int64_t TrajectoryBuffer::nbytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_ ? 0 : static_cast<int64_t>(storage_.nbytes());
}

int64_t TrajectoryBuffer::num_pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(pending_.size());
}

std::string TrajectoryBuffer::backend() const { return backend_name_; }

}  // namespace otca
