"""``make mutation``: mutation testing (mutmut 3) of jev4's numeric and integrity core, one group of modules at a time.

Why groups: mutmut runs, for each mutant, the tests that reach the mutated
function. Its first pass runs the whole test selection once with tracing,
so the selection decides the cost. Each group pairs a few modules with the
tests that exercise them (not the whole suite), so every group fits in
minutes on a 2-core machine and the whole run in under an hour.

Each group runs in a scratch copy of the committed tree (``.mutation/GROUP``,
git-ignored): mutmut writes its mutated tree into ``mutants/`` under the
working directory and reads its settings from ``setup.cfg`` there, so the
repository itself is never touched. The summary (counts and score per group)
and every surviving mutant with its diff go to ``--out`` as JSON; that is
what docs/testing.md reports and explains.

Not part of ``make test`` or CI: it takes most of an hour.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("mutation")

ROOT = Path(__file__).resolve().parent.parent
MUTMUT_VERSION = "3.8.1"
# A mutant times out after this many times its tests' own duration (plus TIMEOUT_CONSTANT). mutmut also
# enforces it as wall time, so on a machine busy with other work a mutant that would be killed by a test can
# time out instead: 3 x timed out nearly every mutant at a load of 7 on 2 cores. Timeouts are reported apart
# from kills (see GroupResult) so that a run on a busy machine cannot pass for a good score.
TIMEOUT_MULTIPLIER = 10.0
# Seconds added to the tests' own duration before multiplying. mutmut's default of 1 s left no room for
# what its per-test durations leave out: fixture set-up (a tiny checkpoint written and loaded for each
# mutant, since every mutant runs in a fresh fork) and (before _ONE_THREAD) torch's second thread, which doubled the CPU time
# that mutmut's limit counts. With 1 s, every mutant of jev4/model/ "timed out", i.e. counted as killed
# without any test having judged it.
TIMEOUT_CONSTANT = 10.0


# One intra-op thread per mutant: mutmut already runs one mutant per core, and two OpenMP threads per mutant on
# two cores spin against each other. Measured on the 2-core AMD EPYC: two copies of the model group's tests at
# once took 23.9 s with torch's default threads and 12.9 s with one.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Group:
    """Modules mutated together, and the tests that must kill their mutants."""

    name: str
    modules: tuple[str, ...]
    tests: tuple[str, ...]
    # Only these functions of the modules (mutmut mutant-name globs, e.g. "jev4.quant.embeddings.x_pack_bits__*"),
    # where a module is far larger than the part under test; empty: every function.
    functions: tuple[str, ...] = ()
    # Test ids left out of the selection: slow tests whose import cost every mutant would pay, whose checks
    # faster tests of the group repeat (said where they are listed).
    deselect: tuple[str, ...] = ()


def _functions(module: str, *names: str) -> tuple[str, ...]:
    """Mutant-name globs for module-level functions ``names`` of ``module`` (a dotted path)."""
    return tuple(f"{module}.x_{name}__mutmut_*" for name in names)


GROUPS = (
    Group("model", ("jev4/model/pooling.py", "jev4/model/adapters.py", "jev4/model/lora.py"), ("tests/model/test_lora.py", "tests/model/test_adapters.py", "tests/model/test_encoder.py", "tests/model/test_model_core_values.py")),
    Group("merge", ("jev4/export/merge.py",), ("tests/export/test_merge.py", "tests/export/test_merge_precision.py")),
    Group("manifest", ("jev4/export/manifest.py",), ("tests/export/test_manifest.py", "tests/export/test_manifest_format.py")),
    # The in-process tests only: tests/reliability runs whole CLI commands per mutant, minutes each.
    Group("atomic", ("jev4/atomic.py",), ("tests/test_atomic.py", "tests/test_atomic_units.py")),
    # The output-codec half of quant/embeddings.py (calibration, encode, decode); its bit layouts are 'packing' and its
    # QAT half (fake_quantize, ste, RollingRange) is tested by tests/qat, outside the groups.
    Group(
        "codecs",
        ("jev4/quant/embeddings.py",),
        ("tests/quant/test_embeddings.py", "tests/quant/test_properties.py", "tests/quant/test_packing_contract.py", "tests/quant/test_codec_contract.py"),
        (
            "jev4.quant.embeddings.xǁCalibrationǁ*",
            "jev4.quant.embeddings.xǁEmbeddingCodecǁ*",
            *_functions("jev4.quant.embeddings", "_as_array", "_check_finite", "truncate_normalize", "_as_matrix", "calibrate", "_check_truncate_dim", "_steps"),
        ),
        # Imports sentence-transformers (~10 s per mutant); the int8 codes are also checked against the slow
        # pure-Python codec of tests/quant/test_embeddings.py.
        deselect=("tests/quant/test_embeddings.py::test_int8_matches_sentence_transformers_given_the_same_ranges",),
    ),
    # The packing half of quant/embeddings.py alone: the bit layouts every stored code depends on.
    Group(
        "packing",
        ("jev4/quant/embeddings.py",),
        ("tests/quant/test_embeddings.py", "tests/quant/test_properties.py", "tests/quant/test_packing_contract.py"),
        _functions("jev4.quant.embeddings", "check_precision", "_family", "code_width", "bytes_per_vector", "pack_int4", "unpack_int4", "pack_ternary", "_trit_table", "unpack_ternary", "pack_bits", "unpack_bits"),
    ),
    Group("search", ("jev4/quant/search.py",), ("tests/quant/test_search.py", "tests/quant/test_properties.py", "tests/quant/test_search_contract.py")),
    Group("metrics", ("jev4/validate/metrics.py", "jev4/validate/streaming.py"), ("tests/validate/test_metrics.py", "tests/validate/test_streaming.py", "tests/validate/test_metrics_mutants.py")),
    Group("thresholds", ("jev4/validate/thresholds.py",), ("tests/validate/test_thresholds.py", "tests/validate/test_thresholds_boundaries.py", "tests/validate/test_codecs.py", "tests/validate/test_clip_thresholds.py")),
    Group("parity", ("jev4/validate/parity.py",), ("tests/validate/test_parity_units.py",)),
)


@dataclass
class GroupResult:
    name: str
    modules: tuple[str, ...]
    tests: tuple[str, ...]
    seconds: float
    counts: dict[str, int]
    score: float | None  # killed (incl. timeouts) / (killed + survived); mutants no test reaches are listed apart
    score_without_timeouts: float | None  # killed by a failing test only / (killed + survived): timeouts count as survivors
    survivors: list[dict[str, str]]
    no_tests: list[str]


def _mutmut() -> Path:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit(f"mutmut is not installed in this venv: {sys.executable} -m pip install mutmut=={MUTMUT_VERSION}")
    return exe


def _scratch_copy(group: Group, work: Path) -> Path:
    """The committed package, tests and pyproject in a fresh directory, with mutmut's settings for the group."""
    target = work / group.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD", "jev4", "tests", "pyproject.toml"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)  # the committed tree: uncommitted edits do not leak in
    selection = [*group.tests, *(arg for test in group.deselect for arg in ("--deselect", test))]
    lines = ["[mutmut]", "source_paths=jev4", "only_mutate=" + "\n  ".join(group.modules), "pytest_add_cli_args_test_selection=" + "\n  ".join(selection)]
    lines.append("pytest_add_cli_args=-q\n  -p\n  no:cacheprovider\n  -m\n  not slow and not gpu and not serving")
    lines.append(f"timeout_multiplier={TIMEOUT_MULTIPLIER}")
    lines.append(f"timeout_constant={TIMEOUT_CONSTANT}")
    # Fork each mutant's worker from a clean server process, not from mutmut's main process after it ran the
    # suite: torch's thread pool does not survive a fork, and workers forked after it ran hung until mutmut's
    # time limit, so they were counted as killed by timeout (every mutant of jev4/model/, 54 of packing).
    lines.append("process_isolation=forkserver")
    (target / "setup.cfg").write_text("\n".join(lines) + "\n")
    return target


def _results(mutmut: Path, cwd: Path, functions: tuple[str, ...]) -> tuple[dict[str, int], list[str], list[str]]:
    """Counts by status, survivors and unreached mutants, of the group's functions only (mutmut lists every mutant)."""
    listing = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {"total": 0}
    survived, no_tests = [], []
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name or (functions and not any(fnmatch.fnmatchcase(name, glob) for glob in functions)):
            continue
        key = status.replace(" ", "_")
        counts[key] = counts.get(key, 0) + 1
        counts["total"] += 1
        if status == "survived":
            survived.append(name)
        elif status == "no tests":
            no_tests.append(name)
    return counts, survived, no_tests


def _diff(mutmut: Path, cwd: Path, name: str) -> str:
    shown = subprocess.run([str(mutmut), "show", name], cwd=cwd, capture_output=True, text=True).stdout
    return "\n".join(line for line in shown.splitlines() if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))


def run_group(group: Group, work: Path, children: int) -> GroupResult:
    mutmut = _mutmut()
    cwd = _scratch_copy(group, work)
    log.info("%s: mutating %s against %s", group.name, ", ".join(group.modules), ", ".join(group.tests))
    started = time.perf_counter()
    with open(cwd / "mutmut-run.log", "w") as out:  # mutmut redraws a progress line; the log keeps it off the terminal
        done = subprocess.run([str(mutmut), "run", "--max-children", str(children), *group.functions], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **_ONE_THREAD, "JEV4_MUTATION": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{group.name}: mutmut run failed (exit {done.returncode}); see {cwd / 'mutmut-run.log'}")
    counts, survived, no_tests = _results(mutmut, cwd, group.functions)
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    judged = killed + counts.get("survived", 0)
    result = GroupResult(
        name=group.name,
        modules=group.modules,
        tests=group.tests,
        seconds=round(seconds, 1),
        counts=counts,
        score=round(killed / judged, 4) if judged else None,
        score_without_timeouts=round(counts.get("killed", 0) / judged, 4) if judged else None,
        survivors=[{"mutant": name, "diff": _diff(mutmut, cwd, name)} for name in survived],
        no_tests=no_tests,
    )
    log.info("%s: %d mutants, %d killed, %d survived, %d reached by no test (score %s) in %.0f s", group.name, counts.get("total", 0), killed, counts.get("survived", 0), len(no_tests), result.score, seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(g.name for g in GROUPS)}")
    parser.add_argument("--work", default=str(ROOT / ".mutation"), help="scratch copies, one per group")
    parser.add_argument("--out", default=str(ROOT / ".mutation" / "mutation.json"), help="summary and surviving mutants (JSON)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested in parallel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    known = {g.name: g for g in GROUPS}
    unknown = [name for name in args.groups if name not in known]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {list(known)}")
    chosen = [known[name] for name in args.groups] if args.groups else list(GROUPS)
    results = [run_group(group, Path(args.work), args.children) for group in chosen]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mutmut": MUTMUT_VERSION, "groups": [asdict(r) for r in results]}, indent=1, ensure_ascii=False) + "\n")
    print(f"{'group':<10} {'mutants':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'no tests':>9} {'score':>6} {'seconds':>8}")
    for r in results:
        killed = r.counts.get("killed", 0) + r.counts.get("segfault", 0)
        score = r.score if r.score is not None else "-"
        print(f"{r.name:<10} {r.counts.get('total', 0):>8} {killed:>7} {r.counts.get('timeout', 0):>8} {r.counts.get('survived', 0):>9} {len(r.no_tests):>9} {score:>6} {r.seconds:>8.0f}")
    print(f"details: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
