"""finetune.mode as one object: what a mode changes in a run, in the order the trainer (and
the plan) asks it. A new mode is one class here and one entry in MODES.

    convert(model)              on the built (meta) model, before sharding: adapters, freezing
    init(model, seed)           after init_weights: the mode's own parameters
    build_optimizer(model, optim)   None: the standard AdamW (optim.py)
    start(model, optimizer)     once the optimizer exists: per-step state (sparse rows)
    counting()                  a context around each training step's forward and backward
    after_backward              None, or a callable run once the gradients are reduced
    stats                       per-logged-step metrics of the mode
    describe(model)             the console line, or None
    close()
    planned                     whether the scale plan can measure the mode's step
"""

from __future__ import annotations

from contextlib import nullcontext

from lingua_mem.config import FinetuneConfig
from lingua_mem.model.args import ModelArgs
from lingua_mem.model.llama import Transformer, build_model


class FullFinetune:
    """finetune.mode=full: every parameter trains (pretraining too)."""

    planned = True  # the scale plan (lingua_mem.plan) can measure a step of this mode

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.after_backward = None

    @property
    def stats(self) -> dict:
        return {}

    def convert(self, model) -> None:
        pass

    def init(self, model, seed: int) -> None:
        pass

    def build_optimizer(self, model, optim):
        return None

    def start(self, model, optimizer) -> None:
        pass

    def counting(self):
        return nullcontext()

    def describe(self, model) -> str | None:
        return None

    def close(self) -> None:
        pass

    def _line(self, model, what: str) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"finetune.mode={self.cfg.mode}: {what}; {trainable:,} trainable parameters"


class LoraFinetune(FullFinetune):
    """finetune.mode=lora: adapters on the dense projections, everything else frozen."""

    def convert(self, model) -> None:
        from lingua_mem.finetune.lora import apply_lora

        apply_lora(model, self.cfg.lora)

    def init(self, model, seed: int) -> None:
        from lingua_mem.finetune.lora import init_lora

        init_lora(model, seed)

    def describe(self, model) -> str:
        return self._line(model, f"LoRA rank {self.cfg.lora.rank} on {', '.join(self.cfg.lora.targets)}")


class SparseMemoryFinetune(FullFinetune):
    """finetune.mode=sparse_memory: the value tables alone, and of them only the rows each step
    selects against the background usage (finetune/sparse_memory.py)."""

    planned = False  # its step selects rows from real read counts, which fake tensors do not have

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.rows = None  # the per-step row selection, once started

    def convert(self, model) -> None:
        from lingua_mem.finetune.sparse_memory import freeze_all_but_values

        freeze_all_but_values(model)

    def build_optimizer(self, model, optim):
        from lingua_mem.finetune.sparse_memory import build_sparse_optimizer

        return build_sparse_optimizer(model, self.cfg, optim)

    def start(self, model, optimizer) -> None:
        """The background counts are read and checked against the model's tables here."""
        from lingua_mem.finetune.sparse_memory import SparseMemoryFinetune as RowSelection
        from lingua_mem.memory.usage import load_usage

        n_values = {key: table.weight.shape[0] for key, table in model.values.items()}
        self.rows = RowSelection(model, self.cfg, load_usage(self.cfg.background, n_values), optimizer)
        self.after_backward = self.rows.after_backward

    @property
    def stats(self) -> dict:
        return self.rows.stats if self.rows is not None else {}

    def counting(self):
        return self.rows.counting()  # the step's reads, not an evaluation's

    def describe(self, model) -> str:
        return self._line(model, self.rows.describe())

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()


MODES = {"full": FullFinetune, "lora": LoraFinetune, "sparse_memory": SparseMemoryFinetune}


def build_finetune(cfg: FinetuneConfig) -> FullFinetune:
    return MODES[cfg.mode](cfg)


def build_model_as_trained(args: ModelArgs, finetune: FullFinetune, kernel: str = "auto",
                           attention_impl: str = "auto") -> Transformer:
    """The model on meta as a run of `finetune`'s mode trains it: built from its arguments,
    then converted (LoRA adapters, frozen parameters), before any sharding. The one way the
    trainer, the plan, eval and consolidation build a run's model, so that each sees the
    tensors the run has. `kernel` and `attention_impl` are implementations (build_model)."""
    model = build_model(args, "meta", kernel=kernel, attention_impl=attention_impl)
    finetune.convert(model)
    return model
