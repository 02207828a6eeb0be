"""Checkpoints on disk: retention, the manifest, fallback past corrupt checkpoints (bit-exact
resume from the previous one), half-written .tmp directories, model/checkpoint shape mismatches
(exit 2, nothing written), init_from (a memory retrofit of a dense checkpoint on 1 and 2 processes,
setting and shape mismatches), checkpoint config errors, and a resume at the last step."""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_parallel import free_port
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lingua_mem.checkpoint.checkpointer import MANIFEST, complete_checkpoints, verify
from lingua_mem.config import ConfigError, load_config, model_args
from lingua_mem.model.llama import build_model
from lingua_mem.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# a small Memory+ model (one memory layer) on short batches: a step takes milliseconds
SMALL = ["config=configs/debug.yaml", "model.dim=64", "model.n_layers=2", "model.max_seq_len=64",
         "memory.layers=[1]", "memory.n_keys=16", "memory.heads=2", "memory.knn=4", "memory.k_dim=32",
         "data.batch_size=2", "data.seq_len=64", "data.facts.people=50", "optim.warmup=2", "log_every=1"]
# lr and value_lr must be positive (config validation); at 1e-300 the AdamW step (lr * m / sqrt(v))
# and the decoupled weight decay (p *= 1 - lr * wd) round to nothing in fp32: weights stay bit-equal
FROZEN = ["optim.lr=1e-300", "optim.value_lr=1e-300"]


def cli_args(dump_dir: Path, *overrides: str) -> list[str]:
    return [*SMALL, f"dump_dir={dump_dir}", *overrides]


def run_inproc(dump_dir: Path, *overrides: str) -> dict:
    return train(load_config(cli_args(dump_dir, *overrides)))


def run_cli(dump_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *cli_args(dump_dir, *overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def run_2proc(dump_dir: Path, *overrides: str) -> list[tuple[int, str, str]]:
    """train.py on 2 CPU processes (gloo), started as torchrun starts them; (rc, stdout, stderr) each."""
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "train.py", *cli_args(dump_dir, *overrides)], cwd=ROOT,
                                      env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def rows(dump_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (dump_dir / "metrics.jsonl").read_text().splitlines()]


def ckpts(dump_dir: Path) -> list[str]:
    return sorted(p.name for p in (dump_dir / "checkpoints").iterdir())


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A ConfigError exit: status 2 and exactly one line, `error: ...`, on stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def model_state(ckpt: Path, tmp_path: Path) -> dict:
    """A checkpoint's {"model", "optim"}, read back through DCP's own converter."""
    out = tmp_path / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)


def init_from_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("init_from ")]


def assert_nothing_written(dump_dir: Path) -> None:
    assert not any((dump_dir / name).exists() for name in ("metrics.jsonl", "config.yaml", "checkpoints"))


def first_shape_difference(a: list[str], b: list[str]) -> tuple[str, tuple, tuple]:
    """(name, shape in a, shape in b) of the first parameter, in model order, whose shape differs."""
    sa = build_model(model_args(load_config(a).model, load_config(a).memory), "meta").state_dict()
    sb = build_model(model_args(load_config(b).model, load_config(b).memory), "meta").state_dict()
    return next((k, tuple(sa[k].shape), tuple(sb[k].shape)) for k in sa if sa[k].shape != sb[k].shape)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_keeps_the_newest_and_every_kth_with_complete_manifests(tmp_path, async_save):
    run_inproc(tmp_path, "steps=10", "checkpoint.every=2", "checkpoint.keep_last=2",
               "checkpoint.keep_every=3", f"checkpoint.async_save={str(async_save).lower()}")
    # saved 2, 4, 6, 8, 10: the newest two, and 6 (a multiple of 3); no .tmp left behind
    assert ckpts(tmp_path) == ["0000000006", "0000000008", "0000000010"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ckpts(tmp_path)
    for name in ckpts(tmp_path):
        path = tmp_path / "checkpoints" / name
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["step"] == int(name)
        on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
        assert on_disk == {".metadata", "__0_0.distcp", "train_state_00000.pt", "config.yaml", "meta.json"}
        assert set(manifest["files"]) == on_disk
        for fname, entry in manifest["files"].items():
            data = (path / fname).read_bytes()
            assert entry["size"] == len(data) > 0, fname
            assert entry["crc32"] == zlib.crc32(data), fname
        assert json.loads((path / "meta.json").read_text())["step"] == int(name)
        assert torch.load(path / "train_state_00000.pt", weights_only=False)["step"] == int(name)
        verify(path)  # raises on any mismatch


def test_corrupt_checkpoints_are_set_aside_and_resume_is_bit_exact_from_the_previous(tmp_path):
    run = ("steps=12", "checkpoint.every=4", "checkpoint.keep_last=3")
    first = run_cli(tmp_path, *run)
    assert first.returncode == 0, first.stderr[-3000:]
    want = rows(tmp_path)
    assert [r["step"] for r in want] == list(range(1, 13))
    assert ckpts(tmp_path) == ["0000000004", "0000000008", "0000000012"]

    root = tmp_path / "checkpoints"
    cut = root / "0000000012" / "__0_0.distcp"
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])  # truncated
    flipped = root / "0000000008" / "__0_0.distcp"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the CRC can tell
    flipped.write_bytes(bytes(data))
    truncated_size = len(cut.read_bytes())

    again = run_cli(tmp_path, *run)
    assert again.returncode == 0, again.stderr[-3000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: checkpoint ")]
    assert len(errors) == 2, again.stderr
    assert str(cut) in errors[0] and "truncated" in errors[0] and "0000000012.corrupt" in errors[0]
    assert str(flipped) in errors[1] and "CRC32" in errors[1] and "0000000008.corrupt" in errors[1]
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resumed from ")]
    assert resumed == [f"resumed from {root / '0000000004'} (512 tokens trained)"]  # 4 steps of 2 x 64
    # set aside as they were; 8 and 12 written again by the resumed run
    assert ckpts(tmp_path) == ["0000000004", "0000000008", "0000000008.corrupt", "0000000012",
                               "0000000012.corrupt"]
    assert (root / "0000000012.corrupt" / "__0_0.distcp").stat().st_size == truncated_size
    assert (root / "0000000008.corrupt" / "__0_0.distcp").read_bytes() == bytes(data)
    for name in ("0000000008", "0000000012"):
        verify(root / name)
    got = rows(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 13))  # 5..12 logged again, once
    for g, w in zip(got, want, strict=True):
        assert (g["step"], g["loss"], g["grad_norm"], g["value_grad_norm"], g["lr"]) == \
            (w["step"], w["loss"], w["grad_norm"], w["value_grad_norm"], w["lr"])


def test_a_step_found_corrupt_twice_is_set_aside_twice(tmp_path, capsys):
    run = ("steps=8", "checkpoint.every=4")
    run_inproc(tmp_path, *run)
    want = rows(tmp_path)
    root = tmp_path / "checkpoints"
    for _ in range(2):  # flaky storage: the rewritten checkpoint 8 goes bad again
        bad = root / "0000000008" / "__0_0.distcp"
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
        capsys.readouterr()
        run_inproc(tmp_path, *run)
        out, err = capsys.readouterr()
        assert f"resumed from {root / '0000000004'}" in out
        assert str(bad) in err and "CRC32" in err
        assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows(tmp_path)] == \
            [(r["step"], r["loss"], r["grad_norm"]) for r in want]
    set_aside = [n for n in ckpts(tmp_path) if n.startswith("0000000008.")]
    assert len(set_aside) == 2 and all("corrupt" in n for n in set_aside)
    assert "0000000008" in ckpts(tmp_path)


def test_when_no_checkpoint_loads_the_run_stops_and_writes_nothing(tmp_path):
    run_inproc(tmp_path, "steps=2", "checkpoint.every=2")
    metrics_before = (tmp_path / "metrics.jsonl").read_bytes()
    bad = tmp_path / "checkpoints" / "0000000002" / "train_state_00000.pt"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ConfigError, match=r"^checkpoint: no checkpoint in .* can be loaded"):
        run_inproc(tmp_path, "steps=2", "checkpoint.every=2")
    assert ckpts(tmp_path) == ["0000000002.corrupt"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics_before
    with pytest.raises(ConfigError, match=r"remove them, or use another dump_dir"):  # the rerun too
        run_inproc(tmp_path, "steps=2", "checkpoint.every=2")
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics_before


def test_a_tmp_directory_is_never_loaded(tmp_path, capsys):
    run_inproc(tmp_path, "steps=4", "checkpoint.every=2")
    want = rows(tmp_path)
    root = tmp_path / "checkpoints"
    # a save killed half-way, newer than any complete checkpoint, with a plausible manifest
    junk = root / "0000000099.tmp"
    junk.mkdir()
    for name in (".metadata", "__0_0.distcp", "train_state_00000.pt", "meta.json"):
        (junk / name).write_bytes(b"junk")
    (junk / MANIFEST).write_text(json.dumps({"step": 99, "files": {}}))
    # and a step directory with no manifest, older than the newest complete one
    (root / "0000000003").mkdir()
    (root / "0000000003" / "__0_0.distcp").write_bytes(b"junk")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["0000000002", "0000000004"]
    capsys.readouterr()

    last = run_inproc(tmp_path, "steps=6", "checkpoint.every=2")
    out, err = capsys.readouterr()
    assert f"resumed from {root / '0000000004'}" in out
    assert "error: checkpoint" not in err  # nothing was tried and set aside
    assert last["step"] == 6
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 7))
    assert rows(tmp_path)[:4] == want
    assert (junk / "__0_0.distcp").read_bytes() == b"junk"  # untouched
    assert "0000000006" in ckpts(tmp_path) and "0000000099.tmp" in ckpts(tmp_path)
    assert not any(name.endswith(".corrupt") for name in ckpts(tmp_path))


@pytest.mark.parametrize("lost", [["0000000004"], ["0000000002", "0000000004"]])
def test_a_checkpoint_that_lost_its_manifest_stops_the_run_and_loses_nothing(tmp_path, lost):
    run_inproc(tmp_path, "steps=4", "checkpoint.every=2")
    for name in lost:
        (tmp_path / "checkpoints" / name / MANIFEST).unlink()
    before = snapshot(tmp_path)
    line = one_error_line(run_cli(tmp_path, "steps=6", "checkpoint.every=2"))
    root = tmp_path / "checkpoints"
    fallback = f"from {root / '0000000002'}" if len(lost) == 1 else "from scratch"
    assert line.startswith(f"error: checkpoint: {root / '0000000004'} has no {MANIFEST}, so it cannot be "
                           f"verified and is not loaded; to resume {fallback}")
    assert snapshot(tmp_path) == before  # metrics.jsonl and every folder as they were

    # moved aside as the message says: the run resumes from what is left
    (root / "0000000004").rename(tmp_path / "set-aside")
    if len(lost) == 1:
        assert run_inproc(tmp_path, "steps=6", "checkpoint.every=2")["step"] == 6
        assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def limit_file_size(limit: int):
    """A child's write past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_keeps_the_previous_checkpoint_and_the_same_command_resumes(tmp_path, async_save):
    args = ["checkpoint.every=2", f"checkpoint.async_save={str(async_save).lower()}"]
    assert run_cli(tmp_path, "steps=2", *args).returncode == 0
    root = tmp_path / "checkpoints"
    before = snapshot(root)
    # the checkpoint's shard file is about 2 MB: with a 1 MB limit every save fails
    proc = subprocess.run([sys.executable, "train.py", *cli_args(tmp_path, "steps=4", *args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(1 << 20))
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    # the reason: the OS's, or (a short write inside torch.save) its line and the free space
    assert lines[0].startswith(f"error: checkpoint: cannot write step 4 to {root / '0000000004.tmp'}: ")
    assert "File too large" in lines[0] or "GiB free there" in lines[0]
    assert lines[0].endswith(f"; the partial save is removed and {root / '0000000002'} is intact; free space "
                             "(or fix the path) and run the same command again to resume")
    assert ckpts(tmp_path) == ["0000000002"] and snapshot(root) == before

    last = run_inproc(tmp_path, "steps=4", *args)  # space again: the same command resumes
    assert last["step"] == 4 and ckpts(tmp_path) == ["0000000002", "0000000004"]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]


def test_a_model_of_another_shape_stops_before_writing_anything(tmp_path):
    run_inproc(tmp_path, "steps=2", "checkpoint.every=2")
    before = snapshot(tmp_path)
    assert {"metrics.jsonl", "config.yaml", "checkpoints/0000000002/__0_0.distcp"} <= set(before)
    other = ("model.dim=128",)
    load_config(cli_args(tmp_path, *other))  # a valid config: the mismatch is with the checkpoint
    name, saved, mine = first_shape_difference(cli_args(tmp_path), cli_args(tmp_path, *other))
    assert name == "tok_embeddings.weight" and saved == (258, 64) and mine == (258, 128)

    line = one_error_line(run_cli(tmp_path, "steps=2", "checkpoint.every=2", *other))
    assert f"parameter {name} " in line and str(saved) in line and str(mine) in line
    assert str(tmp_path / "checkpoints" / "0000000002") in line
    assert snapshot(tmp_path) == before  # metrics.jsonl, config.yaml, checkpoints: byte for byte
    assert ckpts(tmp_path) == ["0000000002"]  # not set aside as corrupt


def test_init_from_starts_from_the_weights_only(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run_inproc(a, "steps=4", "checkpoint.every=2")
    source = a / "checkpoints" / "0000000004"
    capsys.readouterr()
    run_inproc(b, f"checkpoint.init_from={source}", *FROZEN, "steps=1", "checkpoint.every=1")
    out = capsys.readouterr().out
    assert f"started from the weights of {source}" in out
    assert ckpts(b) == ["0000000001"]

    a2 = model_state(a / "checkpoints" / "0000000002", tmp_path)
    a4 = model_state(source, tmp_path)
    b1 = model_state(b / "checkpoints" / "0000000001", tmp_path)
    assert init_from_lines(out) == [f"init_from {source}: loaded {len(a4['model'])} tensors"]  # no more
    assert set(b1["model"]) == set(a4["model"])
    for k, v in a4["model"].items():
        assert torch.equal(b1["model"][k], v), k
    # steps 3-4 changed the weights (so B did not merely start from the same seed's init)
    changed = [k for k, v in a4["model"].items() if not torch.equal(a2["model"][k], v)]
    assert "tok_embeddings.weight" in changed and "values.shared.weight" in changed
    # the optimizer and schedule start afresh: one AdamW step, warm-up lr of step 1
    assert {float(s["step"]) for s in a4["optim"]["state"].values()} == {4.0}
    assert {float(s["step"]) for s in b1["optim"]["state"].values()} == {1.0}
    assert rows(b)[0]["step"] == 1 and rows(b)[0]["lr"] == pytest.approx(1e-300 / 2)

    # a path with no checkpoint: a config error, before anything is built or written
    line = one_error_line(run_cli(tmp_path / "c", f"checkpoint.init_from={tmp_path / 'nope'}"))
    assert line.startswith("error: checkpoint.init_from: ") and str(tmp_path / "nope") in line
    assert not (tmp_path / "c").exists()
    # a checkpoint of another model: the first setting that differs and both values, nothing logged
    d = tmp_path / "d"
    line = one_error_line(run_cli(d, f"checkpoint.init_from={source}", "model.dim=32", "steps=1"))
    assert line == f"error: checkpoint.init_from: {source} has model.dim=64, this run's model.dim is 32"
    assert_nothing_written(d)
    # the same settings, a memory of another size: the first tensor that differs and both shapes
    other = ("memory.n_keys=8",)
    name, saved, mine = first_shape_difference(cli_args(a), cli_args(a, *other))
    with pytest.raises(ConfigError) as err:
        run_inproc(tmp_path / "e", f"checkpoint.init_from={source}", *other, "steps=1")
    assert str(err.value) == (f"checkpoint.init_from: {source}: parameter {name} has shape {saved} in the "
                              f"checkpoint and {mine} in this model")
    assert_nothing_written(tmp_path / "e")


def test_init_from_a_dense_checkpoint_retrofits_memory_on_1_and_2_processes(tmp_path, capsys):
    dense = tmp_path / "dense"
    run_inproc(dense, "memory.layers=[]", "steps=2", "checkpoint.every=2")  # SMALL, less its memory
    source = dense / "checkpoints" / "0000000002"
    step1 = (*FROZEN, "steps=1", "checkpoint.every=1")  # the weights as they were loaded (or initialised)
    run_inproc(tmp_path / "fresh", *step1)  # the memory config from its own init, the same seed
    capsys.readouterr()
    run_inproc(tmp_path / "one", f"checkpoint.init_from={source}", *step1)
    line = init_from_lines(capsys.readouterr().out)

    src = model_state(source, tmp_path)["model"]
    fresh = model_state(tmp_path / "fresh" / "checkpoints" / "0000000001", tmp_path)["model"]
    one = model_state(tmp_path / "one" / "checkpoints" / "0000000001", tmp_path)["model"]
    ffn = sorted(set(src) - set(fresh))
    memory = sorted(set(fresh) - set(src))  # the memory layer's tensors and the value table
    shared = sorted(set(src) & set(fresh))
    assert ffn == [f"layers.1.feed_forward.w{i}.weight" for i in (1, 2, 3)]
    assert len(memory) == 8 and "values.shared.weight" in memory
    assert line == [f"init_from {source}: loaded {len(shared)} tensors; skipped 3 not in this model: "
                    f"{', '.join(ffn)}; 8 new, from init: {', '.join(memory[:4])}, ... (8 in all)"]
    assert set(one) == set(fresh)
    for k in shared:  # the dense checkpoint's, bit for bit (not this config's init: they differ)
        assert torch.equal(one[k], src[k]) and not torch.equal(one[k], fresh[k]), k
    for k in memory:
        assert torch.equal(one[k], fresh[k]), k

    # 2 processes, dense weights sharded (FSDP2) and the value table split (memory parallel):
    # the same weights loaded, the same line printed once
    results = run_2proc(tmp_path / "two", f"checkpoint.init_from={source}", *step1,
                        "distributed.memory_parallel_size=2")
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert init_from_lines(results[0][1]) == line and init_from_lines(results[1][1]) == []
    two = model_state(tmp_path / "two" / "checkpoints" / "0000000001", tmp_path)["model"]
    assert set(two) == set(one)
    for k, v in one.items():
        assert torch.equal(two[k], v), k

    # a setting the shapes do not show: named with both values, nothing written
    with pytest.raises(ConfigError) as err:
        run_inproc(tmp_path / "theta", f"checkpoint.init_from={source}", "model.rope_theta=500000")
    assert str(err.value) == (f"checkpoint.init_from: {source} has model.rope_theta=10000.0, this run's "
                              "model.rope_theta is 500000.0")
    assert_nothing_written(tmp_path / "theta")


def test_init_from_a_corrupt_checkpoint_is_a_config_error(tmp_path):
    a = tmp_path / "a"
    run_inproc(a, "steps=2", "checkpoint.every=2")
    source = a / "checkpoints" / "0000000002"
    bad = source / "__0_0.distcp"
    bad.write_bytes(bad.read_bytes()[:-1])
    line = one_error_line(run_cli(tmp_path / "b", f"checkpoint.init_from={source}", "steps=1"))
    assert line.startswith("error: checkpoint.init_from: ") and str(bad) in line
    assert ckpts(a) == ["0000000002"]  # another run's checkpoint is never renamed
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,key", [
    ("checkpoint.every=-1", "checkpoint.every"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("checkpoint.keep_every=-2", "checkpoint.keep_every"),
    ("checkpoint.preempt_signals=[SIGUSR1,SIGFOO]", "checkpoint.preempt_signals"),
])
def test_bad_checkpoint_config_exits_2_naming_the_key(tmp_path, override, key):
    line = one_error_line(run_cli(tmp_path / "run", override))
    assert line.startswith(f"error: {key}: "), line
    if "SIGFOO" in override:
        assert "SIGFOO" in line
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_trains_nothing(tmp_path, capsys):
    first = run_inproc(tmp_path, "steps=4", "checkpoint.every=2")
    assert first["step"] == 4
    before = snapshot(tmp_path)
    metrics_before = (tmp_path / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    last = run_inproc(tmp_path, "steps=4", "checkpoint.every=2")
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'checkpoints' / '0000000004'}" in out
    assert not [line for line in out.splitlines() if line.startswith("step ")]  # no step was logged
    assert last == {}
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics_before
    assert snapshot(tmp_path) == before  # no checkpoint written again


def test_an_async_save_holds_the_weights_of_its_step_once_staged_whatever_follows(tmp_path):
    # the trainer waits for staged() after the next step's backward, before its update: the copy
    # runs beside that forward and backward, and the weights may change as soon as it returns
    from lingua_mem.checkpoint.checkpointer import Checkpointer
    from lingua_mem.config import CheckpointConfig, DistributedConfig
    from lingua_mem.parallel import init_distributed, parallelize

    cfg = load_config(SMALL)
    meshes = init_distributed(DistributedConfig(), "cpu")
    try:
        model = build_model(model_args(cfg.model, cfg.memory), seed=1)
        model = parallelize(model, meshes, DistributedConfig())
        optimizer = torch.optim.AdamW(model.parameters())
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        asynchronous = CheckpointConfig(every=1, async_save=True)
        checkpointer = Checkpointer(asynchronous, tmp_path, model, optimizer, None)
        checkpointer.save(1)
        assert checkpointer.staging is not None and checkpointer.pending[1] is not None  # in the background
        checkpointer.staged()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the next update
        checkpointer.close()
        saved = model_state(tmp_path / "checkpoints" / "0000000001", tmp_path)["model"]
        for name, value in before.items():
            assert torch.equal(saved[name], value), name
    finally:
        meshes.close()


def test_tokens_and_flops_add_up_across_a_resume_with_another_batch(tmp_path):
    first = run_cli(tmp_path, "steps=4", "checkpoint.every=2")  # 2 x 64 tokens a step
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(tmp_path, "steps=6", "checkpoint.every=2", "data.batch_size=4")  # 4 x 64
    assert second.returncode == 0, second.stderr[-2000:]
    said = second.stdout + second.stderr
    assert "resumed from" in said and "(512 tokens trained)" in said
    assert ("warning: the global batch changed on resume: 128 tokens a step before, 256 now (processes x "
            "grad_accum x batch_size x seq_len); the token count goes on from 512") in said
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    train_rows = {r["step"]: r for r in rows if "loss" in r and not r.get("eval")}
    assert [train_rows[s]["tokens"] for s in range(1, 7)] == [128, 256, 384, 512, 768, 1024]
    per_token = train_rows[6]["flops_per_token"]
    assert train_rows[6]["flops"] == pytest.approx(1024 * per_token)
    done = [line for line in second.stdout.splitlines() if line.startswith("done:")]
    assert done and "1,024 tokens" in done[0]  # not 6 x 256 = 1,536
    # the same batch again: no warning
    third = run_cli(tmp_path, "steps=8", "checkpoint.every=2", "data.batch_size=4")
    assert third.returncode == 0 and "global batch changed" not in third.stdout + third.stderr


def test_a_rerun_never_rewrites_the_runs_config_but_records_a_new_version(tmp_path):
    assert run_cli(tmp_path, "steps=4", "checkpoint.every=2").returncode == 0
    first = (tmp_path / "config.yaml").read_bytes()
    same = run_cli(tmp_path, "steps=4", "checkpoint.every=2")  # nothing to train, nothing changed
    assert same.returncode == 0 and "config: this run changes" not in same.stdout
    smaller = run_cli(tmp_path, "steps=2", "checkpoint.every=2")  # a smaller steps than the checkpoint's
    assert smaller.returncode == 0
    assert "config: this run changes steps from config.yaml; recorded as config.2.yaml" in smaller.stdout
    assert (tmp_path / "config.yaml").read_bytes() == first
    assert OmegaConf.load(tmp_path / "config.2.yaml").steps == 2
    again = run_cli(tmp_path, "steps=6", "checkpoint.every=2", "optim.lr=1e-4")
    assert again.returncode == 0
    assert ("config: this run changes optim.lr, steps from config.2.yaml; recorded as config.3.yaml"
            in again.stdout)
    assert (tmp_path / "config.yaml").read_bytes() == first


def test_a_resume_trains_with_the_learning_rates_and_schedule_its_config_gives(tmp_path):
    # after a loss spike the usual move: resume at a lower lr (and another warmup); from the
    # first resumed step the run logs the rates a fresh run of that config logs at that step
    new = ("optim.lr=1e-4", "optim.value_lr=2e-4", "optim.warmup=3", "optim.weight_decay=0.05")
    run_inproc(tmp_path / "resumed", "steps=2", "checkpoint.every=2")
    run_inproc(tmp_path / "resumed", "steps=4", "checkpoint.every=2", *new)
    run_inproc(tmp_path / "fresh", "steps=4", "checkpoint.every=0", *new)
    resumed, fresh = rows(tmp_path / "resumed"), rows(tmp_path / "fresh")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed[2:], fresh[2:], strict=True):
        assert (got["lr"], got["value_lr"]) == (want["lr"], want["value_lr"])
    assert resumed[2]["lr"] < resumed[1]["lr"] / 10  # not the checkpoint's 3e-3 schedule
    # the checkpoint the resumed run wrote holds its own config's rates
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "0000000004" / "train_state_00000.pt",
                       weights_only=True)
    assert state["scheduler"]["base_lrs"] == [1e-4, 1e-4, 2e-4]


def test_a_resume_with_another_value_optimizer_carries_its_state_or_is_refused(tmp_path, monkeypatch):
    run_inproc(tmp_path, "steps=2", "checkpoint.every=2", "optim.value_optimizer=adamw")
    with pytest.raises(ConfigError, match=r"^optim.value_optimizer: adagrad cannot take the state of adamw, "
                                          r"which trained checkpoint .*0000000002; resume with "
                                          r"optim.value_optimizer=adamw"):
        run_inproc(tmp_path, "steps=4", "checkpoint.every=2", "optim.value_optimizer=adagrad")
    assert ckpts(tmp_path) == ["0000000002"]
    # past that check, DCP's load fails on the other state: still a settings error, the
    # checkpoint verifies and is not set aside as corrupt
    from lingua_mem.checkpoint.checkpointer import Checkpointer

    monkeypatch.setattr(Checkpointer, "_check_value_optimizer", lambda self, path: None)
    with pytest.raises(ConfigError, match=r"^checkpoint: .*DCP load failed .*; it verifies \(sizes, CRC32\), "
                                          r"so a setting of this run differs"):
        run_inproc(tmp_path, "steps=4", "checkpoint.every=2", "optim.value_optimizer=adagrad")
    assert ckpts(tmp_path) == ["0000000002"]
    monkeypatch.undo()
    last = run_inproc(tmp_path, "steps=4", "checkpoint.every=2", "optim.value_optimizer=lazy_adamw")
    assert last["step"] == 4 and ckpts(tmp_path) == ["0000000002", "0000000004"]


@pytest.mark.parametrize("n_keys", [30000, 100_000_000])
def test_a_table_larger_than_the_machine_is_refused_before_anything_is_made(tmp_path, n_keys):
    with pytest.raises(ConfigError, match=rf"^memory.n_keys: the value tables \({n_keys**2:,} values x "
                                          r"memory.v_dim 64, with optim.value_optimizer=adamw's state\) take "
                                          r"[\d,.]+ GB here, more than this machine's [\d,.]+ GB of RAM; "):
        run_inproc(tmp_path / "run", "steps=1", f"memory.n_keys={n_keys}")
    assert not (tmp_path / "run").exists()  # no corpus generated, nothing built


def test_table_bytes_count_weights_state_and_the_bf16_copy():
    from lingua_mem.stats import table_bytes_per_rank

    cfg = load_config(cli_args(Path("unused"), "memory.n_keys=100"))  # 10,000 values x 64, one table
    assert table_bytes_per_rank(cfg, 1) == 10_000 * 64 * (4 + 12)  # fp32, AdamW's moments, dense grad
    assert table_bytes_per_rank(cfg, 4) == 10_000 * 64 * 16 // 4
    adagrad = load_config(cli_args(Path("unused"), "memory.n_keys=100", "optim.value_optimizer=adagrad",
                                   "distributed.compute_dtype=bf16"))
    assert table_bytes_per_rank(adagrad, 1) == 10_000 * 64 * (4 + 2)  # the bf16 copy values compute from
