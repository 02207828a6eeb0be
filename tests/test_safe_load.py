"""Checkpoints are read as data: a crafted file in a checkpoint (DCP's .metadata, an optimizer
byte item in a .distcp, a train_state_<rank>.pt) is refused by every reader in one line, its
manifest resealed as an attacker would, and its payload never runs; nothing is set aside."""

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from sealed import seal
from test_checkpoint import ROOT, cli_args, run_inproc

from lingua_mem.checkpoint.__main__ import main as checkpoint_main
from lingua_mem.checkpoint.checkpointer import _rng_state, _set_rng_state
from lingua_mem.checkpoint.safe_load import UnsafeCheckpoint, dcp_load, load_train_state, read_dcp_metadata
from lingua_mem.config import ConfigError
from lingua_mem.eval.load import load_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class Payload:
    """Unpickled, it writes `marker`: what a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def crafted_metadata(ckpt: Path, marker: Path) -> None:
    """The checkpoint's real metadata, carrying a payload, resealed."""
    metadata = read_dcp_metadata(ckpt)
    metadata.planner_data = Payload(marker)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    seal(ckpt, int(ckpt.name))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("run")
    run_inproc(dump, "steps=2", "checkpoint.every=2")
    return dump


def fresh_copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    dump = tmp_path / "run"
    shutil.copytree(trained, dump)
    (dump / "run.lock").unlink(missing_ok=True)
    return dump, dump / "checkpoints" / "0000000002"


def test_a_crafted_metadata_is_refused_by_every_reader_and_runs_nothing(trained, tmp_path, capsys):
    dump, ckpt = fresh_copy(trained, tmp_path)
    marker = tmp_path / "payload_ran"
    crafted_metadata(ckpt, marker)
    refused = f"{ckpt / '.metadata'}: refused, not loaded: it names builtins.exec"
    for command in (["consolidate", str(ckpt), "--out", str(tmp_path / "out")],
                    ["export-hf", str(ckpt), "--out", str(tmp_path / "hf")]):
        assert checkpoint_main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and refused in err, err
    with pytest.raises(ConfigError, match="refused, not loaded: it names builtins.exec"):
        load_model(ckpt, "cpu")  # eval.py's, eval.usage's and generate's loader
    with pytest.raises(ConfigError, match="refused, not loaded: it names builtins.exec"):  # resume
        run_inproc(dump, "steps=4", "checkpoint.every=2")
    with pytest.raises(ConfigError, match="checkpoint.init_from: .*refused, not loaded"):
        run_inproc(tmp_path / "other", "steps=1", f"checkpoint.init_from={ckpt}")
    # train.py: one line, exit 2, the checkpoint kept where it is (not set aside as corrupt)
    proc = subprocess.run([sys.executable, "train.py", *cli_args(dump, "steps=4", "checkpoint.every=2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and refused in proc.stderr, proc.stderr
    assert not marker.exists()
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["0000000002"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


def test_a_crafted_train_state_is_refused_and_runs_nothing(trained, tmp_path):
    dump, ckpt = fresh_copy(trained, tmp_path)
    marker = tmp_path / "payload_ran"
    state_file = ckpt / "train_state_00000.pt"
    state = load_train_state(state_file)
    state["loader"] = Payload(marker)
    torch.save(state, state_file)
    seal(ckpt, 2)
    with pytest.raises(ConfigError, match=f"{state_file}: refused, not loaded: it asks for more than data "
                                          r"\(Unsupported global: GLOBAL exec\)$"):
        run_inproc(dump, "steps=4", "checkpoint.every=2")
    assert not marker.exists()
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["0000000002"]


def test_a_crafted_byte_item_is_refused_by_dcp_load(tmp_path):
    # DCP keeps non-tensor state (the optimizer's param groups) as torch.save bytes, which its
    # own planner loads with weights_only=False
    marker, ckpt = tmp_path / "payload_ran", tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3), "optim": {"param_groups": [{"lr": 0.1, "name": Payload(marker)}]}},
             checkpoint_id=str(ckpt), no_dist=True)
    state = {"w": torch.zeros(3), "optim": {"param_groups": [{"lr": 0.0, "name": None}]}}
    with pytest.raises(UnsafeCheckpoint, match=f"{ckpt}: refused, not loaded: its item "
                                               r"optim.param_groups.0.name asks for more than data"):
        dcp_load(state, ckpt, distributed=False, partial=False)
    assert not marker.exists()
    plain = tmp_path / "plain"  # plain data loads as before
    groups = [{"lr": 0.1, "betas": (0.9, 0.95), "name": "dense"}]
    dcp.save({"w": torch.ones(3), "optim": {"param_groups": groups}}, checkpoint_id=str(plain), no_dist=True)
    state = {"w": torch.zeros(3), "optim": {"param_groups": [{"lr": 0.0, "betas": None, "name": None}]}}
    dcp_load(state, plain, distributed=False, partial=False)
    assert state["optim"]["param_groups"] == groups
    assert torch.equal(state["w"], torch.ones(3))


def test_generator_states_round_trip_as_data_and_older_numpy_arrays_still_load(tmp_path):
    np.random.seed(7)
    saved = tmp_path / "new.pt"
    torch.save({"rng": _rng_state()}, saved)
    expected = (np.random.rand(3), torch.rand(3))
    np.random.seed(0)
    torch.manual_seed(0)
    _set_rng_state(load_train_state(saved)["rng"])
    assert np.array_equal(np.random.rand(3), expected[0]) and torch.equal(torch.rand(3), expected[1])
    older = tmp_path / "older.pt"  # a train state written before: numpy's state as its array
    np.random.seed(7)
    rng = {**_rng_state(), "numpy": np.random.get_state()}
    torch.save({"rng": rng}, older)
    np.random.seed(0)
    _set_rng_state(load_train_state(older)["rng"])
    assert np.array_equal(np.random.rand(3), expected[0])


def test_metadata_of_anything_but_dcp_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    buf = io.BytesIO()
    pickle.dump({"not": "metadata"}, buf)
    (ckpt / ".metadata").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeCheckpoint, match="it holds a dict, not DCP metadata"):
        read_dcp_metadata(ckpt)
    for name in ("system", "getattr"):  # callables an attacker reaches for, by module
        (ckpt / ".metadata").write_bytes(f"cos\n{name}\n.".encode() if name == "system"
                                         else b"cbuiltins\ngetattr\n.")
        with pytest.raises(UnsafeCheckpoint, match="refused, not loaded: it names (os|builtins)"):
            read_dcp_metadata(ckpt)


def test_two_processes_refuse_a_crafted_checkpoint_alike(trained, tmp_path):
    """A resume on 2 processes (each rank reads the metadata): every rank refuses in one line
    and exits 2, none runs the payload or waits for the other, nothing is set aside."""
    import os

    from test_parallel import free_port

    dump, ckpt = fresh_copy(trained, tmp_path)
    marker = tmp_path / "payload_ran"
    crafted_metadata(ckpt, marker)
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "train.py", *cli_args(dump, "steps=4", "checkpoint.every=2")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    refused = f"{ckpt / '.metadata'}: refused, not loaded: it names builtins.exec"
    for _, stderr in results:
        assert stderr.count("\n") <= 1 and "Traceback" not in stderr, stderr
    assert refused in results[0][1]
    assert not marker.exists()
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["0000000002"]
