"""Truth benchmark: every figure lowbit reports for a variant, against an independent measurement, JSON out.

Run: python -m bench.truth [--project DIR] [--variants fp32 ptq_nf4 ...] [--out bench/results/truth.json]
DIR is a finished lowbit project (metrics/*.json, models/, data/prepared/, params.yaml); the default is this
checkout (`make bench` passes the project bench.overhead made). About 70 s a variant on an idle 2-core machine,
2-3 min for ptq_int8_static_compiled (it compiles in each of its processes): about 22 minutes for the 18 default
variants; twice that and more while other work runs. --rss-repeats N (default 3) measures each peak N times: the
median is the independent figure and the range judges the one reported run (run_spread).

Each variant's figures (metrics/<variant>.json) are measured again, each kind in a fresh process of its
own (`python -m bench.truth --child KIND ...`), and never through lowbit's measuring code (lowbit.measure,
lowbit.io, lowbit.isolation):
- weight_bytes    tensor bytes of the saved files: safetensors headers' data_offsets; a .pt2 program loaded with
                  torch.export.load, each storage once. Adapters: the base's files plus the adapter's, the base
                  costed in NF4 for QLoRA (the base is quantized when it is loaded, its files are FP32).
- total_params    the FP32 baseline's floating-point tensors (every variant of one architecture stands for the
                  same weights), plus the adapter's for adapters.
- bits_per_param  dtype arithmetic: Σ bits(dtype) × numel over the saved tensors / total_params from the files.
- disk_bytes      os.walk + os.stat(st_size) under the variant's model_dir.
- peak_rss_bytes  max RSS (/usr/bin/time -v, or wait4's ru_maxrss without it) of a fresh process that imports
                  lowbit.evaluation (the evaluate stage's forkserver preload), reads the test/val splits and runs
                  evaluate_saved_variant on this variant only, with the run's params and thread count.
- serving_memory_bytes  that peak − the peak of a fresh process that imports and reads the same and loads no model
                  (the project's `import_floor` check compares that floor with import_floor_bytes).
- latency_ms_p50  a fresh process loads the variant, tokenizes evaluate.latency_samples test texts one at a time
                  (model.max_length, truncation), warms up, and times each batch-1 forward pass with perf_counter,
                  evaluate.latency_rounds passes over the texts, each text's fastest counted (as lowbit defines the
                  figure); --latency-repeats such processes (default 3): the median of their p50s is the figure,
                  their range judges the reported run (run_spread).

Per check: reported, independent, abs_diff and relative_diff (reported − independent, over independent),
within_2pct, and an explanation (null where the figures agree exactly) that names each known difference
between the two measurements in numbers and what is left unexplained. `summary` counts the checks within 2%.
Timing figures depend on the machine's load: `loadavg` is recorded with each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME = Path("/usr/bin/time")
TOLERANCE = 0.02
CARD = "lowbit_variant.json"  # lowbit.variants.CARD; read as plain JSON here
BASELINE = "fp32"
HEAD = "classifier"  # lowbit.adapters.HEAD: kept out of NF4, trained in full by adapters
# Bits per element of safetensors' dtype names (the safetensors format specification).
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "I16": 16, "F16": 16,
                    "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64}
# bitsandbytes' NF4 with double quantization (its defaults, as lowbit.quant.bnb.nf4_config uses them):
# 4 bits a weight, one uint8 absmax per block of 64 weights, one fp32 absmax per 256 such blocks,
# and two fp32 code books per layer (16 NF4 levels, 256 levels for the absmax quantization).
NF4_BLOCK, NF4_NESTED_BLOCK, NF4_CODEBOOK_BYTES = 64, 256, 4 * (16 + 256)
# transformers' BERT embeddings hold these int64 [1, max_position_embeddings] buffers, not persistent:
# in memory (measured by weight_bytes) but absent from the files save_pretrained writes.
UNSAVED_BUFFERS = ("position_ids", "token_type_ids")


# ---------------------------------------------------------------- children: each in a fresh process

def safetensors_tensors(path: Path) -> list[dict]:
    """Every tensor of a .safetensors file from its JSON header: bytes from data_offsets, bits from the dtype."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return [{"name": name, "file": path.name, "bits": SAFETENSORS_BITS[t["dtype"]], "numel": math.prod(t["shape"]),
             "nbytes": t["data_offsets"][1] - t["data_offsets"][0], "ndim": len(t["shape"]),
             "float": t["dtype"].startswith(("F", "BF"))}
            for name, t in header.items()]


def program_tensors(path: Path) -> list[dict]:
    """Every tensor of a torch.export program (.pt2), each storage once; bits from torch's dtype info."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops the graph calls
    import transformers.modeling_outputs  # noqa: F401  registers the output class in pytree

    program = torch.export.load(str(path))
    seen, tensors = set(), []
    for name, tensor in [*program.state_dict.items(), *program.constants.items()]:
        if not torch.is_tensor(tensor):
            continue
        storage = tensor.untyped_storage()
        if (storage.data_ptr(), storage.nbytes()) in seen:
            continue
        seen.add((storage.data_ptr(), storage.nbytes()))
        info = torch.finfo(tensor.dtype) if tensor.dtype.is_floating_point else torch.iinfo(tensor.dtype)
        tensors.append({"name": name, "file": path.name, "bits": info.bits, "numel": tensor.numel(),
                        "nbytes": storage.nbytes(), "ndim": tensor.dim(), "float": tensor.dtype.is_floating_point})
    return tensors


def saved_tensors(directory: Path) -> list[dict]:
    tensors = []
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            tensors += safetensors_tensors(path)
        elif path.suffix == ".pt2":
            tensors += program_tensors(path)
    return tensors


def files_under(directory: Path) -> list[dict]:
    """Every file below `directory` (os.walk, symlinks followed as lowbit's figure does) with size and mtime."""
    found = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            stat = os.stat(Path(root) / name)
            found.append({"path": str((Path(root) / name).relative_to(directory)), "bytes": stat.st_size,
                          "mtime": stat.st_mtime})
    return found


def baseline_params(project: Path) -> int | None:
    """Floating-point values in the FP32 baseline's files: the parameters of the architecture."""
    for card in sorted((project / "models").rglob(CARD)):
        hidden = any(part.startswith(".") for part in card.relative_to(project / "models").parts)  # a killed stage's tmp
        if not hidden and json.loads(card.read_text())["variant"] == BASELINE:
            return sum(t["numel"] for t in saved_tensors(card.parent) if t["float"])
    return None


def child_files(project: Path, model_dir: Path) -> dict:
    """The saved variant as files: its tensors, its directory, and for adapters the base's."""
    card = json.loads((model_dir / CARD).read_text())
    result = {"card": card, "tensors": saved_tensors(model_dir), "files": files_under(model_dir),
              "baseline_params": baseline_params(project), "config": read_config(model_dir)}
    if card["format"] == "peft":
        from lowbit.models import resolve_model  # where the loader takes the base from (a directory, not a measure)

        base = Path(resolve_model(card["base_model"]))
        adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
        result |= {"base_dir": str(base), "base_tensors": saved_tensors(base), "base_files": files_under(base),
                   "config": read_config(base), "modules_to_save": sorted(set(adapter_config.get("modules_to_save") or []))}
    return result


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def memory_status() -> dict[str, int]:
    """This process's resident memory now (VmRSS = RssAnon + RssFile + RssShmem) and its peak (VmHWM), in bytes."""
    fields = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    lines = Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []
    found = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.split(":")[0] in fields}
    return {field: found.get(field, 0) for field in fields}


def load_data(project: Path):
    """What the evaluate stage's forkserver preloads, then the params and the splits it hands each child."""
    import lowbit.evaluation  # noqa: F401  the forkserver's preload (tasks.evaluate.CHILD_IMPORTS, classifiers)
    import pandas as pd
    from lowbit.config import load_params

    prepared = project / "data" / "prepared"
    params = load_params(project / "params.yaml")
    labels = json.loads((prepared / "meta.json").read_text())["labels"]
    return params, pd.read_parquet(prepared / "test.parquet"), pd.read_parquet(prepared / "val.parquet"), labels


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def child_floor(project: Path, threads: int | None) -> dict:
    """Imports and data, no model: the floor a serving process starts from."""
    set_threads(threads)
    load_data(project)
    return memory_status()


def child_forked() -> dict:
    """The same imports, seen from a child forked from a forkserver that preloaded them, as the evaluate stage
    measures (multiprocessing's own forkserver here, not lowbit.isolation): what such a child counts as resident."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lowbit.evaluation"])
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(memory_status).result()


def child_rss(project: Path, variant: str, model_dir: Path, threads: int | None) -> dict:
    """Imports and data, then lowbit's evaluation of this variant only; the process's peak is measured outside."""
    from lowbit.evaluation import evaluate_saved_variant

    set_threads(threads)
    params, test, val, labels = load_data(project)
    before = memory_status()
    record, _, _ = evaluate_saved_variant(variant, model_dir, test, val, params.evaluate, params.model, labels)
    return {"before_model": before, "end": memory_status(),
            "lowbit_latency_ms_p50_now": record["metrics"]["latency_ms_p50"]}


def child_latency(project: Path, model_dir: Path, threads: int | None) -> dict:
    """Batch-1 forward passes over the run's latency texts, timed here: evaluate.latency_rounds passes over them,
    each text's fastest counted (as lowbit defines the figure)."""
    import pandas as pd
    import torch
    from lowbit.config import load_params
    from lowbit.formats import load_variant  # the loader only: the timing below is this benchmark's

    set_threads(threads)
    params = load_params(project / "params.yaml")
    texts = pd.read_parquet(project / "data" / "prepared" / "test.parquet")["text"].tolist()
    model, tokenizer = load_variant(model_dir, params.model)
    model.eval()
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples = [texts[i % len(texts)] for i in range(params.evaluate.latency_samples)]  # as the run: cycling the test texts
    encoded = [tokenizer(text, truncation=True, max_length=params.model.max_length, return_tensors="pt") for text in samples]
    inputs = [{k: v.to(device) for k, v in example.items()} for example in encoded]
    fastest = [math.inf] * len(inputs)
    with torch.inference_mode():
        for i in range(max(1, params.evaluate.warmup_batches)):
            model(**inputs[i % len(inputs)])
        compiled_before = getattr(model, "compile_seconds", 0.0)
        for _ in range(params.evaluate.latency_rounds):
            for i, example in enumerate(inputs):
                start = time.perf_counter()
                model(**example)
                sync()
                fastest[i] = min(fastest[i], (time.perf_counter() - start) * 1000.0)
    return {"p50": statistics.median(fastest), "p95": percentile(fastest, 95),
            "compile_seconds_in_timed_loops": getattr(model, "compile_seconds", 0.0) - compiled_before}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without importing numpy here."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (rank - low)


def child_main(args: argparse.Namespace) -> None:
    os.chdir(args.project)  # relative paths in params.yaml resolve as in the run; lowbit is imported from REPO
    model_dir = Path(args.model_dir) if args.model_dir else None
    run = {"files": lambda: child_files(args.project, model_dir),
           "floor": lambda: child_floor(args.project, args.threads),
           "forked": child_forked,
           "rss": lambda: child_rss(args.project, args.variant, model_dir, args.threads),
           "latency": lambda: child_latency(args.project, model_dir, args.threads)}[args.child]
    Path(args.result).write_text(json.dumps(run()))


# ---------------------------------------------------------------- the parent: spawn, compare, explain

def spawn(kind: str, project: Path, timeout: float = 1800, **options) -> tuple[dict, dict]:
    """Run one child; (its result, {"peak_rss_bytes", "peak_rss_wait4_bytes", "seconds"}) measured from outside."""
    with tempfile.TemporaryDirectory(prefix="truth-") as tmp:
        result, log, timing = Path(tmp) / "result.json", Path(tmp) / "log.txt", Path(tmp) / "time.txt"
        command = [sys.executable, "-m", "bench.truth", "--child", kind, "--project", str(project), "--result", str(result)]
        command += [f"--{key.replace('_', '-')}={value}" for key, value in options.items() if value is not None]
        if TIME.exists():
            command = [str(TIME), "-v", "-o", str(timing), *command]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        started = time.perf_counter()
        with log.open("w") as out:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            killer = threading.Timer(timeout, process.kill)
            killer.start()
            _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (with its children's)
            killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise RuntimeError(f"child {kind} {options} exited {process.returncode}:\n" + log.read_text()[-3000:])
        wait4_peak = usage.ru_maxrss * 1024  # Linux: KiB
        measured = {"peak_rss_bytes": time_v_peak(timing) if TIME.exists() else wait4_peak,
                    "peak_rss_wait4_bytes": wait4_peak, "seconds": time.perf_counter() - started}
        return json.loads(result.read_text()), measured


def time_v_peak(path: Path) -> int:
    for line in path.read_text().splitlines():
        if "Maximum resident set size (kbytes)" in line:
            return int(line.rsplit(":", 1)[1]) * 1024
    raise RuntimeError(f"{TIME} -v wrote no maximum resident set size:\n{path.read_text()}")


def compare(reported: float | None, independent: float | None, explanation: str | None = None, **extra) -> dict:
    """One check's record: relative_diff = (reported − independent) / independent."""
    if reported is None or independent is None:
        return {"reported": reported, "independent": independent, "abs_diff": None, "relative_diff": None,
                "within_2pct": None, "explanation": explanation or "no reported figure to compare", **extra}
    relative = (reported - independent) / independent if independent else (0.0 if reported == independent else math.inf)
    return {"reported": reported, "independent": independent, "abs_diff": reported - independent,
            "relative_diff": relative, "within_2pct": abs(relative) <= TOLERANCE,
            "explanation": explanation if reported != independent else None, **extra}


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def sentence(items: dict[str, float], unit: str, residual: float, total: float) -> str:
    """'known differences: a: +x bytes; b: -y bytes; unexplained: +r bytes (p% of the reported figure)'."""
    known = "; ".join(f"{why}: {value:+,.0f} {unit}" for why, value in items.items() if value)
    share = abs(residual) / total * 100 if total else 0.0
    return f"known differences: {known or 'none'}; unexplained: {residual:+,.0f} {unit} ({share:.4f}% of the reported figure)"


def nf4_bytes(numel: int) -> int:
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_CODEBOOK_BYTES


def nf4_linear(tensor: dict) -> bool:
    """A weight bitsandbytes puts in NF4: a 2-D Linear weight outside the embeddings and the FP32 head."""
    name = tensor["name"]
    return tensor["float"] and tensor["ndim"] == 2 and name.endswith(".weight") and "embeddings" not in name \
        and not name.startswith(f"{HEAD}.") and f".{HEAD}." not in name


def base_cost(files: dict) -> tuple[int, int, str | None]:
    """(bytes, bits) of an adapter's base as held in memory, from its files; NF4-costed for QLoRA."""
    tensors = files.get("base_tensors", [])
    if files["card"].get("base_quantization") != "nf4":
        return sum(t["nbytes"] for t in tensors), sum(t["bits"] * t["numel"] for t in tensors), None
    quantized = [t for t in tensors if nf4_linear(t)]
    kept = [t for t in tensors if not nf4_linear(t)]
    nf4 = sum(nf4_bytes(t["numel"]) for t in quantized)
    stored = sum(t["nbytes"] for t in tensors)
    values = sum(t["numel"] for t in quantized)
    note = (f"the base's files are FP32 ({stored:,} bytes), quantized to NF4 when loaded (card base_quantization: nf4): "
            f"its {len(quantized)} Linear weights ({values:,} values) costed as NF4 with double quantization = {nf4:,} "
            f"bytes (4 bits each, a uint8 absmax per {NF4_BLOCK}, an fp32 absmax per {NF4_NESTED_BLOCK} blocks, "
            f"{NF4_CODEBOOK_BYTES} bytes of code books a layer); bitsandbytes' packed quant-state JSON "
            f"(~170 bytes a layer) is not costed")
    return nf4 + sum(t["nbytes"] for t in kept), 8 * nf4 + sum(t["bits"] * t["numel"] for t in kept), note


def memory_minus_files(files: dict) -> dict[str, int]:
    """Bytes the loaded model holds that its files do not (positive) or the files hold that it does not (negative)."""
    tensors = files["tensors"] + files.get("base_tensors", [])
    items = {}
    positions = files["config"].get("max_position_embeddings")
    if positions and files["card"]["format"] != "pt2e":  # a program holds exactly the tensors it saved
        missing = [b for b in UNSAVED_BUFFERS if not any(t["name"].endswith(f"embeddings.{b}") for t in tensors)]
        if missing:
            why = f"non-persistent int64 buffers {'/'.join(missing)} [1, {positions}] (in memory, not saved)"
            items[why] = 8 * positions * len(missing)
    tags = [t for t in tensors if t["name"].endswith(".weight_format")]
    if tags:
        why = f"{len(tags)} LLM.int8 weight_format tags (saved by transformers, not held by the loaded layers)"
        items[why] = -sum(t["nbytes"] for t in tags)
    head = head_copy(files)
    if head:
        why = f"the base's own {'/'.join(files['modules_to_save'])} kept by PEFT beside the trained copy (modules_to_save)"
        items[why] = sum(t["nbytes"] for t in head)
    return items


def head_copy(files: dict) -> list[dict]:
    """The adapter file's full copies of modules_to_save: in memory PEFT holds the base's original module too."""
    modules = files.get("modules_to_save") or []
    return [t for t in files["tensors"] if "lora_" not in t["name"] and any(f".{m}." in t["name"] for m in modules)]


def check_weight_bytes(metrics: dict, files: dict) -> dict:
    own = sum(t["nbytes"] for t in files["tensors"])
    base, _, base_note = base_cost(files)
    independent = own + base
    items = memory_minus_files(files)
    residual = metrics["weight_bytes"] - independent - sum(items.values())
    parts = [base_note] if base_note else []
    parts.append(sentence(items, "bytes", residual, metrics["weight_bytes"]))
    where = ", ".join(sorted({t["file"] for t in files["tensors"]}))
    extra = {"files": where, "base_files_bytes": base if files.get("base_tensors") else None,
             "unexplained_bytes": residual}
    return compare(metrics["weight_bytes"], independent, "; ".join(parts), **extra)


def independent_params(files: dict) -> tuple[int | None, str]:
    if files["card"]["format"] == "peft":
        base = sum(t["numel"] for t in files["base_tensors"] if t["float"])
        own = sum(t["numel"] for t in files["tensors"] if t["float"])
        return base + own, "floating-point values of the base's files plus the adapter's"
    return files["baseline_params"], "floating-point values of the FP32 baseline's files"


def check_total_params(metrics: dict, files: dict) -> dict:
    independent, how = independent_params(files)
    head = sum(t["numel"] for t in head_copy(files))
    items = {"the base's own head, held beside the trained copy (modules_to_save)": head} if head else {}
    residual = metrics["total_params"] - (independent or 0) - head
    why = sentence(items, "params", residual, metrics["total_params"])
    return compare(metrics["total_params"], independent, why, source=how)


def check_bits_per_param(metrics: dict, files: dict) -> dict:
    total, _ = independent_params(files)
    _, base_bits, base_note = base_cost(files)
    bits = sum(t["bits"] * t["numel"] for t in files["tensors"]) + base_bits
    independent = bits / total if total else None
    why = ("Σ bits(dtype) × numel over the saved tensors / total_params from the files; any difference is that of "
           "weight_bytes and total_params (see those checks)")
    if base_note:
        why += "; the QLoRA base costed in NF4 as in weight_bytes"
    return compare(metrics["bits_per_param"], independent, why)


def check_disk_bytes(metrics: dict, files: dict, written: float) -> dict:
    independent = sum(f["bytes"] for f in files["files"])
    changed = [f["path"] for f in files["files"] if f["mtime"] > written]
    parts = []
    if metrics["disk_bytes"] != independent:
        parts.append(f"files modified after the metrics were written: {changed}" if changed else
                     "no file is newer than the metrics: the directory held other files when it was measured")
    if files["card"]["format"] == "peft":
        base = sum(f["bytes"] for f in files["base_files"])
        parts.append(f"the figure counts the adapter directory only; serving it also needs the base at "
                     f"{files['base_dir']} ({base:,} bytes on disk, shared by every adapter on it)")
    result = compare(metrics["disk_bytes"], independent, "; ".join(parts) or None)
    if result["abs_diff"] == 0:
        result["explanation"] = "; ".join(parts) or None  # the peft note stands even where the figures agree
    return result


def check_import_floor(reported: int | None, floor: int, fresh: dict, forked: dict) -> dict:
    why = (f"reported: a child forked from the evaluate stage's forkserver, which first touches the library pages the "
           f"server holds after its imports (lowbit.isolation), VmHWM reset at the call's start; independent: lifetime "
           f"peak of a fresh process importing lowbit.evaluation and reading the splits (RssAnon {mib(fresh['RssAnon'])} "
           f"+ RssFile {mib(fresh['RssFile'])}). Without that touch a forked child holds RssFile "
           f"{mib(forked['RssFile'])} only (measured here): fork maps library pages lazily")
    if reported is None:
        why = "not reported: these metrics predate lowbit.isolation (no import_floor_bytes); " + why
    return compare(reported, floor, why, fresh_process=fresh, forked_child_untouched=forked)


def check_peak_rss(metrics: dict, rss: dict, measured: dict, forked: dict, peaks: list[int]) -> dict:
    peak, before, end = measured["peak_rss_bytes"], rss["before_model"], rss["end"]
    why = (f"reported: peak RSS of one call in a child forked from the evaluate stage's forkserver (library pages "
           f"touched first, VmHWM reset at the call's start). independent: lifetime peak of a fresh process; its "
           f"imports + data left it at {mib(before['VmRSS'])} (RssFile {mib(before['RssFile'])}), loading and evaluating "
           f"the variant raised it to {mib(peak)} (RssFile {mib(end['RssFile'])} at the end)")
    if metrics.get("import_floor_bytes") is None:
        why = ("these metrics predate lowbit.isolation (no import_floor_bytes): the reported peak was read in the "
               "evaluate process itself, after the variants evaluated before this one; ") + why
    method = f"{TIME} -v" if TIME.exists() else "os.wait4 ru_maxrss"
    if len(peaks) > 1:
        why += (f"; the fresh-process peak varied {mib(min(peaks))}–{mib(max(peaks))} over {len(peaks)} runs "
                f"(the median run is the figure)")
    return compare(metrics.get("peak_rss_bytes"), peak, why, method=method, independent_runs=peaks,
                   **run_spread(metrics.get("peak_rss_bytes"), peaks),
                   peak_rss_wait4_bytes=measured["peak_rss_wait4_bytes"], fresh_before_model=before, fresh_end=end)


def run_spread(reported: float | None, runs: list[float]) -> dict:
    """One process's peak RSS is not one number: the same variant, evaluated in identical fresh processes (or
    children forked from one server), peaked up to 9.3% apart here with 2 threads. FP32, 2-core EPYC, 11 fresh
    processes: 865-925 MiB, in two groups: 3 runs at 865-872 MiB kept 90-100 MiB less heap resident after the
    test pass than the others (902-925). No malloc or tokenizer setting tried removes it: with the tokenizer's
    threads off (TOKENIZERS_PARALLELISM=false) 893-920 over 11, and 867-929 over 4 with glibc's mmap threshold
    also fixed (at its 32 MiB ceiling); one arena (MALLOC_ARENA_MAX=1) 899-930 over 4; the threshold alone
    912-933 over 4; 1 torch thread 888-909 over 3. Likeliest cause, not proven: which freed blocks a later batch
    reuses depends on the order the threads free them in. So lowbit measures with malloc as a serving process
    has it, and the reported figure is one draw from that range. Nor is a latency one number: this 2-core VM ran
    the same loop at 2x its usual time for 5-15 s at a stretch, with both vCPUs busy in that loop alone and no
    steal time counted (the host's load, invisible from inside). The reported figure is one such run, so
    besides the 2% check it is judged against the independent runs' own range: within_run_spread is true when
    it lies inside [min, max] of them, widened by the tolerance. Needs 3 runs (--rss-repeats, --latency-repeats)."""
    if reported is None or len(runs) < 3:
        return {"run_spread": None, "within_run_spread": None}
    low, high = min(runs), max(runs)
    return {"run_spread": (high - low) / statistics.median(runs),
            "within_run_spread": (1 - TOLERANCE) * low <= reported <= (1 + TOLERANCE) * high}


def check_serving_memory(metrics: dict, rss: dict, peak: int, floor: int, peaks: list[int]) -> dict:
    reported = metrics.get("serving_memory_bytes")
    touched = rss["end"]["RssFile"] - rss["before_model"]["RssFile"]
    why = (f"independent: fresh-process peak {mib(peak)} − fresh-process floor {mib(floor)}; in it the variant's "
           f"phase made {mib(touched)} of library pages resident that its imports had not. A difference of two large "
           f"figures: judge by abs_diff as well as relative_diff (fresh-process peaks vary by a few percent run to run)")
    if reported is None:
        why = "not reported: these metrics predate lowbit.isolation (no serving_memory_bytes); " + why
    return compare(reported, peak - floor, why, independent_runs=[p - floor for p in peaks],
                   **run_spread(reported, [p - floor for p in peaks]))


def check_latency(metrics: dict, latencies: list[dict], harness: list[float], loadavg: tuple) -> dict:
    """`latencies`: this benchmark's timing, one fresh process each; `harness`: lowbit's own latency figure from
    each peak-RSS child (a fresh process each). Both are judged across processes: inside one process the
    fastest-of-rounds p50 repeats within a few percent, between fresh processes it does not."""
    runs, reported = [run["p50"] for run in latencies], metrics["latency_ms_p50"]
    independent = statistics.median(runs)
    spread = run_spread(reported, runs)
    why = (f"independent p50s {min(runs):.2f}–{max(runs):.2f} ms in {len(runs)} fresh processes; lowbit's own harness "
           f"rerun in {len(harness)} fresh processes gives {min(harness):.2f}–{max(harness):.2f} ms; "
           f"load average {loadavg[0]:.2f} on {os.cpu_count()} cores")
    contended = loadavg[0] > (os.cpu_count() or 1)
    if contended:
        why += (": other work is sharing the CPU and no 2% comparison of timings is possible now (within_2pct: null); "
                "run again on an idle machine")
    elif spread["within_run_spread"]:
        why += (": the reported figure lies inside the fresh processes' own range; identical processes on this VM "
                f"differ by {spread['run_spread']:.1%} here")
    elif spread["within_run_spread"] is False:
        why += (": the reported run lies outside the fresh processes' range, so it was measured under other "
                "conditions than these processes (the host's speed varies over time, see run_spread)")
    compiled = sum(run["compile_seconds_in_timed_loops"] for run in latencies)
    if compiled:
        why += f"; the timed loops included {compiled:.1f} s of compilation"
    result = compare(reported, independent, why, independent_p50_runs=runs,
                     independent_p95=statistics.median(run["p95"] for run in latencies),
                     reported_p95=metrics.get("latency_ms_p95"), lowbit_harness_p50_now=statistics.median(harness),
                     lowbit_harness_p50_runs=harness, loadavg=list(loadavg), **spread)
    if contended:
        result["within_2pct"] = None  # an agreement measured on a contended CPU would be luck
    return result


def check_variant(project: Path, path: Path, floor: int, forked: dict, args: argparse.Namespace) -> dict:
    record = json.loads(path.read_text())
    metrics, threads = record["metrics"], record.get("threads")
    model_dir = (project / record["model_dir"]).resolve()
    files, files_run = spawn("files", project, model_dir=model_dir)
    runs = sorted((spawn("rss", project, variant=record["variant"], model_dir=model_dir, threads=threads)
                   for _ in range(args.rss_repeats)), key=lambda run: run[1]["peak_rss_bytes"])
    rss, measured = runs[len(runs) // 2]
    peaks = [run[1]["peak_rss_bytes"] for run in runs]
    loadavg = os.getloadavg()
    latencies = [spawn("latency", project, model_dir=model_dir, threads=threads) for _ in range(args.latency_repeats)]
    checks = {
        "weight_bytes": check_weight_bytes(metrics, files),
        "total_params": check_total_params(metrics, files),
        "bits_per_param": check_bits_per_param(metrics, files),
        "disk_bytes": check_disk_bytes(metrics, files, path.stat().st_mtime),
        "peak_rss_bytes": check_peak_rss(metrics, rss, measured, forked, peaks),
        "serving_memory_bytes": check_serving_memory(metrics, rss, measured["peak_rss_bytes"], floor, peaks),
        "latency_ms_p50": check_latency(metrics, [run[0] for run in latencies],
                                        [run[0]["lowbit_latency_ms_p50_now"] for run in runs], loadavg),
    }
    seconds = {"files": files_run["seconds"], "rss": sum(run[1]["seconds"] for run in runs),
               "latency": sum(run[1]["seconds"] for run in latencies)}
    return {"format": record["format"], "model_dir": str(model_dir), "threads": threads, "checks": checks,
            "child_seconds": seconds}


def summary(variants: dict, extra_checks: dict) -> dict:
    results = [(f"{v}.{name}", c["within_2pct"]) for v, r in variants.items() for name, c in r["checks"].items()]
    results += [(name, c["within_2pct"]) for name, c in extra_checks.items()]
    spread = {f"{v}.{name}": c["within_run_spread"] for v, r in variants.items() for name, c in r["checks"].items()
              if c.get("within_run_spread") is not None}
    return {"checks": len(results), "within_2pct": sum(ok is True for _, ok in results),
            "not_within_2pct": [name for name, r in results if r is False],
            # memory and latency checks that miss 2% but lie inside the spread of the independent runs themselves
            "not_within_2pct_but_within_run_spread": [name for name, r in results if r is False and spread.get(name)],
            "outside_run_spread": [name for name, ok in spread.items() if not ok],
            "not_comparable": [name for name, r in results if r is None],
            "failed_variants": [v for v, r in variants.items() if "error" in r]}


def variant_files(project: Path, wanted: list[str] | None) -> dict[str, Path]:
    found = {p.stem: p for p in sorted((project / "metrics").glob("*.json")) if not p.stem.startswith("lowbit")}
    if wanted:
        unknown = sorted(set(wanted) - set(found))
        if unknown:
            sys.exit(f"no metrics for {unknown} in {project / 'metrics'}; there are: {', '.join(found)}")
        found = {name: found[name] for name in wanted}
    ordered = sorted(found.items(), key=lambda item: json.loads(item[1].read_text()).get("report_order", 10**6))
    return dict(ordered)


def header(project: Path) -> dict:
    import torch

    from bench.common import code_version
    from bench.quant import cpu_model
    from lowbit.hardware import detect

    return {"benchmark": "truth", "project": str(project), "lowbit_code": str(REPO), "lowbit_commit": code_version(),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(), "hardware": detect().describe(),
            "peak_rss_method": f"{TIME} -v" if TIME.exists() else "os.wait4 ru_maxrss", "tolerance": TOLERANCE,
            "loadavg_at_start": list(os.getloadavg())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=REPO, help="a finished lowbit project (default: this checkout)")
    parser.add_argument("--variants", nargs="+", help="check only these variants (default: every metrics/<variant>.json)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--latency-repeats", type=int, default=3,
                        help="fresh timing processes per variant (the median of their p50s is the figure, the range "
                             "judges the reported run: see run_spread; 3 or more)")
    parser.add_argument("--rss-repeats", type=int, default=3,
                        help="fresh peak-RSS processes per variant (the median is the figure, the range judges the "
                             "reported run: see run_spread; 3 or more)")
    child = parser.add_argument_group("child processes (internal)")
    child.add_argument("--child", choices=("files", "floor", "forked", "rss", "latency"), help=argparse.SUPPRESS)
    child.add_argument("--result", help=argparse.SUPPRESS)
    child.add_argument("--model-dir", help=argparse.SUPPRESS)
    child.add_argument("--variant", help=argparse.SUPPRESS)
    child.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.project = args.project.resolve()
    if args.child:
        return child_main(args)
    from bench.common import emit

    if not (args.project / "metrics").is_dir():
        sys.exit(f"{args.project} has no metrics/: run the pipeline there first (lowbit run), or pass --project")
    paths = variant_files(args.project, args.variants)
    started = time.perf_counter()
    result = header(args.project)
    threads = next((json.loads(p.read_text()).get("threads") for p in paths.values()), None)
    fresh, floor = spawn("floor", args.project, threads=threads)
    forked, _ = spawn("forked", args.project)
    reported_floor = next((json.loads(p.read_text())["metrics"].get("import_floor_bytes") for p in paths.values()), None)
    project_checks = {"import_floor": check_import_floor(reported_floor, floor["peak_rss_bytes"], fresh, forked)}
    variants = {}
    for name, path in paths.items():
        print(f"truth: {name}", file=sys.stderr, flush=True)
        try:
            variants[name] = check_variant(args.project, path, floor["peak_rss_bytes"], forked, args)
        except RuntimeError as err:  # a child failed: the others still run; the error is in the JSON
            variants[name] = {"error": str(err), "checks": {}}
    result |= {"project_checks": project_checks, "variants": variants,
               "summary": summary(variants, project_checks), "seconds": time.perf_counter() - started}
    emit(result, args.out)


if __name__ == "__main__":
    main()
