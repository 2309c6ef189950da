"""The CPU kernels' paths for other x86 CPUs than this one, in a fresh process with
FASTREG_CPU_CAPABILITY capping what fastreg picks (csrc/cpu/vectorize.h): avx2 runs the
explicit vector loops in 32-byte vectors and float16 through F16C's 8-lane conversions,
default runs 16-byte vectors and the integer-lane conversions. On a CPU without AVX-512 the
avx2 run repeats the main suite's path; on one with it, both runs reach code the main suite
does not."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import skip_unless_runs

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The tests of the kernels that pick their vector width or Half conversions at run time,
# by node: their CPU cases (-k cpu) compare against torch or float64.
WIDE_VECTOR_TESTS = [
    "tests/test_batch_norm.py::test_cpu_16_bit_values_round_trip",  # every 16-bit pattern, both ways
    "tests/test_batch_norm.py::test_cpu_vector_paths_match_float64",  # channel sums, apply of 16-bit rows
    "tests/test_group_norm.py::test_cpu_channels_last_16_bit_rows",  # channel sums, rows converted in registers
    "tests/test_layer_norm.py::test_norm_matches_torch",  # rows of 1 to 1023 + values
    "tests/test_cross_entropy.py::test_matches_torch",  # rows of classes
    "tests/test_cross_entropy.py::test_spatial_inputs",  # positions in vector lanes
    "tests/test_optim.py::test_step_ops_match_the_reference",  # SGD and Adam updates, every regularizer
]


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_paths_of_other_cpus(capability):
    skip_unless_runs("cpu")
    env = dict(os.environ, FASTREG_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "-k", "cpu", *WIDE_VECTOR_TESTS],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    # every selected case ran: nothing skipped, deselected cases aside
    assert re.match(r"\d+ passed(, \d+ deselected)? in ", summary), summary
