"""Sequences longer than the model's context, memorized in windows.

A sample ``[bos] + answer`` whose length exceeds the context C is split into windows of
S = C // 2 answer tokens. Window k trains (and is recalled) on answer tokens [k S, (k + 1) S),
prompted by ``[bos]`` and the P = C - 1 - S true tokens before it (window 0: ``[bos]`` alone), so
every window fits the context and each token after the first window is predicted with at least
P tokens of true left context. Verbatim recall of the sequence = every window reproduced by greedy
generation from its prompt; the windows are kept in order, so the report's first wrong position
is a position in the whole sequence.
"""
from __future__ import annotations

from typing import List

from .data import Sample, Task


def split_long_samples(task: Task, context: int) -> Task:
    """``task`` unchanged if every sample fits ``context``; else each long sample split into windows."""
    if task.max_len <= context:
        return task
    stride = context // 2
    carry = context - 1 - stride
    samples: List[Sample] = []
    for s in task.samples:
        if len(s.prompt) + len(s.answer) <= context:
            samples.append(s)
            continue
        head = list(s.prompt[:1])  # bos
        for start in range(0, len(s.answer), stride):
            prompt = head + list(s.answer[max(0, start - carry):start])
            samples.append(Sample(prompt, list(s.answer[start:start + stride]), ""))
    return Task(task.name, samples, task.tokenizer)
