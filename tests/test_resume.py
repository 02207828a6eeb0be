"""Exact resume: a run stopped (by a preemption signal, or kill -9) and started again with
the same command logs, bit for bit, what the uninterrupted run logs; on 1 process and on 2
with memory parallelism. Plus W&B continuing the same run, and checkpoints loading
into other layouts (4 processes -> 2 -> 1)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_parallel import free_port
from wandb_runs import read_run

from lingua_mem.checkpoint.checkpointer import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
RUN = ["config=configs/debug.yaml", "steps=14", "log_every=1", "checkpoint.every=4",
       "data.batch_size=4", "data.seq_len=64"]
COMPARED = ("step", "loss", "grad_norm", "value_grad_norm", "lr", "tokens")


def start(dump_dir: Path, world: int, *overrides: str) -> list[subprocess.Popen]:
    """train.py as `world` processes (the environment torchrun or srun would give them)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(key)
        procs.append(subprocess.Popen([sys.executable, "train.py", *RUN, f"dump_dir={dump_dir}", *overrides],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def rows(dump_dir: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, (dump_dir / "metrics.jsonl").open())]


def wait_for_step(dump_dir: Path, step: int, procs, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    path = dump_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and f'"step": {step},' in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"the run ended before step {step}: {finish(procs)}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """uninterrupted(world, *overrides): the rows of the uninterrupted run of that command,
    run once per module (the kill -9 and the preemption tests of one layout share it)."""
    runs = {}

    def rows_of(world: int, *overrides: str) -> list[dict]:
        if (world, overrides) not in runs:
            dump = tmp_path_factory.mktemp("uninterrupted")
            results = finish(start(dump, world, *overrides))
            assert all(rc == 0 for rc, _, _ in results), results
            runs[world, overrides] = rows(dump)
        return runs[world, overrides]

    return rows_of


@pytest.mark.parametrize("world,overrides", [
    (1, ()), (1, ("checkpoint.async_save=true",)), (2, ("distributed.memory_parallel_size=2",)),
    (2, ("distributed.memory_parallel_size=2", "checkpoint.async_save=true"))],
    ids=["1proc", "1proc-async", "2proc-mp2", "2proc-mp2-async"])
def test_kill_9_then_resume_is_bit_exact(tmp_path, uninterrupted, world, overrides):
    want = uninterrupted(world, *overrides)
    dump = tmp_path / "killed"
    procs = start(dump, world, *overrides)
    wait_for_step(dump, 10, procs)  # checkpoint 8 is committed, 12 not yet written
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert all(rc == -signal.SIGKILL for rc, _, _ in finish(procs))
    committed = [p.name for p in complete_checkpoints(dump)]
    assert committed and "0000000012" not in committed
    if not any("async" in o for o in overrides):  # an async save of step 8 may still be in flight
        assert committed[-1] == "0000000008"
    assert max(r["step"] for r in rows(dump)) < 14

    results = finish(start(dump, world, *overrides))
    assert all(rc == 0 for rc, _, _ in results), results
    assert f"resumed from {dump / 'checkpoints' / committed[-1]}" in results[0][1]
    assert rows(dump) == want  # every step, bit for bit (steps 9-10 logged again, not twice)


@pytest.mark.parametrize("world,overrides,target", [
    (1, (), 0), (2, ("distributed.memory_parallel_size=2",), 1)], ids=["1proc", "2proc-mp2-signal-rank1"])
def test_preemption_signal_checkpoints_exits_0_and_resumes_exactly(tmp_path, uninterrupted, world, overrides,
                                                                  target):
    want = uninterrupted(world, *overrides)
    dump = tmp_path / "preempted"
    procs = start(dump, world, *overrides)
    wait_for_step(dump, 5, procs)
    procs[target].send_signal(signal.SIGUSR1)  # to one rank only: all must agree to stop
    results = finish(procs)
    assert all(rc == 0 for rc, _, _ in results), results
    stdout = results[0][1]
    stopped = int(stdout.split("checkpoint of step ")[1].split()[0])
    assert 5 <= stopped < 14 and "preempted (" in stdout
    assert (dump / "checkpoints" / f"{stopped:010d}" / "manifest.json").is_file()
    assert max(r["step"] for r in rows(dump)) == stopped

    results = finish(start(dump, world, *overrides))
    assert all(rc == 0 for rc, _, _ in results), results
    assert f"{stopped:010d}" in results[0][1]
    assert rows(dump) == want


def test_ctrl_c_checkpoints_exits_130_without_a_traceback_and_resumes_exactly(tmp_path, uninterrupted):
    want = uninterrupted(1)
    dump = tmp_path / "interrupted"
    procs = start(dump, 1)
    wait_for_step(dump, 5, procs)
    procs[0].send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground process
    (rc, stdout, stderr), = finish(procs)
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    stopped = int(stdout.split("interrupted (SIGINT): checkpoint of step ")[1].split()[0])
    assert 5 <= stopped < 14 and "the same command resumes" in stdout
    assert (dump / "checkpoints" / f"{stopped:010d}" / "manifest.json").is_file()
    results = finish(start(dump, 1))
    assert results[0][0] == 0, results
    assert rows(dump) == want  # nothing lost, nothing twice


def local_rank_pid(parent: int, local_rank: int) -> int:
    """The pid of torchrun's worker of `local_rank` (from /proc: its parent and LOCAL_RANK)."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:  # its ppid
                continue
            if f"LOCAL_RANK={local_rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no worker of local rank {local_rank} under pid {parent}")


def test_ctrl_c_to_one_torchrun_rank_stops_every_rank_cleanly(tmp_path):
    """SIGINT to rank 1 alone: the ranks agree on it, checkpoint, and all exit 0 (torchrun takes
    any other code for a failure: its ChildFailedError traceback)."""
    dump = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "train.py", *RUN, f"dump_dir={dump}", "distributed.memory_parallel_size=2"]
    torchrun = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(dump, 5, [torchrun])
    os.kill(local_rank_pid(torchrun.pid, 1), signal.SIGINT)
    (rc, stdout, stderr), = finish([torchrun])
    assert rc == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    stopped = int(stdout.split("interrupted (SIGINT to another rank): checkpoint of step ")[1].split()[0])
    assert 5 <= stopped < 14 and (dump / "checkpoints" / f"{stopped:010d}" / "manifest.json").is_file()
    assert max(r["step"] for r in rows(dump)) == stopped


def test_wandb_continues_the_same_run_after_a_kill(tmp_path):
    wandb = ("logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.wandb.project=lm_test")
    dump = tmp_path / "run"
    procs = start(dump, 1, *wandb)
    wait_for_step(dump, 10, procs)
    procs[0].send_signal(signal.SIGUSR1)  # a clean stop, so the first W&B run file is complete
    assert finish(procs)[0][0] == 0
    assert finish(start(dump, 1, *wandb))[0][0] == 0

    runs = sorted((dump / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    first, second = (read_run(r) for r in runs)
    assert first["run_id"] == second["run_id"] == (dump / "wandb_run_id").read_text().strip()
    metrics = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    # the stop checkpointed the last logged step: the two runs' rows are metrics.jsonl, in order
    logged = [{k: h[k] for k in ("loss", "grad_norm")} for h in first["history"] + second["history"]]
    assert logged == [{k: m[k] for k in ("loss", "grad_norm")} for m in metrics]
    assert len(first["history"]) < len(metrics) == 14


def reshard_worker(rank, world, port, layout, dump, results):
    """Phase "save" (4 ranks): a step, a checkpoint, then logits and a second step's loss.
    Other phases: other weights, resume from that checkpoint, the same logits and step."""
    import torch
    import torch.distributed as dist
    from test_parallel import MEMORY, MODEL, OPTIM, SEQ

    from lingua_mem.checkpoint.checkpointer import Checkpointer
    from lingua_mem.config import CheckpointConfig, DistributedConfig, model_args, to_dict
    from lingua_mem.model.llama import build_model
    from lingua_mem.optim import build_optimizer, split_params
    from lingua_mem.parallel import init_distributed, parallelize
    from lingua_mem.train.step import train_step

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saving = dump is None
    cfg = DistributedConfig(**layout)
    meshes = init_distributed(cfg, "cpu")
    model = parallelize(build_model(model_args(MODEL, MEMORY), "meta"), meshes, cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=3 if saving else 99)  # the loaders start from other weights
    optimizer = build_optimizer(model, OPTIM)
    dense, values = split_params(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, MODEL.vocab_size, (8, SEQ + 1), generator=gen) for _ in range(2)]
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)

    def step(tokens):
        t = tokens[rows]
        loss = train_step(model, optimizer, [{"inputs": t[:, :-1], "targets": t[:, 1:]}], OPTIM,
                          dense, values).loss
        if world > 1:
            dist.all_reduce(loss)
        return loss.item() / world

    run_config = {"model": to_dict(MODEL), "memory": to_dict(MEMORY)}  # what consolidate reads
    checkpointer = Checkpointer(CheckpointConfig(), results["dir"] if saving else dump, model, optimizer,
                                run_config=run_config)
    if saving:
        step(batches[0])
        checkpointer.save(1)
    else:
        assert checkpointer.resume() == 1
    with torch.no_grad():
        logits = model(batches[1][:2, :-1]).detach()  # the same tokens on every rank
    second_loss = step(batches[1])
    if rank == 0:  # numpy, not tensors: their sender exits
        results["out"].put((logits.numpy(), second_loss, batches[1][:2, :-1].numpy()))
    dist.barrier()
    meshes.close()


def test_a_4_process_checkpoint_loads_into_2_processes_and_1(tmp_path):
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()

    def run(world, layout, dump):
        results = {"out": out, "dir": str(tmp_path)}
        if world == 1:
            reshard_worker(0, 1, 0, layout, dump, results)
        else:
            mp.start_processes(reshard_worker, args=(world, free_port(), layout, dump, results), nprocs=world,
                               start_method="spawn", join=True)
        return out.get(timeout=30)

    hsdp_mp = {"dp_replicate": 2, "dp_shard": 2, "memory_parallel_size": 2}
    saved_logits, saved_loss, saved_tokens = run(4, hsdp_mp, None)
    for world, layout in ((2, {"memory_parallel_size": 2}), (2, {"dp_shard": 2}), (1, {})):
        logits, loss, _ = run(world, layout, str(tmp_path))
        torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(saved_logits),
                                   rtol=1e-5, atol=1e-6)
        assert loss == pytest.approx(saved_loss, rel=1e-5)  # optimizer state resharded too

    # and the export: full weights on one process without torch.distributed
    from lingua_mem.checkpoint.consolidate import consolidate, load_consolidated

    consolidate(tmp_path / "checkpoints" / "0000000001", tmp_path / "export")
    with torch.no_grad():
        logits = load_consolidated(tmp_path / "export")(torch.from_numpy(saved_tokens))
    torch.testing.assert_close(logits, torch.from_numpy(saved_logits), rtol=1e-5, atol=1e-6)
