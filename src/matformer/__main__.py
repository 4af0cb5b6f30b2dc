"""``python -m matformer`` (also what ``torchrun -m matformer`` runs)."""

import sys

from .cli import main

sys.exit(main())
