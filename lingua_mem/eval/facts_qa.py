"""Facts QA: greedy answers to held-out cloze questions, exact match and F1, and the bits
of knowledge they show.

A question file is jsonl, one {"question", "answer"[, "attribute", "person"]} per
line (the facts corpus writes qa.jsonl so). The question is a prompt ending where
the answer starts; the model's greedy continuation, cut at the first of
ANSWER_STOP, is the prediction. Both are normalised (lower case, no punctuation
or articles, single spaces) before exact match and token-level F1 (SQuAD's).

Bits of knowledge ("Physics of Language Models 3.3", which finds about 2 bits per
parameter for dense transformers): a fact whose attribute can take V values holds
log2(V) bits (0 for one that follows from another: data.facts.fact_bits). Two
measures: `bits`, the sum of a fact's bits over the facts answered exactly right,
and `bits_loss`, the sum over all facts of max(0, its bits - the bits the model
needs to write its answer after the prompt, teacher-forced): a fact the model is
unsure of counts for part of its bits, one it has no idea of (or writes worse than
a uniform guess over the values would) for none. With a sample of the questions
(eval.max_questions) both are scaled to the whole file. Attributes of unknown V
(not of the facts corpus) count for EM / F1 only.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from pathlib import Path

import torch

from lingua_mem.data.facts import fact_bits
from lingua_mem.errors import ConfigError
from lingua_mem.eval.generate import common_length, cut_at_stop, generate_ids
from lingua_mem.eval.shard import rank_batches
from lingua_mem.parallel.runtime import gather

ANSWER_STOP = ("\n", ".", ",", ";")  # an answer ends at its sentence's punctuation
SAMPLE_SEED = 0  # the fixed sample of eval.max_questions questions


def load_questions(key: str, path: str, max_questions: int) -> tuple[list[dict], int]:
    """(questions, how many the file has): a fixed sample of max_questions (0: all) in file
    order. ConfigError names `key` for a missing file or a line that is not a question."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: {path} is not a file" if file.exists() else f"{key}: no such file {path}")
    questions = []
    with file.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                raise ConfigError(f"{key}: {path} line {n} is not JSON") from None
            if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                    and isinstance(row.get("answer"), str)):
                raise ConfigError(f"{key}: {path} line {n} has no \"question\" and \"answer\" strings")
            if not isinstance(row.get("attribute", ""), str):
                raise ConfigError(f"{key}: {path} line {n}: \"attribute\" is not a string")
            questions.append(row)
    if not questions:
        raise ConfigError(f"{key}: {path} holds no questions")
    total = len(questions)
    if max_questions and total > max_questions:
        keep = sorted(random.Random(SAMPLE_SEED).sample(range(total), max_questions))
        questions = [questions[i] for i in keep]
    return questions, total


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold:
        return float(pred == gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(questions: list[dict], predictions: list[str], total: int, n_params: int,
          n_dense_params: int, answer_bits: list[float] | None = None) -> dict[str, float]:
    """The metrics of `predictions` (one per question): overall and per attribute EM and
    F1, and the bits of knowledge (scaled from the sample to `total` questions);
    `answer_bits` (one per question, from answer_bits()): bits_loss too."""
    bits_of = fact_bits()
    em = [float(normalize(p) == normalize(q["answer"])) for q, p in zip(questions, predictions, strict=True)]
    f1 = [f1_score(p, q["answer"]) for q, p in zip(questions, predictions, strict=True)]
    out = {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1), "questions": len(em)}
    by_attr: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        if isinstance(q.get("attribute"), str):
            by_attr.setdefault(q["attribute"], []).append(i)
    for attr, idx in sorted(by_attr.items()):
        out[f"{attr}/exact_match"] = sum(em[i] for i in idx) / len(idx)
        out[f"{attr}/f1"] = sum(f1[i] for i in idx) / len(idx)
    known = [i for i, q in enumerate(questions) if q.get("attribute") in bits_of]
    if known:
        bits = sum(em[i] * bits_of[questions[i]["attribute"]] for i in known)
        bits *= total / len(questions)
        out["bits"] = bits
        out["bits_per_param"] = bits / n_params
        out["bits_per_dense_param"] = bits / n_dense_params
        if answer_bits is not None:
            stored = sum(max(0.0, bits_of[questions[i]["attribute"]] - answer_bits[i]) for i in known)
            out["bits_loss"] = stored * total / len(questions)
    return out


def prompt_and_answer_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """The ids of `question` (BOS first) and of " " + `answer` as they follow it in one text:
    the encoding of question + " " + answer, cut after its longest common prefix with the
    question's own. Encoding " " + answer alone would not do: a SentencePiece model with a
    dummy prefix writes it as "▁", "▁Oslo", a sequence training text never holds."""
    prompt = tokenizer.encode(question, add_bos=True, add_eos=False)
    whole = tokenizer.encode(f"{question} {answer}", add_bos=True, add_eos=False)
    common = 0
    while common < min(len(prompt), len(whole) - 1) and prompt[common] == whole[common]:
        common += 1  # the answer keeps a token at least
    return whole[:common], whole[common:]


@torch.no_grad()
def answer_bits(model, tokenizer, questions: list[dict], batch_size: int) -> list[float]:
    """-log2 p(" " + answer | question) of every question: the bits the model needs to write
    the answer after the prompt, teacher-forced (each rank its share; all get every one)."""
    device, window = model.rope_cos.device, model.args.max_seq_len
    mine = []
    for batch in rank_batches(questions, batch_size):
        start, items = batch if batch is not None else (-1, [])
        pairs = [prompt_and_answer_ids(tokenizer, q["question"], q["answer"]) for q in items]
        pairs += [([tokenizer.bos_id], [tokenizer.bos_id])] * (batch_size - len(pairs))  # fillers
        # within the model's window: the answer, and the end of its prompt (a token at least)
        pairs = [(p[-(window - len(a)):], a) for p, a in ((p, a[: window - 1]) for p, a in pairs)]
        width = common_length(max(len(p) + len(a) for p, a in pairs), device)  # one shape on every rank
        # right-padded: a causal model's logits for the real tokens do not see the padding
        tokens = torch.full((batch_size, width), tokenizer.bos_id, dtype=torch.long)
        for row, (p, a) in enumerate(pairs):
            tokens[row, : len(p) + len(a)] = torch.tensor(p + a)
        tokens = tokens.to(device)
        logp = torch.log_softmax(model(tokens).float(), dim=-1)  # (B, T, vocab)
        nats = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).cpu()  # (B, T-1): token t+1's
        for row, (p, a) in enumerate(pairs[: len(items)]):
            answer_nats = nats[row, len(p) - 1 : len(p) + len(a) - 1].sum().item()
            mine.append((start + row, answer_nats / math.log(2)))
    bits = dict(pair for part in gather(mine) for pair in part)
    return [bits[i] for i in range(len(questions))]


@torch.no_grad()
def answer(model, tokenizer, questions: list[dict], batch_size: int, max_answer_tokens: int) -> list[str]:
    """The greedy answer to every question (each rank answers its share; all get every answer)."""
    mine = []
    for batch in rank_batches(questions, batch_size):
        start, items = batch if batch is not None else (-1, [])
        prompts = [tokenizer.encode(q["question"], add_bos=True, add_eos=False) for q in items]
        prompts += [[tokenizer.bos_id]] * (batch_size - len(prompts))  # fillers: every rank one shape
        stop = lambda i, new: any(s in tokenizer.decode(new) for s in ANSWER_STOP)  # noqa: E731
        new = generate_ids(model, prompts, max_answer_tokens, tokenizer.eos_id, stop=stop, active=len(items))
        mine += [(start + i, cut_at_stop(tokenizer.decode(ids), ANSWER_STOP).strip())
                 for i, ids in enumerate(new[: len(items)])]
    answers = dict(pair for part in gather(mine) for pair in part)
    return [answers[i] for i in range(len(questions))]
