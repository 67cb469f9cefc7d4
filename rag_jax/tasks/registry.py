"""The tasks rag_jax trains and evaluates on, by name: what dev evaluation, experiments.evaluate and the data readers
ask instead of assuming NQ-open.

A run config names one (`task.name`, default "qa"); a task (base.Task) owns how a record becomes the generator's input
and target and its evaluator. A built-in name is the module that registers it (BUILTIN, imported on first use, so
that this module stays light). Adding a task = one new module that calls `register` plus one line in BUILTIN. A task
registered elsewhere (a test, a user's package) is named `package.module:name`: the module is imported, it registers
`name`, and every process that reads the config finds it the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# name -> the module that registers it
BUILTIN = {
    "qa": "rag_jax.tasks.qa",
    "abstractive_qa": "rag_jax.tasks.abstractive_qa",
    "question_generation": "rag_jax.tasks.question_generation",
    "fact_verification": "rag_jax.tasks.fact_verification",
}

_TASKS: dict[str, Any] = {}


def register(task: Any) -> Any:
    """Adds (or replaces) `task` (a base.Task) under its `name`."""
    _TASKS[task.name] = task
    return task


def _split(name: str) -> tuple[str | None, str]:
    """("package.module", "task") of "package.module:task"; (BUILTIN module or None, name) of a plain name."""
    if ":" in name:
        module, _, task = name.partition(":")
        return module, task
    return BUILTIN.get(name), name


def known(name: Any) -> bool:
    """Whether `name` can name a task, without importing it (for the config and flag checks)."""
    if not isinstance(name, str) or not name:
        return False
    if name in _TASKS:
        return True
    module, task = _split(name)
    if module is None or not task:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def names() -> list[str]:
    """The built-in names and those registered so far."""
    return sorted(set(BUILTIN) | set(_TASKS))


def get(name: str) -> Any:
    """The task `name` names: a built-in or registered name or `package.module:name`. Raises ValueError naming the
    known ones."""
    if name not in _TASKS:
        module, name = _split(name)
        if module is not None:
            importlib.import_module(module)
    if name not in _TASKS:
        raise ValueError(f"no task named {name!r}; known: {', '.join(names())} (or 'package.module:name' of a module "
                         "that registers one with rag_jax.tasks.registry.register)")
    return _TASKS[name]


def from_config(config: Any) -> Any:
    """The task of a run config: config.task.name, "qa" for configs saved before the task section existed."""
    section = config.get("task") if hasattr(config, "get") else None
    return get(section.get("name", "qa") if section is not None else "qa")
