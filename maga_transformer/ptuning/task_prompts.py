"""rtp-llm's per-task system prompts: MULTI_TASK_PROMPT (a JSON file) or MULTI_TASK_PROMPT_STR (the
JSON itself), a list of {"task_id": ..., "prompt": ...} (or an object task_id -> prompt). A request
with generate_config.task_id starts with its task's prompt; the prompt's full KV blocks are pinned in
the prefix cache once computed (engine/block_pool.py), so later requests of the task reuse them."""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping


def load_task_prompts(env: Mapping[str, str]) -> Dict[str, str]:
    """task_id (as a string) -> prompt text; {} when neither variable is set."""
    raw = env.get("MULTI_TASK_PROMPT_STR")
    source = "MULTI_TASK_PROMPT_STR"
    if not raw and env.get("MULTI_TASK_PROMPT"):
        source = "MULTI_TASK_PROMPT"
        try:
            with open(env["MULTI_TASK_PROMPT"]) as f:
                raw = f.read()
        except OSError as err:
            raise ValueError(f"MULTI_TASK_PROMPT: cannot read {env['MULTI_TASK_PROMPT']!r} ({err})") from None
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from None
    return parse_task_prompts(value, source)


def parse_task_prompts(value, source: str = "task prompts") -> Dict[str, str]:
    items = value.items() if isinstance(value, dict) else (
        [(entry.get("task_id"), entry.get("prompt")) for entry in value if isinstance(entry, dict)]
        if isinstance(value, list) else None)
    if items is None:
        raise ValueError(f"{source}: expected a list of {{\"task_id\", \"prompt\"}} objects")
    prompts = {}
    for task_id, prompt in items:
        if task_id is None or isinstance(task_id, bool) or not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{source}: every entry needs a task_id and a non-empty prompt, got "
                             f"{task_id!r}: {prompt!r}")
        prompts[str(task_id)] = prompt
    if isinstance(value, list) and len(prompts) != len(value):
        raise ValueError(f"{source}: entries must be objects with distinct task_ids")
    return prompts


def task_prompts_from_env() -> Dict[str, str]:
    return load_task_prompts(os.environ)
