"""``python -m matformer`` (also what ``torchrun -m matformer`` runs)."""

from .cli import entry

entry()
