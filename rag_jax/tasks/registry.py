"""The tasks rag_jax trains and evaluates on, by name: what dev evaluation, experiments.evaluate and the data readers
ask instead of assuming NQ-open.

A run config names one (`task.name`, default "qa"); a task (base.Task) owns how a record becomes the generator's input
and target and its evaluator. A built-in name is the module that registers it (BUILTIN, imported on first use, so
that this module stays light). Adding a task = one new module that calls `register` plus one line in BUILTIN. A task
registered elsewhere (a test, a user's package) is named `package.module:name`: the module is imported, it registers
`name`, and every process that reads the config finds it the same way.
"""

from __future__ import annotations

from typing import Any

from rag_jax import named

# name -> the module that registers it
BUILTIN = {
    "qa": "rag_jax.tasks.qa",
    "abstractive_qa": "rag_jax.tasks.abstractive_qa",
    "question_generation": "rag_jax.tasks.question_generation",
    "fact_verification": "rag_jax.tasks.fact_verification",
}



_REGISTRY = named.Registry(BUILTIN, "task named", "rag_jax.tasks.registry")
register, known, names, get = _REGISTRY.register, _REGISTRY.known, _REGISTRY.names, _REGISTRY.get


def from_config(config: Any) -> Any:
    """The task of a run config: config.task.name, "qa" for configs saved before the task section existed."""
    section = config.get("task") if hasattr(config, "get") else None
    return get(section.get("name", "qa") if section is not None else "qa")
