"""The task zoo: built-in tasks and a user's own."""

from autoquant.tasks.base import Task, evaluate, top1_accuracy
from autoquant.tasks.registry import BUILTIN_TASKS, load_task

__all__ = ["BUILTIN_TASKS", "Task", "evaluate", "load_task", "top1_accuracy"]
