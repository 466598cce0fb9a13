"""The built-in CPU testbed: synthetic verifiable tasks, a character tokenizer, a tiny Qwen2 decoder, a cached
supervised warm start and a lean GRPO loop where entropy collapse and its cures show within minutes.

Heavy imports (transformers) happen lazily inside ``model`` / ``train``.
"""
from rlvr_entropy.testbed.tasks import Problem, Task, get_task
from rlvr_entropy.testbed.tokenizer import CharTokenizer

__all__ = ["Problem", "Task", "get_task", "CharTokenizer"]
