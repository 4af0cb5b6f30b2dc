"""matformer: nested Transformers for elastic inference.

One set of weights holds a whole family of models: every Transformer block's FFN is nested into
granularities (prefix slices of its hidden units), and any per-layer choice of width is a valid
submodel. See README.md for a tour.
"""

__version__ = "0.1.0"
