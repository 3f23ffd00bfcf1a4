"""The README's quick start, run exactly as it is printed, in a new empty folder: a fresh
virtualenv, the install from this checkout, the sample table, the config, the commands —
each command's output asserted."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<<<vectorsync-quickstart>>> "


def quick_start_block() -> str:
    """The first ```bash block under the README's "## Quick start" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the README's quick start has no bash block"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's commands, heredocs kept whole with the line that opens them."""
    found: list[str] = []
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip():
            continue
        command = [line]
        heredoc = re.search(r"<<'(\w+)'", line)
        if heredoc:
            for body in lines:
                command.append(body)
                if body == heredoc.group(1):
                    break
        found.append("\n".join(command))
    return found


def test_the_quick_start_works_verbatim_in_an_empty_folder(tmp_path: Path) -> None:
    steps = commands(quick_start_block())
    # one shell runs the block as printed; a marker before each command splits its output
    script = "set -euo pipefail\n" + "\n".join(
        f"echo '{MARKER}{i}' ; echo '{MARKER}{i}' >&2\n{step}" for i, step in enumerate(steps)
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VECTORSYNC", "PYTHON", "VIRTUAL"))
    }
    env.update(VECTORSYNC=str(ROOT), PIP_DISABLE_PIP_VERSION_CHECK="1", COLUMNS="200")
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out, err = _split(done.stdout, len(steps)), _split(done.stderr, len(steps))
    ran = max((i for i, o in enumerate(out) if o or err[i]), default=0)
    assert done.returncode == 0, f"failed at: {steps[ran]}\n{done.stderr[-4000:]}"
    by_command = dict(zip(steps, zip(out, err, strict=True), strict=True))

    def output(prefix: str) -> tuple[str, str]:
        [(o, e)] = [v for k, v in by_command.items() if k.startswith(prefix)]
        return o, e

    _, synced = output("vectorsync run --once")
    assert "3 changes in" in synced and "3 embedded" in synced, synced
    found, _ = output('vectorsync search articles "how do I reset my password"')
    first, text = found.splitlines()[:2]
    assert first.split()[0] == "1." and first.split()[-1] == "1", found
    assert "forgot-password" in text
    bills, _ = output('vectorsync search articles "when do bills arrive"')
    hits = [line.split() for line in bills.splitlines() if line[:3].strip().endswith(".")]
    assert [hit[-1] for hit in hits] == ["2"], bills  # bob's only article
    status, _ = output("vectorsync status")
    assert "articles" in status and "app → vectors/articles" in status, status
    assert (tmp_path / ".vectorsync" / "qdrant" / "articles").is_dir()


def _split(text: str, steps: int) -> list[str]:
    parts = [""] * steps
    current = -1
    for line in text.splitlines(keepends=True):
        if line.startswith(MARKER):
            current = int(line[len(MARKER) :])
            continue
        if current >= 0:
            parts[current] += line
    return parts
