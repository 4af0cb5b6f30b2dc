"""matformer: nested Transformers for elastic inference.

One set of weights holds a whole family of models: every Transformer block's FFN is nested into
granularities (prefix slices of its hidden units), and any per-layer choice of width is a valid
submodel. The common entry points are importable from here::

    from matformer import MatFormerLM, preset, load_checkpoint, generate

See README.md for a tour.
"""

from .cache import KVCache
from .config import ModelConfig, preset
from .families import load_checkpoint
from .generate import generate
from .model import MatFormerLM

__version__ = "0.1.0"
__all__ = ["KVCache", "MatFormerLM", "ModelConfig", "generate", "load_checkpoint", "preset"]
