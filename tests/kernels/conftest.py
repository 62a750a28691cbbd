"""Kernel tests run the real Triton kernels: on CPU tensors through Triton's interpreter, on CUDA
tensors (tests marked ``gpu``) compiled.

``kernels.runtime.jit`` picks interpreter or compiler at each launch, so it is enough to set
``TRITON_INTERPRET`` per test, whatever imported triton or kernels earlier in the session; the
variable is restored afterwards, so tests in other folders never see it.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def triton_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("gpu") is not None:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (bf16 and compiled-kernel checks cannot run in the CPU interpreter)")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
