"""Evaluation: eval.py on a real training checkpoint (1 process, and 2 with memory
parallelism: the same numbers), a consolidated export (the same numbers again), KV-cache
generation against full recomputation, validation and facts-QA scores against hand
computations, memory analytics against the layers' own lookups, one-line input errors,
and evaluation during training leaving the training bit-identical (resumed runs too)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_parallel import free_port

from lingua_mem.checkpoint.checkpointer import checkpoint_dir
from lingua_mem.checkpoint.consolidate import consolidate
from lingua_mem.config import GenerateConfig, MemoryConfig, ModelConfig, load_config, model_args
from lingua_mem.data.facts import attribute_values
from lingua_mem.data.tokenizer import BytesTokenizer
from lingua_mem.eval.analytics import MemoryReadStats
from lingua_mem.eval.facts_qa import answer_bits, f1_score, normalize, score
from lingua_mem.eval.generate import generate, generate_ids
from lingua_mem.eval.validate import prepare_text, validate
from lingua_mem.model.llama import build_model
from lingua_mem.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "memory.layers=[0,2]", "memory.n_keys=16", "memory.heads=2", "memory.knn=4",
        "data.seq_len=32", "data.batch_size=4", "data.facts.people=40", "optim.warmup=2",
        "logging.console=false"]
FAST_EVAL = ["eval.max_tokens=1500", "eval.max_questions=24", "eval.batch_size=4",
             "eval.max_answer_tokens=12", "eval.generate.max_new_tokens=12"]


def tiny_args():
    return model_args(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, max_seq_len=64,
                                  multiple_of=32),
                      MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=32))


def metrics_rows(dump_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(dump_dir) / "metrics.jsonl").read_text().splitlines()]


def run_eval(*args: str, world: int = 1, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """eval.py as `world` processes (the environment torchrun gives them)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "eval.py", *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small run's dump dir with a checkpoint at step 8 (trained on the facts corpus)."""
    dump = tmp_path_factory.mktemp("run")
    train(load_config(["config=configs/debug.yaml", f"dump_dir={dump}", *TINY, "steps=8",
                       "checkpoint.every=8"]))
    return dump


def comparable(report: dict) -> dict:
    return {k: v for k, v in report["metrics"].items() if not k.endswith("tokens_per_s")}


# ---------------------------------------------------------------- eval.py end to end

def test_eval_on_one_and_two_processes_with_memory_parallelism_agree(trained, tmp_path):
    ckpt = checkpoint_dir(trained, 8)
    one, = run_eval(f"ckpt={ckpt}", f"out={tmp_path / 'one'}", *FAST_EVAL)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "val/loss" in one.stdout and "wrote" in one.stdout
    two = run_eval(f"ckpt={ckpt}", f"out={tmp_path / 'two'}", "distributed.memory_parallel_size=2",
                   *FAST_EVAL, world=2)
    assert all(p.returncode == 0 for p in two), two[0].stderr[-2000:] + two[1].stderr[-2000:]
    a = json.loads((tmp_path / "one" / "evals" / "8.json").read_text())
    b = json.loads((tmp_path / "two" / "evals" / "8.json").read_text())
    assert (a["world_size"], b["world_size"], b["memory_parallel_size"]) == (1, 2, 2)
    assert a["step"] == b["step"] == 8 and a["tokens"] == 8 * 4 * 32
    ma, mb = comparable(a), comparable(b)
    assert ma.keys() == mb.keys()
    for key in ("val/loss", "val/ppl", "val/bits_per_byte", "facts_qa/exact_match", "facts_qa/f1",
                "memory/layer0/usage", "memory/layer2/kl_uniform", "memory/layer2/weight_entropy"):
        assert key in ma
    for key in ma:
        assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-7), key
    assert a["samples"] == b["samples"]  # the same greedy answers and completions
    assert ma["val/tokens"] >= 1500 and 0 < ma["memory/layer0/usage"] <= 1
    assert ma["val/ppl"] == pytest.approx(math.exp(ma["val/loss"]))
    assert ma["facts_qa/questions"] == 24


def test_a_consolidated_export_evaluates_to_the_same_numbers(trained, tmp_path):
    ckpt = checkpoint_dir(trained, 8)
    consolidate(ckpt, tmp_path / "export")
    facts = trained / "data" / "facts"
    # an export has no run config: the sources and the window (the run's data.seq_len) are given
    sources = ["eval.seq_len=32", f"eval.sources.facts.path={facts / 'val.jsonl'}",
               f"eval.sources.facts_qa.path={facts / 'qa.jsonl'}", "eval.sources.facts_qa.kind=qa"]
    runs = [run_eval(f"ckpt={c}", f"out={tmp_path / n}", "tasks=val,facts_qa", *FAST_EVAL, *sources)[0]
            for c, n in ((ckpt, "train"), (tmp_path / "export", "export"))]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    a = json.loads((tmp_path / "train" / "evals" / "8.json").read_text())
    b = json.loads((tmp_path / "export" / "evals" / "8.json").read_text())
    assert comparable(a) == comparable(b)


def eval_main(*args: str) -> int:
    """eval.py's main in this process."""
    spec = importlib.util.spec_from_file_location("eval_command", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


@pytest.mark.parametrize("args, message", [
    (["ckpt=/nonexistent/checkpoints/0000000100"],
     "ckpt: no such checkpoint /nonexistent/checkpoints/0000000100"),
    (["tasks=val,bogus"], "tasks: 'bogus' is not a task"),
    (["eval.max_tokens=-1"], "eval.max_tokens: must be >= 0"),
    (["eval.sources.x.path=/nonexistent.jsonl", "tasks=val"], "eval.sources.x.path: no such file"),
    (["eval.sources.x.path=/nonexistent.jsonl", "eval.sources.x.kind=qa", "tasks=facts_qa"],
     "eval.sources.x.path: no such file /nonexistent.jsonl"),
    (["tasks=val", "eval.sources.q.path=/q.jsonl", "eval.sources.q.kind=qa"],
     "eval.sources: the val task needs a source of kind text"),
    (["eval.seq_len=65"], "eval.seq_len: 65 exceeds model.max_seq_len=64"),
    (["eval.max_answer_tokens=64"], "eval.max_answer_tokens: 64 must be below model.max_seq_len=64"),
    (["out=/etc/hostname/x"], "out: cannot write to /etc/hostname/x: /etc/hostname is a file"),
])
def test_bad_input_is_one_line_and_exit_2(trained, args, message, capsys):
    if not any(a.startswith("ckpt=") for a in args):
        args = [f"ckpt={checkpoint_dir(trained, 8)}", *args]
    assert eval_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("inside", [".", "evals", "../0000000004/evals", ".."])
def test_an_out_inside_a_runs_checkpoints_is_refused(trained, inside, capsys):
    """Retention would remove it with the checkpoint (or beside it); nothing is evaluated."""
    ckpt = checkpoint_dir(trained, 8)
    out = (ckpt / inside).resolve()
    assert eval_main(f"ckpt={ckpt}", f"out={out}", "tasks=val") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "a run's checkpoints, which retention prunes; choose another out" in err
    assert not (out / "evals").exists()


def test_a_tokenizer_the_model_cannot_embed_is_one_line_and_exit_2(tmp_path, capsys):
    from safetensors.torch import save_file

    args = model_args(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=200, max_seq_len=32,
                                  multiple_of=32), MemoryConfig())
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in build_model(args, "cpu").state_dict().items()},
              str(export / "model.safetensors"))
    config = {"format": "lingua_mem", "step": 3, "model": args.to_dict(), "tokenizer": {"name": "bytes"}}
    (export / "config.json").write_text(json.dumps(config))
    proc, = run_eval(f"ckpt={export}", "tasks=generate")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: tokenizer: bytes has 258 tokens, the model of {export} embeds "
                                   "only 200 (model.vocab_size): not the tokenizer it was trained with")
    del config["tokenizer"]  # an export that does not say: never a silent guess
    (export / "config.json").write_text(json.dumps(config))
    assert eval_main(f"ckpt={export}", "tasks=generate") == 2
    assert "tokenizer.name: required: the config.json has no tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def model():
    return build_model(tiny_args(), "cpu", seed=3).eval()


def test_cached_generation_gives_the_tokens_of_full_recomputation(model):
    prompts = [[256, 72, 101, 108, 108, 111], [256, 65], [256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [256]]
    cached = generate_ids(model, prompts, 30, eos_id=257, use_cache=True)
    full = generate_ids(model, prompts, 30, eos_id=257, use_cache=False)
    assert cached == full and all(len(c) == 30 for c in cached)  # a random model never says EOS here
    for i, p in enumerate(prompts):  # each prompt alone: its padding in the batch changed nothing
        assert generate_ids(model, [p], 30, eos_id=257) == [cached[i]]
    # sampling: the same generator seed draws the same tokens with and without the cache
    draws = [generate_ids(model, prompts, 20, 257, temperature=1.0, top_p=0.9, use_cache=c,
                          generator=torch.Generator().manual_seed(5)) for c in (True, False)]
    assert draws[0] == draws[1] and draws[0] != cached


def test_cached_logits_equal_the_full_forward(model):
    from lingua_mem.model.kv_cache import KVCache

    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args.n_layers, 2, 20, "cpu")
        parts = [model(tokens[:, :12], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache)
                                                       for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_the_argmax_continuation_and_stops(model):
    tok = BytesTokenizer()
    prompt = "Hello"
    ids = tok.encode(prompt, add_eos=False)
    expected = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(torch.tensor([ids + expected]))[0, -1].argmax())
            expected.append(nxt)
    text, = generate(model, tok, [prompt], GenerateConfig(max_new_tokens=8))
    assert text == tok.decode(expected)
    stop = tok.decode(expected[3:4])
    cut, = generate(model, tok, [prompt], GenerateConfig(max_new_tokens=8), stop=(stop,))
    assert cut == tok.decode(expected)[: tok.decode(expected).find(stop)]


def test_max_new_tokens_beyond_the_context_is_refused(model):
    with pytest.raises(ValueError, match="generate.max_new_tokens: 64 must be in 1..63"):
        generate_ids(model, [[256]], 64, 257)


# ---------------------------------------------------------------- validation and scores

def test_validation_loss_and_bits_per_byte_equal_a_hand_computation(model):
    tok = BytesTokenizer()
    docs = ["Ada was born in Oslo.", "Hugo works for Zephyr Motors in Turin. " * 3, "x"]
    stream = [t for d in docs for t in tok.encode(d)]
    with torch.no_grad():  # one sequence at a time, no batching or padding
        nats = 0.0
        for start in range(0, len(stream) - 1, 16):
            chunk = torch.tensor(stream[start : start + 17])
            logits = model(chunk[:-1].view(1, -1))[0]
            nats += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    r = validate(model, prepare_text(iter(docs), tok, 16, max_tokens=0), batch_size=3, device="cpu")
    assert r["tokens"] == len(stream) - 1 and r["documents"] == 3
    assert r["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-5)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert r["bytes"] == n_bytes
    capped = prepare_text(iter(docs), tok, 16, max_tokens=20)
    assert capped.documents == 1  # 23 tokens reach the cap of 20: the first document, whole


def test_facts_qa_scores_and_bits_of_knowledge_by_hand():
    assert normalize("The  Oslo!") == "oslo"
    assert f1_score("Zephyr Motors Ltd", "Zephyr Motors") == pytest.approx(0.8)
    questions = [{"question": "q", "answer": "Oslo", "attribute": "birth_city"},
                 {"question": "q", "answer": "3 May 1961", "attribute": "birth_date"},
                 {"question": "q", "answer": "physics", "attribute": "field"},
                 {"question": "q", "answer": "Zephyr Motors", "attribute": "employer"}]
    predictions = ["oslo", "3 May 1962", "physics", "Zephyr"]
    s = score(questions, predictions, total=8, n_params=1000, n_dense_params=250)
    values = attribute_values()
    assert values["birth_date"] == 365 * 63 and values["birth_city"] == 57
    bits = (math.log2(values["birth_city"]) + math.log2(values["field"])) * 8 / 4  # scaled to the 8 questions
    assert s["exact_match"] == 0.5 and s["bits"] == pytest.approx(bits)
    assert s["bits_per_param"] == pytest.approx(bits / 1000)
    assert s["bits_per_dense_param"] == pytest.approx(bits / 250)
    assert s["f1"] == pytest.approx((1 + 2 / 3 + 1 + 2 / 3) / 4)
    assert s["birth_date/exact_match"] == 0 and s["birth_date/f1"] == pytest.approx(2 / 3)


def test_answer_bits_are_the_answers_code_length_and_bits_loss_what_beats_a_guess(model):
    """A model that says nothing (uniform logits) needs log2(258) bits a byte of every answer,
    more than any fact holds: bits_loss 0. Its real logits give the teacher-forced loss."""
    tokenizer = BytesTokenizer()
    questions = [{"question": "Ada Bel was born in", "answer": "Oslo", "attribute": "birth_city"},
                 {"question": "Ada Bel works for", "answer": "Zephyr Motors", "attribute": "employer"}]
    got = answer_bits(model, tokenizer, questions, batch_size=4)
    for q, bits in zip(questions, got, strict=True):  # the loss, as the model computes it, in bits
        ids = tokenizer.encode(q["question"] + " " + q["answer"], add_bos=True, add_eos=False)
        n = len(q["answer"]) + 1
        tokens = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).float(), -1)[0]  # (T, vocab)
        nats = -logp[-n - 1 : -1].gather(-1, tokens[0, -n:, None]).sum().item()  # the answer's n bytes
        assert bits == pytest.approx(nats / math.log(2), rel=1e-5)
    silent = build_model(tiny_args(), "cpu", seed=3).eval()
    torch.nn.init.zeros_(silent.output.weight)
    uniform = answer_bits(silent, tokenizer, questions, batch_size=1)
    assert uniform == pytest.approx([5 * math.log2(258), 14 * math.log2(258)], rel=1e-5)  # " Oslo", ...
    s = score(questions, ["Oslo", "Zephyr Motors"], 2, 1000, 250, uniform)
    assert s["bits_loss"] == 0 and s["bits"] == pytest.approx(math.log2(57) + math.log2(46))
    # a model 1 bit short of sure of the city holds log2(57) - 1 of its bits; derived facts none
    s = score([*questions, {"question": "q", "answer": "Turin", "attribute": "employer_city"}],
              ["Oslo", "x", "Turin"], 3, 1000, 250, [1.0, 100.0, 0.0])
    assert s["bits_loss"] == pytest.approx(math.log2(57) - 1) and s["bits"] == pytest.approx(math.log2(57))


def test_the_answer_is_scored_in_the_tokens_it_has_after_its_prompt(tmp_path):
    """With a SentencePiece vocabulary " Oslo" alone encodes as "▁", "▁Oslo" (the dummy prefix),
    a pair training text never holds; answer_bits scores the answer's tokens in the whole text."""
    from lingua_mem.data.facts import generate_facts
    from lingua_mem.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from lingua_mem.eval.facts_qa import prompt_and_answer_ids

    generate_facts(tmp_path, 30, 0, style="capacity")
    train_sentencepiece([str(tmp_path / "train.jsonl")], 400, str(tmp_path / "t.model"), threads=1)
    for tokenizer in (SentencePieceTokenizer(str(tmp_path / "t.model")), BytesTokenizer()):
        for line in (tmp_path / "recall.jsonl").read_text().splitlines()[:12]:
            q = json.loads(line)
            prompt, answer = prompt_and_answer_ids(tokenizer, q["question"], q["answer"])
            assert prompt + answer == tokenizer.encode(f"{q['question']} {q['answer']}", add_eos=False)
            assert prompt == tokenizer.encode(q["question"], add_eos=False) and answer
            assert tokenizer.decode(answer).strip() == q["answer"]
    sp = SentencePieceTokenizer(str(tmp_path / "t.model"))
    alone = sp.encode(" Oslo", add_bos=False, add_eos=False)
    assert alone != prompt_and_answer_ids(sp, "Ada was born in", "Oslo")[1]


def test_memory_analytics_equal_the_layers_own_lookups(model):
    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    memory = model.layers[1].feed_forward
    seen = {}
    hook = memory.reads.register_forward_hook(lambda m, i, out: seen.update(indices=out[0], weights=out[1]))
    with torch.no_grad(), MemoryReadStats(model) as reads:
        model(tokens)
    hook.remove()
    got = reads.result()
    idx, w = seen["indices"], seen["weights"].double()
    n_values = memory.n_keys**2
    assert got["memory/layer1/usage"] == pytest.approx(len(set(idx.flatten().tolist())) / n_values)
    mass = torch.zeros(n_values, dtype=torch.float64).index_add_(0, idx.flatten(), w.flatten())
    p = mass / mass.sum()
    kl = sum(float(q * math.log(q * n_values)) for q in p.tolist() if q > 0)
    assert got["memory/layer1/kl_uniform"] == pytest.approx(kl, rel=1e-9)
    heads = w.view(-1, memory.heads, memory.knn)
    assert got["memory/layer1/top1_weight"] == pytest.approx(heads.max(-1).values.mean().item(), rel=1e-9)
    entropy = -(heads * heads.log()).sum(-1).mean().item()
    assert got["memory/layer1/weight_entropy"] == pytest.approx(entropy, rel=1e-9)


# ---------------------------------------------------------------- during training

def test_evaluation_during_training_leaves_training_bit_identical_and_resumes_at_the_same_steps(tmp_path):
    common = [*TINY, "steps=10", "log_every=1", "checkpoint.every=5", "checkpoint.keep_last=0",
              "eval.max_tokens=600", "eval.max_questions=8", "eval.max_answer_tokens=8"]
    train(load_config(["config=configs/debug.yaml", f"dump_dir={tmp_path / 'off'}", *common]))
    on = ["config=configs/debug.yaml", f"dump_dir={tmp_path / 'on'}", *common, "eval.every=4"]
    train(load_config(on))
    off_rows, on_rows = metrics_rows(tmp_path / "off"), metrics_rows(tmp_path / "on")
    train_rows = [r for r in on_rows if not r.get("eval")]
    keys = ("step", "loss", "grad_norm", "value_grad_norm", "lr", "tokens")
    assert [[r[k] for k in keys] for r in train_rows] == [[r[k] for k in keys] for r in off_rows]  # bitwise
    evals = [r for r in on_rows if r.get("eval")]
    assert [r["step"] for r in evals] == [4, 8, 10]  # every 4 steps and the last
    assert all(math.isfinite(r["val/loss"]) and "facts_qa/exact_match" in r for r in evals)
    assert evals[0]["tokens"] == 4 * 4 * 32
    # resumed from step 5: the rows up to it are kept, steps 8 and 10 are evaluated again, alike
    shutil.rmtree(checkpoint_dir(tmp_path / "on", 10))
    train(load_config(on))
    again = [r for r in metrics_rows(tmp_path / "on") if r.get("eval")]
    assert [r["step"] for r in again] == [4, 8, 10]
    for a, b in zip(evals, again, strict=True):
        assert a["val/loss"] == b["val/loss"] and a["facts_qa/f1"] == b["facts_qa/f1"]
    # a run preempted at step 8 before its evaluation (the checkpoint of 8, no eval row):
    # resuming evaluates step 8 first
    cfg8 = [*on, "checkpoint.every=4"]
    shutil.rmtree(tmp_path / "on")
    train(load_config([*cfg8, "steps=8"]))
    logged = metrics_rows(tmp_path / "on")
    (tmp_path / "on" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in logged if not (r.get("eval") and r["step"] == 8)))
    train(load_config([*cfg8, "steps=10"]))
    resumed = [r for r in metrics_rows(tmp_path / "on") if r.get("eval")]
    assert [r["step"] for r in resumed] == [4, 8, 10]
    row8 = next(r for r in logged if r.get("eval") and r["step"] == 8)
    assert resumed[1]["val/loss"] == row8["val/loss"]  # the same weights, evaluated alike


def test_a_bad_eval_source_stops_training_before_any_step(tmp_path):
    from lingua_mem.config import ConfigError

    cfg = load_config(["config=configs/debug.yaml", f"dump_dir={tmp_path}", *TINY, "eval.every=5",
                       f"eval.sources.qa.path={tmp_path / 'qa.jsonl'}", "eval.sources.qa.kind=qa",
                       "eval.tasks=facts_qa"])
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 3}\n')
    with pytest.raises(ConfigError, match=r"eval.sources.qa.path: .*qa.jsonl line 2 has no \"question\""):
        train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_eval_config_errors_name_the_key(tmp_path):
    from lingua_mem.config import ConfigError

    with pytest.raises(ConfigError, match="eval.tasks: lm_eval:piqa: lm-evaluation-harness tasks run in"):
        load_config(["config=configs/debug.yaml", "eval.every=5", "eval.tasks=val,lm_eval:piqa"])
    with pytest.raises(ConfigError, match="eval.sources.v.kind: 'pictures' is not one of text, qa"):
        load_config(["config=configs/debug.yaml", "eval.sources.v.path=x", "eval.sources.v.kind=pictures"])
    with pytest.raises(ConfigError, match="eval.generate.top_p: must be in"):
        load_config(["config=configs/debug.yaml", "eval.generate.top_p=0"])
