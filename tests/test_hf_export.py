"""export-hf and init_from a Hugging Face directory, against the real transformers: a trained
memory model (1 process, and 2 with memory parallelism) loads with AutoModelForCausalLM and
gives the training model's logits and greedy generations; a dense model is a plain
LlamaForCausalLM; a transformers Llama imports (and retrofits memory layers) and exports
back to the same logits; lm-eval's stock `hf` model runs on an export; the tokenizers
convert exactly; consolidation streams in bounded memory; bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")

from sealed import seal  # noqa: E402
from test_parallel import free_port  # noqa: E402
from test_tokenizer import write_ranks  # noqa: E402

from lingua_mem.checkpoint.__main__ import main  # noqa: E402
from lingua_mem.checkpoint.checkpointer import checkpoint_dir  # noqa: E402
from lingua_mem.checkpoint.hf_export import export_hf  # noqa: E402
from lingua_mem.checkpoint.hf_import import load_hf_weights  # noqa: E402
from lingua_mem.checkpoint.hf_tokenizer import hf_tokenizer  # noqa: E402
from lingua_mem.config import (  # noqa: E402
    ConfigError,
    MemoryConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    load_config,
    model_args,
)
from lingua_mem.data import facts  # noqa: E402
from lingua_mem.data.tokenizer import BytesTokenizer, build_tokenizer  # noqa: E402
from lingua_mem.data.tokenizer import main as tokenizer_main  # noqa: E402
from lingua_mem.eval.generate import generate_ids  # noqa: E402
from lingua_mem.eval.load import load_model  # noqa: E402
from lingua_mem.model.llama import build_model  # noqa: E402
from lingua_mem.train.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["config=configs/debug.yaml", "model.dim=64", "model.n_layers=3", "model.n_heads=4",
        "model.n_kv_heads=2", "model.max_seq_len=64", "memory.layers=[0,2]", "memory.n_keys=16",
        "memory.heads=2", "memory.knn=4",
        "memory.qk_norm=true", "memory.query_batchnorm=true", "data.seq_len=32", "data.batch_size=4",
        "data.facts.people=40", "optim.warmup=2", "steps=4", "checkpoint.every=4", "logging.console=false"]
TOK = BytesTokenizer()
TEXT = ["Ada Lovelace was born in London.", "The capital of France is Paris, and 2 + 2 = 4."]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """transformers copies remote code under HF_HOME: a fresh one per test, never the hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def batch(texts=TEXT) -> torch.Tensor:
    ids = [TOK.encode(t, add_eos=False) for t in texts]
    n = min(map(len, ids))
    return torch.tensor([i[:n] for i in ids])  # (B, T), no padding


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny memory model trained 4 steps on one process, and on two with mp=2."""
    root = tmp_path_factory.mktemp("runs")
    train(load_config([*TINY, f"dump_dir={root / 'one'}"]))
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "train.py", *TINY, f"dump_dir={root / 'two'}",
                                       "distributed.memory_parallel_size=2"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return {"1proc": checkpoint_dir(root / "one", 4), "mp2": checkpoint_dir(root / "two", 4)}


@pytest.mark.parametrize("layout", ["1proc", "mp2"])
def test_a_memory_export_loads_in_transformers_with_the_training_models_logits(checkpoints, layout, tmp_path,
                                                                             monkeypatch):
    ckpt = checkpoints[layout]
    ours = load_model(ckpt, "cpu", TokenizerConfig(name="")).model
    out = export_hf(ckpt, tmp_path / "export", max_shard_bytes=200_000)  # several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.values.shared.weight" in index["weight_map"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lingua_mem" and config["memory_layers"] == [0, 2]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lingua_mem.LinguaMemForCausalLM"
    # the remote code needs torch and transformers only
    for name in ("modeling_lingua_mem.py", "configuration_lingua_mem.py"):
        assert "lingua_mem." not in (out / name).read_text().replace("lingua_mem.py", "")

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert type(hf).__name__ == "LinguaMemForCausalLM" and not hf.training
    assert not hf.model.layers[0].mlp.query_bn.training  # BatchNorm on its running statistics
    tokens = batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=2e-5)
    # init_from the export checks the settings it records, even those shapes do not show
    other = build_model(dataclasses.replace(ours.args, rope_theta=5e5), "cpu")
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint.init_from: {out} has rope_theta=10000.0, "
                                                    "this run's model.rope_theta is 500000.0")):
        load_hf_weights(other, out, other.args)
    assert load_hf_weights(build_model(ours.args, "cpu"), out, ours.args).new == []
    # lingua_mem reads the export back too (eval.py, init_from): step, tokenizer, weights
    back = load_model(out, "cpu", TokenizerConfig(name=""))
    assert back.step == 4 and isinstance(back.tokenizer, BytesTokenizer)
    with torch.no_grad():
        torch.testing.assert_close(back.model(tokens), ours(tokens), rtol=0, atol=0)

    # AutoTokenizer reads config.json first: for a memory model, remote code, which an
    # interactive session is asked about ("run the custom code? [y/N]"); the documented call
    # (docs/checkpoints.md) says no up front: the tokenizer needs none
    asked = []

    def terminal(prompt=""):
        asked.append(prompt)
        return "n"

    monkeypatch.setattr("builtins.input", terminal)
    transformers.AutoTokenizer.from_pretrained(str(out))
    assert asked and "Do you wish to run the custom code?" in asked[0]  # what a user met
    asked.clear()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    assert asked == []
    for text in [*TEXT, "literal <s> and </s> are text"]:
        assert tokenizer(text)["input_ids"] == TOK.encode(text, add_eos=False)
    prompt = TOK.encode("Ada Lovelace was born in", add_eos=False)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    expected = generate_ids(ours, [prompt], 20, TOK.eos_id)[0]
    assert theirs[:len(expected)] == expected and len(expected) > 0
    assert len(theirs) == len(expected) or theirs[len(expected)] == TOK.eos_id


def llama_dir(tmp_path: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A transformers Llama (random weights) saved as a Hugging Face directory."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 1e4}
    config = transformers.LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=192,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_parameters=rope,
                                      bos_token_id=256, eos_token_id=257)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "llama"
    model.save_pretrained(str(path))
    return path, model


DENSE = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=258, max_seq_len=64,
                    multiple_of=64, attention="causal")


def save_training_checkpoint(model, path: Path, memory: MemoryConfig | None = None) -> Path:
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    config = TrainConfig(model=DENSE, memory=memory or MemoryConfig())
    OmegaConf.save(OmegaConf.structured(config), path / "config.yaml")
    seal(path)
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_llama_imports_and_exports_back_as_a_plain_llama_with_equal_logits(tmp_path):
    src, llama = llama_dir(tmp_path)
    args = model_args(DENSE, MemoryConfig())
    assert args.ffn_hidden_dim == 192
    ours = build_model(args, seed=5).eval()
    summary = load_hf_weights(ours, src, args)
    assert (len(summary.loaded), summary.skipped, summary.new) == (len(ours.state_dict()), [], [])
    tokens = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), llama(tokens).logits, rtol=0, atol=2e-5)

    out = export_hf(save_training_checkpoint(ours, tmp_path / "ckpt"), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not list(out.glob("*.py"))  # no remote code
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out))  # no trust_remote_code
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, llama(tokens).logits, rtol=0, atol=1e-6)
    for name, t in llama.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_init_from_a_llama_retrofits_memory_layers_and_trains(tmp_path, capsys):
    src, llama = llama_dir(tmp_path)
    common = [*TINY[:1], "model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
              "model.max_seq_len=64", "model.multiple_of=64", "model.attention=causal", "data.seq_len=32",
              "data.batch_size=4", "data.facts.people=40", "steps=2", "log_every=1", "checkpoint.every=0",
              f"checkpoint.init_from={src}", "optim.warmup=1"]
    # dense: the first step's loss is the Llama's own on that batch
    train(load_config([*common, f"dump_dir={tmp_path / 'dense'}", "memory.layers=[]"]))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("init_from")]
    assert line == [f"init_from {src}: loaded 30 tensors"]
    first = json.loads((tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()[0])
    cfg = load_config([*common, f"dump_dir={tmp_path / 'probe'}", "memory.layers=[]"])
    from lingua_mem.data.loader import build_loader

    loader = build_loader(cfg.data, build_tokenizer(cfg.data.tokenizer), str(tmp_path / "probe"), 0, 1)
    b = next(iter(loader))
    with torch.no_grad():
        logits = llama(b["inputs"]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten()).item()
    assert first["loss"] == pytest.approx(expected, rel=1e-5)

    # two processes (FSDP2 over 2): each rank keeps its slice, the same first loss
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        argv = [*common, f"dump_dir={tmp_path / 'dense2'}", "memory.layers=[]", "distributed.dp_shard=2"]
        procs.append(subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    two = json.loads((tmp_path / "dense2" / "metrics.jsonl").read_text().splitlines()[0])
    losses = []
    for rank in range(2):  # each rank's first batch, scored by the Llama
        b = next(iter(build_loader(cfg.data, build_tokenizer(cfg.data.tokenizer), str(tmp_path / "probe2"),
                                   rank, 2)))
        with torch.no_grad():
            logits = llama(b["inputs"]).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten()).item())
    assert two["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)

    # memory at layer 1: the Llama's FFN there is skipped, the memory starts from init
    train(load_config([*common, f"dump_dir={tmp_path / 'memory'}", "memory.layers=[1]", "memory.n_keys=16",
                       "memory.heads=2", "memory.knn=4"]))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("init_from")]
    assert len(line) == 1
    assert line[0].startswith(f"init_from {src}: loaded 27 tensors; skipped 3 not in this model: "
                              "layers.1.feed_forward.w1.weight, layers.1.feed_forward.w2.weight, "
                              "layers.1.feed_forward.w3.weight; ")
    # the memory layer's 7 tensors and the value table
    assert "; 8 new, from init: layers.1.feed_forward.gate.bias, " in line[0]
    assert line[0].endswith("(8 in all)")

    # a Llama of another shape: one line naming the setting
    argv = [*common, f"dump_dir={tmp_path / 'bad'}", "memory.layers=[]", "model.dim=128"]
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(f"checkpoint.init_from: {src} has hidden_size=64, "
                                                         "this run's model.dim is 128")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sp")
    facts.generate_facts(root / "facts", people=200, seed=1)
    texts = [json.loads(x)["text"] for x in (root / "facts" / "train.jsonl").read_text().splitlines()]
    (root / "a.txt").write_text("\n".join(texts) + "\n")
    assert tokenizer_main(["train", "--input", str(root / "a.txt"), "--vocab-size", "400",
                           "--out", str(root / "tok.model")]) == 0
    return root / "tok.model"


def test_every_tokenizer_converts_to_the_same_ids(sentencepiece_model, tmp_path, capsys):
    capsys.readouterr()
    texts = [json.loads(x)["text"] for x in (sentencepiece_model.parent / "facts" / "val.jsonl").open()][:40]
    texts += ["\n\n  Two  spaces, 12345 \u2603 zebra\ttab", " leading", "trailing ", "<s> in text </s>",
              "<|begin_of_text|> too", "caf\u00e9 \U0001f642"]
    for cfg in ({"name": "bytes", "path": None}, {"name": "sentencepiece", "path": str(sentencepiece_model)},
                {"name": "tiktoken", "path": write_ranks(tmp_path / "ranks.tiktoken")}):
        tok = build_tokenizer(TokenizerConfig(**cfg))
        hf_tokenizer(tok, cfg).save_pretrained(str(tmp_path / cfg["name"]))
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / cfg["name"]))
        assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
        for text in texts:
            ids = tok.encode(text, add_eos=False)
            assert hf(text)["input_ids"] == ids, (cfg["name"], text)
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), (cfg["name"], text)


def test_lm_evals_stock_hf_model_runs_a_local_task_on_an_export(checkpoints, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    out = export_hf(checkpoints["1proc"], tmp_path / "export")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"q": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0},
            {"q": "Two plus two is", "choices": [" four", " five", " six"], "gold": 1}]
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny.yaml").write_text(
        "task: tiny_hf_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True",
                                      tasks=["tiny_hf_mc"], task_manager=TaskManager(include_path=str(tasks)),
                                      device="cpu", batch_size=2)
    acc = results["results"]["tiny_hf_mc"]["acc,none"]
    # the same choice lingua_mem's own scores make
    ours = load_model(checkpoints["1proc"], "cpu", TokenizerConfig(name="")).model
    right = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx, full = TOK.encode(d["q"], add_eos=False), TOK.encode(d["q"] + choice, add_eos=False)
            with torch.no_grad():
                logp = ours(torch.tensor([full[:-1]])).log_softmax(-1)[0]
            scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        right += max(range(len(scores)), key=scores.__getitem__) == d["gold"]
    assert acc == pytest.approx(right / len(docs))


PEAKS = """
import json, sys
from lingua_mem.checkpoint.__main__ import main
import lingua_mem.checkpoint.hf_export, transformers  # imported before the first measure


def status(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) * 1024


peaks = []
for argv in json.loads(sys.argv[1]):  # each command's peak above the memory it started from
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to VmRSS
    start = status("VmRSS")
    if argv[0] == "full-load":  # the control: DCP's own load holds the whole model
        from lingua_mem.checkpoint.consolidate import read_checkpoint
        read_checkpoint(argv[1])
    else:
        assert main(argv) == 0
    peaks.append(status("VmHWM") - start)
print(json.dumps(peaks))
"""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_consolidation_streams_in_bounded_memory(tmp_path):
    # value tables of 8 and 128 MiB (32x the 4 MB shard): the peak does not grow with the table
    tables, commands = {}, []
    for n_keys in (64, 256):
        memory = MemoryConfig(layers=[1], n_keys=n_keys, heads=2, knn=4, k_dim=32, v_dim=512)
        model = build_model(model_args(DENSE, memory), seed=0)
        tables[n_keys] = model.values.shared.weight.detach().clone()
        ckpt = save_training_checkpoint(model, tmp_path / f"ckpt{n_keys}", memory)
        del model
        for command in ("consolidate", "export-hf"):
            commands.append([command, str(ckpt), "--out", str(tmp_path / f"{command}{n_keys}"),
                             "--max-shard-size", "4MB"])
        commands.append(["full-load", str(ckpt)])
    proc = subprocess.run([sys.executable, "-c", PEAKS, json.dumps(commands)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    names = [(c[0], n) for n in (64, 256) for c in commands[:3]]
    peaks = dict(zip(names, json.loads(proc.stdout.splitlines()[-1]), strict=True))
    growth = (tables[256].numel() - tables[64].numel()) * 4  # 120 MiB more to write
    assert peaks["full-load", 256] - peaks["full-load", 64] > growth, peaks  # the measure sees a table
    for command in ("consolidate", "export-hf"):
        assert peaks[command, 256] - peaks[command, 64] < 0.1 * growth, peaks
    index = json.loads((tmp_path / "consolidate256" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["values.shared.weight"] != index["weight_map"]["tok_embeddings.weight"]
    from safetensors import safe_open

    table_file = tmp_path / "consolidate256" / index["weight_map"]["values.shared.weight"]
    with safe_open(str(table_file), framework="pt") as f:  # a shard of its own, 32x the limit
        assert torch.equal(f.get_tensor("values.shared.weight"), tables[256])


def test_bad_input_is_one_line_and_leaves_nothing_half_written(checkpoints, tmp_path, capsys):
    ckpt = checkpoints["1proc"]

    def cli(*argv: str) -> tuple[int, str, str]:  # the CLI in process (the public command: below)
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # the public command, once: one line on stderr, exit 2, nothing created
    argv = ["export-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    missing = subprocess.run([sys.executable, "-m", "lingua_mem.checkpoint", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert f"no such checkpoint {tmp_path / 'nope'}" in missing.stderr and not (tmp_path / "x").exists()

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("export-hf", str(ckpt), "--out", str(out))
    assert code == 2 and err == f"error: {out}: exists and is not empty (give --force to replace it)\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for bad, why in ((["--dtype", "fp8"], "--dtype: 'fp8' is not one of fp32, bf16"),
                     (["--max-shard-size", "lots"], "--max-shard-size: 'lots' is not a size")):
        code, _, err = cli("export-hf", str(ckpt), "--out", str(tmp_path / "y"), *bad)
        assert code == 2 and why in err and err.count("\n") == 1, err

    code, stdout, err = cli("export-hf", str(ckpt), "--out", str(out), "--force", "--dtype", "bf16")
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert stdout.startswith(f"wrote {out}: ")

    corrupt = tmp_path / "corrupt"  # a copy of the checkpoint with its shard cut short
    subprocess.run(["cp", "-r", str(ckpt), str(corrupt)], check=True)
    for shard in corrupt.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:4096])
    code, _, err = cli("export-hf", str(corrupt), "--out", str(tmp_path / "z"))
    assert code == 2 and err.count("\n") == 1 and "bytes, the manifest says" in err, err
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z.partial-*"))
    assert cli("export-hf", str(corrupt), "--out", str(out), "--force")[0] == 2
    assert (out / "config.json").is_file()  # the earlier export survives a failed --force
