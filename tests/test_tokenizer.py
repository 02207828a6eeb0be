"""The tiktoken tokenizer and the SentencePiece training CLI (lingua_mem.data.tokenizer)."""

import base64
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lingua_mem.config import ConfigError, TokenizerConfig
from lingua_mem.data import facts
from lingua_mem.data.tokenizer import (
    LLAMA3_SPLIT_PATTERN,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    llama3_special_tokens,
)
from lingua_mem.data.tokenizer import main as tokenizer_main

REPO = Path(__file__).resolve().parents[1]
MERGES = [b"th", b"he", b"the", b" the", b"in", b"ng", b"ing", b"12", b"123", b"1234", b"e ", b"  "]


def write_ranks(path, merges=MERGES, single_bytes=range(256)):
    """A tiktoken ranks file: the single bytes, then the merges, ranked in that order."""
    tokens = [bytes([b]) for b in single_bytes] + list(merges)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return str(path)


def tiktoken_cfg(path):
    return TokenizerConfig(name="tiktoken", path=str(path))


# ---------------------------------------------------------------- tiktoken

def test_tiktoken_layout_and_round_trip(tmp_path):
    tok = build_tokenizer(tiktoken_cfg(write_ranks(tmp_path / "ranks.model")))
    n_ranks = 256 + len(MERGES)
    assert isinstance(tok, TiktokenTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (n_ranks + 256, n_ranks, n_ranks + 1)
    specials = llama3_special_tokens()
    assert len(specials) == len(set(specials)) == 256
    assert specials[:2] == ["<|begin_of_text|>", "<|end_of_text|>"] and specials[9] == "<|eot_id|>"
    assert specials[-1] == "<|reserved_special_token_250|>"

    rank = {t: 256 + i for i, t in enumerate(MERGES)}
    # pieces "the" and " thing"; " thing" merges th, in, then ing (" th" is no token)
    assert tok.encode("the thing", add_bos=False, add_eos=False) == [
        rank[b"the"], ord(" "), rank[b"th"], rank[b"ing"]]
    ids = tok.encode("the")
    assert ids == [tok.bos_id, rank[b"the"], tok.eos_id]
    for text in ["", "Ünïcode ☃ and ascii\n\n  two  spaces\ttab", "1234567", "emoji 🦙 ok"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < n_ranks for i in ids[1:-1])
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False, add_eos=False) == ids[1:-1]


def test_tiktoken_split_pattern(tmp_path):
    """Merges never cross the Llama 3 pre-token boundaries."""
    assert LLAMA3_SPLIT_PATTERN.startswith(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    tok = TiktokenTokenizer(write_ranks(tmp_path / "ranks.model"))
    rank = {t: 256 + i for i, t in enumerate(MERGES)}
    # numbers split into runs of at most three digits: "1234" is never one token
    assert tok.encode("1234", add_bos=False, add_eos=False) == [rank[b"123"], ord("4")]
    # "e " never merges: the space starts the next word's piece
    assert rank[b"e "] not in tok.encode("the thing the", add_bos=False, add_eos=False)
    assert rank[b" the"] in tok.encode("a the", add_bos=False, add_eos=False)
    # a run of spaces before a word leaves one space for the word
    assert tok.encode("a   b", add_bos=False, add_eos=False) == [ord("a"), rank[b"  "], ord(" "), ord("b")]


def test_tiktoken_special_text_is_plain(tmp_path):
    tok = build_tokenizer(tiktoken_cfg(write_ranks(tmp_path / "ranks.model")))
    text = "before <|begin_of_text|> <|end_of_text|><|eot_id|> after"
    ids = tok.encode(text)
    assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
    assert all(i < tok.bos_id for i in ids[1:-1])  # no special id at all
    assert tok.decode(ids) == text
    assert tok.decode([ord("a"), tok.bos_id, tok.eos_id, ord("b"), 10**9, -1]) == "ab"
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # a cut multi-byte char is replaced, not raised


def test_tiktoken_errors(tmp_path):
    missing = tmp_path / "nope" / "ranks.model"
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.path: no such file .*nope/ranks\.model$"):
        build_tokenizer(tiktoken_cfg(missing))
    with pytest.raises(ConfigError, match="data.tokenizer.path: required for tiktoken"):
        build_tokenizer(TokenizerConfig(name="tiktoken"))
    with pytest.raises(ConfigError, match="^data.tokenizer.name: 'gpt2' is not one of bytes, sentencepiece"):
        build_tokenizer(TokenizerConfig(name="gpt2"))

    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a ranks file\n")
    (tmp_path / "b64.model").write_bytes(b"!!!! 0\n")
    (tmp_path / "rank.model").write_bytes(base64.b64encode(b"a") + b" zero\n")
    (tmp_path / "empty.model").write_bytes(b"")
    write_ranks(tmp_path / "gap.model")
    with open(tmp_path / "gap.model", "ab") as fh:  # ranks 0..267, then 300
        fh.write(base64.b64encode(b"zz") + b" 300\n")
    write_ranks(tmp_path / "bytes.model", merges=[], single_bytes=range(255))
    write_ranks(tmp_path / "repeat.model", merges=[b"a"])
    why = {"junk": "line 1: expected '<base64 token> <rank>'", "b64": "line 1: bad base64 token or rank",
           "rank": "line 1: bad base64 token or rank", "empty": "no '<base64 token> <rank>' line",
           "gap": "the ranks of its 269 tokens are not 0..268",
           "bytes": "1 of the 256 single-byte tokens are missing", "repeat": "line 257: token repeated"}
    for name, reason in why.items():
        path = tmp_path / f"{name}.model"
        with pytest.raises(ConfigError) as err:
            build_tokenizer(tiktoken_cfg(path))
        msg, prefix = str(err.value), f"data.tokenizer.path: cannot load tiktoken BPE ranks file {path}: "
        assert msg.startswith(prefix + reason), msg
        assert "\n" not in msg


def test_tiktoken_rewritten_file_is_reread(tmp_path):
    """No cache by path (tiktoken's loader keeps one in a temp dir): a rewritten file is read anew."""
    path = tmp_path / "ranks.model"
    assert build_tokenizer(tiktoken_cfg(write_ranks(path))).n_words == 256 + len(MERGES) + 256
    assert build_tokenizer(tiktoken_cfg(write_ranks(path, merges=[b"ab"]))).n_words == 256 + 1 + 256


# ---------------------------------------------------------------- sentencepiece training

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The facts corpus as a .txt file, a .jsonl.gz file (with bad lines) and a directory of both."""
    root = tmp_path_factory.mktemp("corpus")
    facts.generate_facts(root / "facts", people=200, seed=1)
    texts = [json.loads(line)["text"] for line in (root / "facts" / "train.jsonl").read_text().splitlines()]
    d = root / "dir"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(texts[:300]) + "\n\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as fh:
        fh.write("not json\n" + json.dumps({"other": "x"}) + "\n")
        fh.write("".join(json.dumps({"body": t}) + "\n" for t in texts[300:]))
    (d / "ignored.csv").write_text("a,b\n")
    return {"texts": texts, "dir": d, "txt": d / "a.txt", "jsonl": d / "b.jsonl.gz"}


def test_train_sentencepiece_cli(corpus, tmp_path, capsys):
    out = tmp_path / "models" / "tok.model"
    argv = ["train", "--input", str(corpus["dir"]), "--vocab-size", "400", "--out", str(out),
            "--text-field", "body"]
    assert tokenizer_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["out"] == str(out) and summary["vocab_size"] == 400
    # a.txt: 300 lines; b.jsonl.gz: the rest, less two bad lines counted
    assert summary["docs"] == len(corpus["texts"])
    assert summary["skipped"] == {"bad_json": 1, "no_text": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok.model"]  # no temp file left

    tok = build_tokenizer(TokenizerConfig(name="sentencepiece", path=str(out)))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (400, 1, 2)
    text = corpus["texts"][0] + "\n\n  Two  spaces, 12345 ☃ <s> zebra\ttab"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == text  # identity normalisation and byte fallback: lossless
    assert len(tok.encode(corpus["texts"][0])) < 0.75 * len(corpus["texts"][0])  # it learned merges


def test_train_max_docs_and_files(corpus, tmp_path, capsys):
    out = tmp_path / "tok.model"
    argv = ["train", "--input", str(corpus["txt"]), "--vocab-size", "340", "--out", str(out),
            "--max-docs", "50"]
    assert tokenizer_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["docs"] == 50 and summary["sentences"] == 50
    assert build_tokenizer(TokenizerConfig(name="sentencepiece", path=str(out))).n_words == 340


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lingua_mem.data.tokenizer", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_train_errors(corpus, tmp_path):
    out = tmp_path / "tok.model"
    missing = tmp_path / "no" / "such.jsonl"
    res = run_cli("train", "--input", str(corpus["txt"]), str(missing), "--vocab-size", "300",
                  "--out", str(out))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and str(missing) in res.stderr, res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("train", "--input", str(empty), "--vocab-size", "300", "--out", str(out))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and str(empty) in res.stderr
    res = run_cli("train", "--input", str(corpus["jsonl"]), "--vocab-size", "300", "--out", str(out))
    assert res.returncode == 2  # no "text" field in b.jsonl.gz
    assert res.stderr == f'error: no text to train on in {corpus["jsonl"]} (skipped: {{"bad_json": 1, ' \
        '"no_text": 301})\n'
    res = run_cli("train", "--input", str(corpus["txt"]), "--vocab-size", "100000", "--out", str(out))
    assert res.returncode == 1 and res.stderr.startswith("error: sentencepiece training failed")
    assert res.stderr.count("\n") == 1, res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "empty"]  # no temp left
