"""SEDD (Score Entropy Discrete Diffusion) in PyTorch: model, noise, graphs, samplers, loading, engine."""
from .config import SEDDConfig
from .generation import GenerationError, generate, make_job
from .loading import CheckpointError, LoadedModel, load

__all__ = ["SEDDConfig", "load", "LoadedModel", "CheckpointError", "generate", "make_job", "GenerationError"]
__version__ = "0.1.0"
