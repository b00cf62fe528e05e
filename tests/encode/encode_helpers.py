"""Constants and helpers of the corpus-encoding tests (a module of its own: ``conftest`` names more than one file)."""

CORPUS_DOCS = 400  # stdlib-code documents: 8 shards of 50, a few seconds per run with the tiny artifact
SHARD_SIZE = 50
MAX_LENGTH = 64


def shard_stats(out):
    """{shard name: (inode, mtime_ns)}: equal for files left untouched (a rewritten file gets a new mtime, and usually a new inode)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("part-*.parquet"))}
