"""Triton launches on the tensors' device: Triton launches a kernel on the current CUDA
device (and its current stream), so each launcher of triton_kernels/ makes its tensors'
device current for its launches, and enters no device context when it already is.

Checked without a GPU: every launcher call of tests/kernel_launches.py runs on fake CUDA
tensors under a fake CUDA runtime (tests/triton_aot.py: record_launches) that records,
per launch, which device was current.
"""

import pytest

pytest.importorskip("triton")

from tests import kernel_launches, triton_aot  # noqa: E402

# one call per launcher and kernel family is enough: the guard sits in the launchers
CALLS = {name: call for name, call in kernel_launches.CALLS.items()
         if name in ("dropout-fp32", "channel_dropout-fp32", "dropout_add-bias-bf16", "layer_norm-bf16-n4096",
                     "prenorm-layer_norm-bf16-n4096", "layer_norm-fp32-n65536", "batch_norm-fp32-contiguous",
                     "batch_norm-bf16-channels_last")
         or (name.startswith("group_norm-fp32-") and name.endswith(("64x64", "8x8")))}


@pytest.mark.parametrize("name", CALLS)
def test_launches_run_on_the_tensors_device(name):
    """Tensors on cuda:1 while cuda:0 is current: every launch is made with cuda:1
    current, and cuda:0 is current again afterwards."""
    with triton_aot.record_launches(current_device=0) as (launches, fake_cuda):
        CALLS[name]("cuda:1")
        assert fake_cuda.current == 0
    assert launches
    assert {launch.current_device for launch in launches} == {1}, [(l.kernel, l.current_device) for l in launches]


@pytest.mark.parametrize("name", CALLS)
def test_no_device_context_when_the_device_is_current(name):
    """Tensors on the current device: the launchers enter no device context (the common
    case costs one current-device query per launch)."""
    with triton_aot.record_launches(current_device=1) as (launches, fake_cuda):
        CALLS[name]("cuda:1")
    assert launches and {launch.current_device for launch in launches} == {1}
    assert fake_cuda.contexts_entered == 0
