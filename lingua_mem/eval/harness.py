"""lm-evaluation-harness (lm-eval 0.4.13) on lingua_mem models: the `lingua_mem` model type.

From the shell, with any lm-eval CLI arguments:

    python -m lingua_mem.eval.harness --model lingua_mem \\
        --model_args ckpt=dumps/x/checkpoints/0000000200,batch_size=8,device=cuda \\
        --tasks hellaswag [--include_path my_tasks/ --limit 100 --num_fewshot 0 ...]

registers the model type, then runs lm-eval's own CLI (lm_eval.__main__.cli_evaluate) on the
arguments (`--model lingua_mem`, `--device auto` and `--batch_size 8` are added when missing;
`ls tasks`, `validate` work too). Plain `lm_eval --model lingua_mem` does NOT work: lm-eval 0.4.13 finds
models only in its registry, which holds its own lazy MODEL_MAPPING (lm_eval/models/__init__.py)
plus classes registered by code imported in that process; it reads no entry point for
out-of-tree models. In Python, `import lingua_mem.eval.harness` registers it for
`lm_eval.simple_evaluate(model="lingua_mem", model_args="ckpt=...")`, or pass an instance
(`LinguaMemLM.from_loaded(load_model(...))`); eval.py's `tasks=lm_eval:<task>` calls
run_lm_eval.

model_args: ckpt (a training checkpoints/<step> directory or a consolidated export), batch_size
(sequences per forward call, default 8), device (auto | cpu | cuda | cuda:N), max_length (the
context window, default and at most the model's max_seq_len), max_gen_toks (default 256),
tokenizer / tokenizer_path (default: the run's own tokenizer). model_args override lm-eval's
--batch_size / --device.

Conventions (those of lm-eval's HF causal models):
- A scored text follows BOS: loglikelihood scores continuation tokens after BOS + the context
  (an empty context: BOS alone); the context's trailing whitespace moves to the continuation,
  and the pair is tokenized as one text (context + continuation) then split where it stops
  matching the context's own tokens, so a tokenizer that marks word starts (SentencePiece)
  sees " word" as it does inside a document. No EOS is added.
- A continuation token is scored by the logits at the position before it. A request longer
  than the window keeps its last max_length + 1 tokens (the context is cut on the left); a
  continuation longer than the window is scored in windows of max_length tokens.
- loglikelihood_rolling: BOS + the text in disjoint windows of max_length predicted tokens,
  each window's input the max_length tokens before its last target (one token of overlap;
  the last window full context): lm-eval's get_rolling_token_windows with context_len=1.
- generate_until: lingua_mem.eval.generate (greedy unless do_sample / temperature > 0), cut
  at the first `until` string; EOS always ends a generation.

One process only (rank 0 of 1): eval.py runs lm_eval tasks without torchrun.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own lazy model entries (hf, vllm, ...), before ours
import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from lingua_mem.config import GenerateConfig, TokenizerConfig
from lingua_mem.errors import ConfigError
from lingua_mem.eval.generate import generate
from lingua_mem.eval.load import LoadedModel, load_model

MODEL_NAME = "lingua_mem"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
MODEL_ARGS = ("ckpt", "batch_size", "device", "max_length", "max_gen_toks", "tokenizer", "tokenizer_path")
IGNORED_ARGS = ("max_batch_size", "trust_remote_code")  # lm-eval may pass them; nothing to do here
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "do_sample", "temperature", "top_p")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- tokens and windows


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids starting with BOS, continuation ids) of a loglikelihood request.

    The context's trailing whitespace moves to the continuation; then the whole text is
    tokenized once and split after the longest prefix it shares with the context's own
    tokens, so context + continuation ids are exactly the tokens of the whole text."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False, add_eos=False)
    ctx = tokenizer.encode(context, add_bos=True, add_eos=False)
    whole = tokenizer.encode(context + continuation, add_bos=True, add_eos=False)
    common = 0
    for a, b in zip(ctx, whole, strict=False):
        if a != b:
            break
        common += 1
    common = max(common, 1)  # BOS always conditions
    return whole[:common], whole[common:]


def scoring_windows(tokens: Sequence[int], n_context: int, max_length: int) -> list[tuple[list[int], int]]:
    """(window, n) pairs scoring tokens[n_context:], each predicted once: a window is at most
    max_length + 1 tokens, its input window[:-1], its last n tokens the targets (predicted by
    the logits at the positions before them). Targets come in chunks of max_length from the
    first; each chunk's input is the (up to) max_length tokens before its last target."""
    tokens = list(tokens)
    if n_context < 1:
        raise ValueError("scoring_windows: the first target needs a token before it (n_context >= 1)")
    out = []
    start = n_context
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        low = max(0, end - 1 - max_length)
        out.append((tokens[low:end], end - start))
        start = end
    return out


# ---------------------------------------------------------------- the model type


def _batch_size(value) -> int:
    """An int; lm-eval's "auto" / "auto:N" (no automatic sizing here) becomes the default."""
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size=%s: no automatic batch sizing for lingua_mem; using %d", value,
                    DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args: batch_size={value!r} is not an integer") from None
    if size < 1:
        raise ConfigError(f"model_args: batch_size={size} must be >= 1")
    return size


def _device(name) -> torch.device:
    from lingua_mem.parallel.runtime import resolve_device

    name = "auto" if name in (None, "") else str(name)
    if name.startswith("cuda:") and not torch.cuda.is_available():
        raise ConfigError(f"model_args: device={name} requested but no GPU is available")
    return resolve_device(name) if name in ("auto", "cuda", "cpu") else torch.device(name)


class LinguaMemLM(LM):
    """A lingua_mem model (LoadedModel) as an lm-eval LM: loglikelihood, loglikelihood_rolling
    and generate_until (see the module docstring for the conventions).

    From lm-eval: model_args ckpt=...,batch_size=8,device=cpu,max_length=... In process:
    LinguaMemLM.from_loaded(load_model(...), batch_size=8)."""

    def __init__(self, ckpt: str = "", batch_size: int | str = DEFAULT_BATCH_SIZE, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, tokenizer: str = "",
                 tokenizer_path: str | None = None, max_batch_size: int | None = None,
                 trust_remote_code: bool | None = None, *, loaded: LoadedModel | None = None):
        super().__init__()
        if loaded is None:
            if not ckpt:
                raise ConfigError("model_args: ckpt=<a checkpoints/<step> directory or a consolidated "
                                  "export> is required")
            loaded = load_model(str(ckpt), _device(device), TokenizerConfig(name=tokenizer or "",
                                                                            path=tokenizer_path))
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self._batch_size = _batch_size(batch_size)
        limit = int(loaded.args.max_seq_len)
        self._max_length = limit if max_length in (None, "") else int(max_length)
        if not 2 <= self._max_length <= limit:
            raise ConfigError(f"model_args: max_length={self._max_length} must be in 2..{limit} "
                              "(the model's max_seq_len)")
        self._warned: set[tuple[str, ...]] = set()
        self._max_gen_toks = int(max_gen_toks)
        if self._max_gen_toks < 1:
            raise ConfigError(f"model_args: max_gen_toks={self._max_gen_toks} must be >= 1")

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> LinguaMemLM:
        """The LM of an already loaded model (its device is the model's)."""
        return cls(batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks, loaded=loaded)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LinguaMemLM:
        """model_args (a dict) over lm-eval's own batch_size / device / max_batch_size."""
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS) - set(IGNORED_ARGS))
        if unknown:
            raise ConfigError(f"model_args: unknown key(s) {', '.join(unknown)} for {MODEL_NAME} "
                              f"(known: {', '.join(MODEL_ARGS)})")
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k in MODEL_ARGS + IGNORED_ARGS and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LinguaMemLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def tokenizer_name(self) -> str:
        """Part of lm-eval's request-cache key (the base class raises, and getattr does not catch it)."""
        tok = self.tokenizer
        return f"{type(tok).__name__}:{getattr(tok, 'path', '')}:{tok.n_words}"

    def get_model_info(self) -> dict:
        return {"lingua_mem_ckpt": str(self.loaded.path), "lingua_mem_step": self.loaded.step,
                "max_length": self.max_length}

    # -- scoring

    @torch.no_grad()
    def _score(self, windows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """(sum of the log-probs of its last n tokens, all of them the argmax) of each
        (window, n): batches of the longest first, right-padded (valid False after each
        window's tokens, positions 0.. per window). Results in the order given."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
        order = sorted((i for i, (_, n) in enumerate(windows) if n > 0), key=lambda i: -len(windows[i][0]))
        device = self.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = [list(windows[i][0][:-1]) for i in idx]
            lengths = [len(x) for x in inputs]
            width = max(lengths)
            tokens = torch.zeros(len(idx), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                tokens[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            tokens = tokens.to(device)
            if all(n == width for n in lengths):  # no padding: the plain causal forward
                logits = self.model(tokens)
            else:
                lens = torch.tensor(lengths, device=device)
                positions = torch.arange(width, device=device).expand(len(idx), width)
                valid = positions < lens[:, None]
                logits = self.model(tokens, positions.contiguous(), valid)
            sums, greedy = [], []
            for row, i in enumerate(idx):
                window, n = windows[i]
                m = lengths[row]
                logp = torch.log_softmax(logits[row, m - n : m].float(), dim=-1)  # (n, V)
                target = torch.tensor(list(window[-n:]), dtype=torch.long, device=device)
                sums.append(logp.gather(-1, target[:, None]).sum())
                greedy.append((logp.argmax(dim=-1) == target).all())
            for i, s, g in zip(idx, torch.stack(sums).tolist(), torch.stack(greedy).tolist(), strict=True):
                out[i] = (float(s), bool(g))
        return out

    def _score_requests(self, sequences: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (tokens, n_context): tokens[n_context:] scored in
        scoring_windows, their sums added."""
        windows, owner = [], []
        for k, (tokens, n_context) in enumerate(sequences):
            for w in scoring_windows(tokens, n_context, self.max_length):
                windows.append(w)
                owner.append(k)
        scored = self._score(windows)
        total = [0.0] * len(sequences)
        greedy = [True] * len(sequences)
        for k, (s, g) in zip(owner, scored, strict=True):
            total[k] += s
            greedy[k] = greedy[k] and g
        return list(zip(total, greedy, strict=True))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | BOS + context), whether greedy decoding gives it) per request."""
        pairs = [req.args for req in requests]
        sequences = []
        for context, continuation in pairs:
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            sequences.append((ctx + cont, len(ctx)))
        results = self._score_requests(sequences)
        for pair, res in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text | BOS) per request, in rolling windows of max_length."""
        texts = [req.args[0] for req in requests]
        bos = self.tokenizer.bos_id
        sequences = [([bos] + self.tokenizer.encode(t, add_bos=False, add_eos=False), 1) for t in texts]
        results = [s for s, _ in self._score_requests(sequences)]
        for text, res in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return results

    # -- generation

    def _generation(self, gen_kwargs: dict | None) -> tuple[float, float, tuple[str, ...], int]:
        """(temperature, top_p, stop strings, max new tokens) of a request's gen_kwargs."""
        kw = dict(gen_kwargs or {})
        ignored = sorted(set(kw) - set(GEN_KWARGS))
        if ignored and tuple(ignored) not in self._warned:
            self._warned.add(tuple(ignored))
            log.warning("gen_kwargs %s: not used by lingua_mem generation (known: %s)", ", ".join(ignored),
                        ", ".join(GEN_KWARGS))
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = self.max_gen_toks
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if kw.get(alias) is not None:
                max_new = int(kw[alias])
                break
        do_sample = kw.get("do_sample")
        temperature = kw.get("temperature")
        if do_sample is False:
            temperature = 0.0
        elif temperature is None:
            temperature = 1.0 if do_sample else 0.0
        top_p = float(kw.get("top_p") or 1.0)
        return float(temperature), top_p, tuple(s for s in until if s), max(1, max_new)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The generation of each (context, gen_kwargs): BOS + context, greedy unless the kwargs
        sample, up to max_gen_toks new tokens, cut at the first `until` string. A context too
        long for its max_gen_toks keeps its last tokens, giving up to half the window to new
        tokens."""
        args = [req.args for req in requests]
        groups: dict[tuple, list[int]] = {}
        prompt_lens = []
        window = self.max_length
        for i, (context, gen_kwargs) in enumerate(args):
            temperature, top_p, until, max_new = self._generation(gen_kwargs)
            n = len(self.tokenizer.encode(context, add_bos=True, add_eos=False))
            prompt_lens.append(n)
            max_new = min(max_new, max(window - n, window // 2), window - 1)
            groups.setdefault((temperature, top_p, until, max_new), []).append(i)
        out = [""] * len(args)
        for (temperature, top_p, until, max_new), idx in groups.items():
            idx = sorted(idx, key=lambda i: -prompt_lens[i])
            cfg = GenerateConfig(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                                 batch_size=self.batch_size, cache=True)
            texts = generate(self._window_model(), self.tokenizer, [args[i][0] for i in idx], cfg, stop=until)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
        for (context, gen_kwargs), text in zip(args, out, strict=True):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _window_model(self):
        """The model, seen by generate() as having max_seq_len = max_length."""
        if self.max_length == self.model.args.max_seq_len:
            return self.model
        return _Windowed(self.model, self.max_length)


class _Windowed:
    """A model whose args.max_seq_len reads as `max_length` (generate() keeps prompts in it)."""

    def __init__(self, model, max_length: int):
        from dataclasses import replace

        self._model = model
        self.args = replace(model.args, max_seq_len=max_length)
        self.rope_cos = model.rope_cos

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)


def register() -> None:
    """Register LinguaMemLM as lm-eval's model type "lingua_mem" (once per process)."""
    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(LinguaMemLM)


register()


# ---------------------------------------------------------------- in-process runs (eval.py)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' INFO/WARNING lines and progress bars off, for the duration
    (lm-eval's per-task "building requests" bar is its module's tqdm: swapped, then restored)."""
    import datasets
    import lm_eval.api.task as task_module

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    task_tqdm = task_module.tqdm
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    task_module.tqdm = functools.partial(task_tqdm, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = task_tqdm
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _kept_rng() -> Iterator[None]:
    """The random, numpy and torch generator states as they were before (simple_evaluate
    reseeds all three: a run during training must not change training's draws)."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def task_manager(task: str, include_path: str | Path | None = None):
    """An lm-eval TaskManager knowing `task`: the include_path's task YAMLs alone when the
    task is one of them (indexing lm-eval's ~15k built-in tasks takes seconds), else with
    the built-in ones. ConfigError when neither has it."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"lm_eval.include_path: no such directory {include_path}")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if local.match_tasks([task]):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    if not manager.match_tasks([task]):
        close = difflib.get_close_matches(task, manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f" nor in {include_path}" if include_path is not None else ""
        raise ConfigError(f"tasks: lm_eval:{task}: no such task built into lm-eval{where}{hint}")
    return manager


def flatten_results(results: dict, task: str) -> dict[str, float]:
    """{"lm_eval/<name>/<metric>": value} of the task's entry in simple_evaluate's results
    (all entries when the task is a tag with no entry of its own). A metric with a filter
    other than "none" is <metric>/<filter>; stderrs are <metric>_stderr; non-numbers ("N/A")
    and non-finite values are dropped."""
    table = results.get("results") or {}
    names = [task] if task in table else sorted(table)
    out: dict[str, float] = {}
    for name in names:
        for key, value in table[name].items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, "N/A"
            if not math.isfinite(value):
                continue
            metric, filt = key.split(",", 1)
            out[f"lm_eval/{name}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


def run_lm_eval(loaded: LoadedModel, task: str, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                bootstrap_iters: int = 100_000) -> dict[str, float]:
    """The metrics of lm-eval task `task` (a built-in one, or a YAML under include_path) on
    the loaded model, {"lm_eval/<task>/<metric>": value} (flatten_results). Quiet; the
    model runs in eval mode, and its mode and the random generators are left as they were."""
    import lm_eval

    lm = LinguaMemLM.from_loaded(loaded, batch_size=batch_size)
    training = loaded.model.training
    loaded.model.eval()
    try:
        with _quiet(), _kept_rng():
            manager = task_manager(task, include_path)
            results = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                                              batch_size=batch_size, task_manager=manager, log_samples=False,
                                              bootstrap_iters=bootstrap_iters)
    finally:
        loaded.model.train(training)
    return flatten_results(results, task) if results is not None else {}


# ---------------------------------------------------------------- the CLI


def _has(argv: Sequence[str], *flags: str) -> bool:
    return any(a in flags or any(a.startswith(f"{f}=") for f in flags) for a in argv)


def cli_args(argv: Sequence[str]) -> list[str]:
    """lm-eval's argv (after the program name) for ours: a run (the default command) gets
    --model lingua_mem, --device auto and --batch_size 8 unless given (in model_args too, for
    the batch size) or a --config file may set them."""
    argv = list(argv)
    if argv and argv[0] in ("ls", "validate"):
        return argv
    rest = argv[1:] if argv and argv[0] == "run" else argv
    if not rest or _has(rest, "-h", "--help") or _has(rest, "--config", "-C"):
        return ["run", *rest]
    if not _has(rest, "--model", "-M"):
        rest = ["--model", MODEL_NAME, *rest]
    if not _has(rest, "--device"):
        rest += ["--device", "auto"]  # lm-eval's default is cuda:0
    if not _has(rest, "-b") and not any("batch_size" in a for a in rest):
        rest += ["--batch_size", str(DEFAULT_BATCH_SIZE)]  # lm-eval's is 1
    return ["run", *rest]


def main(argv: Sequence[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    from lingua_mem.cli import fail

    args = cli_args(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except ConfigError as exc:
        return fail(exc)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
