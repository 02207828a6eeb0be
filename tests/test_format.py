"""Runs that survive an upgrade. The checkpoint fixtures of tests/fixtures/ (one a format,
written by the version that introduced it, never rewritten) resume under this version and log
the rows their own uninterrupted run logged; a format newer than this version reads is refused
in one line and left as it is. And the golden losses: configs/debug.yaml's first steps on CPU
fp32, which a silent change to the numerics (init, data order, loss, optimizer, schedule)
moves (one set of rows a torch version). Update tests/golden/debug_losses.json only on purpose,
with the reason in the commit, under each torch version the suite runs (2.13, and 2.11 for
.ci/oldest_torch.sh):

    python tests/test_format.py --update-golden
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from make_checkpoint_fixture import COMPARED, train_args  # noqa: E402

from lingua_mem.checkpoint.records import CHECKPOINT_FORMAT, NewerFormat, verify  # noqa: E402

FIXTURES = sorted((ROOT / "tests" / "fixtures").glob("checkpoint_format*"))
GOLDEN = ROOT / "tests" / "golden" / "debug_losses.json"
GOLDEN_RUN = ["config=configs/debug.yaml", "steps=8", "log_every=1", "checkpoint.every=0",
              "data.prefetch=none", "logging.console=false"]
# the same machine repeats a run bit for bit; another CPU (its vector width) or torch version
# sums in another order: differences of ~1e-7 relative, which 8 steps grow to ~1e-6
RTOL = 2e-5


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def rows(dump: Path) -> list[dict]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, lines) if "loss" in r]


def close(got: list[dict], want: list[dict]) -> bool:
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return False
    pairs = zip(got, want, strict=True)
    return all(g[k] == pytest.approx(w[k], rel=RTOL, abs=1e-9) for g, w in pairs for k in COMPARED)


def test_every_format_has_a_fixture():
    formats = [int(f.name.removeprefix("checkpoint_format")) for f in FIXTURES]
    assert formats == list(range(1, CHECKPOINT_FORMAT + 1))


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_a_fixture_checkpoint_resumes_with_the_rows_its_run_logged(tmp_path, fixture):
    expected = json.loads((fixture / "expected.json").read_text())
    shutil.copytree(fixture / "checkpoints", tmp_path / "checkpoints")
    proc = train(*train_args(fixture), f"dump_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints'}" in proc.stdout
    got = rows(tmp_path)
    assert close(got, expected["rows"]), (got, expected)


def test_a_newer_format_is_refused_in_one_line_and_kept(tmp_path):
    shutil.copytree(FIXTURES[-1] / "checkpoints", tmp_path / "checkpoints")
    step = next((tmp_path / "checkpoints").iterdir())
    manifest = json.loads((step / "manifest.json").read_text())
    (step / "manifest.json").write_text(json.dumps({**manifest, "format": CHECKPOINT_FORMAT + 1}))
    with pytest.raises(NewerFormat, match=f"checkpoint format {CHECKPOINT_FORMAT + 1}, newer than"):
        verify(step)
    proc = train(*train_args(FIXTURES[-1]), f"dump_dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"checkpoint format {CHECKPOINT_FORMAT + 1}, newer than this lingua_mem reads" in proc.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [step.name]  # not set aside
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("written,reads", [(None, True), (0, True), (CHECKPOINT_FORMAT, True), ("1", False),
                                            (True, False), (-1, False), (CHECKPOINT_FORMAT + 1, False)])
def test_which_formats_this_version_reads(tmp_path, written, reads):
    """A manifest without "format" (written before formats were recorded) is format 0."""
    shutil.copytree(FIXTURES[-1] / "checkpoints", tmp_path / "checkpoints")
    step = next((tmp_path / "checkpoints").iterdir())
    manifest = {k: v for k, v in json.loads((step / "manifest.json").read_text()).items() if k != "format"}
    if written is not None:
        manifest["format"] = written
    (step / "manifest.json").write_text(json.dumps(manifest))
    if reads:
        verify(step)
    else:
        with pytest.raises(NewerFormat):
            verify(step)


def run_golden(dump: Path) -> list[dict]:
    proc = train(*GOLDEN_RUN, f"dump_dir={dump}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return rows(dump)


def torch_minor() -> str:
    import torch

    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def test_the_debug_config_logs_the_golden_losses(tmp_path):
    """Per torch version: the same seed draws other initial weights under torch 2.11 and 2.13
    (torch.nn.init.trunc_normal_ changed how it samples), so each has its own losses."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["run"] == GOLDEN_RUN
    if torch_minor() not in golden["by_torch"]:
        pytest.skip(f"no golden losses for torch {torch_minor()}: tests/test_format.py --update-golden")
    want = golden["by_torch"][torch_minor()]["rows"]
    got = run_golden(tmp_path)
    assert close(got, want), ("the numerics changed: if on purpose, update the golden file (see this "
                              "module's docstring)", got, want)


if __name__ == "__main__" and sys.argv[1:] == ["--update-golden"]:
    import datetime
    import platform
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        golden_rows = run_golden(Path(tmp))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"by_torch": {}}
    golden["run"] = GOLDEN_RUN
    golden["by_torch"][torch_minor()] = {"torch": torch.__version__, "written": str(datetime.date.today()),
                                         "machine": platform.machine(), "rows": golden_rows}
    golden["by_torch"] = dict(sorted(golden["by_torch"].items()))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote torch {torch_minor()}'s rows into {GOLDEN}")
