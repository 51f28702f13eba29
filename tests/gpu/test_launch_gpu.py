"""The launcher on a real GPU: arguments packed right, current stream, >48 KB smem, graphs."""
import pytest
import torch

from vidrial.core.arch import device_arch
from vidrial.core.compile import compile_source
from vidrial.core.launch import LaunchableKernel, current_stream_handle
from vidrial.core.render import RenderedKernel

pytestmark = pytest.mark.gpu

SOURCE = r"""
extern "C" __global__ void axpy_smem(float* __restrict__ out, const float* __restrict__ x,
                                     long long n, float a, int bias) {
  extern __shared__ float buf[];
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) out[i] = a * buf[threadIdx.x] + (float)bias;
}
"""


def _kernel(smem: int) -> LaunchableKernel:
    compiled = compile_source(RenderedKernel("axpy_smem", SOURCE, "<test>"), device_arch())
    return LaunchableKernel(compiled, ("ptr", "ptr", "i64", "f32", "i32"), smem)


@pytest.mark.parametrize("smem", [1024, 100 * 1024])
def test_launch_matches_torch(smem):
    k = _kernel(smem)
    x = torch.randn(100_003, device="cuda")
    out = torch.full_like(x, float("nan"))
    dev = x.device.index
    k.launch(((x.numel() + 255) // 256, 1, 1), (256, 1, 1),
             (out.data_ptr(), x.data_ptr(), x.numel(), 2.5, 3), dev, current_stream_handle(dev))
    torch.testing.assert_close(out, 2.5 * x + 3)


def test_launch_on_side_stream_and_graph():
    k = _kernel(1024)
    x = torch.randn(4096, device="cuda")
    out = torch.full_like(x, float("nan"))
    dev = x.device.index
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        k.launch((16, 1, 1), (256, 1, 1), (out.data_ptr(), x.data_ptr(), x.numel(), -1.0, 0), dev,
                 current_stream_handle(dev))
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, -x)
    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        k.launch((16, 1, 1), (256, 1, 1), (out.data_ptr(), x.data_ptr(), x.numel(), 4.0, 1), dev,
                 current_stream_handle(dev))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, 4 * x + 1)
