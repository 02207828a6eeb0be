"""The continual-learning experiment's presets: the two facts corpora, the pretraining and
finetuning budgets, and each method's learning-rate grid."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One way to learn B: a finetune.mode, the config keys it adds, the swept learning rate."""

    name: str  # the run names' prefix
    mode: str  # finetune.mode
    lr_key: str  # optim.lr (dense / adapters) or optim.value_lr (the value rows)
    lrs: tuple[float, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preset:
    name: str
    model: tuple[str, ...]  # config keys of the model and its batches (on top of configs/debug.yaml)
    people_a: int  # pretraining facts (seed 0)
    people_b: int  # the new facts (seed 1), learned by finetuning
    pretrain_steps: int
    pretrain: tuple[str, ...]  # the pretraining's optimizer keys
    finetune_steps: int
    evals: int  # evaluations per finetuning run, evenly spaced
    usage_batches: int  # background batches of the pretraining data
    methods: tuple[Method, ...]
    max_questions: int  # per question set (A recall is sampled; B's are all asked when fewer)
    expected_minutes: float
    machine: str
    usage: tuple[str, ...] = ()  # config keys of the background count (e.g. its batch size)


FULL_VALUE_LR_RATIO = 10 / 3  # full finetuning: value_lr = lr x this, pretraining's ratio

PRESETS = {
    # the test's: every stage through the same command, a few steps each
    "tiny": Preset(
        name="tiny",
        model=("model.dim=64", "model.n_layers=2", "model.max_seq_len=64", "memory.layers=[1]",
               "memory.n_keys=16", "memory.heads=2", "memory.knn=4", "memory.k_dim=32",
               "data.batch_size=2", "data.seq_len=64"),
        people_a=20, people_b=5, pretrain_steps=8, pretrain=("optim.warmup=2",), finetune_steps=4, evals=2,
        usage_batches=2,
        methods=(Method("full", "full", "optim.lr", (1e-3,)),
                 Method("lora", "lora", "optim.lr", (1e-2,), ("finetune.lora.rank=2",)),
                 Method("sparse", "sparse_memory", "optim.value_lr", (10.0,), ("finetune.top_t=8",))),
        max_questions=20, expected_minutes=1, machine="any CPU"),
    # the debug model (configs/debug.yaml: dim 256, 4 layers, 4,096 shared values at layers 1
    # and 3) on a 2-core CPU machine
    "small": Preset(
        name="small", model=(), people_a=100, people_b=30, pretrain_steps=1200,
        pretrain=("optim.warmup=50", "log_every=50"), finetune_steps=200, evals=5, usage_batches=64,
        methods=(Method("full", "full", "optim.lr", (1e-4, 3e-4, 1e-3)),
                 Method("lora", "lora", "optim.lr", (1e-3, 3e-3, 1e-2)),
                 Method("sparse", "sparse_memory", "optim.value_lr", (1.0, 10.0, 100.0),
                        ("finetune.top_t=128", "finetune.optimizer=sgd")),
                 Method("sparse_adamw", "sparse_memory", "optim.value_lr", (1e-3, 1e-2),
                        ("finetune.top_t=128", "finetune.optimizer=adamw")),
                 # TF-IDF's document frequency saturates in a memory this small (docs/continual.md):
                 # the KL ranking, on more rows
                 Method("sparse_kl", "sparse_memory", "optim.value_lr", (100.0, 1000.0),
                        ("finetune.ranking=kl", "finetune.top_t=512", "finetune.optimizer=sgd")),
                 Method("sparse_kl_adamw", "sparse_memory", "optim.value_lr", (1e-3, 1e-2),
                        ("finetune.ranking=kl", "finetune.top_t=512", "finetune.optimizer=adamw"))),
        max_questions=300, expected_minutes=45, machine="2-core CPU"),
    # the debug model with 16x its memory (256**2 = 65,536 rows; 512**2 trains at 1.5k tok/s
    # here, too slow): fewer reads per row, so that rows can be specific to what reads them;
    # background batches of one sequence, so that a row's document frequency does not
    # saturate (32k picks a batch over 65k rows)
    "large_memory": Preset(
        name="large_memory", model=("memory.n_keys=256",), people_a=100, people_b=30, pretrain_steps=1200,
        pretrain=("optim.warmup=50", "log_every=50"), finetune_steps=200, evals=5, usage_batches=512,
        usage=("data.batch_size=1",),
        methods=(Method("full", "full", "optim.lr", (1e-4, 3e-4)),
                 Method("lora", "lora", "optim.lr", (1e-3, 3e-3)),
                 Method("sparse", "sparse_memory", "optim.value_lr", (100.0,),
                        ("finetune.top_t=512", "finetune.optimizer=sgd")),
                 Method("sparse_adamw", "sparse_memory", "optim.value_lr", (1e-2,),
                        ("finetune.top_t=512", "finetune.optimizer=adamw")),
                 Method("sparse_kl_adamw", "sparse_memory", "optim.value_lr", (1e-2,),
                        ("finetune.ranking=kl", "finetune.top_t=512", "finetune.optimizer=adamw"))),
        max_questions=300, expected_minutes=35, machine="2-core CPU"),
}
