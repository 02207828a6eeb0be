"""Tokenizers, the facts corpus and the packed loader (lingua_mem.data)."""

import dataclasses
import gzip
import json
import math
import os
import re
import time

import pytest
import torch

from lingua_mem.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig, TrainConfig, validate
from lingua_mem.data import facts
from lingua_mem.data.loader import build_loader, document_ids
from lingua_mem.data.prefetch import STOP_S
from lingua_mem.data.sources import (
    HFDiskSource,
    HFStreamSource,
    JsonlSource,
    ParquetSource,
    TextSource,
    detect_format,
    open_source,
    resolve_files,
)
from lingua_mem.data.tokenizer import BytesTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer

BOS, EOS = 256, 257


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def stream_of(batches):
    """The token stream the batches were cut from: each row is inputs + last target."""
    rows = [torch.cat([b["inputs"], b["targets"][:, -1:]], dim=1).reshape(-1) for b in batches]
    return torch.cat(rows).tolist()


def docs_in(stream):
    """Complete BOS ... EOS documents in a byte-token stream, decoded."""
    out, cur = [], None
    for t in stream:
        if t == BOS:
            cur = []
        elif t == EOS:
            if cur is not None:
                out.append(bytes(cur).decode())
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


# ---------------------------------------------------------------- tokenizers

def test_bytes_tokenizer():
    tok = build_tokenizer(TokenizerConfig(name="bytes"))
    assert isinstance(tok, BytesTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert tok.encode("hé!") == [256, 104, 195, 169, 33, 257]
    assert tok.encode("a", add_bos=False, add_eos=False) == [97]
    assert tok.encode("") == [256, 257]
    text = "Ünïcode ☃ and ascii"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text
    assert tok.decode([104, 195]) == "h\ufffd"  # a cut multi-byte char is replaced, not raised


def train_spm(tmp_path, bos_id=1, eos_id=2):
    import sentencepiece as spm

    words = ["alpha", "beta", "gamma", "city", "born", "works", "studied", "university"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(300)]
    prefix = tmp_path / f"spm_{bos_id}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=bos_id, eos_id=eos_id, pad_id=-1, minloglevel=2)
    return f"{prefix}.model"


def test_sentencepiece_tokenizer(tmp_path):
    path = train_spm(tmp_path)
    tok = build_tokenizer(TokenizerConfig(name="sentencepiece", path=path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (300, 1, 2)
    text = "alpha city born ☃ zebra"  # ☃ and z are not in the training text: byte fallback
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 300 for i in ids)
    assert 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False, add_eos=False) == ids[1:-1]
    # The loader packs sentencepiece ids like bytes.
    write_jsonl(tmp_path / "a.jsonl", ["alpha beta", "gamma city"])
    cfg = DataConfig(sources={"a": SourceConfig(path=str(tmp_path / "a.jsonl"))}, batch_size=2, seq_len=8)
    stream = stream_of(take(build_loader(cfg, tok, str(tmp_path)), 3))
    assert stream[: len(tok.encode("alpha beta"))] == tok.encode("alpha beta")


def test_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "nope" / "x.model")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.path: no such file .*nope/x\.model$"):
        build_tokenizer(TokenizerConfig(name="sentencepiece", path=missing))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="data.tokenizer.path: cannot load .*junk.model"):
        build_tokenizer(TokenizerConfig(name="sentencepiece", path=str(junk)))
    with pytest.raises(ConfigError, match="data.tokenizer.path: required"):
        build_tokenizer(TokenizerConfig(name="sentencepiece"))
    with pytest.raises(ConfigError, match="data.tokenizer.name"):
        build_tokenizer(TokenizerConfig(name="gpt2"))
    no_bos = train_spm(tmp_path, bos_id=-1, eos_id=-1)
    with pytest.raises(ConfigError, match="no BOS/EOS"):
        build_tokenizer(TokenizerConfig(name="sentencepiece", path=no_bos))


# ---------------------------------------------------------------- facts corpus

def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_facts_deterministic(tmp_path):
    a = facts.generate_facts(tmp_path / "a", people=60, seed=5)
    facts.generate_facts(tmp_path / "b", people=60, seed=5)
    facts.generate_facts(tmp_path / "c", people=60, seed=6)
    assert (a["people"], a["documents"], a["questions"]) == (60, 180, 360)
    for name in ("train.jsonl", "qa.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    assert (tmp_path / "a" / "qa.jsonl").read_bytes() != (tmp_path / "c" / "qa.jsonl").read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))  # no temp file left behind
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["people"] == 60 and meta["seed"] == 5 and meta["documents"] == 180


def test_facts_heldout_and_answers(tmp_path):
    facts.generate_facts(tmp_path, people=120, seed=0)
    raw = (tmp_path / "train.jsonl").read_text() + (tmp_path / "qa.jsonl").read_text()
    assert raw.isascii()
    train = [d["text"] for d in read_jsonl(tmp_path / "train.jsonl")]
    qa = read_jsonl(tmp_path / "qa.jsonl")
    assert len(train) == 360 and len(qa) == 120 * len(facts.ATTRIBUTES)
    assert all(len(t) >= 4 for t in facts.TRAIN_TEMPLATES.values())
    assert len({q["person"] for q in qa}) == 120  # names are unique

    corpus = "\n".join(train)
    fragments = {frag.strip() for ts in facts.QA_TEMPLATES.values() for t in ts
                 for frag in t.split("{name}") if len(frag.strip()) >= 6}
    assert len(fragments) >= 2 * len(facts.ATTRIBUTES)
    for frag in fragments:
        assert frag not in corpus, frag
    used = {t for ts in facts.QA_TEMPLATES.values() for t in ts}
    for q in qa:  # each question is one of the held-out templates, filled with the person
        assert q["question"].replace(q["person"], "{name}") in used

    def mentions(text, name):  # "Ada Bel" must not match inside "Ada Belvin"
        return re.search(re.escape(name) + r"(?![A-Za-z])", text) is not None

    docs_of = {}
    for text in train:
        for name in {q["person"] for q in qa if q["person"].split()[0] in text}:
            if mentions(text, name):
                docs_of.setdefault(name, []).append(text)
    for q in qa:
        assert any(q["answer"] in d for d in docs_of[q["person"]]), q
    # the employer's city is a property of the company
    by_person = {}
    for q in qa:
        by_person.setdefault(q["person"], {})[q["attribute"]] = q["answer"]
    companies = dict(facts.COMPANIES)
    assert all(companies[p["employer"]] == p["employer_city"] for p in by_person.values())


def test_every_recall_prompt_is_answered_by_its_persons_training_text(tmp_path):
    """recall asks each fact in words its person's documents use, so prompt + " " + answer +
    "." is in train.jsonl; recall_unseen in a template never used for that person."""
    for t in (t for ts in facts.TRAIN_TEMPLATES.values() for t in ts):  # name first, ends at the value
        assert t.index("{name}") < t.index("{value}") and t.endswith("{value}."), t
    facts.generate_facts(tmp_path, people=200, seed=3)
    train = [d["text"] for d in read_jsonl(tmp_path / "train.jsonl")]
    recall, unseen = read_jsonl(tmp_path / "recall.jsonl"), read_jsonl(tmp_path / "recall_unseen.jsonl")
    assert len(recall) == 200 * len(facts.ATTRIBUTES) and len(unseen) >= 0.9 * len(recall)
    sentences = {s_.strip() for text in train for s_ in re.split(r"(?<=\.) (?=[A-Z])", text)}
    for q in recall:
        assert f"{q['question']} {q['answer']}." in sentences, q
    for q in unseen:
        template = q["question"].replace(q["person"], "{name}")
        assert any(t.startswith(template + " {value}") for t in facts.TRAIN_TEMPLATES[q["attribute"]]), q
        assert not any(s_.startswith(q["question"] + " ") for s_ in sentences), q  # never for this person
    bits = facts.fact_bits()
    assert bits["employer_city"] == 0 and bits["birth_city"] == pytest.approx(math.log2(57))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["bits"] == pytest.approx(200 * sum(bits.values()), abs=0.1)
    assert meta["version"] == facts.VERSION


def test_the_capacity_style_states_every_fact_in_one_wording_in_k_orders(tmp_path):
    facts.ensure_facts(tmp_path, 40, 2, "capacity", 5)
    train = [d["text"] for d in read_jsonl(tmp_path / "train.jsonl")]
    recall, unseen = read_jsonl(tmp_path / "recall.jsonl"), read_jsonl(tmp_path / "recall_unseen.jsonl")
    assert len(train) == 40 * 5 and len(recall) == len(unseen) == 40 * 6
    by_person: dict[str, list[str]] = {}
    for q in recall:
        by_person.setdefault(q["person"], []).append(f"{q['question']} {q['answer']}.")
    for person, statements in by_person.items():  # 5 documents, each every statement, in orders of their own
        docs = [t for t in train if t.startswith(person + " ") or f". {person} " in t]
        docs = [t for t in docs if all(st in t for st in statements)]
        assert len(docs) == 5 and all(len(t) == len(" ".join(statements)) for t in docs), person
        assert len(set(docs)) > 1
    for q in recall:  # the first template of each attribute, the only one training uses
        assert q["question"] == facts.recall_prompt(facts.TRAIN_TEMPLATES[q["attribute"]][0], q["person"])
    corpus = "\n".join(train)
    assert not any(q["question"] + " " in corpus for q in unseen)
    facts.ensure_facts(tmp_path, 40, 2)  # the mixed style asked of the same folder: made again
    assert json.loads((tmp_path / "meta.json").read_text())["style"] == "mixed"
    with pytest.raises(ConfigError, match="data.facts.style"):
        validate(TrainConfig(data=DataConfig(facts=facts_config(style="dense"))))


def test_mixed_training_answers_questions_for_some_people_and_asks_the_others(tmp_path):
    """qa_fraction (Physics of LMs 3.1): a fraction of the people also has its facts as answered
    questions in training text; QA asks only the others; 0 leaves the files as they were."""
    plain, none, mixed = tmp_path / "plain", tmp_path / "none", tmp_path / "mixed"
    facts.generate_facts(plain, 40, 3)
    facts.generate_facts(none, 40, 3, qa_fraction=0.0)
    for name in ("train.jsonl", "val.jsonl", "qa.jsonl", "recall.jsonl", "recall_unseen.jsonl"):
        assert (plain / name).read_bytes() == (none / name).read_bytes(), name
    meta = facts.generate_facts(mixed, 40, 3, qa_fraction=0.25)
    assert meta["qa_people"] == 10 and meta["documents"] == json.loads((plain / "meta.json").read_text())[
        "documents"] + 10 * 12  # two QA wordings x six attributes a person
    train = {d["text"] for d in read_jsonl(mixed / "train.jsonl")}
    assert {d["text"] for d in read_jsonl(plain / "train.jsonl")} <= train  # the biographies kept
    qa = read_jsonl(mixed / "qa.jsonl")
    asked = {q["person"] for q in qa}
    assert len(asked) == 30 and len(qa) == 30 * 6
    qa_docs = train - {d["text"] for d in read_jsonl(plain / "train.jsonl")}
    answered = {q["person"] for q in read_jsonl(plain / "qa.jsonl")} - asked
    assert len(answered) == 10
    for q in qa:  # never a person QA asks; the question's wording is learnt on the others
        assert not any(d.startswith(q["question"] + " ") for d in qa_docs), q
        wording = q["question"].replace(q["person"], "{name}")
        assert any(wording.format(name=other) + " " in d for other in answered for d in qa_docs), q
    for person in answered:  # every fact of theirs, in both wordings, ending at the answer
        mine = [d for d in qa_docs if person in d]
        assert len(mine) == 12 and all(d.endswith(".") for d in mine)
    with pytest.raises(ConfigError, match="data.facts.qa_fraction"):
        validate(TrainConfig(data=DataConfig(facts=facts_config(qa_fraction=1.0))))


def facts_config(**kw):
    from lingua_mem.config.schema import FactsConfig

    return FactsConfig(**kw)


def test_facts_size_ensure_and_cli(tmp_path, capsys):
    out = tmp_path / "f"
    assert facts.ensure_facts(out, 1000, 0) == out
    size = (out / "train.jsonl").stat().st_size
    assert 500_000 < size < 2_000_000
    (out / "train.jsonl").write_text("kept\n")  # same people/seed: not regenerated
    facts.ensure_facts(out, 1000, 0)
    assert (out / "train.jsonl").read_text() == "kept\n"
    facts.ensure_facts(out, 1000, 1)  # another seed: regenerated
    assert (out / "train.jsonl").stat().st_size > 500_000
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    facts.main(["--people", "10", "--seed", "3", "--out", str(tmp_path / "cli")])
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["people"] == 10 and summary["documents"] == 30 and summary["questions"] == 60
    assert (tmp_path / "cli" / "qa.jsonl").is_file()


# ---------------------------------------------------------------- loader

def test_loader_batches_and_packing(tmp_path):
    texts = ["short", "a somewhat longer document that spans more than one window of tokens", "", "mid doc"]
    write_jsonl(tmp_path / "one.jsonl", texts)
    cfg = DataConfig(sources={"one": SourceConfig(path=str(tmp_path / "one.jsonl"))},
                     batch_size=3, seq_len=10, prefetch="none")
    loader = build_loader(cfg, BytesTokenizer(), str(tmp_path))
    batches = take(loader, 12)
    for b in batches:
        assert set(b) == {"inputs", "targets", "doc_ids"}
        assert b["inputs"].shape == b["targets"].shape == b["doc_ids"].shape == (3, 10)
        assert b["inputs"].dtype == b["targets"].dtype == b["doc_ids"].dtype == torch.int64
        assert torch.equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    stream = stream_of(batches)
    expected = []
    while len(expected) < len(stream):  # documents in file order, cycling, each BOS + bytes + EOS
        for t in texts:
            expected += [BOS, *t.encode(), EOS]
    assert stream == expected[: len(stream)]
    assert stream[0] == BOS and docs_in(stream)[:4] == texts
    assert loader.sources[0].epoch >= 2 and loader.skipped == {"one": 0}


def make_two_sources(tmp_path):
    (tmp_path / "web").mkdir()
    write_jsonl(tmp_path / "web" / "00.jsonl", [f"web doc {i} " + "w" * (i % 13) for i in range(15)])
    with gzip.open(tmp_path / "web" / "01.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": f"gz doc {i} " + "g" * (i % 5)}) + "\n" for i in range(9)))
    write_jsonl(tmp_path / "books.jsonl", [f"book {i} " + "b" * (7 * i % 40) for i in range(11)], "body")
    return DataConfig(
        sources={"web": SourceConfig(path=str(tmp_path / "web"), weight=3.0),
                 "books": SourceConfig(path=str(tmp_path / "book*.jsonl"), weight=1.0, text_field="body")},
        batch_size=2, seq_len=16, seed=7)


def test_loader_resume_bit_exact(tmp_path):
    cfg = make_two_sources(tmp_path)
    tok = BytesTokenizer()
    loader = build_loader(cfg, tok, str(tmp_path))
    take(loader, 25)  # past the end of both sources: epochs and gzip offsets are in the state
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["buffer"], "a document should straddle the cut"
    assert state["sources"]["web"]["epoch"] >= 1
    after = take(loader, 30)

    fresh = build_loader(cfg, tok, str(tmp_path))
    fresh.load_state_dict(state)
    for a, b in zip(after, take(fresh, 30), strict=True):
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
        assert torch.equal(a["doc_ids"], b["doc_ids"])
    assert fresh.state_dict() == loader.state_dict()
    # a different seed mixes differently
    other = build_loader(dataclasses.replace(cfg, seed=8), tok, str(tmp_path))
    assert stream_of(take(other, 10)) != stream_of(take(build_loader(cfg, tok, str(tmp_path)), 10))
    # a state from another rank is refused
    with pytest.raises(ValueError, match="rank"):
        build_loader(cfg, tok, str(tmp_path), rank=1, world_size=2).load_state_dict(state)


def test_loader_mixing_weights(tmp_path):
    cfg = make_two_sources(tmp_path)
    docs = docs_in(stream_of(take(build_loader(cfg, BytesTokenizer(), str(tmp_path)), 800)))
    books = sum(d.startswith("book") for d in docs)
    assert len(docs) > 1400
    assert 0.2 < books / len(docs) < 0.3  # weight 1 against 3
    assert any(d.startswith("gz doc") for d in docs)


def first_epoch(src) -> list[str]:
    """The documents `src` returns in its first epoch."""
    got = []
    while True:
        text = src.next_text()
        if src.epoch > 0:
            return got
        got.append(text)


def test_sharding_disjoint_and_complete(tmp_path):
    all_docs = []
    for i in range(7):  # files of 0..6 docs with blank lines: counts are not multiples of 3
        docs = [f"file {i} doc {j}" for j in range(i)]
        all_docs += docs
        (tmp_path / f"{i:02d}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    files = resolve_files("s", SourceConfig(path=str(tmp_path)))
    assert len(files) == 7
    shares = [first_epoch(JsonlSource("s", files, rank=rank, world_size=3)) for rank in range(3)]
    assert all(len(s) == 7 for s in shares)  # 21 documents over 3 ranks
    assert sorted(sum(shares, [])) == sorted(all_docs)
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])
    assert not set(shares[0]) & set(shares[2])
    # the same through build_loader: rank 1's stream holds only rank 1's documents
    cfg = DataConfig(sources={"s": SourceConfig(path=str(tmp_path))}, batch_size=2, seq_len=32)
    seen = set(docs_in(stream_of(take(build_loader(cfg, BytesTokenizer(), str(tmp_path), 1, 3), 10))))
    assert seen == set(shares[1])


def test_bad_lines_skipped_and_counted(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.jsonl").write_bytes(
        b'{"content": "good one"}\n'
        b'{"content": "unterminated\n'  # invalid JSON
        b'{"other": "missing field"}\n'
        b'{"content": 42}\n'  # not a string
        b'{"content": null}\n'
        b'["a", "list"]\n'
        b'{"content": "bad \xff\xfe utf8"}\n'  # invalid UTF-8
        b'\n'
        b'{"content": "good two"}'  # no final newline
    )
    (d / "b.jsonl").write_bytes(b"")  # an empty file
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"content": "good three"}\nnot json\n'))
    cfg = DataConfig(sources={"src": SourceConfig(path=str(d), text_field="content")},
                     batch_size=2, seq_len=20, prefetch="none")
    src = JsonlSource("src", resolve_files("src", cfg.sources["src"]), text_field="content")
    assert [src.next_text() for _ in range(3)] == ["good one", "good two", "good three"]
    assert src.skipped == 6
    assert src.next_text() == "good one" and (src.epoch, src.skipped) == (1, 7)
    loader = build_loader(cfg, BytesTokenizer(), str(tmp_path))
    docs = docs_in(stream_of(take(loader, 4)))
    assert docs[:4] == ["good one", "good two", "good three", "good one"]
    assert set(docs) == {"good one", "good two", "good three"}
    epochs = loader.sources[0].epoch
    assert epochs >= 1 and 7 * epochs <= loader.skipped["src"] <= 7 * epochs + 6
    # a source with no usable document at all is an error, not an endless loop
    (tmp_path / "bad.jsonl").write_text("nope\n{}\n")
    cfg = DataConfig(sources={"bad": SourceConfig(path=str(tmp_path / "bad.jsonl"))})
    with pytest.raises(ConfigError, match="data.sources.bad.path: no usable document"):
        next(build_loader(cfg, BytesTokenizer(), str(tmp_path)))


def test_missing_source_path(tmp_path):
    tok = BytesTokenizer()
    for path in (str(tmp_path / "nowhere"), str(tmp_path / "*.jsonl")):
        cfg = DataConfig(sources={"web": SourceConfig(path=path)})
        with pytest.raises(ConfigError, match=r"^data\.sources\.web\.path: .*" + re.escape(path)):
            build_loader(cfg, tok, str(tmp_path))
    (tmp_path / "empty_dir").mkdir()
    cfg = DataConfig(sources={"web": SourceConfig(path=str(tmp_path / "empty_dir"))})
    with pytest.raises(ConfigError, match="data.sources.web.path: no .*jsonl"):
        build_loader(cfg, tok, str(tmp_path))


def test_default_facts_source(tmp_path):
    cfg = DataConfig(batch_size=4, seq_len=64)
    cfg.facts.people = 30
    loader = build_loader(cfg, BytesTokenizer(), str(tmp_path / "dump"))
    facts_dir = tmp_path / "dump" / "data" / "facts"
    assert json.loads((facts_dir / "meta.json").read_text())["people"] == 30
    first = json.loads((facts_dir / "train.jsonl").read_text().splitlines()[0])["text"]
    docs = docs_in(stream_of(take(loader, 3)))
    assert docs[0] == first and list(loader.skipped) == ["facts"]


# ---------------------------------------------------------------- parquet and Hugging Face sources

def write_parquet(path, texts, field="text", row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: texts}), path, row_group_size=row_group_size)
    return path


def read_all(src, n):
    return [src.next_text() for _ in range(n)]


def test_a_corrupt_parquet_file_is_skipped_with_its_reason(tmp_path, capsys):
    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "a.parquet", ["one", "two"])
    (d / "b.parquet").write_bytes(b"PAR1 truncated garbage")
    src = open_source("pq", SourceConfig(path=str(d)))
    assert read_all(src, 3) == ["one", "two", "one"] and src.skipped == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: data.sources.pq: skipped the rest of {d / 'b.parquet'}: Parquet magic bytes "
                   "not found in footer. Either the file is corrupted or this is not a parquet file."]


def test_parquet_source(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "a.parquet", [f"p{i}" for i in range(4)] + [None] + [f"p{i}" for i in range(5, 10)])
    write_parquet(d / "b.parquet", [1, 2])  # not strings: skipped
    write_parquet(d / "c.parquet", ["x", "y"], field="body")  # no text column: skipped, one warning
    (d / "d.parquet").write_bytes(b"PAR1 truncated garbage")  # unreadable: one bad record
    write_parquet(d / "e.parquet", ["last"])
    write_parquet(d / "f.parquet", [])  # an empty file
    cfg = SourceConfig(path=str(d))
    assert detect_format(cfg) == "parquet"
    src = open_source("pq", cfg)
    assert isinstance(src, ParquetSource) and len(src.files) == 6
    expected = [f"p{i}" for i in range(10) if i != 4] + ["last"]
    assert read_all(src, 10) == expected
    assert src.skipped == 1 + 2 + 1 + 1
    assert src.next_text() == "p0" and src.epoch == 1
    # resume from every position: the same next documents (row groups of 3 rows are skipped over)
    ref = open_source("pq", cfg)
    for k in range(12):
        state = json.loads(json.dumps(ref.state_dict()))
        fresh = open_source("pq", cfg)
        fresh.load_state_dict(state)
        assert read_all(fresh, 5) == (expected * 3)[k : k + 5], k
        ref.next_text()
    # through the loader: the documents in order, packed
    loader = build_loader(DataConfig(sources={"pq": cfg}, batch_size=2, seq_len=16, prefetch="none"),
                          BytesTokenizer(), str(tmp_path))
    assert docs_in(stream_of(take(loader, 4)))[:9] == expected[:9]
    epochs = loader.sources[0].epoch
    assert epochs >= 1 and loader.skipped["pq"] in (5 * epochs, 5 * epochs + 5)


def test_a_parquet_source_without_its_text_column_names_the_columns(tmp_path, capsys):
    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "a.parquet", ["x", "y"], field="body")
    write_parquet(d / "b.parquet", ["z"], field="content")
    with pytest.raises(ConfigError) as exc:
        open_source("web", SourceConfig(path=str(d)))
    assert str(exc.value) == (f"data.sources.web.text_field: 'text' is not a column of {d / 'a.parquet'} "
                              "(its columns: body), nor of the other 1 file(s)")
    src = open_source("web", SourceConfig(path=str(d), text_field="content"))  # the right column
    assert src.next_text() == "z"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: data.sources.web: skipped the rest of {d / 'a.parquet'}: no column 'content' "
                   "(its columns: body)"]


def test_text_source(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_bytes(b"one\r\n\n  \ntwo  \nbad \xff utf8\n  three")  # a document per non-blank line
    (d / "b.txt.gz").write_bytes(gzip.compress(b"four\n\nfive\n"))
    (d / "notes.md").write_text("not a source file")
    cfg = SourceConfig(path=str(d))
    assert detect_format(cfg) == "text"
    src = open_source("t", cfg)
    expected = ["one", "two  ", "  three", "four", "five"]
    assert isinstance(src, TextSource) and read_all(src, 5) == expected and src.skipped == 1
    ref = open_source("t", cfg)
    for k in range(7):  # resume from every position, across files and epochs
        fresh = open_source("t", cfg)
        fresh.load_state_dict(json.loads(json.dumps(ref.state_dict())))
        assert read_all(fresh, 4) == (expected * 3)[k : k + 4], k
        ref.next_text()
    shares = [first_epoch(open_source("t", cfg, rank, 2)) for rank in range(2)]
    assert shares == [["one", "four"], ["two  ", "  three", "five"]]  # records 0, 2 (bad), 4 are rank 0's
    # an explicit format: text for one file, through the validated config and the loader
    cfg = TrainConfig(data=DataConfig(sources={"t": SourceConfig(path=str(d / "a.txt"), format="text")},
                                      batch_size=1, seq_len=8, prefetch="none"))
    validate(cfg)
    loader = build_loader(cfg.data, BytesTokenizer(), str(tmp_path))
    assert docs_in(stream_of(take(loader, 4)))[:3] == expected[:3]


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a data source tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hf_sources(tmp_path, no_network):
    import datasets

    texts = [f"hf doc {i}" for i in range(9)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(9))}).save_to_disk(str(tmp_path / "ds"))
    cfg = SourceConfig(path=str(tmp_path / "ds"))
    assert detect_format(cfg) == "hf"
    src = open_source("hf", cfg)
    assert isinstance(src, HFDiskSource) and read_all(src, 10) == texts + texts[:1] and src.epoch == 1
    # a DatasetDict: the configured split
    valid = [f"valid {i}" for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts}),
                          "validation": datasets.Dataset.from_dict({"body": valid})}
                         ).save_to_disk(str(tmp_path / "dd"))
    cfg = SourceConfig(path=str(tmp_path / "dd"), split="validation", text_field="body")
    assert detect_format(cfg) == "hf" and read_all(open_source("dd", cfg), 5) == valid
    with pytest.raises(ConfigError, match=r"^data\.sources\.dd\.split: 'test' is not a split .*validation"):
        open_source("dd", dataclasses.replace(cfg, split="test"))
    with pytest.raises(ConfigError, match=r"^data\.sources\.dd\.text_field: 'text' is not a column"):
        open_source("dd", dataclasses.replace(cfg, text_field="text"))
    # local data files through load_dataset(streaming=True): csv, and a dataset folder with split files
    (tmp_path / "t.csv").write_text("text,n\n" + "".join(f"csv {i},{i}\n" for i in range(6)))
    cfg = SourceConfig(path=str(tmp_path / "t.csv"), format="hf")
    src = open_source("csv", cfg, rank=1, world_size=2)
    assert isinstance(src, HFStreamSource) and read_all(src, 4) == ["csv 1", "csv 3", "csv 5", "csv 1"]
    state = src.state_dict()
    fresh = open_source("csv", cfg, rank=1, world_size=2)
    fresh.load_state_dict(state)  # skips ahead in the stream
    assert read_all(fresh, 3) == read_all(src, 3) == ["csv 3", "csv 5", "csv 1"]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", ["tr 0", "tr 1"])
    write_parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet", ["te 0", None, "te 2"])
    cfg = SourceConfig(path=str(tmp_path / "repo"), format="hf", split="test")
    src = open_source("repo", cfg)
    assert read_all(src, 3) == ["te 0", "te 2", "te 0"] and src.skipped == 1


def test_source_formats_and_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["j"])
    write_parquet(tmp_path / "b.parquet", ["p"])
    (tmp_path / "onlypq").mkdir()
    write_parquet(tmp_path / "onlypq" / "x.parquet", ["p"])
    (tmp_path / "empty").mkdir()
    auto = lambda path: detect_format(SourceConfig(path=str(path)))
    assert auto(tmp_path / "a.jsonl") == "jsonl" and auto(tmp_path / "b.parquet") == "parquet"
    assert auto(tmp_path / "*.parquet") == "parquet" and auto(tmp_path / "onlypq") == "parquet"
    assert auto(tmp_path) == "jsonl"  # jsonl files win in a mixed directory
    cases = [  # (path, format, message): each a one-line ConfigError naming the source's path key
        (tmp_path / "nowhere", "parquet", "no such file"),
        (tmp_path / "nowhere", "hf", "no such file"),
        (tmp_path / "no*.parquet", "auto", "no glob match"),
        (tmp_path / "empty", "parquet", r"no \*\.parquet files in directory"),
        (tmp_path / "onlypq", "jsonl", r"no \*\.jsonl or \*\.jsonl\.gz files"),
        (tmp_path / "a.jsonl", "parquet", "is not a parquet file"),
        (tmp_path / "b.parquet", "jsonl", "is a parquet file, not jsonl"),
        (tmp_path / "empty", "hf", "cannot load a dataset"),
        (tmp_path / "a.jsonl", "hf", None),  # fine: streamed by the json builder
    ]
    tok = BytesTokenizer()
    for path, fmt, message in cases:
        cfg = DataConfig(sources={"s": SourceConfig(path=str(path), format=fmt)}, prefetch="none")
        if message is None:
            assert docs_in(stream_of(take(build_loader(cfg, tok, str(tmp_path)), 1)))[0] == "j"
            continue
        with pytest.raises(ConfigError, match=r"^data\.sources\.s\.path: .*" + message) as info:
            build_loader(cfg, tok, str(tmp_path))
        assert "\n" not in str(info.value)


def make_mixed(tmp_path, prefetch="none"):
    """jsonl (with .gz) + parquet + a HF DatasetDict split, weighted: a DataConfig."""
    import datasets

    cfg = make_two_sources(tmp_path)
    (tmp_path / "pq").mkdir()
    for f in range(3):
        texts = [f"parquet {f}.{i} " + "q" * (i % 9) for i in range(7)]
        write_parquet(tmp_path / "pq" / f"{f}.parquet", texts)
    docs = [f"hf row {i} " + "h" * (5 * i % 23) for i in range(13)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["unused"]}),
                          "validation": datasets.Dataset.from_dict({"text": docs})}
                         ).save_to_disk(str(tmp_path / "hf"))
    sources = {**cfg.sources,
               "pq": SourceConfig(path=str(tmp_path / "pq" / "*.parquet"), weight=2.0),
               "hf": SourceConfig(path=str(tmp_path / "hf"), weight=1.5, split="validation")}
    return dataclasses.replace(cfg, sources=sources, batch_size=2, seq_len=24, seed=3,
                               prefetch=prefetch, prefetch_depth=3)


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert set(x) == set(y) == {"inputs", "targets", "doc_ids"}
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("prefetch", ["none", "thread", "process"])
def test_mixed_sources_resume_with_prefetch(tmp_path, prefetch):
    cfg = make_mixed(tmp_path, prefetch)
    none = dataclasses.replace(cfg, prefetch="none")
    tok = BytesTokenizer()
    ref = build_loader(none, tok, str(tmp_path))
    want = take(ref, 70)  # past the end of every source
    names = {d.split(" ")[0] for d in docs_in(stream_of(want))}
    assert names == {"web", "gz", "book", "parquet", "hf"}

    loader = build_loader(cfg, tok, str(tmp_path))
    assert loader.state_dict() == build_loader(none, tok, str(tmp_path)).state_dict()  # before any batch
    first = take(loader, 40)
    state = json.loads(json.dumps(loader.state_dict()))  # prefetched batches are not in it
    assert loader.skipped == {"books": 0, "hf": 0, "pq": 0, "web": 0}
    rest = take(loader, 30)
    loader.close()
    assert_same_batches(first + rest, want)  # prefetch does not change the stream
    assert all(state["sources"][n]["epoch"] >= 1 for n in ("web", "pq", "hf")) and state["buffer"]

    for mode in {"none", prefetch}:  # a state saved under any prefetch resumes under any other
        fresh = build_loader(dataclasses.replace(cfg, prefetch=mode), tok, str(tmp_path))
        fresh.load_state_dict(state)
        assert_same_batches(take(fresh, 30), want[40:])
        fresh.close()


def test_sharding_parquet_and_hf_disjoint_and_complete(tmp_path):
    import datasets

    all_docs = []
    (tmp_path / "pq").mkdir()
    for i in range(6):  # files of 0..5 rows, row groups of 2
        docs = [f"file {i} row {j}" for j in range(i)]
        all_docs += docs
        write_parquet(tmp_path / "pq" / f"{i:02d}.parquet", docs, row_group_size=2)
    datasets.Dataset.from_dict({"text": all_docs}).save_to_disk(str(tmp_path / "hf"))
    for path in ("pq", "hf"):
        cfg = SourceConfig(path=str(tmp_path / path))
        for world in (2, 3):
            shares = [first_epoch(open_source("s", cfg, rank, world)) for rank in range(world)]
            assert sorted(sum(shares, [])) == sorted(all_docs), (path, world)  # complete, none twice
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_document_ids():
    inputs = torch.tensor([[BOS, 1, 2, EOS, BOS, 3, EOS, BOS],
                           [4, 5, EOS, BOS, 6, EOS, BOS, BOS]])
    assert document_ids(inputs, BOS).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2],
                                                   [0, 0, 0, 1, 1, 1, 2, 3]]


def test_document_ids_in_batches(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["ab", "", "a longer document here", "xyz"])
    cfg = DataConfig(sources={"d": SourceConfig(path=str(tmp_path / "d.jsonl"))}, batch_size=2, seq_len=9,
                     prefetch="none")
    for b in take(build_loader(cfg, BytesTokenizer(), str(tmp_path)), 10):
        ids, starts = b["doc_ids"], b["inputs"] == BOS
        assert (ids[:, 0] == 0).all()
        assert torch.equal(ids[:, 1:] - ids[:, :-1], starts[:, 1:].long())  # +1 exactly at each BOS


@pytest.mark.parametrize("prefetch", ["thread", "process"])
def test_prefetch_error_surfaces(tmp_path, prefetch):
    (tmp_path / "bad.jsonl").write_text("nope\n{}\n")
    cfg = DataConfig(sources={"bad": SourceConfig(path=str(tmp_path / "bad.jsonl"))}, prefetch="none")
    with pytest.raises(ConfigError) as plain:
        next(build_loader(cfg, BytesTokenizer(), str(tmp_path)))
    loader = build_loader(dataclasses.replace(cfg, prefetch=prefetch), BytesTokenizer(), str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ConfigError) as prefetched:
        next(loader)
    assert str(prefetched.value) == str(plain.value)
    assert str(plain.value).startswith("data.sources.bad.path: no usable document")
    assert time.monotonic() - start < 30
    loader.close()


def test_prefetch_close_and_restart(tmp_path):
    cfg = make_two_sources(tmp_path)
    tok = BytesTokenizer()
    want = take(build_loader(dataclasses.replace(cfg, prefetch="none"), tok, str(tmp_path)), 12)
    # thread: close, then iterating again restarts from the last batch consumed
    loader = build_loader(dataclasses.replace(cfg, prefetch="thread", prefetch_depth=4), tok, str(tmp_path))
    got = take(loader, 3)
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 2
    got += take(loader, 3)
    loader.load_state_dict(loader.state_dict())  # while running: stops and restarts the producer
    got += take(loader, 3)
    assert_same_batches(got, want[:9])
    loader.close()
    # process: close() ends the process promptly; a producer that dies is an error, not a hang
    loader = build_loader(dataclasses.replace(cfg, prefetch="process", prefetch_depth=2), tok, str(tmp_path))
    assert_same_batches(take(loader, 2), want[:2])
    process = loader._producer.process
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < STOP_S and process.exitcode is not None
    assert_same_batches(take(loader, 2), want[2:4])  # a new process, from the last batch consumed
    loader._producer.process.kill()
    with pytest.raises(RuntimeError, match="ended without a batch or an error"):
        take(loader, 10)
    loader.close()


def test_process_prefetch_checks_the_tokenizer(tmp_path):
    class Wider(BytesTokenizer):  # not what cfg.tokenizer builds in the prefetch process
        n_words = 300

    cfg = make_two_sources(tmp_path)
    loader = build_loader(dataclasses.replace(cfg, prefetch="process"), Wider(), str(tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: the prefetch process built .*258.*300"):
        next(loader)
    loader.close()


@pytest.mark.parametrize("prefetch", ["none", "thread"])
def test_a_pathological_document_is_capped_and_the_state_stays_small(tmp_path, prefetch):
    d = tmp_path / "src"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ["before", "x" * 5_000_000, "after"] + [f"doc {i}" for i in range(500)])
    cfg = DataConfig(sources={"web": SourceConfig(path=str(d))}, batch_size=2, seq_len=64, prefetch=prefetch,
                     max_doc_tokens=1000)
    loader = build_loader(cfg, BytesTokenizer(), str(tmp_path))
    batches = take(loader, 20)  # 2,600 stream tokens: past the capped document
    state = loader.state_dict()
    assert len(json.dumps(state)) < 50_000  # not the 5 MB document's tokens
    assert loader.truncated == 1
    tok = BytesTokenizer()
    expected = (tok.encode("before", add_bos=True, add_eos=True) + tok.encode("x" * 2000, add_bos=True)[:1000]
                + tok.encode("after", add_bos=True, add_eos=True))  # BOS and 999 x's, no EOS
    assert stream_of(batches)[:len(expected)] == expected
    fresh = build_loader(cfg, BytesTokenizer(), str(tmp_path))
    fresh.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(take(fresh, 3), take(loader, 3), strict=True):  # resumes exactly
        assert torch.equal(a["inputs"], b["inputs"])
    assert fresh.truncated == 1
    loader.close()
    fresh.close()
    with pytest.raises(ConfigError, match="data.max_doc_tokens"):
        validate(TrainConfig(data=DataConfig(max_doc_tokens=-1)))


def test_files_added_between_runs_join_at_the_next_epoch_and_removed_ones_stop(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ["a0", "a1"])
    write_jsonl(d / "b.jsonl", ["b0", "b1"])
    cfg = SourceConfig(path=str(d))
    src = open_source("web", cfg)
    assert read_all(src, 3) == ["a0", "a1", "b0"]
    state = json.loads(json.dumps(src.state_dict()))

    write_jsonl(d / "c.jsonl", ["c0"])  # added while the run was stopped
    resumed = open_source("web", cfg)
    resumed.load_state_dict(state)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: data.sources.web: 1 file(s) added since the checkpoint (c.jsonl) join at the "
                   "next epoch"]
    # this epoch exactly as the first run would have gone on; the new file from the next one
    assert read_all(resumed, 6) == ["b1", "a0", "a1", "b0", "b1", "c0"]
    assert [os.path.basename(f) for f in resumed.state_dict()["files"]] == ["a.jsonl", "b.jsonl", "c.jsonl"]

    (d / "b.jsonl").unlink()  # a file the saved epoch was reading is gone
    fresh = open_source("web", cfg)
    with pytest.raises(ConfigError, match=r"^data\.sources\.web\.path: b\.jsonl was read by the run being "
                                          r"resumed and is not in .* any more"):
        fresh.load_state_dict(state)


def test_a_file_cut_below_the_saved_offset_stops_the_resume_in_one_line(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ["a0", "a1", "a2", "a3"])
    cfg = SourceConfig(path=str(d))
    src = open_source("web", cfg)
    assert read_all(src, 3) == ["a0", "a1", "a2"]
    state = json.loads(json.dumps(src.state_dict()))
    src.close()
    write_jsonl(d / "a.jsonl", ["a0"])  # rewritten shorter while the run was stopped
    size = (d / "a.jsonl").stat().st_size
    with pytest.raises(ConfigError, match=re.escape(
            f"data.sources.web.path: {d / 'a.jsonl'} is {size:,} bytes, below the offset {state['offset']:,} "
            "the run being resumed had read it to (changed since the checkpoint?)")):
        open_source("web", cfg).load_state_dict(state)
    write_jsonl(d / "a.jsonl", ["a0", "a1", "a2", "a3", "a4"])  # grown: still resumes where it was
    resumed = open_source("web", cfg)
    resumed.load_state_dict(state)
    assert read_all(resumed, 2) == ["a3", "a4"]
