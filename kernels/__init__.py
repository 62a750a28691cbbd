"""CyxWiz's Triton kernel library: fused training ops with torch-compatible modules.

Every op runs its Triton kernels where :func:`use_triton` says so (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``) and plain torch elsewhere, so CPU-only nodes still train. Importing this
package never touches the GPU driver. See docs/kernels.md.
"""

from kernels.modules.adamw import AdamW
from kernels.modules.cross_entropy import CrossEntropyLoss
from kernels.modules.layer_norm import LayerNorm
from kernels.modules.linear_act import LinearAct
from kernels.modules.rms_norm import RMSNorm
from kernels.ops.activation import ACTIVATIONS
from kernels.ops.cross_entropy import cross_entropy
from kernels.ops.layer_norm import layer_norm
from kernels.ops.linear_act import linear_act
from kernels.ops.rms_norm import rms_norm
from kernels.runtime import use_triton

__all__ = [
    "ACTIVATIONS",
    "AdamW",
    "CrossEntropyLoss",
    "LayerNorm",
    "LinearAct",
    "RMSNorm",
    "cross_entropy",
    "layer_norm",
    "linear_act",
    "rms_norm",
    "use_triton",
]
