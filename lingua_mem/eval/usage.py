"""How often each value row is read: the background usage that sparse memory finetuning ranks
a batch's rows against (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning").

    python -m lingua_mem.eval.usage ckpt=dumps/debug/checkpoints/0000000200 [batches=64] \
        [out=FILE] [data.sources...=...] [distributed.*=...]
    torchrun --nproc-per-node 2 -m lingua_mem.eval.usage ckpt=... distributed.memory_parallel_size=2

The model of `ckpt` reads `batches` batches of data (per process; by default the run's own
training data, as its config.yaml has it: a sample of what it was pretrained on) and counts,
per value table (one for a shared table, else one per memory layer), for each row:
  reads    how many (token, head, top-k slot) picks chose it, over every memory layer reading
           the table
  batches  in how many of the batches it was read at least once (its document frequency:
           one batch is data.batch_size x data.seq_len tokens of one process)
The counts of every process are summed. They are written as safetensors (<key>.reads and
<key>.batches, int64 (n_values,)), the metadata holding the checkpoint, its step and the
numbers of batches and tokens; by default into <dump_dir>/memory_usage/<step>.safetensors
(run_dir.usage_file: beside checkpoints/, so retention never prunes it; an export's own
folder for an export). An `out` inside a checkpoint or a run's checkpoints/ is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lingua_mem.memory.usage import Usage, count_usage, save_usage
from lingua_mem.run_dir import dump_dir_of


def run(cfg) -> Usage:
    """The command (every process): load the checkpoint, count, write (rank 0)."""
    from lingua_mem.config import TokenizerConfig
    from lingua_mem.data.loader import build_loader
    from lingua_mem.errors import ConfigError
    from lingua_mem.eval.load import inspect_checkpoint, load_model
    from lingua_mem.parallel import distributed_session
    from lingua_mem.parallel.runtime import on_rank_0
    from lingua_mem.run_dir import check_output, check_writable, usage_file

    with distributed_session(cfg.distributed) as (meshes, device):
        dims = meshes.dims
        is_main = dims.rank == 0
        say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
        info = inspect_checkpoint(cfg.ckpt, TokenizerConfig(name=""))  # the run's own tokenizer
        if not info.args.memory.layers:
            raise ConfigError(f"ckpt: {info.path} is a dense model: it has no memory layers to count")
        out = Path(cfg.out) if cfg.out else usage_file(info.path, info.kind == "training")
        try:
            check_output(out, [info.path], key="out")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        on_rank_0(lambda: check_writable(out.parent), is_main)
        # the run's dump dir holds its generated facts corpus; an export's folder stands in
        dump_dir = dump_dir_of(info.path) if info.kind == "training" else info.path
        loader = on_rank_0(lambda: build_loader(cfg.data, info.tokenizer, str(dump_dir), dims.rank,
                                                dims.world_size), is_main)
        if not is_main:
            loader = build_loader(cfg.data, info.tokenizer, str(dump_dir), dims.rank, dims.world_size)
        loaded = load_model(info, device, meshes=meshes, distributed=cfg.distributed)
        say(f"counting the value rows {info.path} (step {info.step}) reads over {cfg.batches} batches of "
            f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens per process, {dims.world_size} process(es)")
        try:
            usage = count_usage(loaded.model, iter(loader), cfg.batches, device, say)
        finally:
            loader.close()
        usage.meta = {"ckpt": str(info.path), "step": str(info.step), "batch_size": str(cfg.data.batch_size),
                      "seq_len": str(cfg.data.seq_len), "data": json.dumps(_sources(cfg.data))}

        def write():
            save_usage(out, usage)
            for key, reads in usage.reads.items():
                used = float((reads > 0).double().mean())
                say(f"{key}: {int(reads.sum()):,} reads, {used:.1%} of {reads.numel():,} rows read")
            say(f"wrote {out}")

        on_rank_0(write, is_main)
        return usage


def _sources(data) -> dict:
    from lingua_mem.config import to_dict

    d = to_dict(data)
    return {"sources": d["sources"], "facts": d["facts"]} if not d["sources"] else {"sources": d["sources"]}


def main(argv: list[str]) -> int:
    from lingua_mem.cli import STOPPED, Stopped, fail
    from lingua_mem.config import UsageCommandConfig, load_config, run_data_defaults, validate_usage_command
    from lingua_mem.errors import ConfigError

    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return 0
    try:
        cfg = load_config(argv, UsageCommandConfig, validate_usage_command, base=run_data_defaults(argv))
        run(cfg)
    except ConfigError as exc:
        return fail(exc)
    except Stopped as exc:
        return fail(exc, code=STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
