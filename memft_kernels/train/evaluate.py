"""What the paper measures: teacher-forced loss / accuracy / recalled share, and verbatim recall by
real greedy generation from each sample's prompt (exact match, first wrong position)."""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Dict, List

import torch

from ..loss import memft_loss
from .data import Task, to_batch


@torch.no_grad()
def teacher_forced(model, task: Task, device, batch_size: int = 16, backend: str = "auto") -> Dict:
    """Per-token CE / prob / argmax over every answer token (one forward per batch, no grad).

    Returns means over all answer tokens (``loss`` is the plain CE per token) and the per-sample
    per-token arrays (lists of tensors) for tokens.npz.
    """
    model.eval()
    width = task.max_len
    total_ce = total_recalled = total_correct = total = 0.0
    per_sample = []
    for start in range(0, len(task.samples), batch_size):
        idx = range(start, min(len(task.samples), start + batch_size))
        batch = to_batch(task, idx, width).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        _, stats = memft_loss(logits, batch.labels, policy="none", reduction="sum", return_stats=True, backend=backend)
        valid = batch.labels != -100
        correct = (stats.pred == batch.labels) & valid
        total_ce += float(stats.ce[valid].double().sum())
        total_recalled += float(((stats.prob > 0.5) & valid).sum())
        total_correct += float(correct.sum())
        total += float(valid.sum())
        for row in range(len(idx)):
            v = valid[row]
            per_sample.append({
                "prob": stats.prob[row][v].float().cpu(),
                "ce": stats.ce[row][v].float().cpu(),
                "correct": correct[row][v].cpu(),
            })
    model.train()
    total = max(total, 1.0)
    return {
        "loss": total_ce / total,
        "token_accuracy": total_correct / total,
        "recalled_frac": total_recalled / total,
        "per_sample": per_sample,
    }


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what this version takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(model, prompts: List[List[int]], max_new_tokens: int, device) -> torch.Tensor:
    """Greedy continuation of equal-length prompts with the KV cache: [B, max_new_tokens]."""
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    cache_kw = _cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    past = getattr(out, cache_kw)
    generated = []
    next_id = out.logits[:, -1].argmax(-1)
    for _ in range(max_new_tokens):
        generated.append(next_id)
        if len(generated) == max_new_tokens:
            break
        out = model(input_ids=next_id[:, None], use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        next_id = out.logits[:, -1].argmax(-1)
    return torch.stack(generated, dim=1)


@torch.no_grad()
def exact_recall(model, task: Task, device, batch_size: int = 64) -> Dict:
    """Generate each sample's answer greedily from its prompt and compare token by token.

    ``exact_recall`` is the share of samples reproduced verbatim; ``whole_exact`` whether all are
    (the whole text); ``first_wrong`` per sample (None if exact) and ``first_wrong_overall``, the
    first wrong position in the concatenation of all answers (None if all exact).
    """
    model.eval()
    groups = defaultdict(list)  # equal prompt lengths batch without padding
    for i, s in enumerate(task.samples):
        groups[len(s.prompt)].append(i)
    first_wrong: List = [None] * len(task.samples)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            n_new = max(len(task.samples[i].answer) for i in chunk)
            gen = greedy_generate(model, [task.samples[i].prompt for i in chunk], n_new, device).cpu()
            for row, i in enumerate(chunk):
                answer = torch.tensor(task.samples[i].answer)
                wrong = (gen[row, : len(answer)] != answer).nonzero()
                first_wrong[i] = int(wrong[0]) if len(wrong) else None
    model.train()
    n_exact = sum(fw is None for fw in first_wrong)
    overall, offset = None, 0
    for s, fw in zip(task.samples, first_wrong):
        if fw is not None:
            overall = offset + fw
            break
        offset += len(s.answer)
    return {
        "exact_recall": n_exact / len(task.samples),
        "whole_exact": n_exact == len(task.samples),
        "first_wrong": first_wrong,
        "first_wrong_overall": overall,
    }
