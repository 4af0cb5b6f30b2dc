"""The ``matformer`` command line (parser and dispatch in :mod:`.main`; one module per group
of commands; :mod:`.common` holds the convention every command follows, :mod:`.args` the
argument types and cross-flag rules)."""

from .main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
