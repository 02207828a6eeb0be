"""consolidate: a DCP checkpoint (one process or FSDP2-sharded over two) -> model.safetensors +
config.json, loaded back by load_consolidated into a model with the very same logits."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors import safe_open
from sealed import seal

from lingua_mem.checkpoint.__main__ import main
from lingua_mem.checkpoint.consolidate import consolidate, load_consolidated
from lingua_mem.config import (
    ConfigError,
    DistributedConfig,
    MemoryConfig,
    ModelConfig,
    TrainConfig,
    model_args,
)
from lingua_mem.eval.load import load_model
from lingua_mem.model.llama import build_model
from lingua_mem.parallel import init_distributed, parallelize

# DCP warns on every save without a process group that it assumes a single process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

MODEL = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=16)
MEMORY = MemoryConfig(layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=16, query_batchnorm=True)
ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.randint(0, MODEL.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))


def write_config(path, model=MODEL, memory=MEMORY) -> None:
    """config.yaml as a training run saves it: the whole TrainConfig; then the manifest."""
    OmegaConf.save(OmegaConf.structured(TrainConfig(model=model, memory=memory)), path / "config.yaml")
    seal(path)


def trained_model() -> torch.nn.Module:
    """A model moved off its init by two SGD steps (BatchNorm running stats updated too)."""
    model = build_model(model_args(MODEL, MEMORY), seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        logits = model(TOKENS[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_consolidate_round_trip_gives_the_same_logits(tmp_path):
    model = trained_model()
    ckpt = tmp_path / "checkpoints" / "0000000042"
    dcp.save({"model": model.state_dict(), "optim": {"lr": 0.5}}, checkpoint_id=str(ckpt))
    write_config(ckpt)

    assert consolidate(ckpt, tmp_path / "out") == tmp_path / "out"
    weights = tmp_path / "out" / "model.safetensors"  # one file: smaller than a shard
    with safe_open(str(weights), framework="pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())
        table = f.get_tensor("values.shared.weight")
    assert table.shape == (MEMORY.n_keys**2, MODEL.dim)
    assert torch.equal(table, model.values.shared.weight.detach())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "lingua_mem" and config["step"] == 42
    # the model's own arguments, every default resolved (v_dim = dim, the FFN width)
    assert config["model"]["n_kv_heads"] == 2 and config["model"]["memory"]["layers"] == [0, 2]
    assert config["model"]["memory"]["v_dim"] == MODEL.dim and config["model"]["ffn_hidden_dim"] == 256

    loaded = load_consolidated(tmp_path / "out")
    assert not loaded.training
    bn = loaded.layers[0].feed_forward.query_bn
    assert bn.num_batches_tracked.item() == 2  # persistent buffers travel too
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=0)

    # a config.json that does not describe a model names the key
    config_file = tmp_path / "out" / "config.json"
    for edit, key in ((lambda c: c["model"].pop("dim"), "model.dim: missing"),
                      (lambda c: c["model"]["memory"].update(colour=1),
                       "memory.colour: not a model argument"),
                      (lambda c: c["model"].update(n_kv_heads=3), "model.n_kv_heads: 3 does not divide")):
        bad = json.loads(json.dumps(config))
        edit(bad)
        config_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(f"{config_file}: {key}")):
            load_consolidated(tmp_path / "out")
    config_file.write_text(json.dumps({"format": "lingua_mem", "model": {"dim": 32}, "memory": {}}))
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: an export of an older lingua_mem")):
        load_consolidated(tmp_path / "out")


def test_cli_prints_one_line_and_returns_0(tmp_path, capsys):
    model = build_model(model_args(MODEL, MEMORY), seed=0)
    ckpt = tmp_path / "ckpt"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    write_config(ckpt)
    assert main(["consolidate", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    n = len(model.state_dict())
    assert len(out) == 1
    assert out[0].startswith(f"wrote {tmp_path / 'out'}: {n} tensors in 1 safetensors file (")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["step"] is None  # not a <step> dir


def test_public_command_consolidates(tmp_path):
    ckpt = tmp_path / "checkpoints" / "0000000007"
    dcp.save({"model": build_model(model_args(MODEL, MEMORY)).state_dict()}, checkpoint_id=str(ckpt))
    write_config(ckpt)
    cmd = ["-m", "lingua_mem.checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'o'}: ")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["step"] == 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_sharded(rank, world, port, path):
    """Each rank builds the model sharded on meta (FSDP2, dp_shard=2), initialises its shards
    with seed 7, and DCP-saves its part of {"model": ...}."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = DistributedConfig(dp_shard=2)
    meshes = init_distributed(cfg, "cpu")
    model = build_model(model_args(MODEL, MEMORY), "meta")
    parallelize(model, meshes, cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=7)
    sd = model.state_dict()
    assert type(sd["values.shared.weight"]).__name__ == "DTensor"  # really sharded
    dcp.save({"model": sd}, checkpoint_id=path)
    dist.barrier()
    dist.destroy_process_group()


def test_consolidate_a_checkpoint_saved_by_two_fsdp_ranks(tmp_path):
    ckpt = tmp_path / "0000000100"
    mp.start_processes(save_sharded, args=(2, free_port(), str(ckpt)), nprocs=2, start_method="spawn",
                       join=True)
    assert len(list(ckpt.glob("*.distcp"))) == 2
    write_config(ckpt)
    consolidate(ckpt, tmp_path / "out")
    loaded = load_consolidated(tmp_path / "out")
    reference = build_model(model_args(MODEL, MEMORY), seed=7).eval()  # the same init, never sharded
    for name, t in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), reference(TOKENS), rtol=0, atol=0)


def test_errors_name_the_path_or_key(tmp_path):
    missing = tmp_path / "nope"
    (tmp_path / "0000000100").mkdir()  # the checkpoints beside it are listed
    (tmp_path / "0000000200").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"no such checkpoint {missing}; {tmp_path} has "
                                                   "0000000100, 0000000200")):
        consolidate(missing, tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(f"no such checkpoint {tmp_path / 'x' / 'y'}")):
        consolidate(tmp_path / "x" / "y", tmp_path / "out")
    for name in ("0000000100", "0000000200"):
        (tmp_path / name).rmdir()
    with pytest.raises(ValueError, match=re.escape(f"no such checkpoint {missing}") + "$"):
        consolidate(missing, tmp_path / "out")

    ckpt = tmp_path / "ckpt"
    dcp.save({"model": build_model(model_args(MODEL, MEMORY)).state_dict()}, checkpoint_id=str(ckpt))
    with pytest.raises(ValueError, match=re.escape(f"{ckpt}: no manifest.json (a save that never finished")):
        consolidate(ckpt, tmp_path / "out")
    seal(ckpt)
    with pytest.raises(ValueError, match=re.escape(f"{ckpt / 'config.yaml'}: missing")):
        consolidate(ckpt, tmp_path / "out")

    write_config(ckpt, memory=MemoryConfig(**{**vars(MEMORY), "n_keys": 4}))
    with pytest.raises(ValueError, match=r"parameter layers\.0\.feed_forward\.keys has shape "
                                         r"\(2, 2, 8, 8\) in the checkpoint and \(2, 2, 4, 8\) in this "):
        consolidate(ckpt, tmp_path / "out")

    write_config(ckpt, model=ModelConfig(**{**vars(MODEL), "tie_embeddings": True}))
    with pytest.raises(ValueError, match=r"parameter output\.weight is in the checkpoint but not in this "):
        consolidate(ckpt, tmp_path / "out")

    write_config(ckpt, memory=MemoryConfig(**{**vars(MEMORY), "layers": [0, 1, 2]}))
    with pytest.raises(ValueError, match=r"parameter layers\.1\.feed_forward\.\w+ of this model is not "
                                         "in the checkpoint"):
        consolidate(ckpt, tmp_path / "out")

    OmegaConf.save(OmegaConf.create({"model": {"dim": "big"}}), ckpt / "config.yaml")
    seal(ckpt)
    with pytest.raises(ConfigError, match=re.escape(f"{ckpt / 'config.yaml'}: model.dim: ") + ".*'big'"):
        consolidate(ckpt, tmp_path / "out")

    (ckpt / ".metadata").write_bytes(b"garbage")
    write_config(ckpt)
    with pytest.raises(ValueError, match=re.escape(f"{ckpt / '.metadata'}: unreadable")):
        consolidate(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on any error

    ckpt = tmp_path / "ckpt2"  # a good checkpoint, but the output path is a file
    dcp.save({"model": build_model(model_args(MODEL, MEMORY)).state_dict()}, checkpoint_id=str(ckpt))
    write_config(ckpt)
    (tmp_path / "file").write_text("")
    shard = next(ckpt.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: the metadata reads, the tensors do not
    with pytest.raises(ValueError, match=re.escape(f"{shard}: {len(data) // 2} bytes, the manifest says "
                                                   f"{len(data)} (truncated?)")):
        consolidate(ckpt, tmp_path / "out")
    seal(ckpt)  # a manifest that agrees with the truncated file: DCP's read names it
    with pytest.raises(ValueError, match=re.escape(f"{ckpt}: ") + r"[\w.]+ unreadable \("):
        consolidate(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not list(tmp_path.glob(".out.partial-*"))
    shard.write_bytes(data)
    seal(ckpt)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'file'}: cannot write")):
        consolidate(ckpt, tmp_path / "file")

    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'out' / 'config.json'}: missing")):
        load_consolidated(tmp_path / "out")


def test_cli_error_is_one_line_on_stderr(tmp_path, capsys):
    missing = tmp_path / "nope"
    for argv in (["consolidate", str(missing), "--out", str(tmp_path / "out")],
                 ["consolidate", str(missing)],  # no --out
                 ["export", str(missing), "--out", "x"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert captured.out == ""
    assert main(["consolidate", str(missing), "--out", "x"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_every_reader_refuses_a_corrupt_or_set_aside_checkpoint_in_one_line(tmp_path, capsys):
    model = trained_model()
    ckpt = tmp_path / "checkpoints" / "0000000042"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    write_config(ckpt)
    data = next(ckpt.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: same size, another CRC
    data.write_bytes(bytes(raw))
    aside = ckpt.with_name("0000000042.corrupt")
    shutil.copytree(ckpt, aside)
    seal(aside)  # its manifest agrees with its files: set aside all the same
    corrupt = f"{data}: CRC32 mismatch (corrupt)"
    set_aside = f"{aside}: set aside by training as corrupt (it failed to load); not read"
    for path, message in ((ckpt, corrupt), (aside, set_aside)):
        for command in (["consolidate", str(path), "--out", str(tmp_path / "out")],
                        ["export-hf", str(path), "--out", str(tmp_path / "hf")]):
            assert main(command) == 2
            assert capsys.readouterr().err.strip().endswith(message)
        with pytest.raises(ConfigError, match=re.escape(f"ckpt: {message}")):
            load_model(path, "cpu")
        assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


def test_no_output_destroys_what_it_reads_or_a_live_run_and_killed_partials_are_removed(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "0000000042"
    dcp.save({"model": trained_model().state_dict()}, checkpoint_id=str(ckpt))
    write_config(ckpt)
    other = tmp_path / "live"  # a run training now: its lock
    (other / "checkpoints").mkdir(parents=True)
    (other / "run.lock").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [(ckpt, "is", ckpt), (run, "contains", ckpt), (tmp_path, "contains", ckpt),
             (ckpt / "out", "lies inside", ckpt),
             (run / "checkpoints" / "0000000040", "lies inside", ckpt.parent),
             (other, "is", other), (other / "checkpoints" / "x", "lies inside", other / "checkpoints")]
    for out, where, what in cases:
        for command in ("consolidate", "export-hf"):
            assert main([command, str(ckpt), "--out", str(out), "--force"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"--out {out}: {where} {what}, " in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing touched
    # a folder of its own in the run's dump dir is fine (training never touches it)
    assert main(["consolidate", str(ckpt), "--out", str(run / "exports" / "c")]) == 0
    # a consolidation killed mid-write left its staging folder: the next run removes it; one
    # of a process still writing is left alone
    gone = subprocess.Popen(["true"])
    gone.wait()
    writing = subprocess.Popen(["sleep", "60"])
    try:
        left, busy = tmp_path / f".out.partial-{gone.pid}", tmp_path / f".out.partial-{writing.pid}"
        (left / "half").mkdir(parents=True)
        (busy / "half").mkdir(parents=True)
        assert main(["consolidate", str(ckpt), "--out", str(tmp_path / "out")]) == 0
        assert not left.exists() and busy.exists() and (tmp_path / "out" / "config.json").is_file()
    finally:
        writing.kill()


def test_an_export_whose_step_is_not_a_step_number_is_refused(tmp_path, capsys):
    # the step names eval's output file (evals/<step>.json): a path there would leave its folder
    ckpt = tmp_path / "checkpoints" / "0000000042"
    dcp.save({"model": trained_model().state_dict()}, checkpoint_id=str(ckpt))
    write_config(ckpt)
    assert main(["consolidate", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    config = tmp_path / "out" / "config.json"
    meta = json.loads(config.read_text())
    assert meta["step"] == 42
    for step in ("../../../x/y", -1, 1.5, True):
        config.write_text(json.dumps({**meta, "step": step}))
        with pytest.raises(ConfigError, match=r'^ckpt: .*config.json: "step" is .*, not a step number$'):
            load_model(tmp_path / "out", "cpu")
