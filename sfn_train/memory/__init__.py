"""Memory planning: one training step of a recipe simulated on fake tensors (`sfn memory`)."""

from .plan import cli_main, plan_memory

__all__ = ["cli_main", "plan_memory"]
