"""One process on a CUDA GPU trains the model one process trains on the CPU: fp32, 10 steps, the same
losses and gradient norms within 1e-5 relative (the kernels sum in other orders; TF32 is off, PyTorch's
default for matmuls). Skipped without a GPU: bench/gpu_check.sh runs it on one."""

import pytest
import torch

from nanotrain.runtime import RuntimeEngine

TOL = 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")
def test_cuda_trains_what_the_cpu_trains(make_config):
    common = ["--precision.recipe=fp32", "--train.max_steps=10", "--logging.log_interval=1",
              "--schedule.decay_steps=10"]
    cpu = RuntimeEngine(make_config(*common, "--train.device=cpu")).run()
    cuda = RuntimeEngine(make_config(*common, "--train.device=cuda", f"--train.out_dir={cpu.out_dir}_cuda")).run()
    for step in range(1, 11):
        loss = abs(cuda.losses[step] - cpu.losses[step]) / cpu.losses[step]
        norm = abs(cuda.grad_norms[step] - cpu.grad_norms[step]) / cpu.grad_norms[step]
        print(f"step {step}: cpu {cpu.losses[step]:.7f} cuda {cuda.losses[step]:.7f} loss {loss:.1e} norm {norm:.1e}")
        assert loss < TOL and norm < TOL
