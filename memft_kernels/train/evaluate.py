"""What the paper measures: teacher-forced loss / accuracy / recalled share, and verbatim recall by
real greedy generation from each sample's prompt (exact match, first wrong position)."""
from __future__ import annotations

import inspect
from typing import Dict, List

import torch

from .data import Task, to_batch
from .head import forward_head


@torch.no_grad()
def teacher_forced(model, task: Task, device, batch_size: int = 16, backend: str = "auto", fused: bool = False,
                   autocast: bool = False) -> Dict:
    """Per-token CE / prob / argmax over every answer token (one forward per batch, no grad).

    ``fused``: the statistics come from ``memft_linear_loss`` on the last hidden states (no logits);
    ``autocast``: the forward runs under bfloat16 autocast, as in training.

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
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            head = forward_head(model, batch.input_ids, batch.attention_mask, fused, autocast=autocast)
        _, stats = head.loss(batch.labels, policy="none", reduction="sum", return_stats=True, backend=backend)
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


def _left_padded(prompts: List[List[int]], pad_id: int, device):
    """Prompts right-aligned in one batch: ids, attention mask and position ids (0 at each prompt's start)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def greedy_generate(model, prompts: List[List[int]], max_new_tokens: int, device, use_cache: bool = True,
                    pad_id: int = 0) -> torch.Tensor:
    """Greedy continuations of a batch of prompts (any lengths: left-padded): [B, max_new_tokens].

    With the KV cache (default) the prompts take one forward and every new token one forward of
    one position per row, so recalling N tokens costs about one generation of N tokens. Without it
    (``use_cache=False``, the reference) every new token re-runs the whole sequence.
    """
    ids, mask, pos = _left_padded(prompts, pad_id, device)
    cache_kw = _cache_kwarg(model)
    generated = []
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, logits_to_keep=1)
    past = getattr(out, cache_kw) if use_cache else None
    next_id = out.logits[:, -1].argmax(-1)
    while True:
        generated.append(next_id)
        if len(generated) == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
        if use_cache:
            out = model(input_ids=next_id[:, None], attention_mask=mask, position_ids=pos[:, -1:], use_cache=True,
                        logits_to_keep=1, **{cache_kw: past})
            past = getattr(out, cache_kw)
        else:
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
        next_id = out.logits[:, -1].argmax(-1)
    return torch.stack(generated, dim=1)


@torch.no_grad()
def exact_recall(model, task: Task, device, batch_size: int = 64, use_cache: bool = True) -> Dict:
    """Generate each sample's answer greedily from its prompt and compare token by token.

    ``exact_recall`` is the share of samples reproduced verbatim; ``whole_exact`` whether all are
    (the whole text); ``first_wrong`` per sample (None if exact) and ``first_wrong_overall``, the
    first wrong position in the concatenation of all answers (None if all exact).
    """
    model.eval()
    # Batches of samples with similar answer lengths; prompts of any length share a batch (left-padded).
    order = sorted(range(len(task.samples)), key=lambda i: len(task.samples[i].answer))
    first_wrong: List = [None] * len(task.samples)
    for members in [order]:
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            n_new = max(len(task.samples[i].answer) for i in chunk)
            gen = greedy_generate(model, [task.samples[i].prompt for i in chunk], n_new, device, use_cache=use_cache,
                                  pad_id=task.tokenizer.pad).cpu()
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
