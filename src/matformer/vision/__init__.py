"""MatViT: the nested FFN in a ViT encoder (arXiv 2310.07707, sec. 4.2).

- :mod:`.model`: :class:`ViTConfig`, :class:`MatViT`, presets, classifier evaluation and
  [CLS] embeddings;
- :mod:`.task`: :class:`VisionTask`, image classification for the shared trainer;
- :mod:`.data`: the embedded 8x8 digits and image folders;
- :mod:`.evaluate`: adaptive retrieval and the ViT's Mix'n'Match sweep (through
  :mod:`matformer.submodels`), with plots.
"""

from .model import (
    POS_EMBEDS,
    VIT_PRESETS,
    MatViT,
    ViTConfig,
    embed_images,
    evaluate_classifier,
    vit_preset,
)
from .task import VisionTask

__all__ = ["POS_EMBEDS", "VIT_PRESETS", "MatViT", "ViTConfig", "VisionTask", "embed_images",
           "evaluate_classifier", "vit_preset"]
