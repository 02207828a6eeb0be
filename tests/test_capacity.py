"""The capacity studies (experiments/knowledge/capacity.py): each corpus gets a SentencePiece
vocabulary trained on it, the same on every machine; its tokens a pass are counted as the
loader packs them; curve runs spend the dense base's FLOPs, size and probe runs its tokens;
the curve_tiny study runs end to end and a rerun reads its runs back."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.knowledge import capacity
from lingua_mem.config import load_config
from lingua_mem.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from lingua_mem.stats import config_stats

ROOT = Path(__file__).resolve().parents[1]


def keys(run) -> dict:
    return dict(o.split("=", 1) for o in run.overrides)


def test_a_corpus_gets_one_vocabulary_and_its_packed_token_count(tmp_path):
    study = capacity.STUDIES["curve_tiny"]
    a = capacity.prepare_corpus(study, 10, tmp_path / "a")
    b = capacity.prepare_corpus(study, 10, tmp_path / "b")
    assert a == b and a["people"] == 10 and a["vocab_size"] == study.vocab_size
    pieces = [[t.sp.id_to_piece(i) for i in range(t.n_words)]
              for t in (SentencePieceTokenizer(str(d / "corpus" / "p10" / "tokenizer.model"))
                        for d in (tmp_path / "a", tmp_path / "b"))]
    assert pieces[0] == pieces[1] and len(pieces[0]) == study.vocab_size
    corpus = tmp_path / "a" / "corpus" / "p10"
    tokenizer = SentencePieceTokenizer(str(corpus / "tokenizer.model"))
    docs = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    assert len(docs) == 10 * study.docs_per_person
    assert a["tokens_per_pass"] == sum(len(tokenizer.encode(d)) for d in docs)  # BOS and EOS each
    assert a["bits"] == json.loads((corpus / "meta.json").read_text())["bits"]
    # prepared again: read back, not retrained (the file is not rewritten)
    stamp = (corpus / "tokenizer.model").stat().st_mtime_ns
    assert capacity.prepare_corpus(study, 10, tmp_path / "a") == a
    assert (corpus / "tokenizer.model").stat().st_mtime_ns == stamp


def test_the_study_s_vocabulary_is_the_one_thread_vocabulary(tmp_path):
    """prepare_corpus trains with one thread: BPE counted on another number of threads can
    break ties otherwise, and the vocabulary would depend on the machine."""
    study = capacity.STUDIES["curve_tiny"]
    corpus = tmp_path / "corpus" / "p20"
    capacity.prepare_corpus(study, 20, tmp_path)
    one = str(tmp_path / "one.model")
    train_sentencepiece([str(corpus / "train.jsonl")], study.vocab_size, one, threads=1)
    pieces = [[t.sp.id_to_piece(i) for i in range(t.n_words)]
              for t in (SentencePieceTokenizer(p) for p in (one, str(corpus / "tokenizer.model")))]
    assert pieces[0] == pieces[1]


def plan_of(name: str, tmp_path: Path):
    study = capacity.STUDIES[name]
    people = study.people if study.kind == "curve" else study.people[:1]
    corpora = {p: capacity.prepare_corpus(study, p, tmp_path) for p in people}
    return study, corpora, capacity.plan(study, corpora, tmp_path)


def test_curve_runs_spend_the_dense_base_s_flops_on_each_corpus(tmp_path):
    study, corpora, planned = plan_of("curve_tiny", tmp_path)
    assert [p.run.size for p in planned] == ["p10 dense", "p10 mem64", "p20 dense", "p20 mem64"]
    tokens_a_step = study.batch_size * study.seq_len
    for dense, memory in zip(planned[::2], planned[1::2], strict=True):
        assert dense.people == memory.people and dense.base == memory.base
        model = tmp_path / "corpus" / f"p{dense.people}" / "tokenizer.model"
        assert f"data.tokenizer.path={model}" in dense.base
        steps = int(keys(dense.run)["steps"])
        assert steps == round(study.passes * corpora[dense.people]["tokens_per_pass"] / tokens_a_step)
        fpt = [config_stats(load_config([*p.base, *p.run.overrides]))["flops_per_token"]
               for p in (dense, memory)]
        assert fpt[1] < fpt[0]  # the memory layer costs less a token: more tokens, the same FLOPs
        assert abs(int(keys(memory.run)["steps"]) * fpt[1] - steps * fpt[0]) <= fpt[1] / 2


def test_size_runs_hold_the_base_and_the_tokens_fixed(tmp_path):
    study, _, planned = plan_of("size_tiny", tmp_path)
    assert [p.run.size for p in planned] == ["p10 dense", "p10 mem16", "p10 mem64"]
    assert len({keys(p.run)["steps"] for p in planned}) == 1
    for p in planned[1:]:
        k = keys(p.run)
        assert (k["model.dim"], k["model.n_layers"], k["memory.heads"]) == ("16", "2", "2")


def test_probe_runs_vary_value_lr_heads_and_knn_at_the_base_s_tokens(tmp_path):
    study = dataclasses.replace(capacity.STUDIES["size_tiny"], kind="probe", probe=((0.1, 2, 4), (1.0, 4, 2)))
    corpora = {10: capacity.prepare_corpus(study, 10, tmp_path)}
    planned = capacity.plan(study, corpora, tmp_path)
    assert [p.run.size for p in planned] == ["p10 dense", "vlr0.1 h2k4", "vlr1 h4k2"]
    assert len({keys(p.run)["steps"] for p in planned}) == 1
    memory = [keys(p.run) for p in planned[1:]]
    got = [(k["optim.value_lr"], k["memory.heads"], k["memory.knn"]) for k in memory]
    assert got == [("0.1", "2", "4"), ("1.0", "4", "2")]


def test_the_cpu_studies_are_sized_as_the_docs_say(tmp_path):
    probe = capacity.STUDIES["capacity_probe"]
    assert len(probe.probe) == 6 and {v for v, _, _ in probe.probe} == {0.1, 0.3, 1.0}
    for name in ("capacity_probe", "capacity_size", "capacity_curve"):
        s = capacity.STUDIES[name]
        assert (s.vocab_size, s.docs_per_person, s.base.dim, s.base.n_layers) == (1024, 5, 32, 4)
    assert min(len(capacity.STUDIES[n].seeds) for n in ("capacity_size", "capacity_curve")) >= 2
    sizes = [k * k for k in capacity.STUDIES["capacity_size"].n_keys]
    assert sizes[0] == 1024 and sizes[-1] == 65536


def test_curve_tiny_runs_end_to_end_and_reads_its_runs_back(tmp_path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "experiments.knowledge", "--preset", "curve_tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[4/4] p20_mem64_seed0: recall EM " in proc.stdout and "ETA" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [g["group"] for g in results["groups"]] == ["p10 dense", "p10 mem64", "p20 dense", "p20 mem64"]
    for g in results["groups"]:
        corpus = results["corpora"][str(g["people"])]
        assert g["corpus_bits"] == corpus["bits"] and 0 <= g["recall_bits"] <= corpus["bits"]
        assert 0 <= g["recall_em"] <= 1 and g["seeds"] == 1
        assert g["exposures"] == pytest.approx(g["tokens"] / corpus["tokens_per_pass"] * 2)
    assert "| p20 mem64 | 1 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    logs = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/train.log")}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]
    assert len(logs) == 4 and {p: p.stat().st_mtime_ns for p in logs} == logs  # read back, not trained
