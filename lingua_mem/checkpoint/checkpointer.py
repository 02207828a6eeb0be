"""Checkpoints: sharded (DCP) model and optimizer, each rank's train state, atomic
commit, retention, async save, resume with fallback, and init_from.

<dump_dir>/checkpoints/
  0000000200/               a complete checkpoint of step 200 (the only kind ever loaded)
    .metadata, __<r>_0.distcp   DCP of {"model", "optim"}: global shapes, loadable by any layout
    train_state_<r>.pt      rank r: data loader state, LR schedule, RNG states, tokens and FLOPs
                            trained
    config.yaml             the run's full config
    meta.json               step, world size, layout
    manifest.json           format (records.CHECKPOINT_FORMAT), size and CRC32 of every file
                            above; written last
  0000000300.tmp/           being written; renamed to 0000000300/ by rank 0 once every rank is done
  0000000100.corrupt/       failed to load; set aside (kept) by the resume that fell back
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lingua_mem.checkpoint.records import (
    CHECKPOINT_FORMAT,
    MANIFEST,
    CheckpointError,
    check_model_shapes,
    checkpoint_dir,
    checkpoint_model_args,
    complete_checkpoints,
    file_crc32,
    match_by_name,
    quiet_single_process,
    saved_shapes,
    verify,
)
from lingua_mem.checkpoint.safe_load import UnsafeCheckpoint, dcp_load, load_train_state
from lingua_mem.cli import Stopped, one_line
from lingua_mem.config import CheckpointConfig
from lingua_mem.errors import ConfigError
from lingua_mem.parallel.runtime import agree, first_error

# torch 2.11's DefaultStager releases its copy routines after its first stage, so a second
# stage fails (KeyError: <class 'type'>); from 2.13 one stager (and its pinned buffers) serves
# every save.
STAGER_REUSABLE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


class CheckpointWriteError(Stopped):
    """A save that failed (disk full, I/O error); the run stops, the earlier checkpoints stay."""


def _tmp_dir(dump_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(dump_dir, step).with_name(f"{step:010d}.tmp")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(exc: BaseException, where: Path) -> str:
    """What went wrong in one phrase: the OS's reason (e.g. 'No space left on device') when
    the failure is an OSError anywhere in the chain (DCP wraps each rank's); else its line and
    the free space left where it wrote (torch.save inside DCP reports a short write as
    'unexpected pos', losing the OS error)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    try:
        free = f"{shutil.disk_usage(where).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    return f"{one_line(f'{type(exc).__name__}: {exc}')} ({free})"


def _untrusted_checkpoint(dump_dir: Path, complete: list[Path]) -> str | None:
    """The message for a step folder newer than every complete checkpoint that has no
    manifest (so it cannot be verified), or None. Such a folder is never loaded, never
    pruned and never silently passed over."""
    root = Path(dump_dir) / "checkpoints"
    newest = int(complete[-1].name) if complete else 0
    suspects = sorted(p for p in root.iterdir() if p.name.isdigit() and p.is_dir()
                      and not (p / MANIFEST).is_file() and int(p.name) > newest) if root.is_dir() else []
    if not suspects:
        return None
    fallback = f"from {complete[-1]}" if complete else "from scratch (it truncates metrics.jsonl)"
    return (f"checkpoint: {suspects[-1]} has no {MANIFEST}, so it cannot be verified and is not loaded; "
            f"to resume {fallback} instead, move it out of {root}; to keep both, use another dump_dir")


def _rng_state() -> dict:
    """This rank's generators. On CUDA the state of its own device alone (`cuda_device`): a
    rank uses one GPU, and a resume may run on a node with fewer GPUs than the saver's."""
    # numpy's as lists (its array would need numpy's globals to load: safe_load reads data only)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def wait_for_device(model) -> None:
    """Wait until the work queued on the model's CUDA device (its current stream) is done."""
    device = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    if device is not None:
        torch.cuda.current_stream(device).synchronize()


def device_rng_state(state: dict, device_index: int) -> torch.Tensor | None:
    """The saved CUDA generator state for this rank's device: `cuda_device`, or from a state of
    every device an older checkpoint saved (`cuda`, a list), its device's entry where it has one
    (None: nothing to restore)."""
    if "cuda_device" in state:
        return state["cuda_device"]
    every = state.get("cuda") or []
    return every[device_index] if device_index < len(every) else None


def continue_schedule(scheduler, saved: dict) -> None:
    """`scheduler` (a LambdaLR made from this run's config) at the step count of `saved` (a
    checkpoint's state_dict of it): the schedule this run's config describes (its lr, warmup,
    kind, steps), evaluated from the resumed step on, each group's lr set to its value there.
    A resume with a lower lr (or another warmup or schedule) trains with it from its first step."""
    scheduler.last_epoch = saved["last_epoch"]
    scheduler._step_count = saved.get("_step_count", saved["last_epoch"] + 1)
    lrs = [base * factor(scheduler.last_epoch)
           for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


# value optimizers whose state another can take as it is: AdamW's (step, exp_avg, exp_avg_sq)
# over every row or over the rows read; Adagrad's row sums and SGD's nothing are their own
_VALUE_STATE = {"adamw": "adamw", "lazy_adamw": "adamw", "adagrad": "adagrad", "sgd": "sgd"}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]  # keys: a list (an array in checkpoints before lists)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        saved = device_rng_state(state, device)
        if saved is not None:
            torch.cuda.set_rng_state(saved, device)




class Checkpointer:
    """Saves and loads one training run's checkpoints (on every rank, collectively).

    `model` is parallelized: its sharded parameters (FSDP2, memory-parallel value tables)
    are DTensors of global shape, so a checkpoint loads into any layout (4 ranks -> 2 -> 1)."""

    def __init__(self, cfg: CheckpointConfig, dump_dir: str | Path, model, optimizer, scheduler=None,
                 loader=None, run_config: dict | None = None, layout: dict | None = None, counts=None):
        self.cfg, self.dump_dir = cfg, Path(dump_dir)
        self.counts = counts  # the tokens and FLOPs trained (train/report.TrainedCounts), or None
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.run_config, self.layout = run_config or {}, layout or {}
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.pending = None  # (step, future) of an async save not yet committed
        self.staging = None  # (step, future): its copy of the state, until done (staged())
        self.stager = None  # async_save's, made at the first async save (its pinned buffers reused)
        self.async_group = self.poll_group = None
        if cfg.async_save and self.distributed:
            # gloo groups of their own: DCP's collectives run in its writer thread, the "is
            # every rank's write done?" vote in the step loop; neither may share a group
            self.async_group = dist.new_group(backend="gloo")
            self.poll_group = dist.new_group(backend="gloo")

    # ---- state dicts -----------------------------------------------------------------

    def _state(self, with_optimizer: bool = True) -> dict:
        """{"model", "optim"} as DCP sees it: sharded parameters (FSDP2, memory-parallel
        tables) are DTensors of global shape, so any layout can load them."""
        state = {"model": get_model_state_dict(self.model)}
        if with_optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    # ---- save --------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, block: bool = False) -> None:
        """Write the checkpoint of `step` into <step>.tmp/; committed by rank 0 (renamed to
        <step>/) once every rank is done: now, or with async_save when the write ends. A write
        that fails on any rank (disk full, I/O error) removes <step>.tmp/ and raises
        CheckpointWriteError on every rank; the checkpoints committed before stay as they are."""
        self.wait()  # one save in flight at a time
        tmp = _tmp_dir(self.dump_dir, step)

        def prepare():
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way
                tmp.mkdir(parents=True)

        self._or_abandon(step, prepare)
        if self.distributed:
            dist.barrier()
        self._or_abandon(step, lambda: self._write_train_state(step, tmp))
        state = self._state()
        if self.cfg.async_save and not block:
            # the stager copies on a stream and thread of its own, which do not wait for the
            # compute stream: the step's queued kernels must have written the weights first
            # (one wait a checkpoint)
            wait_for_device(self.model)

            def start():
                with quiet_single_process():
                    return dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group,
                                          no_dist=not self.distributed, async_stager=self._stager())

            response = self._or_abandon(step, start)
            self.staging = (step, response.staging_completion)
            self.pending = (step, response.upload_completion)
        else:
            def write():
                with quiet_single_process():
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=not self.distributed)  # fsyncs its files

            self._or_abandon(step, write)  # a collective: DCP raises on every rank alike
            self.pending = (step, None)
            self.wait()

    def _write_train_state(self, step: int, tmp: Path) -> None:
        path = tmp / f"train_state_{self.rank:05d}.pt"
        torch.save({"step": step, "world_size": self.world,
                    "loader": self.loader.state_dict() if self.loader is not None else None,
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "counts": self.counts.state_dict() if self.counts is not None else None,
                    "rng": _rng_state()}, path)
        _fsync(path)

    def _or_abandon(self, step: int, fn):
        """fn() on this rank; if it failed on any rank, the save of `step` is abandoned on all."""
        result, error = None, None
        try:
            result = fn()
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            error = _write_failure(exc, self.dump_dir)
        if (error := first_error(error)) is not None:
            tmp = _tmp_dir(self.dump_dir, step)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            done = complete_checkpoints(self.dump_dir)
            kept = f"{done[-1]} is intact" if done else "there is no earlier checkpoint"
            raise CheckpointWriteError(
                f"checkpoint: cannot write step {step} to {tmp}: {error}; the partial save is removed and "
                f"{kept}; free space (or fix the path) and run the same command again to resume") from None
        return result

    def poll(self) -> None:
        """Commit a finished async save (every rank calls this at the same steps)."""
        if self.pending is not None and self.pending[1] is not None:
            done = torch.tensor([float(self.pending[1].done())])
            if self.distributed:
                dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.poll_group)
            if done.item():
                self.wait()

    def _stager(self) -> DefaultStager:
        """async_save's stager: the state copied off the training device in a thread of its own
        (the step goes on meanwhile: staged() waits for the copy before the weights change),
        through pinned host memory when the weights are on CUDA. One for the run where torch
        allows (STAGER_REUSABLE), else a new one for each save."""
        if self.stager is not None and not STAGER_REUSABLE:
            self.stager.close()  # its save's copy is taken: staged() ran before this save
            self.stager = None
        if self.stager is None:
            cuda = any(p.device.type == "cuda" for p in self.model.parameters())
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=True, use_non_blocking_copy=cuda))
        return self.stager

    def staged(self) -> None:
        """Wait until an async save's copy of the state is taken (every rank calls this at the
        same point: after a step's backward, before its update changes the weights)."""
        if self.staging is not None:
            step, future = self.staging
            self.staging = None
            self._or_abandon(step, future.result)

    def close(self) -> None:
        """Finish and commit the save in flight; release the stager's thread and buffers."""
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def wait(self) -> None:
        """Finish the save in flight (if any) and commit it."""
        self.staged()
        if self.pending is None:
            return
        step, future = self.pending
        self.pending = None
        if future is not None:
            self._or_abandon(step, future.result)
        tmp = _tmp_dir(self.dump_dir, step)
        # each rank checksums the files it wrote; rank 0 the shared ones, then commits
        mine = [tmp / f"train_state_{self.rank:05d}.pt", *tmp.glob(f"__{self.rank}_*.distcp")]
        files = {p.name: {"size": p.stat().st_size, "crc32": file_crc32(p)} for p in mine}
        if self.distributed:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, files)
            files = {k: v for part in everyone for k, v in part.items()}
        self._or_abandon(step, lambda: self._commit(step, files) if self.rank == 0 else None)

    def _commit(self, step: int, files: dict) -> None:
        """Rank 0: the shared files and the manifest, all fsynced with their folder, then the
        rename that makes the checkpoint complete (fsynced too): a power loss leaves either the
        old state or a complete checkpoint, never a committed but empty one."""
        final, tmp = checkpoint_dir(self.dump_dir, step), _tmp_dir(self.dump_dir, step)
        OmegaConf.save(OmegaConf.create(self.run_config), tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": self.world,
                                                   "layout": self.layout, "time": time.time()}))
        for p in sorted(tmp.iterdir()):
            if p.is_file() and p.name not in files:  # .metadata, config.yaml, meta.json
                files[p.name] = {"size": p.stat().st_size, "crc32": file_crc32(p)}
        manifest = {"format": CHECKPOINT_FORMAT, "step": step, "files": dict(sorted(files.items()))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in ("config.yaml", "meta.json", MANIFEST, ".metadata"):
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # the same step written again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
        self._retain()

    def _retain(self) -> None:
        """Keep the newest keep_last checkpoints and every keep_every-th step."""
        if self.cfg.keep_last <= 0:
            return
        done = complete_checkpoints(self.dump_dir)
        for path in done[:-self.cfg.keep_last]:
            if self.cfg.keep_every > 0 and int(path.name) % self.cfg.keep_every == 0:
                continue
            shutil.rmtree(path, ignore_errors=True)

    # ---- load --------------------------------------------------------------------------

    def _verify(self, path: Path) -> None:
        """verify() on every rank (each checksums its share); the first error on all."""
        error = None
        try:
            verify(path, self.rank, self.world)
        except CheckpointError as exc:
            error = str(exc)
        if (error := first_error(error)) is not None:
            raise CheckpointError(error)

    def _read(self, state: dict, path: Path, partial: bool) -> None:
        """DCP-load `path` into `state` in place (each rank its own shards); what the checkpoint
        holds beyond `state` is not read. `partial`: DCP's allow_partial_load (a tensor of
        `state` may be missing from the checkpoint)."""
        try:
            with quiet_single_process():
                dcp_load(state, path, self.distributed, partial)
        except UnsafeCheckpoint:  # refused, not corrupt: the run stops, the checkpoint stays
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise CheckpointError(f"{path}: DCP load failed ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300]})") from None

    def _load(self, path: Path, with_train_state: bool) -> dict | None:
        """Load `path` into the model (and optimizer, schedule, data, RNG); the train state or None.
        Strict: every model tensor, in both, of one shape."""
        self._verify(path)
        if with_train_state:
            self._check_value_optimizer(path)
        state = self._state(with_optimizer=with_train_state)
        check_model_shapes(path, {name: tuple(t.shape) for name, t in state["model"].items()})
        try:
            self._read(state, path, partial=not with_train_state)
        except CheckpointError as exc:  # it verified: sound files, another run's settings
            raise ConfigError(f"checkpoint: {exc}; it verifies (sizes, CRC32), so a setting of this run "
                              f"differs from the run that wrote it ({path / 'config.yaml'}): resume with "
                              f"that setting, or start a new run from its weights with "
                              f"checkpoint.init_from={path}") from None
        set_model_state_dict(self.model, state["model"])
        if not with_train_state:
            return None
        # this run's hyperparameters (its config: lr, betas, eps, weight decay, the value
        # optimizer), not the checkpoint's: only the moments and step counts are loaded
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        for group, setting in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(setting)
        same_layout = json.loads((path / "meta.json").read_text())["world_size"] == self.world
        state_file = path / f"train_state_{self.rank if same_layout else 0:05d}.pt"
        try:
            train_state = load_train_state(state_file)
        except UnsafeCheckpoint:
            raise
        except Exception as exc:
            raise CheckpointError(f"{state_file}: unreadable ({type(exc).__name__}: {exc})") from None
        if self.scheduler is not None:
            continue_schedule(self.scheduler, train_state["scheduler"])
        if self.counts is not None:  # global: the same in every rank's file
            if train_state.get("counts") is not None:
                self.counts.load_state_dict(train_state["counts"])
            else:  # written before the counts were kept
                self.counts.guess(train_state["step"])
        if same_layout:
            if self.loader is not None and train_state["loader"] is not None:
                self.loader.load_state_dict(train_state["loader"])
            _set_rng_state(train_state["rng"])
        elif self.rank == 0:
            print(f"warning: checkpoint {path} was written by {train_state['world_size']} processes, this "
                  f"run has {self.world}: weights, optimizer and schedule are restored, each rank's data "
                  "stream starts afresh", file=sys.stderr, flush=True)
        return train_state

    def _check_value_optimizer(self, path: Path) -> None:
        """A resume that changes optim.value_optimizer: adamw and lazy_adamw share their state
        (it carries over); any other change is refused here, before anything is read."""
        now = (self.run_config.get("optim") or {}).get("value_optimizer")
        try:
            saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))["optim"]["value_optimizer"]
        except (OSError, KeyError, TypeError, OmegaConfBaseException):
            return  # an older or partial config: DCP's load says what does not fit
        if now is None or _VALUE_STATE.get(now) == _VALUE_STATE.get(saved):
            return
        raise ConfigError(f"optim.value_optimizer: {now} cannot take the state of {saved}, which trained "
                          f"checkpoint {path}; resume with optim.value_optimizer={saved} (adamw and "
                          f"lazy_adamw take each other's), or start a new run from its weights with "
                          f"checkpoint.init_from={path}")

    def resume(self) -> int:
        """Load the newest complete checkpoint of this run; returns its step (0: none).
        A checkpoint that fails to load is reported, set aside as <step>.corrupt, and the
        previous one is tried; a model that does not match raises ConfigError."""
        candidates = complete_checkpoints(self.dump_dir)
        untrusted = _untrusted_checkpoint(self.dump_dir, candidates)
        if self.distributed:  # every rank tries the same list
            candidates, untrusted = agree((candidates, untrusted), self.rank == 0)
        if untrusted is not None:  # resuming from an older one, or afresh, would drop its steps
            raise ConfigError(untrusted)
        for path in reversed(candidates):
            try:
                return self._load(path, with_train_state=True)["step"]
            except CheckpointError as exc:
                if self.rank == 0:
                    target, n = path.with_name(path.name + ".corrupt"), 1
                    while target.exists():  # this step was set aside before
                        target, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
                    print(f"error: checkpoint {exc}; set aside as {target.name}, trying the previous "
                          "checkpoint", file=sys.stderr, flush=True)
                    path.rename(target)
                if self.distributed:
                    dist.barrier()
        root = self.dump_dir / "checkpoints"
        if candidates or (root.is_dir() and any(".corrupt" in p.name for p in root.iterdir())):
            # starting afresh would overwrite this run's metrics: the user decides
            raise ConfigError(f"checkpoint: no checkpoint in {root} can be loaded (the bad ones are set "
                              "aside as *.corrupt); remove them, or use another dump_dir, to start afresh")
        return 0

    def init_from(self, path: str | Path) -> None:
        """checkpoint.init_from: a new run starts from the weights of `path`, a Hugging Face
        directory (hf_import.py) or a DCP training checkpoint, checked and loaded alike: the
        settings first, then by name (tensors only in `path` are skipped, those only in this
        model keep their init: memory retrofitted into a dense model, LoRA adapters); rank 0
        prints one line of what happened. Any error is a one-line ConfigError
        "checkpoint.init_from: ...", on every rank."""
        from lingua_mem.checkpoint.hf_import import is_hf_dir, load_hf_weights

        path = Path(path)
        if is_hf_dir(path):  # a transformers Llama or a lingua_mem export: by name, from safetensors
            summary = load_hf_weights(self.model, path, self.model.args)
        else:
            summary = self._init_from_checkpoint(path)
        if self.rank == 0:
            print(summary.line(path), flush=True)

    def _init_from_checkpoint(self, path: Path):
        """init_from a DCP checkpoint of any layout; its ImportSummary."""
        from lingua_mem.checkpoint.hf_import import KEY, ImportSummary, check_model_args

        try:
            self._verify(path)
            theirs, _ = checkpoint_model_args(path, verified=True)  # the model and memory sections
            saved = saved_shapes(path)
        except ValueError as exc:  # CheckpointError and ConfigError included
            raise ConfigError(f"{KEY}: {exc}") from None
        check_model_args(path, theirs, self.model.args)  # what shapes do not show (rope_theta, eps...)
        state = get_model_state_dict(self.model)  # DTensors of global shape under any layout
        summary = ImportSummary(*match_by_name(path, saved, {n: tuple(t.shape) for n, t in state.items()}))
        loaded = {name: state[name] for name in summary.loaded}
        try:
            self._read({"model": loaded}, path, partial=True)  # neither "optim" nor the skipped are read
        except CheckpointError as exc:
            raise ConfigError(f"{KEY}: {exc}") from None
        # strict=False: the new tensors are not in `loaded` and keep their init
        set_model_state_dict(self.model, loaded, options=StateDictOptions(strict=False))
        return summary

    def load_weights(self, path: str | Path, key: str) -> None:
        """The model weights of DCP checkpoint `path` only, exactly (evaluation): every tensor
        of the model, of its shape, and no other; a ConfigError names `key`."""
        try:
            self._load(Path(path), with_train_state=False)
        except (CheckpointError, ConfigError) as exc:  # ConfigError: a different model shape
            raise ConfigError(f"{key}: {exc}") from None
