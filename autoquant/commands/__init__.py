"""Typer commands registered by ``autoquant.cli`` (one module per command group)."""
