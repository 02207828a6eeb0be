import re
import subprocess
import sys
from pathlib import Path

import pytest

from lingua_mem.config import AC_MODES, ConfigError, TrainConfig, load_config, validate

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_then_dotlist(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("steps: 7\nmodel:\n  dim: 128\n  n_heads: 8\n")
    cfg = load_config([f"config={yaml}", "model.dim=64", "memory.layers=[1,2]"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.steps == 7  # YAML over default
    assert cfg.model.dim == 64  # CLI over YAML
    assert cfg.model.n_heads == 8
    assert cfg.memory.layers == [1, 2]
    assert cfg.optim.value_lr == 1e-3  # default kept


@pytest.mark.parametrize("args,needle", [
    (["model.nope=1"], "model.nope"),
    (["steps=many"], "steps"),
    (["memory.layers=[1]", "memory.knn=80", "memory.n_keys=64"], "memory.knn"),
    (["model.n_heads=3"], "model.n_heads"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["memory.layers=[9]"], "memory.layers"),
    (["memory.layers=[1]", "memory.k_dim=7"], "memory.k_dim"),
    (["optim.scheduler=step"], "optim.scheduler"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["optim.grad_accum=0"], "optim.grad_accum"),
    (["config=/no/such.yaml"], "/no/such.yaml"),
    (["stepsx"], "stepsx"),
    (["optim.eps=-1"], "optim.eps"),
    (["optim.lr=inf"], "optim.lr"),
    (["model.ffn_dim_multiplier=0"], "model.ffn_dim_multiplier"),
    (["model.n_kv_heads=0"], "model.n_kv_heads"),
    (["model.init_std=nan"], "model.init_std"),
    (["seed=-1"], "seed"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["optim.clip=-1"], "optim.clip"),
    (["name='run\n#SBATCH --nodes=64'"], "name"),  # a #SBATCH job name, a W&B name, file names
    (["name=.."], "name"),  # would name the folder above (an experiment's runs/<name>, the run's files)
    (["name=../elsewhere"], "name"),
])
def test_bad_config_names_the_key(args, needle):
    with pytest.raises(ConfigError) as info:
        load_config(args)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_dump_dir_that_is_a_file(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    with pytest.raises(ConfigError, match="dump_dir"):
        load_config([f"dump_dir={path}"])


def test_bad_key_in_yaml_names_key_and_file(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr.*bad\.yaml"):
        load_config([f"config={yaml}"])


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("model:\n  dim: 64\n   n_layers: 2\n")  # one space too many on line 3
    with pytest.raises(ConfigError, match=re.escape(f"config: {yaml}:3:12: mapping values are not allowed "
                                                    "in this context (YAML syntax)") + "$"):
        load_config([f"config={yaml}"])


def test_a_section_given_a_value_names_its_key_and_where(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("model: 5\n")
    with pytest.raises(ConfigError, match=re.escape(f"model: expected a section (its keys, e.g. model.<key>: "
                                                    f"...), got 5 (in {yaml})")):
        load_config([f"config={yaml}"])
    yaml.write_text("data:\n  facts: 3\n")  # nested
    with pytest.raises(ConfigError, match=re.escape("data.facts: expected a section")):
        load_config([f"config={yaml}"])
    with pytest.raises(ConfigError, match=re.escape("optim: expected a section (its keys, e.g. optim.<key>: "
                                                    "...), got 'fast' (on the command line)")):
        load_config(["optim=fast"])


def test_train_py_exits_2_with_one_line_before_any_work(tmp_path):
    dump = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "config=configs/debug.yaml", f"dump_dir={dump}", "memory.knn=100"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "memory.knn" in lines[0] and "n_keys=64" in lines[0]
    assert not dump.exists()  # nothing was created


def test_all_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config([f"config={path}"])


@pytest.mark.parametrize("override,needle", [
    ("data.sources.web.path=/no/such/dir", "data.sources.web.path"),
    ("data.tokenizer.name=sentencepiece", "data.tokenizer.path"),
    ("model.vocab_size=100", "model.vocab_size"),
])
def test_train_py_rejects_bad_data_settings_before_any_work(tmp_path, override, needle):
    dump = tmp_path / "run"
    extra = ["data.tokenizer.path=/no/such.model"] if "sentencepiece" in override else []
    proc = subprocess.run(
        [sys.executable, "train.py", "config=configs/debug.yaml", f"dump_dir={dump}", override, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not dump.exists()


def test_a_bad_key_says_where_it_came_from(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model:\n  dim: 64\n")
    with pytest.raises(ConfigError, match=r"^model\.nope: .* \(on the command line\)$"):
        load_config([f"config={yaml}", "model.nope=1"])
    yaml.write_text("model:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=rf"^model\.nope: .* \(in {yaml}\)$"):
        load_config([f"config={yaml}", "model.dim=64"])


def test_a_choice_is_checked_once_from_its_literal_type(tmp_path):
    """A choice outside its Literal type: rejected at the merge (YAML or command line, saying
    which) in the words validation uses for a config built in code, with the same list."""
    yaml = tmp_path / "c.yaml"
    yaml.write_text("distributed:\n  activation_checkpointing: most\n")
    want = "distributed.activation_checkpointing: 'most' is not one of none, selective, full"
    with pytest.raises(ConfigError, match=rf"^{want} \(in {yaml}\)$"):
        load_config([f"config={yaml}"])
    with pytest.raises(ConfigError, match=rf"^{want} \(on the command line\)$"):
        load_config(["distributed.activation_checkpointing=most"])
    cfg = TrainConfig()
    cfg.distributed.activation_checkpointing = "most"
    with pytest.raises(ConfigError, match=rf"^{want}$"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^checkpoint\.preempt_signals: 'SIGFOO' is not one of SIGUSR1, "):
        load_config(["checkpoint.preempt_signals=[SIGUSR1,SIGFOO]"])  # a list item: the list's key
    assert AC_MODES == ("none", "selective", "full")


def run_train_py(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_train_py_help_and_print_config(tmp_path):
    proc = run_train_py("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python train.py")
    assert "sections:  model, memory, moe, data, optim, distributed, logging, checkpoint" in proc.stdout
    proc = run_train_py("--print-config", "steps=7", f"dump_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    cfg = load_config([f"config={printed}"])  # the printed YAML is the resolved config
    assert cfg == load_config(["config=configs/debug.yaml", "steps=7", f"dump_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()  # nothing run


def test_train_py_without_a_config_trains_the_debug_memory_model(tmp_path):
    proc = run_train_py("steps=2", "log_every=1", f"dump_dir={tmp_path}", "data.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory at layers [1, 3]" in proc.stdout  # configs/debug.yaml's Memory+ model
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 2 steps in ") and f"metrics {tmp_path / 'metrics.jsonl'}" in last
    assert ", 1,024 tokens; checkpoint " in last  # 2 steps x 2 x 256; debug saves at the last step


def test_the_license_file_is_the_one_pyproject_declares():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "MIT"
    text = (root / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


@pytest.mark.parametrize("text,needle", [
    ("", "holds no settings (an empty file, or not a mapping)"),
    ("# nothing but a comment\n", "holds no settings"),
    ("- a\n- list\n", "holds no settings"),
])
def test_a_config_file_without_settings_is_refused(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^config: {path} {re.escape(needle)}"):
        load_config([f"config={path}"])


def test_a_config_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=f"^config: {tmp_path} is a directory, not a YAML file$"):
        load_config([f"config={tmp_path}"])
