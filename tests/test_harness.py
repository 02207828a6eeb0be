"""lingua_mem.eval.harness: the lm-eval model type against hand computations with the tiny
model, and the real lm-eval (local task YAMLs over local jsonl) in process and by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lingua_mem.config import MemoryConfig, ModelConfig, TokenizerConfig, model_args  # noqa: E402
from lingua_mem.eval.harness import (  # noqa: E402
    LinguaMemLM,
    cli_args,
    encode_pair,
    flatten_results,
    run_lm_eval,
    scoring_windows,
)
from lingua_mem.eval.load import load_model  # noqa: E402
from lingua_mem.model.llama import build_model  # noqa: E402

BOS, EOS = 256, 257
MAX_LEN = 64


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    args = model_args(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258,
                                  max_seq_len=MAX_LEN, multiple_of=32),
                      MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=32))
    model = build_model(args, "cpu", seed=1).eval()
    out = tmp_path_factory.mktemp("export")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"format": "lingua_mem", "step": 7, "model": args.to_dict(),
                                                 "tokenizer": {"name": "bytes", "path": None}}))
    return out


@pytest.fixture(scope="module")
def loaded(export_dir):
    return load_model(export_dir, "cpu", TokenizerConfig(name=""))


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@torch.no_grad()
def hand_scores(model, ids: list[int], n_context: int) -> tuple[float, bool]:
    """sum of log_softmax(model(ids))[p - 1, ids[p]] over p >= n_context (one unpadded
    sequence, the plain causal forward), and whether each ids[p] is the argmax there."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
    total = sum(float(logp[p - 1, ids[p]]) for p in range(n_context, len(ids)))
    greedy = all(int(logp[p - 1].argmax()) == ids[p] for p in range(n_context, len(ids)))
    return total, greedy


def hand_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """BOS + context bytes, then continuation bytes (the context's trailing spaces moved),
    the last MAX_LEN + 1 tokens kept."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx, cont = [BOS] + _ids(stripped), _ids(continuation)
    ids = (ctx + cont)[-(MAX_LEN + 1):]
    return hand_scores(model, ids, len(ids) - len(cont))


@torch.no_grad()
def hand_greedy(model, prompt: str, max_new: int, stop: str | None = None) -> str:
    ids = [BOS] + _ids(prompt)
    new = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if nxt == EOS:
            break
        new.append(nxt)
    text = bytes(t for t in new if t < 256).decode("utf-8", errors="replace")
    return text.split(stop)[0] if stop else text


@torch.no_grad()
def greedy_continuation(model, n_tokens: int) -> tuple[str, str]:
    """A (context, continuation) whose continuation (n_tokens ASCII bytes) is the model's
    greedy one."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for context in (a + b for a in letters for b in letters):
        ids = [BOS] + _ids(context)
        new = []
        for _ in range(n_tokens):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if not 32 <= nxt < 127:
                break
            new.append(nxt)
        if len(new) == n_tokens and not context.endswith(" ") and chr(new[0]) != " ":
            return context, bytes(new).decode()
    raise AssertionError("no context with an ASCII greedy continuation")


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [
    ("", "hello"),  # empty context: BOS alone
    ("The cat sat ", "on the mat"),  # trailing space moves to the continuation
    ("Question: 2+2=", " 4"),
    ("abc", " a continuation of several tokens"),
    ("x" * 90, " long context"),  # over max_seq_len: the context is cut on the left
]


def test_encode_pair_conventions(loaded):
    tok = loaded.tokenizer
    assert encode_pair(tok, "", "hi") == ([BOS], _ids("hi"))
    assert encode_pair(tok, "The cat ", "sat") == ([BOS] + _ids("The cat"), _ids(" sat"))
    assert encode_pair(tok, "a\n\n", "b") == ([BOS] + _ids("a"), _ids("\n\nb"))
    assert encode_pair(tok, "  ", "b") == ([BOS], _ids("  b"))


def test_scoring_windows_match_lm_eval_rolling_windows():
    tokens = list(range(1000, 1000 + 150))
    for n in (1, 5, 63, 64, 65, 128, 150):
        ours = scoring_windows([BOS] + tokens[:n], 1, MAX_LEN)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens[:n], BOS, MAX_LEN, 1)]
        assert [(w[-k:], k) for w, k in ours] == [(pred, len(pred)) for _, pred in theirs]
        for (w, _), (ctx, pred) in zip(ours, theirs, strict=True):
            assert w == (ctx + pred)[-(MAX_LEN + 1):]  # lm-eval's input: the last max_len + 1 tokens
            assert len(w) <= MAX_LEN + 1


def test_loglikelihood_matches_hand_computation(loaded):
    model = loaded.model
    context, continuation = greedy_continuation(model, 3)
    pairs = PAIRS + [(context, continuation), (context, continuation[:1])]
    expected = [hand_loglikelihood(model, c, x) for c, x in pairs]
    assert expected[-1][1] and expected[-2][1]  # the greedy pair is greedy by hand too
    assert not all(g for _, g in expected)
    got4 = LinguaMemLM.from_loaded(loaded, batch_size=4).loglikelihood(_requests("loglikelihood", pairs))
    got1 = LinguaMemLM.from_loaded(loaded, batch_size=1).loglikelihood(_requests("loglikelihood", pairs))
    for (ll, greedy), (ll4, greedy4), (ll1, greedy1) in zip(expected, got4, got1, strict=True):
        assert ll4 == pytest.approx(ll, abs=1e-5)
        assert ll1 == pytest.approx(ll, abs=1e-5)
        assert greedy4 == greedy1 == greedy
        assert ll < 0
    # in a different order and batch: the same answers, in the order given
    lm3 = LinguaMemLM.from_loaded(loaded, batch_size=3)
    back = lm3.loglikelihood(_requests("loglikelihood", pairs[::-1]))
    assert [r[0] for r in back[::-1]] == pytest.approx([r[0] for r in got4], abs=1e-5)


def test_long_continuation_and_rolling(loaded):
    model = loaded.model
    lm = LinguaMemLM.from_loaded(loaded, batch_size=4)
    short = "A short text, under the window."
    long_text = "In the beginning was the word, and the word was with the model; " * 3 + "The end."
    ids = [BOS] + _ids(short)
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long_text,)]))
    assert rolling[0] == pytest.approx(hand_scores(model, ids, 1)[0], abs=1e-5)
    # the long text by lm-eval's own rolling windows, each an unpadded forward here
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(_ids(long_text), BOS, MAX_LEN, 1)]
    assert len(long_text) == 200 and len(windows) == 4  # the last window: 8 targets, full context
    by_hand = 0.0
    for ctx, pred in windows:
        seq = ctx + pred
        by_hand += hand_scores(model, seq, len(seq) - len(pred))[0]
    assert torch.isfinite(torch.tensor(rolling[1]))
    assert rolling[1] == pytest.approx(by_hand, abs=1e-4)
    # an empty context conditions on BOS alone: the same as the rolling log-likelihood
    same = lm.loglikelihood(_requests("loglikelihood", [("", short), ("", long_text)]))
    assert [s for s, _ in same] == pytest.approx(rolling, abs=1e-4)


def test_generate_until(loaded):
    model = loaded.model
    lm = LinguaMemLM.from_loaded(loaded, batch_size=2)
    prompts = ["Once upon a time", "The", "x" * 100]
    kw = {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until(_requests("generate_until", [(p, dict(kw)) for p in prompts]))
    # the 100-byte prompt keeps its last 54 tokens (BOS cut): 64 - 10 new
    expected = [hand_greedy(model, p, 10, "\n") for p in prompts[:2]]
    assert got[:2] == expected
    assert all("\n" not in g for g in got)
    one = LinguaMemLM.from_loaded(loaded, batch_size=1).generate_until(
        _requests("generate_until", [(p, dict(kw)) for p in prompts[::-1]]))
    assert one[::-1] == got
    # a stop string that occurs cuts there (an ASCII character of a longer greedy text)
    long = {"max_gen_toks": 12}
    full = lm.generate_until(_requests("generate_until", [(p, dict(long)) for p in prompts]))
    prompt, text = next((p, t) for p, t in zip(prompts, full, strict=True)
                        if any(c.isascii() and c.isprintable() for c in t[1:]))
    stop = next(c for c in text[1:] if c.isascii() and c.isprintable())
    cut = lm.generate_until(_requests("generate_until", [(prompt, {**long, "until": stop})]))[0]
    assert cut == text[: text.index(stop)]


# ---------------------------------------------------------------- the real lm-eval, local tasks

MC_DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "made of cheese"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "twenty two"], "label": 0},
    {"question": "Cats say", "choices": ["woof", "meow", "moo"], "label": 1},
    {"question": "Water is", "choices": ["dry", "wet", "solid at noon"], "label": 1},
    {"question": "The sun rises in the", "choices": ["west", "north", "east"], "label": 2},
    {"question": "Snow is", "choices": ["black", "hot", "white"], "label": 2},
]
GEN_PROMPTS = ["Q: name a color\nA:", "Q: say hi\nA:", "Q: count\nA:", "Q: a word\nA:"]


def _write_tasks(root: Path, model) -> tuple[Path, list[dict]]:
    """mc.yaml (multiple_choice, acc) and gen.yaml (generate_until, exact_match) over jsonl
    files; half the generation answers are the model's own greedy text."""
    tasks = root / "tasks"
    tasks.mkdir()
    gen_docs = []
    for i, prompt in enumerate(GEN_PROMPTS):
        greedy = hand_greedy(model, prompt, 6, "\n")
        gen_docs.append({"prompt": prompt, "answer": greedy if i % 2 == 0 else "not this"})
    for name, docs in (("mc", MC_DOCS), ("gen", gen_docs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / '{name}.jsonl'}\n"
              f"  cache_dir: {root / 'hf_cache'}\ntest_split: test\n")
    (tasks / "mc.yaml").write_text(
        "task: tiny_mc\n" + common.replace("{name}", "mc") + "output_type: multiple_choice\n"
        "doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "gen.yaml").write_text(
        "task: tiny_gen\n" + common.replace("{name}", "gen") + "output_type: generate_until\n"
        "doc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks, gen_docs


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_run_lm_eval_local_tasks(loaded, tmp_path, offline):
    model = loaded.model
    tasks, gen_docs = _write_tasks(tmp_path, model)
    state = torch.get_rng_state()

    mc = run_lm_eval(loaded, "tiny_mc", include_path=str(tasks), batch_size=4)
    picks = []
    for doc in MC_DOCS:
        lls = [hand_loglikelihood(model, doc["question"], " " + c)[0] for c in doc["choices"]]
        picks.append(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert mc["lm_eval/tiny_mc/acc"] == pytest.approx(sum(picks) / len(picks), abs=1e-9)
    assert mc["lm_eval/tiny_mc/acc_stderr"] >= 0
    assert set(mc) == {"lm_eval/tiny_mc/acc", "lm_eval/tiny_mc/acc_stderr"}

    gen = run_lm_eval(loaded, "tiny_gen", include_path=str(tasks), batch_size=3, limit=4)
    matches = [hand_greedy(model, d["prompt"], 6, "\n") == d["answer"] for d in gen_docs]
    assert gen["lm_eval/tiny_gen/exact_match"] == pytest.approx(sum(matches) / len(matches))
    assert 0.0 < gen["lm_eval/tiny_gen/exact_match"] < 1.0
    assert torch.equal(torch.get_rng_state(), state)  # simple_evaluate's reseeding undone


def test_flatten_results():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                 "exact_match,strict-match": 1, "f1,none": float("nan")}}}
    assert flatten_results(results, "t") == {"lm_eval/t/acc": 0.5, "lm_eval/t/exact_match/strict-match": 1.0}


def test_cli_args():
    assert cli_args(["--model_args", "ckpt=x", "--tasks", "t"]) == \
        ["run", "--model", "lingua_mem", "--model_args", "ckpt=x", "--tasks", "t", "--device", "auto",
         "--batch_size", "8"]
    assert cli_args(["--model_args", "ckpt=x,batch_size=2", "--tasks", "t"])[-2:] == ["--device", "auto"]
    given = ["run", "--model", "hf", "--device", "cpu", "-b", "2"]
    assert cli_args(given) == given
    assert cli_args(["ls", "tasks"]) == ["ls", "tasks"]


def test_model_args(export_dir):
    lm = LinguaMemLM.create_from_arg_string(f"ckpt={export_dir},batch_size=3,device=cpu,max_length=32",
                                            {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (lm.batch_size, lm.max_length, str(lm.device), lm.eot_token_id) == (3, 32, "cpu", EOS)
    from lingua_mem.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key.*pretrained"):
        LinguaMemLM.create_from_arg_string(f"ckpt={export_dir},pretrained=gpt2")
    with pytest.raises(ConfigError, match="max_length=100"):
        LinguaMemLM.create_from_arg_string(f"ckpt={export_dir},max_length=100,device=cpu")


def test_cli_runs_lm_eval(loaded, export_dir, tmp_path, offline):
    tasks, _ = _write_tasks(tmp_path, loaded.model)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_mem.eval.harness", "--model", "lingua_mem",
         "--model_args", f"ckpt={export_dir},batch_size=4,device=cpu", "--tasks", "tiny_mc",
         "--include_path", str(tasks), "--limit", "4"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout
    assert "acc" in proc.stdout and "|" in proc.stdout  # the results table


def test_eval_py_runs_an_lm_eval_task(loaded, export_dir, tmp_path, offline):
    tasks, _ = _write_tasks(tmp_path, loaded.model)
    expected = run_lm_eval(loaded, "tiny_mc", include_path=str(tasks), batch_size=4)
    proc = subprocess.run(
        [sys.executable, "eval.py", f"ckpt={export_dir}", "tasks=lm_eval:tiny_mc",
         f"lm_eval.include_path={tasks}", "eval.batch_size=4", f"out={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "evals" / "7.json").read_text())
    assert report["metrics"] == expected and "lm_eval/tiny_mc/acc" in proc.stdout
