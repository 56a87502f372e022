"""tridlm: one set of weights, three ways to write -- autoregressive, block diffusion, self-speculation."""

from .cache import KVCache
from .checkpoint import CheckpointError, save
from .config import ModelConfig, RopeParameters
from .edit import InfillResult, RevisionResult, infill, revise
from .generate import GenerationResult, generate
from .loader import load
from .model import TriModeLM
from .tokenizer import Tokenizer

__all__ = ["KVCache", "CheckpointError", "ModelConfig", "RopeParameters", "TriModeLM", "Tokenizer", "load",
           "save", "generate", "GenerationResult", "infill", "revise", "InfillResult", "RevisionResult"]
__version__ = "0.1.0"
