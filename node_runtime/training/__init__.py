"""Real PyTorch training for CyxWiz jobs: models, datasets, the loop and checkpoints.

The node runtime's executor calls ``run_training(spec, ctx)`` in a child process per job.
"""

from node_runtime.training.checkpoints import load_trained_model
from node_runtime.training.context import (
    Distributed,
    JobError,
    PeerLost,
    RendezvousTimeout,
    TrainingContext,
    TrainingResult,
)
from node_runtime.training.loop import run_training
from node_runtime.training.models import build_model

__all__ = ["Distributed", "JobError", "PeerLost", "RendezvousTimeout", "TrainingContext", "TrainingResult",
           "build_model", "load_trained_model", "run_training"]
