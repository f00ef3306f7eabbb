// The Python module's native part, `switchyard._switchyard` (pybind11): the runtime over
// NumPy arrays and DLPack tensors without copies, errors as Python exceptions with the
// same messages, the GIL released while the layer runs. The package's __init__.py
// re-exports it; switchyard/__init__.pyi describes it for editors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/dlpack.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "switchyard/version.hpp"

namespace py = pybind11;
using switchyard::Allocator;
using switchyard::Buffer;
using switchyard::DataPath;
using switchyard::DType;
using switchyard::Error;
using switchyard::ErrorCode;
using switchyard::TensorView;

namespace {

/// Python exception classes per error code, created at import (see PYBIND11_MODULE).
std::map<ErrorCode, PyObject*>& exception_classes() {
  static std::map<ErrorCode, PyObject*> classes;
  return classes;
}

[[noreturn]] void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidArgument, message);
}

/// A tensor argument as a view: a NumPy array (buffer protocol) or any object with
/// `__dlpack__` (PyTorch, JAX, CuPy ...). Holds what keeps the memory alive for the call.
class TensorArgument {
 public:
  /// `consumer_stream`: the native handle of the stream that will read the tensor when it
  /// is on a CUDA device, passed to `__dlpack__(stream=...)` so that the producer (PyTorch)
  /// orders its pending work on the tensor before that stream's (DLPack's protocol).
  TensorArgument(const py::object& object, const char* what, bool written = false,
                 void* consumer_stream = nullptr) {
    if (py::isinstance<py::array>(object)) {
      array_ = py::reinterpret_borrow<py::array>(object);
      if (written && !array_.writeable()) invalid(std::string(what) + ": the array is read-only");
      const py::buffer_info info = array_.request(written);
      DType dtype;
      if (info.format == py::format_descriptor<float>::format()) {
        dtype = DType::kF32;
      } else if (info.format == py::format_descriptor<std::int32_t>::format()) {
        dtype = DType::kI32;
      } else if (info.format == py::format_descriptor<std::int64_t>::format() ||
                 (info.itemsize == 8 && (info.format == "l" || info.format == "q"))) {
        dtype = DType::kI64;
      } else {
        invalid(std::string(what) + ": dtype " + std::string(py::str(array_.dtype())) +
                " is not supported (float32 expected)");
      }
      std::vector<std::int64_t> shape(info.shape.begin(), info.shape.end());
      std::vector<std::int64_t> strides;
      for (auto s : info.strides) {
        if (s % info.itemsize != 0) invalid(std::string(what) + ": strides are not whole elements");
        strides.push_back(s / info.itemsize);
      }
      view_ = TensorView(info.ptr, dtype, shape, strides);
      return;
    }
    if (!py::hasattr(object, "__dlpack__")) {
      invalid(std::string(what) + ": expected a NumPy array or an object with __dlpack__, got " +
              std::string(py::str(py::type::of(object))));
    }
    try {
      bool on_cuda = false;
      if (consumer_stream != nullptr && py::hasattr(object, "__dlpack_device__")) {
        const auto device = object.attr("__dlpack_device__")().cast<std::pair<int, int>>();
        on_cuda = device.first == kDLCUDA;
      }
      capsule_ = on_cuda ? object.attr("__dlpack__")(
                               py::arg("stream") = reinterpret_cast<std::intptr_t>(consumer_stream))
                         : object.attr("__dlpack__")();
    } catch (py::error_already_set& e) {
      // E.g. PyTorch refuses to export a tensor that requires grad: say it as bad input.
      invalid(std::string(what) + ": its __dlpack__ failed: " + std::string(py::str(e.value())));
    }
    managed_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule_.ptr(), "dltensor"));
    if (managed_ == nullptr) {
      PyErr_Clear();
      invalid(std::string(what) + ": __dlpack__ did not return a DLPack capsule");
    }
    // Consumed: the capsule must not free it too (DLPack's protocol).
    PyCapsule_SetName(capsule_.ptr(), "used_dltensor");
    view_ = switchyard::from_dlpack(managed_->dl_tensor);
  }
  ~TensorArgument() {
    if (managed_ != nullptr && managed_->deleter != nullptr) managed_->deleter(managed_);
  }
  TensorArgument(const TensorArgument&) = delete;
  TensorArgument& operator=(const TensorArgument&) = delete;

  const TensorView& view() const noexcept { return view_; }

 private:
  py::array array_;
  py::object capsule_;
  DLManagedTensor* managed_ = nullptr;
  TensorView view_;
};

/// A NumPy array viewing `count` elements of a buffer owned by `owner` (kept alive by
/// the array), without a copy.
template <typename T>
py::array_t<T> view_of(T* data, std::vector<py::ssize_t> shape, const py::object& owner) {
  return py::array_t<T>(std::move(shape), data, owner);
}

/// Runs `call` with the GIL released (other Python threads go on meanwhile, and a
/// collective call may wait for other ranks) and `calls` held: one call at a time into the
/// object `calls` guards.
template <typename Call>
void run_released(std::mutex& calls, const Call& call) {
  py::gil_scoped_release released;
  const std::lock_guard<std::mutex> one_call_at_a_time(calls);
  call();
}

/// A `Runtime.dispatch` result: the parts of this process's ranks, each with the rows its
/// rank received. Holds the runtime (whose allocators own its buffers) alive.
class PyDispatch {
 public:
  explicit PyDispatch(py::object runtime) : runtime_(std::move(runtime)) {}
  switchyard::ProcessDispatch dispatched;
  /// The tokens came on the data path's device: the parts' rows are DeviceTensors, and
  /// combine writes a DeviceTensor unless given `out`.
  bool on_device = false;
  const py::object& runtime() const noexcept { return runtime_; }

 private:
  py::object runtime_;
};

/// A float32 matrix in a device data path's memory that the runtime wrote (the output of a
/// forward or a combine on device tensors, the rows a dispatch delivered), handed out
/// through DLPack (`__dlpack__`, for `torch.from_dlpack` and the like) without a copy. Holds
/// its owner alive (the runtime, whose data path's allocator owns its own memory, or the
/// dispatch whose buffers it views), and so does every capsule it gave out.
class DeviceTensor {
 public:
  /// A new matrix [rows, cols] from `allocator`, owned by this tensor.
  DeviceTensor(py::object runtime, Allocator& allocator, std::int64_t rows, std::int64_t cols)
      : owner_(std::move(runtime)), storage_(std::make_shared<Buffer<float>>(allocator)) {
    storage_->resize(static_cast<std::size_t>(rows * cols));
    view_ = TensorView(storage_->data(), DType::kF32, {rows, cols}, storage_->device());
  }
  /// A view of memory `owner` keeps alive.
  DeviceTensor(py::object owner, const TensorView& view) : owner_(std::move(owner)), view_(view) {}
  TensorView view() const { return view_; }
  std::vector<std::int64_t> shape() const { return {view_.dim(0), view_.dim(1)}; }
  /// (DLPack device type, device id): (2, N) for cuda:N.
  std::pair<int, int> dlpack_device() const {
    return {view_.device().kind == switchyard::Device::Kind::kCuda ? kDLCUDA : kDLCPU,
            view_.device().ordinal};
  }
  /// A DLPack capsule of the matrix. The runtime's calls return once what they wrote is
  /// written, so `stream` (the consumer's) needs nothing ordered before it.
  static py::capsule dlpack(const py::object& self, const py::object& /*stream*/) {
    auto& tensor = self.cast<DeviceTensor&>();
    struct Exported {
      DLManagedTensor managed;
      switchyard::DLTensorShape shape;
      py::object owner;
    };
    auto* exported = new Exported{};
    exported->owner = self;
    exported->managed.dl_tensor = switchyard::to_dlpack(tensor.view(), exported->shape);
    exported->managed.manager_ctx = exported;
    exported->managed.deleter = [](DLManagedTensor* m) {
      const py::gil_scoped_acquire gil;
      delete static_cast<Exported*>(m->manager_ctx);
    };
    return py::capsule(&exported->managed, "dltensor", [](PyObject* capsule) {
      // Not consumed (still named "dltensor"): the capsule frees what it holds.
      if (PyCapsule_IsValid(capsule, "dltensor") != 0) {
        auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
        m->deleter(m);
      }
    });
  }

 private:
  py::object owner_;
  std::shared_ptr<Buffer<float>> storage_;  // null for a view
  TensorView view_;
};

/// The C++ runtime for Python: one object per process, used by one thread at a time.
class PyRuntime {
 public:
  PyRuntime(switchyard::Config config, const std::map<std::string, std::string>& overrides) {
    for (const auto& [key, value] : overrides) {
      std::string assignment = key;
      assignment += '=';
      assignment += value;
      config.set_from_command_line(assignment);
    }
    config_ = config;
    py::gil_scoped_release released;  // collective: other ranks may take a while
    runtime_ = std::make_unique<switchyard::Runtime>(config);
  }

  int world_size() const { return runtime_->world_size(); }
  std::vector<int> ranks() const {
    std::vector<int> r;
    for (int local = 0; local < runtime_->num_local_ranks(); ++local)
      r.push_back(runtime_->world_rank(local));
    return r;
  }
  std::int64_t hidden() const { return runtime_->model().hidden(); }
  /// The experts of the ranks this process hosts, ascending.
  std::vector<int> local_experts() {
    std::vector<int> experts;
    for (int local = 0; local < runtime_->num_local_ranks(); ++local) {
      switchyard::MoELayer& l = runtime_->layer(local, 0);
      const int rank = l.transport().rank();
      const switchyard::ExpertSlotMap& map = l.slot_map();
      for (int j = 0; j < l.placement().num_local(rank); ++j)
        experts.push_back(map.expert_of(l.placement().first_expert(rank) + j));
    }
    std::sort(experts.begin(), experts.end());
    experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
    return experts;
  }
  int num_experts() const { return runtime_->model().num_experts(); }
  int num_layers() const { return runtime_->num_layers(); }
  std::vector<int> layer_ids() const {
    return {runtime_->layer_ids().begin(), runtime_->layer_ids().end()};
  }

  /// The native handle of local rank 0's stream of layer `layer` (null for a layer that
  /// does not exist: the call that follows names it).
  void* reading_stream(int layer) {
    if (layer < 0 || layer >= runtime_->num_layers()) return nullptr;
    return runtime_->layer(0, layer).stream().native_handle();
  }

  /// y = layer(x); `out` (same shape, float32) receives y when given, else a new array.
  py::object forward(const py::object& self, const py::object& x, const py::object& out, int layer,
                     const py::object& token_ids) {
    // Device tokens are read on the first rank's stream of the layer: their producer orders
    // its work on them before it; the other ranks' streams wait for it.
    void* reader = reading_stream(layer);
    const TensorArgument in(x, "input x", /*written=*/false, reader);
    // Host tokens, or tokens on the device of the data path (which every layer shares).
    DataPath& path = runtime_->layer(0, 0).data_path();
    const switchyard::Device device =
        in.view().device() == path.device() ? path.device() : switchyard::Device::host();
    in.view().require_on(device, "input x", DType::kF32, {-1, hidden()});
    const std::int64_t T = in.view().dim(0);
    py::object result = out;
    if (out.is_none()) {
      result = device.kind == switchyard::Device::Kind::kHost
                   ? py::object(py::array_t<float>({T, hidden()}))
                   : py::cast(DeviceTensor(self, path.allocator(), T, hidden()));
    }
    const TensorArgument y(result, "output y", /*written=*/true);
    y.view().require_on(device, "output y", DType::kF32, {T, hidden()});
    std::optional<TensorArgument> ids;
    if (!token_ids.is_none()) ids.emplace(token_ids, "token ids");
    run_released(*calls_, [&] {
      if (ids) runtime_->set_token_ids(ids->view());
      if (device.kind == switchyard::Device::Kind::kHost) {
        runtime_->forward_local_tokens(in.view(), y.view(), layer);
        return;
      }
      // Queued behind the producer's work, then waited for: y is written on return.
      runtime_->forward_local_tokens_on_stream(in.view(), y.view(), reader, layer);
      runtime_->layer(0, layer).stream().synchronize();
      // The worst-case mode's checks of this step, done by now: reported here, not later.
      runtime_->finish_worst_case_steps();
    });
    return result;
  }

  /// Sends x's rows to the ranks of their experts per `plan` = (experts [T,K] int32 or
  /// int64, weights [T,K] float32); the result's parts hold what each local rank received.
  std::unique_ptr<PyDispatch> dispatch(const py::object& self, const py::object& x,
                                       const py::object& plan, int layer) {
    if (!py::isinstance<py::tuple>(plan) && !py::isinstance<py::list>(plan)) {
      invalid("plan: expected (experts, weights), e.g. what route() returns");
    }
    const py::sequence pair = plan;
    if (pair.size() != 2) invalid("plan: expected (experts, weights), e.g. what route() returns");
    // Device tokens: see `forward`.
    void* reader = reading_stream(layer);
    const TensorArgument in(x, "input x", /*written=*/false, reader);
    const TensorArgument experts(pair[0], "experts");
    const TensorArgument weights(pair[1], "weights");
    auto result = std::make_unique<PyDispatch>(self);
    result->on_device = in.view().device().kind != switchyard::Device::Kind::kHost;
    run_released(*calls_, [&] {
      // The producer's work on device tokens is ordered before local rank 0's stream;
      // waiting for that stream orders it before every rank's.
      if (result->on_device && reader != nullptr) runtime_->layer(0, layer).stream().synchronize();
      // int32 or int64 ids (PyTorch's topk indices), as the runtime takes them.
      runtime_->dispatch(in.view(), experts.view(), weights.view(), result->dispatched, layer);
    });
    return result;
  }

  /// Tensors per part: None (each part's `own` buffer), one tensor (one part), or a list.
  static std::vector<TensorView> per_part(PyDispatch& d, const py::object& given,
                                          std::vector<std::unique_ptr<TensorArgument>>& held,
                                          const char* what, bool input_buffer) {
    std::vector<TensorView> views;
    if (given.is_none()) {
      for (auto& part : d.dispatched.parts) {
        views.push_back(input_buffer ? part.handle.expert_input() : part.handle.expert_output());
      }
    } else if (py::isinstance<py::list>(given) || py::isinstance<py::tuple>(given)) {
      for (const py::handle item : py::sequence(given)) {
        held.push_back(
            std::make_unique<TensorArgument>(py::reinterpret_borrow<py::object>(item), what));
        views.push_back(held.back()->view());
      }
    } else {
      held.push_back(std::make_unique<TensorArgument>(given, what));
      views.push_back(held.back()->view());
    }
    return views;
  }

  /// Runs `call(views, y)` without the GIL, `views` those of `per_part_arrays` (per_part) and
  /// y [T,H] f32 `out`, or a new array when `out` is None; returns y.
  template <typename Call>
  py::object into_token_rows(PyDispatch& d, const py::object& per_part_arrays, const char* what,
                             bool input_buffer, const py::object& out, const char* out_what,
                             Call call) {
    std::vector<std::unique_ptr<TensorArgument>> held;
    const std::vector<TensorView> views = per_part(d, per_part_arrays, held, what, input_buffer);
    py::object result = out;
    if (out.is_none()) {
      Allocator& device_memory = runtime_->layer(0, d.dispatched.layer).data_path().allocator();
      result = d.on_device ? py::cast(DeviceTensor(d.runtime(), device_memory,
                                                   d.dispatched.num_tokens, hidden()))
                           : py::object(py::array_t<float>({d.dispatched.num_tokens, hidden()}));
    }
    const TensorArgument y(result, out_what, /*written=*/true);
    run_released(*calls_, [&] { call(views, y.view()); });
    return result;
  }

  /// Sums the experts' results back into out (or a new array): `expert_outputs` is None
  /// (each part's own expert_output), one tensor (one part) or one per part.
  py::object combine(PyDispatch& d, const py::object& expert_outputs, const py::object& out) {
    return into_token_rows(d, expert_outputs, "expert output", /*input_buffer=*/false, out,
                           "output y",
                           [&](const std::vector<TensorView>& outputs, const TensorView& y) {
                             runtime_->combine(d.dispatched, outputs, y);
                           });
  }

  /// (d_expert_outputs: one array per part, d_weights [T,K]) for dy and the outputs the
  /// combine took (None: each part's expert_output).
  py::tuple combine_backward(PyDispatch& d, const py::object& dy,
                             const py::object& expert_outputs) {
    std::vector<std::unique_ptr<TensorArgument>> held;
    const std::vector<TensorView> outputs =
        per_part(d, expert_outputs, held, "expert output", /*input_buffer=*/false);
    const TensorArgument grad(dy, "dy");
    if (d.dispatched.parts.empty()) invalid("combine_backward needs a dispatch");
    const auto K = static_cast<std::int64_t>(d.dispatched.parts.front().plan.slots);
    py::list d_outputs;
    std::vector<TensorView> d_views;
    for (auto& part : d.dispatched.parts) {
      py::array_t<float> a({part.handle.expert_input().dim(0), hidden()});
      d_views.emplace_back(a.mutable_data(), DType::kF32,
                           std::initializer_list<std::int64_t>{a.shape(0), a.shape(1)});
      d_outputs.append(a);
    }
    py::array_t<float> d_weights({d.dispatched.num_tokens, K});
    const TensorView d_weights_view(d_weights.mutable_data(), DType::kF32,
                                    {d.dispatched.num_tokens, K});
    run_released(*calls_, [&] {
      runtime_->combine_backward(d.dispatched, outputs, grad.view(), d_views, d_weights_view);
    });
    return py::make_tuple(d_outputs, d_weights);
  }

  /// dx [T,H] from each part's expert-input gradient (into `out` when given).
  py::object dispatch_backward(PyDispatch& d, const py::object& d_expert_inputs,
                               const py::object& out) {
    return into_token_rows(d, d_expert_inputs, "expert input gradient", /*input_buffer=*/true, out,
                           "dx", [&](const std::vector<TensorView>& grads, const TensorView& dx) {
                             runtime_->dispatch_backward(d.dispatched, grads, dx);
                           });
  }

  bool training() const { return training_; }
  void set_training(bool training) {
    const std::lock_guard<std::mutex> one_call_at_a_time(*calls_);
    runtime_->set_training(training);
    training_ = training;
  }

  /// (dx [T,H], d_gate [E,H], per expert (d gate, d up, d down) or None): the backward of
  /// the last forward on the same x, with dy [T,H]. The gradients are new arrays.
  py::tuple backward(const py::object& x, const py::object& dy, const py::object& out, int layer) {
    const TensorArgument in(x, "input x");
    in.view().require("input x", DType::kF32, {-1, hidden()});
    const std::int64_t T = in.view().dim(0);
    const TensorArgument grad(dy, "dy");
    grad.view().require("dy", DType::kF32, {T, hidden()});
    py::object result = out.is_none() ? py::object(py::array_t<float>({T, hidden()})) : out;
    const TensorArgument dx(result, "dx", /*written=*/true);
    dx.view().require("dx", DType::kF32, {T, hidden()});
    run_released(*calls_, [&] {
      runtime_->backward_local_tokens(in.view(), grad.view(), dx.view(), gradients_, layer);
    });
    auto copy = [](const switchyard::HostTensor& t) {
      py::array_t<float> a(std::vector<py::ssize_t>(t.shape().begin(), t.shape().end()));
      std::copy_n(t.data<float>(), t.numel(), a.mutable_data());
      return a;
    };
    py::list experts;
    for (const auto& e : gradients_.experts) {
      if (e[0].size_bytes() == 0) {  // not held here (an empty HostTensor has numel 1)
        experts.append(py::none());
      } else {
        experts.append(py::make_tuple(copy(e[0]), copy(e[1]), copy(e[2])));
      }
    }
    return py::make_tuple(result, copy(gradients_.gate), experts);
  }

  /// (gate [E,H], per expert (gate, up, down) or None): writable float32 views of the
  /// weights this process trains, kept alive by (and valid while) the runtime.
  py::tuple parameters(const py::object& self, int layer) {
    switchyard::ModelParameters p;
    {
      const std::lock_guard<std::mutex> one_call_at_a_time(*calls_);
      p = runtime_->parameters(layer);
    }
    auto view = [&](const TensorView& t) {
      return view_of<float>(t.data_as<float>(), {t.dim(0), t.dim(1)}, self);
    };
    py::list experts;
    for (const auto& e : p.experts) {
      if (e[0].data() == nullptr) {
        experts.append(py::none());
      } else {
        experts.append(py::make_tuple(view(e[0]), view(e[1]), view(e[2])));
      }
    }
    return py::make_tuple(view(p.gate), experts);
  }

  void save_model(const std::string& path) {
    run_released(*calls_, [&] { runtime_->save_model(path); });
  }

  py::array_t<float> reference_forward(const py::object& x, int layer) const {
    const TensorArgument in(x, "input x");
    in.view().require("input x", DType::kF32, {-1, hidden()});
    py::array_t<float> y({in.view().dim(0), hidden()});
    const TensorArgument out(y, "output y", /*written=*/true);
    run_released(*calls_, [&] { runtime_->reference_forward(in.view(), out.view(), layer); });
    return y;
  }

  /// (experts int32 [T,K], weights float32 [T,K]) as this process's first rank routes x.
  py::tuple route(const py::object& x, int layer, const py::object& token_ids) {
    const TensorArgument in(x, "input x");
    in.view().require("input x", DType::kF32, {-1, hidden()});
    std::optional<TensorArgument> ids;
    if (!token_ids.is_none()) ids.emplace(token_ids, "token ids");
    switchyard::RoutingPlan plan;
    run_released(*calls_, [&] {
      switchyard::MoELayer& l = runtime_->layer(0, layer);
      if (ids) l.set_token_ids(ids->view());
      l.route(in.view(), plan);
    });
    if (plan.device().kind != switchyard::Device::Kind::kHost)
      invalid("route needs the host data path ([runtime] data_path = \"host\")");
    const auto T = plan.num_tokens, K = static_cast<std::int64_t>(plan.slots);
    py::array_t<std::int32_t> experts({T, K});
    py::array_t<float> weights({T, K});
    std::copy_n(plan.experts.data(), T * K, experts.mutable_data());
    std::copy_n(plan.weights.data(), T * K, weights.mutable_data());
    return py::make_tuple(experts, weights);
  }

  /// `Runtime::rebalance`: a list of one dict per layer.
  py::list rebalance() {
    std::vector<switchyard::RebalanceReport> done;
    run_released(*calls_, [&] { done = runtime_->rebalance(); });
    py::list out;
    for (const auto& r : done) {
      py::dict d;
      d["layer"] = r.layer;
      d["slots"] = r.slots;
      d["imbalance_before"] = r.imbalance_before;
      d["imbalance_planned"] = r.imbalance_planned;
      d["moved_experts"] = r.moved_experts;
      d["received_bytes"] = r.received_bytes;
      out.append(d);
    }
    return out;
  }

  /// The worst-case mode's checks, waited for (`Runtime::finish_worst_case_steps`).
  void finish_worst_case_steps() {
    run_released(*calls_, [&] { runtime_->finish_worst_case_steps(); });
  }

  /// Statistics, timings and traffic of the last forward over all ranks (collective).
  py::dict stats(int layer) {
    switchyard::GlobalRouterStats s;
    switchyard::LayerTimings t;
    switchyard::LayerTraffic b;
    run_released(*calls_, [&] {
      s = runtime_->global_router_stats(layer);
      t = runtime_->max_timings(layer);
      b = runtime_->total_traffic(layer);
    });
    py::dict d;
    d["tokens"] = s.tokens;
    d["counts"] = s.counts;
    d["dropped"] = s.dropped;
    d["imbalance"] = s.imbalance;
    d["aux_loss"] = s.aux_loss;
    d["z_loss"] = s.z_loss;
    py::dict timings;
    timings["route_s"] = t.route_s;
    timings["layout_s"] = t.layout_s;
    timings["dispatch_s"] = t.dispatch_s;
    timings["experts_s"] = t.experts_s;
    timings["combine_s"] = t.combine_s;
    d["timings"] = timings;
    d["dispatch_bytes"] = b.dispatch_bytes;
    d["combine_bytes"] = b.combine_bytes;
    return d;
  }

  py::list plugins() const {
    switchyard::PluginRegistry registry(switchyard::PluginRegistry::default_search_path(
        switchyard::configured_plugin_dirs(config_)));
    registry.load_all();
    py::list list;
    for (const auto& p : registry.available()) {
      py::dict d;
      d["kind"] = std::string(switchyard::plugin_kind_name(p.kind));
      d["name"] = p.name;
      d["version"] = p.version;
      d["path"] = p.path.string();
      d["usable"] = p.probe.ok();
      d["reason"] = p.probe.message;
      list.append(d);
    }
    return list;
  }

 private:
  switchyard::Config config_;
  std::unique_ptr<switchyard::Runtime> runtime_;
  switchyard::ModelGradients gradients_;  // backward's, copied out
  bool training_ = false;
  // The runtime is used by one thread at a time; with the GIL released, Python threads
  // could otherwise enter it together. Taken after releasing the GIL, dropped before
  // taking it back, so that a waiting thread never holds the GIL.
  std::unique_ptr<std::mutex> calls_ = std::make_unique<std::mutex>();
};

/// A routing policy alone, on logits the caller computes (the router plugins without a
/// transport or a model).
class PyRouter {
 public:
  PyRouter(const std::string& policy, int num_experts, const py::dict& options,
           const py::object& bias) {
    switchyard::Config config;
    config.set("router", "policy", policy);
    for (const auto& [key, value] : options) {
      const std::string name = py::str(key);
      if (py::isinstance<py::bool_>(value)) {
        config.set("router", name, value.cast<bool>());
      } else if (py::isinstance<py::int_>(value)) {
        config.set("router", name, value.cast<std::int64_t>());
      } else if (py::isinstance<py::float_>(value)) {
        config.set("router", name, value.cast<double>());
      } else if (py::isinstance<py::str>(value)) {
        config.set("router", name, value.cast<std::string>());
      } else {
        invalid("router option " + name + ": expected a bool, int, float or str, got " +
                std::string(py::str(py::type::of(value))));
      }
    }
    registry_ = std::make_shared<switchyard::PluginRegistry>(
        switchyard::PluginRegistry::default_search_path({}));
    const switchyard::ResolvedConfig settings(config, *registry_);
    if (!bias.is_none()) {
      const TensorArgument b(bias, "bias");
      b.view().require("bias", DType::kF32, {num_experts});
      bias_.assign(b.view().data_as<const float>(), b.view().data_as<const float>() + num_experts);
    }
    switchyard::RouterCreateArgs args;
    args.options = &settings.section("router");
    args.num_experts = num_experts;
    args.checkpoint_bias = bias_;
    router_ = registry_->create_router(policy, args);
  }

  int num_experts() const { return router_->num_experts(); }
  int slots() const { return router_->slots_per_token(); }

  py::tuple route(const py::object& logits, const py::object& token_ids) {
    const TensorArgument in(logits, "logits");
    in.view().require("logits", DType::kF32, {-1, router_->num_experts()});
    std::optional<TensorArgument> ids;
    if (!token_ids.is_none()) ids.emplace(token_ids, "token ids");
    switchyard::RoutingPlan plan;
    run_released(*calls_, [&] {
      switchyard::RouteInput input;
      input.logits = in.view();
      if (ids) input.token_ids = ids->view();
      router_->route(input, plan, stream_);
    });
    const auto T = plan.num_tokens, K = static_cast<std::int64_t>(plan.slots);
    py::array_t<std::int32_t> experts({T, K});
    py::array_t<float> weights({T, K});
    std::copy_n(plan.experts.data(), T * K, experts.mutable_data());
    std::copy_n(plan.weights.data(), T * K, weights.mutable_data());
    return py::make_tuple(experts, weights);
  }

  py::dict stats() const {
    // The GIL may be held here: a thread in route holds this lock without needing the GIL.
    const std::lock_guard<std::mutex> one_call_at_a_time(*calls_);
    const switchyard::RouterStats& s = router_->stats();
    py::dict d;
    d["tokens"] = s.tokens;
    d["counts"] = s.counts;
    d["dropped"] = s.dropped;
    d["imbalance"] = s.imbalance;
    d["aux_loss"] = s.aux_loss;
    d["z_loss"] = s.z_loss;
    return d;
  }

  py::array_t<float> bias() const {
    const std::lock_guard<std::mutex> one_call_at_a_time(*calls_);
    const auto b = router_->bias();
    py::array_t<float> out(static_cast<py::ssize_t>(b.size()));
    std::copy(b.begin(), b.end(), out.mutable_data());
    return out;
  }

  void update(const py::object& counts) {
    const std::vector<std::int64_t> c = counts.cast<std::vector<std::int64_t>>();
    if (c.size() != static_cast<std::size_t>(router_->num_experts())) {
      invalid("counts: expected " + std::to_string(router_->num_experts()) + " values, got " +
              std::to_string(c.size()));
    }
    const std::lock_guard<std::mutex> one_call_at_a_time(*calls_);
    router_->update(c);
  }

 private:
  std::shared_ptr<switchyard::PluginRegistry> registry_;  // keeps the plugin loaded
  std::vector<float> bias_;
  std::shared_ptr<switchyard::Router> router_;
  switchyard::HostStream stream_;
  std::unique_ptr<std::mutex> calls_ = std::make_unique<std::mutex>();  // as PyRuntime's
};

}  // namespace

PYBIND11_MODULE(_switchyard, m) {
  m.doc() = "Switchyard's native module; use the `switchyard` package.";
  m.attr("__version__") = switchyard::core_version();

  // Error is the base; each code's class also derives from the matching built-in
  // (ValueError for bad input, TimeoutError, FileNotFoundError ...), so that callers can
  // catch either. Every instance has `.code`, the error code's name.
  PyObject* base = PyErr_NewException("switchyard.Error", PyExc_RuntimeError, nullptr);
  m.attr("Error") = py::handle(base);
  const struct {
    ErrorCode code;
    const char* name;
    PyObject* builtin;
  } kinds[] = {{ErrorCode::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError},
               {ErrorCode::kNotFound, "NotFoundError", PyExc_FileNotFoundError},
               {ErrorCode::kUnavailable, "UnavailableError", nullptr},
               {ErrorCode::kAbiMismatch, "AbiMismatchError", nullptr},
               {ErrorCode::kTimeout, "TimeoutError", PyExc_TimeoutError},
               {ErrorCode::kSystem, "SystemError", PyExc_OSError},
               {ErrorCode::kPeerFailed, "PeerFailedError", nullptr},
               {ErrorCode::kInternal, "InternalError", nullptr}};
  for (const auto& k : kinds) {
    py::tuple bases = k.builtin != nullptr ? py::make_tuple(py::handle(base), py::handle(k.builtin))
                                           : py::make_tuple(py::handle(base));
    PyObject* cls =
        PyErr_NewException(("switchyard." + std::string(k.name)).c_str(), bases.ptr(), nullptr);
    m.attr(k.name) = py::handle(cls);
    exception_classes()[k.code] = cls;
  }
  // pybind11 fixes the signature (by value).
  // NOLINTNEXTLINE(performance-unnecessary-value-param)
  py::register_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) std::rethrow_exception(thrown);
    } catch (const Error& e) {
      PyObject* cls = exception_classes().at(e.code());
      py::object instance =
          py::reinterpret_steal<py::object>(PyObject_CallFunction(cls, "s", e.message().c_str()));
      if (!instance) return;  // the call set its own error
      instance.attr("code") = std::string(switchyard::error_code_name(e.code()));
      PyErr_SetObject(cls, instance.ptr());
    }
  });

  m.def(
      "_data_pointer",
      [](const py::object& tensor) {
        const TensorArgument argument(tensor, "tensor");
        return reinterpret_cast<std::uintptr_t>(argument.view().data());
      },
      py::arg("tensor"),
      "The address the runtime reads a tensor argument at (for tests: no copy is made).");

  py::class_<DeviceTensor>(m, "DeviceTensor",
                           "A float32 matrix the runtime wrote in its data path's device "
                           "memory; hand it on with DLPack (torch.from_dlpack, or back to "
                           "the runtime).")
      .def_property_readonly("shape", &DeviceTensor::shape)
      .def("__dlpack__", &DeviceTensor::dlpack, py::arg("stream") = py::none())
      .def("__dlpack_device__", &DeviceTensor::dlpack_device);

  py::class_<PyRuntime>(m, "Runtime")
      .def(py::init(
               [](const py::object& config, const std::map<std::string, std::string>& overrides) {
                 return std::make_unique<PyRuntime>(
                     switchyard::Config::from_file(std::string(py::str(config))), overrides);
               }),
           py::arg("config"), py::arg("overrides") = std::map<std::string, std::string>{},
           "A runtime from a TOML file; overrides are {\"section.key\": \"value\"}.")
      .def_static(
          "from_string",
          [](const std::string& toml, const std::map<std::string, std::string>& overrides) {
            return std::make_unique<PyRuntime>(switchyard::Config::from_string(toml), overrides);
          },
          py::arg("toml"), py::arg("overrides") = std::map<std::string, std::string>{},
          "A runtime from TOML text.")
      .def_property_readonly("world_size", &PyRuntime::world_size)
      .def_property_readonly("ranks", &PyRuntime::ranks,
                             "The world ranks this process hosts (one under mpirun).")
      .def_property_readonly("hidden", &PyRuntime::hidden)
      .def_property_readonly("num_experts", &PyRuntime::num_experts)
      .def_property_readonly("local_experts", &PyRuntime::local_experts,
                             "The experts of the ranks this process hosts (their EP "
                             "groups' shares), ascending: the ones it computes.")
      .def_property_readonly("num_layers", &PyRuntime::num_layers,
                             "L, the model's MoE layers ([model] layers); methods that take "
                             "layer= name one by its index 0..L-1.")
      .def_property_readonly("layer_ids", &PyRuntime::layer_ids,
                             "The checkpoint's layer number of each layer index.")
      .def(
          "forward",
          [](const py::object& self, const py::object& x, const py::object& out, int layer,
             const py::object& token_ids) {
            return self.cast<PyRuntime&>().forward(self, x, out, layer, token_ids);
          },
          py::arg("x"), py::arg("out") = py::none(), py::arg("layer") = 0,
          py::arg("token_ids") = py::none(),
          "MoE layer `layer` on this process's tokens x [T,H] float32 (NumPy or __dlpack__, "
          "host memory or the data path's device; the ranks hosted here split them), into "
          "`out` when given. Without `out`: a NumPy array for host tokens, a DeviceTensor "
          "(DLPack) for device tokens. `token_ids` [T] int32/int64: the tokens' ids, for a "
          "router that routes by them (hash). Returns when y is written.")
      .def("reference_forward", &PyRuntime::reference_forward, py::arg("x"), py::arg("layer") = 0,
           "The dense single-process reference of layer `layer` (float64 inside).")
      .def("route", &PyRuntime::route, py::arg("x"), py::arg("layer") = 0,
           py::arg("token_ids") = py::none(),
           "(experts [T,K] int32, weights [T,K] float32): layer `layer`'s router alone.")
      .def(
          "dispatch",
          [](const py::object& self, const py::object& x, const py::object& plan, int layer) {
            return self.cast<PyRuntime&>().dispatch(self, x, plan, layer);
          },
          py::arg("x"), py::arg("plan"), py::arg("layer") = 0,
          "Sends this process's tokens x [T,H] to the ranks of their experts of layer "
          "`layer`; plan = (experts [T,K] int32/int64, weights [T,K] float32). Returns a "
          "Dispatch, which combine and the backwards use for that layer.")
      .def("combine", &PyRuntime::combine, py::arg("dispatch"),
           py::arg("expert_outputs") = py::none(), py::arg("out") = py::none(),
           "Weighs the experts' results, sends them back and sums them per token into out "
           "[T,H] (or a new array; a DeviceTensor after a dispatch of device tokens). "
           "expert_outputs: None (each part's expert_output), one tensor, or one per part, "
           "in the memory the dispatch's parts are in.")
      .def("combine_backward", &PyRuntime::combine_backward, py::arg("dispatch"), py::arg("dy"),
           py::arg("expert_outputs") = py::none(),
           "(d_expert_outputs per part, d_weights [T,K]): the backward of combine for dy [T,H] "
           "and the outputs the combine took (None: each part's expert_output).")
      .def("dispatch_backward", &PyRuntime::dispatch_backward, py::arg("dispatch"),
           py::arg("d_expert_inputs"), py::arg("out") = py::none(),
           "dx [T,H]: the backward of dispatch, per token the sum of its rows' gradients.")
      .def_property("training", &PyRuntime::training, &PyRuntime::set_training,
                    "Training mode: forwards keep what backward needs (unless [runtime] "
                    "recompute). False by default.")
      .def("backward", &PyRuntime::backward, py::arg("x"), py::arg("dy"),
           py::arg("out") = py::none(), py::arg("layer") = 0,
           "(dx [T,H], d_gate [E,H], d_experts): the backward of the last forward on the same "
           "x, for dy = dL/dy [T,H]. d_experts has per expert (d gate, d up, d down) float32, "
           "or None for experts no rank of this process holds; the gate's gradient is summed "
           "over the world, the experts' over their DP group.")
      .def(
          "parameters",
          [](const py::object& self, int layer) {
            return self.cast<PyRuntime&>().parameters(self, layer);
          },
          py::arg("layer") = 0,
          "(gate [E,H], experts) of layer `layer`: writable float32 views of the weights this "
          "process trains, "
          "per expert (gate, up, down) or None; an optimizer updates them in place between "
          "steps.")
      .def("save_model", &PyRuntime::save_model, py::arg("path"),
           "Writes the model as a safetensors checkpoint from world rank 0 (collective).")
      .def("rebalance", &PyRuntime::rebalance,
           "Places every layer's experts anew for the load measured since the last rebalance "
           "and moves their weights (collective); returns one dict per layer: layer, slots, "
           "imbalance_before, imbalance_planned, moved_experts, received_bytes.")
      .def("finish_worst_case_steps", &PyRuntime::finish_worst_case_steps,
           "With [runtime] max_tokens_per_rank: waits for every layer's after-the-step checks "
           "and raises the first failure they found (local, not collective).")
      .def("stats", &PyRuntime::stats, py::arg("layer") = 0,
           "Statistics, timings and bytes of layer `layer`'s last forward.")
      .def("plugins", &PyRuntime::plugins, "Every plugin the loader finds.");

  py::class_<PyDispatch>(m, "Dispatch",
                         "What a dispatch delivered: one part per rank this process hosts.")
      .def_property_readonly("num_tokens",
                             [](const PyDispatch& d) { return d.dispatched.num_tokens; })
      .def_property_readonly("parts", [](const py::object& self) {
        auto& d = self.cast<PyDispatch&>();
        py::list parts;
        for (auto& part : d.dispatched.parts) {
          py::dict p;
          p["world_rank"] = part.world_rank;
          py::list experts;
          for (const int expert : part.local_experts) experts.append(expert);
          p["experts"] = experts;
          p["first_token"] = part.first_token;
          p["num_tokens"] = part.num_tokens;
          const auto rows = part.handle.rows_per_expert();
          p["rows_per_expert"] = std::vector<std::int64_t>(rows.begin(), rows.end());
          const auto first = part.handle.expert_first_row();
          p["expert_first_row"] = std::vector<std::int64_t>(first.begin(), first.end());
          const TensorView in = part.handle.expert_input();
          const TensorView out = part.handle.expert_output();
          if (in.device().kind == switchyard::Device::Kind::kHost) {
            p["expert_input"] = view_of(in.data_as<float>(), {in.dim(0), in.dim(1)}, self);
            p["expert_output"] = view_of(out.data_as<float>(), {out.dim(0), out.dim(1)}, self);
          } else {
            p["expert_input"] = DeviceTensor(self, in);
            p["expert_output"] = DeviceTensor(self, out);
          }
          parts.append(p);
        }
        return parts;
      });

  py::class_<PyRouter>(m, "Router")
      .def(py::init([](const std::string& policy, int num_experts, const py::object& bias,
                       const py::kwargs& options) {
             return std::make_unique<PyRouter>(policy, num_experts, options, bias);
           }),
           py::arg("policy"), py::arg("num_experts"), py::arg("bias") = py::none(),
           "A routing policy alone: Router(\"topk\", num_experts=8, top_k=2, ...); options are "
           "the policy's [router] keys; bias: float32 [E] selection bias.")
      .def_property_readonly("num_experts", &PyRouter::num_experts)
      .def_property_readonly("slots", &PyRouter::slots)
      .def("route", &PyRouter::route, py::arg("logits"), py::arg("token_ids") = py::none(),
           "(experts [T,K] int32, weights [T,K] float32) for logits [T,E] float32; "
           "token_ids [T] int32/int64 for a policy that routes by them (hash).")
      .def("stats", &PyRouter::stats, "Statistics of the last route.")
      .def("bias", &PyRouter::bias, "The selection bias [E] (empty when the policy has none).")
      .def("update", &PyRouter::update, py::arg("counts"),
           "Bias balancing: updates from the kept counts [E] summed over the group.");
}
