"""Memorization tasks and tokenizers.

A task is a list of samples, each ``prompt + answer`` token ids; the model must produce the answer
verbatim by greedy decoding from the prompt. ``to_batch`` pads them into tensors whose ``labels``
are already aligned with the logits (label at position t = the token predicted from position t;
-100 on the prompt and the padding), so ``memft_loss(logits, labels)`` needs no shift.

Tasks: ``random`` (uniform random ids: the paper's 100%-random setting), ``text`` (a text file or
the bundled passage, a ``replace_rate`` share of tokens swapped for random ones), ``phonebook``
("Firstname Lastname:" -> " 10 digits").
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import List, Optional

import torch

from .config import TrainInputError

IGNORE = -100
BUNDLED_TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "gettysburg.txt")


# ---------------------------------------------------------------------------------------------
# Tokenizers: encode/decode plus the special ids a task needs (bos starts every prompt).
# ---------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes 0..255, then <bos>=256, <eos>=257, <pad>=258."""

    name = "byte"
    vocab_size = 259
    bos, eos, pad = 256, 257, 258
    regular_ids = range(256)  # ids a random replacement may draw

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TrainedTokenizer:
    """A byte-level BPE trained in-process with `tokenizers` on the task's own text."""

    name = "trained"

    def __init__(self, texts: List[str], vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.bos, self.eos, self.pad = (tok.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>"))
        self.regular_ids = range(3, self.vocab_size)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


class ModelTokenizer:
    """A local model's own tokenizer (AutoTokenizer, no download)."""

    name = "model"

    def __init__(self, path: str, model_vocab: int):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means: no usable tokenizer there
            raise TrainInputError(f"model folder {path!r} has no usable tokenizer ({type(exc).__name__}); "
                             "use --tokenizer byte or trained") from None
        self._tok = tok
        self.vocab_size = min(len(tok), model_vocab)
        specials = set(tok.all_special_ids)
        self.eos = tok.eos_token_id
        # Some tokenizers (e.g. Qwen's) have no BOS: the prompt then starts with EOS as a separator.
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if self.bos is None:
            raise TrainInputError(f"the tokenizer in {path!r} has neither a BOS nor an EOS token")
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.bos
        self.regular_ids = [i for i in range(self.vocab_size) if i not in specials]

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


class IdTokenizer:
    """For the random task on a built-in model: ids only; bos/pad are the last two ids."""

    name = "ids"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos, self.pad = vocab_size - 1, vocab_size - 2
        self.eos = None
        self.regular_ids = range(vocab_size - 2)

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    prompt: List[int]
    answer: List[int]
    text: str = ""  # readable form, for the report


@dataclass
class Task:
    name: str
    samples: List[Sample]
    tokenizer: object

    @property
    def max_len(self) -> int:
        return max(len(s.prompt) + len(s.answer) for s in self.samples)

    @property
    def n_answer_tokens(self) -> int:
        return sum(len(s.answer) for s in self.samples)


def read_text(path: Optional[str]) -> str:
    path = path or BUNDLED_TEXT
    if os.path.isdir(path):
        raise TrainInputError(f"data file {path!r} is a folder, not a text file")
    if not os.path.isfile(path):
        raise TrainInputError(f"data file {path!r} does not exist")
    # newline="": the text as it is in the file (no \r\n -> \n translation): it is memorized verbatim
    with open(path, encoding="utf-8", errors="strict", newline="") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as exc:
            raise TrainInputError(f"data file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise TrainInputError(f"data file {path!r} is empty")
    return text


_FIRST = ("Ada Alan Alice Amelia Anna Arthur Beatrice Bruno Carla Clara Daniel Diana Edgar Elena Emil Erik "
          "Felix Flora Frida Georg Greta Hannah Hugo Ida Ivan Jonas Julia Karl Lena Leo Lina Marco Maria "
          "Marta Milan Nina Noah Olga Oscar Paula Peter Rosa Ruth Samuel Sara Sofia Tomas Vera Viktor").split()
_LAST = ("Abbott Baker Becker Bauer Carter Dalton Ellis Fischer Foster Garcia Graham Hale Hansen Hughes "
         "Jensen Keller Klein Larsen Lopez Martin Meyer Miller Moreno Nash Nowak Olsen Parker Perez Quinn "
         "Reyes Richter Romano Schmidt Schulz Silva Stone Turner Vogel Wagner Walsh Weber Young Zimmer").split()


def make_tokenizer(config, texts: List[str]):
    kind = config.tokenizer
    if kind == "auto":
        kind = "byte" if config.task != "random" else "ids"
        if not _is_builtin(config.model):
            kind = "model"
    if kind == "ids":
        return IdTokenizer(config.vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "trained":
        return TrainedTokenizer(texts, config.trained_vocab)
    if _is_builtin(config.model):
        raise TrainInputError(f"tokenizer='model' needs --model PATH; built-in model {config.model!r} has no tokenizer")
    from transformers import AutoConfig

    model_vocab = AutoConfig.from_pretrained(config.model, local_files_only=True).vocab_size
    return ModelTokenizer(config.model, model_vocab)


def _is_builtin(name: str) -> bool:
    from .models import is_builtin

    return is_builtin(name)


def build_task(config) -> Task:
    """The samples of ``config.task`` (seeded by ``config.seed``); ValueError on bad input."""
    rng = random.Random(config.seed)
    if config.task == "random":
        tok = make_tokenizer(config, [])
        regular = list(tok.regular_ids)
        samples = [
            Sample([tok.bos], [regular[rng.randrange(len(regular))] for _ in range(config.length)])
            for _ in range(config.samples)
        ]
        return Task("random", samples, tok)

    if config.task == "text":
        text = read_text(config.data)
        tok = make_tokenizer(config, [text])
        ids = tok.encode(text)
        need = config.length * config.samples
        if len(ids) < need:
            raise TrainInputError(f"the text has {len(ids)} tokens, fewer than length x samples = {need}; "
                             "lower --length/--samples or give a longer --data file")
        ids = ids[:need]
        regular = list(tok.regular_ids)
        n_swap = round(config.replace_rate * len(ids))
        for pos in rng.sample(range(len(ids)), n_swap):
            ids[pos] = regular[rng.randrange(len(regular))]
        chunks = [ids[i * config.length:(i + 1) * config.length] for i in range(config.samples)]
        return Task("text", [Sample([tok.bos], c, _safe_decode(tok, c)) for c in chunks], tok)

    if config.task == "phonebook":
        n_names = len(_FIRST) * len(_LAST)
        if config.samples > n_names:
            raise TrainInputError(f"samples={config.samples} exceeds the {n_names} distinct phonebook names")
        pairs = rng.sample(range(n_names), config.samples)
        entries = []
        for k in pairs:
            name = f"{_FIRST[k // len(_LAST)]} {_LAST[k % len(_LAST)]}:"
            number = " " + "".join(str(rng.randrange(10)) for _ in range(10))
            entries.append((name, number))
        tok = make_tokenizer(config, [n + m for n, m in entries])
        samples = []
        for name, number in entries:
            answer = tok.encode(number) + ([tok.eos] if tok.eos is not None else [])
            samples.append(Sample([tok.bos] + tok.encode(name), answer, name + number))
        return Task("phonebook", samples, tok)

    raise TrainInputError(f"task={config.task!r} is not supported")


def _safe_decode(tok, ids) -> str:
    try:
        return tok.decode(ids)
    except Exception:  # noqa: BLE001 - the readable form is cosmetic
        return ""


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], aligned with the logits, IGNORE off the answer
    index: torch.Tensor  # [B] sample indices into the task

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.index)


def to_batch(task: Task, indices, length: Optional[int] = None) -> Batch:
    """Right-padded batch of the given samples; ``length`` pads every batch to one width (so that a
    sample's positions are the same in every batch, which the window state relies on)."""
    indices = list(indices)
    width = length or max(len(task.samples[i].prompt) + len(task.samples[i].answer) for i in indices)
    pad = task.tokenizer.pad
    ids = torch.full((len(indices), width), pad, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        s = task.samples[i]
        seq = s.prompt + s.answer
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        # The token at position t+1 is predicted from position t; only answer tokens are labels.
        start = len(s.prompt) - 1
        labels[row, start: start + len(s.answer)] = torch.tensor(s.answer)
    return Batch(ids, mask, labels, torch.tensor(indices, dtype=torch.long))
