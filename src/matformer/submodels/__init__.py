"""Submodels out of one nested checkpoint, for language models and ViTs alike.

- :mod:`.candidates`: which per-layer widths to try (the paper's Mix'n'Match rule and its
  ablations, arXiv 2310.07707 sec. 3.3), their names and static costs;
- :mod:`.latency`: the one routine that measures latency;
- :mod:`.sweep`: score and cost every candidate, Pareto fronts, the best under a budget;
- :mod:`.report`: plots, tables and report files of a sweep;
- :mod:`.extract`: any submodel as a standalone dense model;
- :mod:`.hf`: export to and import from Hugging Face ``transformers`` folders, and import of
  GGUF files;
- :mod:`.gguf`: export to llama.cpp's GGUF (per-layer widths through its ``deci``
  architecture), and :mod:`.pretokenizers`: llama.cpp's pre-tokenizer types;
- :mod:`.gemma3n` and :mod:`.gemma3n_sweep`: slicing Gemma 3n checkpoints, and picking a
  slice by an in-place sweep.

None of them needs the trainer; making a pretrained dense model nested by continued training
is :mod:`matformer.elastify`, beside it.
"""
