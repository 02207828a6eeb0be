"""An experiment's run folders (experiments/run_record.py): a folder is reused only by the run
it recorded (experiment, keys, code); anything else is refused in one line and left as it is;
a result is written whole or not at all."""

import json

import pytest

from experiments import run_record
from experiments.run_record import RunMismatch, claim, identity, read_done, write_done

KEYS = ["config=configs/debug.yaml", "steps=4", "seed=0", "optim.lr=0.003"]


def test_a_new_folder_is_recorded_and_the_same_run_reuses_it(tmp_path):
    dump = tmp_path / "runs" / "dense_seed0"
    claim(dump, identity("table1_tiny", KEYS))
    recorded = json.loads((dump / "run.json").read_text())
    assert recorded == {"experiment": "table1_tiny", "keys": KEYS, "code": run_record.code_version()}
    assert (dump / "run.json").stat().st_mode & 0o777 == 0o644
    (dump / "metrics.jsonl").write_text("{}\n")  # the run's files, then the same run again: accepted
    claim(dump, identity("table1_tiny", KEYS))
    assert read_done(dump) is None
    write_done(dump, {"recall_em": 0.5})
    assert read_done(dump) == {"recall_em": 0.5}
    assert sorted(p.name for p in dump.iterdir()) == ["metrics.jsonl", "result.json", "run.json"]


@pytest.mark.parametrize("experiment,keys,code,says", [
    ("table1", KEYS, None, "experiment 'table1_tiny' there, 'table1' here"),
    ("table1_tiny", [*KEYS[:1], "steps=1000", *KEYS[2:]], None, "steps=4 there, 1000 here"),
    ("table1_tiny", [*KEYS, "optim.value_lr=0.1"], None, "optim.value_lr=(unset) there, 0.1 here"),
    ("table1_tiny", KEYS[::-1], None, "its keys in another order"),
    ("table1_tiny", KEYS, "0123abc", "code "),
])
def test_a_folder_of_another_run_is_refused_in_one_line_and_kept(tmp_path, experiment, keys, code, says):
    dump = tmp_path / "dense_seed0"
    claim(dump, identity("table1_tiny", KEYS))
    write_done(dump, {"recall_em": 0.5})
    before = {p.name: p.read_bytes() for p in dump.iterdir()}
    wanted = identity(experiment, keys)
    if code:
        wanted["code"] = code
    with pytest.raises(RunMismatch) as exc:
        claim(dump, wanted)
    line = str(exc.value)
    assert "\n" not in line and says in line and f"{dump} holds another run" in line and "--out" in line
    assert {p.name: p.read_bytes() for p in dump.iterdir()} == before  # nothing removed or rewritten


def test_a_folder_without_a_record_or_with_a_broken_one_is_refused(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "result.json").write_text('{"recall_em": 0.1}')  # an older version's finished run
    with pytest.raises(RunMismatch, match="no record of what it trained"):
        claim(old, identity("tiny", KEYS))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    with pytest.raises(RunMismatch, match="run.json is not a run record"):
        claim(broken, identity("tiny", KEYS))
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is a new one
    claim(empty, identity("tiny", KEYS))


def test_a_half_written_result_is_not_a_result(tmp_path, capsys):
    (tmp_path / "result.json").write_text('{"name": "d32", "recall')
    assert read_done(tmp_path) is None
    assert "is not a whole result" in capsys.readouterr().out


def test_the_code_version_is_the_commit_and_a_digest_of_uncommitted_changes():
    version = run_record.code_version()
    if not (run_record.ROOT / ".git").exists():  # an installed copy: the package's version
        assert version.startswith("lingua_mem ")
        return
    head, _, digest = version.partition("+")
    assert len(head) == 40 and int(head, 16) >= 0
    assert digest == "" or len(digest) == 12
