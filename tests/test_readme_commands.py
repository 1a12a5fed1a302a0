"""Every ```bash block of README.md runs, in order, from a temporary folder outside the checkout; any
failing command fails the test. A block may be left out only with a `<!-- readme-test: skip (reason) -->`
line right above it (the set-up block and real deployments).

The blocks are run line by line: `fedcmd ...` lines in this process through the app itself (shell words,
comments and globs as bash reads them; torch is imported once instead of once per command: seconds, not
minutes), here-documents written as bash would, anything else through bash. Sized small by rewriting,
never by editing the README: `-ge N` becomes `-ge 1 -le 1` and a grid's `--dry-run` skips the calibration
(tests/test_cli_experiment.py runs that). Everything else is the README's own text, so a renamed flag, a
missing file or a changed default breaks this test. tests/test_simulate_cli.py runs the console script.
"""

from __future__ import annotations

import glob
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```bash\n(?P<body>.*?)\n```", re.S)
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->")


def readme_blocks() -> tuple[list[str], list[str]]:
    """(blocks to run, reasons of the skipped ones)."""
    run, skipped = [], []
    for m in BLOCK.finditer(README.read_text()):
        skip = SKIP.search(m.group("before"))
        (skipped.append(skip.group("reason")) if skip else run.append(m.group("body")))
    return run, skipped


def small(script: str) -> str:
    script = re.sub(r"-ge \d+", "-ge 1 -le 1", script)
    return script.replace("--dry-run", "--dry-run --no-calibrate")


def run_block(block: str, work: Path) -> list[str]:
    """Run one README block in ``work``; returns the output of its fedcmd commands. Fails on the first
    command that does not succeed."""
    outputs: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        heredoc = re.fullmatch(r"cat > (\S+) <<'(\w+)'", line.strip())
        if heredoc:
            end = lines.index(heredoc.group(2), i)
            (work / heredoc.group(1)).write_text("\n".join(lines[i:end]) + "\n")
            i = end + 1
            continue
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "fedcmd":
            done = subprocess.run(["bash", "-c", line], cwd=work, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
            continue
        args = [expanded for w in words[1:] for expanded in (sorted(glob.glob(w)) if glob.has_magic(w) else [w])]
        result = CliRunner().invoke(app, args, terminal_width=100)
        assert result.exit_code == 0, f"README command failed (exit {result.exit_code}): {line}\n{result.output}"
        outputs.append(result.output)
    return outputs


@pytest.mark.slow
def test_every_readme_block_runs_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks, skipped = readme_blocks()
    assert len(blocks) >= 2 and len(skipped) <= 2, (len(blocks), skipped)
    assert any("fedcmd simulate" in b for b in blocks) and any("run.toml" in b for b in blocks)
    work = tmp_path / "user"
    work.mkdir()
    monkeypatch.chdir(work)
    outputs = [out for block in blocks for out in run_block(small(block), work)]
    assert (work / "runs" / "p.npz").is_file() and (work / "runs" / "p.npz.png").is_file()
    runs = sorted((work / "runs").rglob("summary.json"))
    simulations = sum(line.strip().startswith("fedcmd simulate") for b in blocks for line in b.splitlines())
    assert simulations >= 5 and len(runs) == simulations, runs  # every simulate line wrote its run folder
    assert sum("432 cells" in out for out in outputs) == 1
    assert not [p for p in work.rglob("*") if p.is_symlink()]  # nothing in the folder points into the checkout


def test_the_skipped_blocks_say_why() -> None:
    _, skipped = readme_blocks()
    assert all(len(reason) > 20 for reason in skipped), skipped


def test_readme_names_no_document_outside_the_repository() -> None:
    text = README.read_text()
    for outside in ("DESIGN.md", "REFERENCE.md", "../shared/"):
        assert outside not in text, outside
    for link in re.findall(r"`((?:docs|deploy|protocols|experiments|tests|cloud|examples)/[\w./-]+)`", text):
        assert (REPO / link.split()[0]).exists(), link
