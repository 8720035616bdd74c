"""Run memopt's Triton kernels under Triton's CPU interpreter when there is no GPU, for this directory only.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, i.e. when ``memopt.kernels.fused_ffn`` is
imported (memopt imports it lazily, on first use). This fixture sets the variable, imports a fresh interpreted copy
of that module for the tests of this directory, and afterwards restores both the variable and whatever copy of the
module existed before. Tests elsewhere therefore see the process exactly as they would without this directory:
no ``TRITON_INTERPRET`` in the environment and ``fused_ffn_available("cpu")`` False. The variable only changes
Triton; ``torch.cuda.is_available()`` is unaffected. With a GPU the fixture does nothing and the tests run the
compiled kernels on it.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULE = "memopt.kernels.fused_ffn"


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """Interpreted kernels for the duration of one test module (CPU-only machines)."""
    if torch.cuda.is_available():
        yield
        return
    package = importlib.import_module("memopt.kernels")
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_module = sys.modules.pop(KERNEL_MODULE, None)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module(KERNEL_MODULE)
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        sys.modules.pop(KERNEL_MODULE, None)
        if saved_module is not None:
            sys.modules[KERNEL_MODULE] = saved_module
            package.fused_ffn = saved_module
        elif hasattr(package, "fused_ffn"):
            del package.fused_ffn
