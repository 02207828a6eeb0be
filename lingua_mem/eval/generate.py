"""Text generation: batched prompts of different lengths, a KV cache, greedy / temperature /
top-p sampling, stop at EOS, a stop string or max_new_tokens.

    python -m lingua_mem.eval.generate ckpt=dumps/debug/checkpoints/0000000200 \\
        prompt="Ada Dorvane was born in" [generate.max_new_tokens=64 generate.temperature=0.8 ...]

Prompts are left-padded to one length: padding slots are never attended to
(`valid`), and each sequence's positions count its own tokens from 0, so a
prompt generates the same tokens alone or in any batch. With the cache, the
prompt is run once and each new token is one forward call of one token; without
it (generate.cache=false), every step recomputes the whole sequence (the
reference the cache is tested against).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lingua_mem.config import GenerateConfig
from lingua_mem.model.kv_cache import KVCache
from lingua_mem.parallel.runtime import all_reduce, world


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, valid, positions: (B, L) for prompts padded on the left to the longest (L)."""
    length = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), length, dtype=torch.long)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
            valid[i, length - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # each prompt's own 0, 1, ...
    return tokens.to(device), valid.to(device), positions.to(device)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): argmax at temperature 0, else a draw from the
    smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p  # the top token always stays
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _everyone(done: bool, device) -> bool:
    """done on every rank (generation under torchrun: every rank takes the same steps, as each
    forward of a sharded model is a collective)."""
    if world()[1] == 1:
        return done
    return bool(all_reduce(torch.tensor([int(done)], device=device), dist.ReduceOp.MIN).item())


def common_length(length: int, device) -> int:
    """The longest prompt over all ranks (their forward calls must have one shape)."""
    if world()[1] == 1:
        return length
    return int(all_reduce(torch.tensor([length], device=device), dist.ReduceOp.MAX).item())


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, stop=None, active: int | None = None) -> list[list[int]]:
    """The new token ids of each prompt (B lists), ending before EOS or at max_new_tokens;
    stop(i, ids) -> bool may end sequence i earlier (its ids are kept). Prompts longer than
    the model's max_seq_len - max_new_tokens keep their last tokens. Prompts from `active`
    on are fillers (one shape on every rank): never waited for, their ids empty."""
    max_len = model.args.max_seq_len
    if not 0 < max_new_tokens < max_len:
        raise ValueError(f"generate.max_new_tokens: {max_new_tokens} must be in 1..{max_len - 1} "
                         f"(model.max_seq_len={max_len})")
    device = model.rope_cos.device
    keep = max_len - max_new_tokens
    prompts = [list(p)[-keep:] for p in prompts]
    length = common_length(max(len(p) for p in prompts), device)
    tokens, valid, positions = left_pad(prompts, device)
    if tokens.shape[1] < length:  # pad to the length every rank uses
        extra = length - tokens.shape[1]
        tokens = torch.nn.functional.pad(tokens, (extra, 0))
        valid = torch.nn.functional.pad(valid, (extra, 0))
        positions = torch.nn.functional.pad(positions, (extra, 0))
    b = tokens.shape[0]
    cache = KVCache(model.args.n_layers, b, length + max_new_tokens, device) if use_cache else None
    logits = model(tokens, positions, valid, cache)[:, -1]  # (B, V)
    out: list[list[int]] = [[] for _ in range(b)]
    finished = [i >= (active if active is not None else b) for i in range(b)]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        for i, t in enumerate(nxt.tolist()):
            if finished[i]:
                continue
            if t == eos_id:
                finished[i] = True
                continue
            out[i].append(t)
            if len(out[i]) == max_new_tokens or (stop is not None and stop(i, out[i])):
                finished[i] = True
        if _everyone(all(finished), device):
            break
        positions = positions[:, -1:] + 1  # (B, 1)
        if cache is not None:
            logits = model(nxt.view(b, 1), positions, None, cache)[:, -1]
        else:  # the reference: the whole sequence again
            tokens = torch.cat([tokens, nxt.view(b, 1)], dim=1)
            valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            all_positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            logits = model(tokens, all_positions, valid)[:, -1]
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to the first of the stop strings (all of it if none occurs)."""
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def generate(model, tokenizer, prompts: Sequence[str], cfg: GenerateConfig, stop: Sequence[str] = (),
             generator: torch.Generator | None = None) -> list[str]:
    """The completion of each prompt (text after it), cut at the first stop string; in
    batches of cfg.batch_size (each rank its own prompts under torchrun)."""
    completions: list[str] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        ids = [tokenizer.encode(p, add_bos=True, add_eos=False) for p in batch]
        done = (lambda i, new: any(s in tokenizer.decode(new) for s in stop)) if stop else None
        new = generate_ids(model, ids, cfg.max_new_tokens, tokenizer.eos_id, cfg.temperature, cfg.top_p,
                           generator, cfg.cache, done)
        completions += [cut_at_stop(tokenizer.decode(n), stop) for n in new]
    return completions


@dataclass
class GenerateCommand:
    ckpt: str = ""
    prompt: list[str] = field(default_factory=list)  # prompt="..." or prompt=["...", "..."]
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    device: str = "auto"


def main(argv: list[str]) -> int:
    from lingua_mem.cli import reports
    from lingua_mem.config import TokenizerConfig, load_config, validate_generate
    from lingua_mem.errors import ConfigError
    from lingua_mem.eval.load import load_model
    from lingua_mem.parallel.runtime import resolve_device

    def check(cfg: GenerateCommand) -> None:
        if not cfg.ckpt:
            raise ConfigError("ckpt: required (a checkpoints/<step> directory or a consolidated export)")
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {cfg.device!r} is not one of auto, cpu, cuda")
        validate_generate(cfg.generate, "generate")

    @reports(ConfigError, ValueError)
    def run(argv: list[str]) -> int:
        argv = [f"prompt=[{a.split('=', 1)[1]!r}]" if a.startswith("prompt=") and not
                a.startswith("prompt=[") else a for a in argv]
        cfg = load_config(argv, GenerateCommand, check)
        device = resolve_device(cfg.device)
        loaded = load_model(cfg.ckpt, device, TokenizerConfig(name=""))
        prompts = cfg.prompt or list(cfg.generate.prompts)
        generator = torch.Generator(device=device).manual_seed(cfg.generate.seed)
        started = time.perf_counter()
        completions = generate(loaded.model, loaded.tokenizer, prompts, cfg.generate, generator=generator)
        seconds = time.perf_counter() - started
        for p, c in zip(prompts, completions, strict=True):
            print(f"{p}\u2192{c}")
        n = sum(len(loaded.tokenizer.encode(c, add_bos=False, add_eos=False)) for c in completions)
        print(f"{len(prompts)} prompt(s), {n} new tokens in {seconds:.2f}s ({n / seconds:,.0f} tokens/s, "
              f"cache {'on' if cfg.generate.cache else 'off'})", file=sys.stderr)
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
