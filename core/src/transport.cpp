// The checks every transport call passes before it reaches the plugin: argument shapes,
// and memory kinds against the plugin's declared capabilities.
#include "switchyard/transport.hpp"

#include "switchyard/collectives.hpp"

namespace switchyard {
void Transport::require_memory(Device device, const char* op, const char* buffer) const {
  const TransportCapabilities caps = capabilities();
  const bool accepted = device.kind == Device::Kind::kHost ? caps.host_memory : caps.device_memory;
  if (accepted) return;
  const char* takes = caps.host_memory && caps.device_memory ? "host and CUDA device"
                      : caps.host_memory                     ? "host"
                                                             : "CUDA device";
  throw Error(ErrorCode::kInvalidArgument, name() + " " + op + ": " + buffer + " in " +
                                               device_name(device) + " memory: the " + name() +
                                               " transport takes only " + takes + " memory");
}

void Transport::alltoall(const void* send, void* recv, std::size_t bytes_per_peer, Stream& stream) {
  require_memory(stream.device(), "alltoall", "send/receive buffers");
  do_alltoall(send, recv, bytes_per_peer, stream);
}

void Transport::alltoall(const void* send, void* recv, std::size_t bytes_per_peer) {
  HostStream stream;
  alltoall(send, recv, bytes_per_peer, stream);
  stream.synchronize();
}

void Transport::check_alltoallv(const AlltoallvBuffers& buffers, const Stream& stream) const {
  check_alltoallv_arguments(buffers, size(), name());
  if (buffers.device != stream.device()) {
    throw Error(ErrorCode::kInvalidArgument,
                name() + " alltoallv: the buffers are in " + device_name(buffers.device) +
                    " memory but the stream runs on " + device_name(stream.device()));
  }
  require_memory(buffers.device, "alltoallv", "send/receive buffers");
}

void Transport::alltoallv(const AlltoallvBuffers& buffers, Stream& stream) {
  check_alltoallv(buffers, stream);
  do_alltoallv(buffers, stream);
}

void Transport::alltoallv_group(std::span<const AlltoallvBuffers> exchanges, Stream& stream) {
  for (const AlltoallvBuffers& buffers : exchanges) check_alltoallv(buffers, stream);
  do_alltoallv_group(exchanges, stream);
}

void Transport::do_alltoallv_group(std::span<const AlltoallvBuffers> exchanges, Stream& stream) {
  for (const AlltoallvBuffers& buffers : exchanges) do_alltoallv(buffers, stream);
}

void Transport::alltoallv(const AlltoallvBuffers& buffers) {
  HostStream stream;
  alltoallv(buffers, stream);
  stream.synchronize();
}

std::unique_ptr<TransportRequest> Transport::ialltoallv(const AlltoallvBuffers& buffers) {
  check_alltoallv_arguments(buffers, size(), name());
  if (buffers.device.kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kInvalidArgument,
                name() + " ialltoallv: takes host buffers; use alltoallv on a stream of " +
                    device_name(buffers.device));
  }
  require_memory(buffers.device, "ialltoallv", "send/receive buffers");
  return do_ialltoallv(buffers);
}

void Transport::allreduce(void* data, std::size_t count, DType dtype, ReduceOp op, Stream& stream) {
  require_memory(stream.device(), "allreduce", "data");
  do_allreduce(data, count, dtype, op, stream);
}

void Transport::allreduce(void* data, std::size_t count, DType dtype, ReduceOp op) {
  HostStream stream;
  allreduce(data, count, dtype, op, stream);
  stream.synchronize();
}

}  // namespace switchyard
