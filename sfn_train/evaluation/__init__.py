"""Evaluation: generate on tasks, grade, classify response levels I-IV, and compare models with paired statistics.

Modules: `tasks` (problems and prompts), `settings` (what to evaluate and how), `tokens` (tokenizer, EOS ids,
signature), `context` (context-length checks), `forcing` (rows and budget forcing, shared by both backends),
`hf_backend` and `vllm_backend` (generation), `grading` (answer extraction, math-verify equivalence in timed worker
processes), `levels` (I-IV rules), `stats` (bootstrap), `run` (`evaluate`), `comparison` (`compare`), `cli`
(`sfn eval|compare|grade`).

Nothing heavy (torch, transformers) is imported here: the grading workers import this package when they start.
"""

from __future__ import annotations

from .settings import GenerationSettings, ModelSpec
from .grading import extract_answer, grade_file, grade_many, grade_response
from .levels import classify_level
from .comparison import compare
from .run import evaluate, load_result
from .stats import bootstrap_ci, paired_bootstrap, pass_at_1
from .tasks import Task, load_task, register_task, registered_tasks

__all__ = [
    "evaluate", "compare", "grade_file", "grade_many", "grade_response", "extract_answer", "classify_level",
    "register_task", "registered_tasks", "load_task", "Task", "ModelSpec", "GenerationSettings", "load_result",
    "bootstrap_ci", "paired_bootstrap", "pass_at_1",
]
