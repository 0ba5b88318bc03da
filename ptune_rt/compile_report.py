"""``ptune-rt compile-report``: compile every shipped kernel configuration for real NVIDIA
targets, without a GPU, and report registers, spills and shared memory.

Each kernel module that ships Triton kernels has an ``*_aot`` companion listed in
:data:`AOT_MODULES`; its ``aot_variants()`` returns :class:`AotVariant` objects (one kernel,
one launch configuration, one argument specialization). Every variant is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for each requested arch
and the ``ptxas -v`` report of Triton's own cubin build is parsed (the ptxas Triton picks for
the arch: the wheel's ``ptxas`` for sm_80, ``ptxas-blackwell`` for sm_90a, with Triton's flags,
which matter: ``--regAllocOptLevel=2`` changes register allocation). The PTX gives the
tensor-core instructions used. A variant is built in one or two specializations:

* **aligned**: the specialization a real launch gets (Triton marks 16-byte-aligned pointers
  and integers divisible by 16 with ``tt.divisibility`` 16, and turns integers equal to 1 into
  constants). This is what models run, and it must pass every check: zero spill stores/loads,
  shared memory within the arch's per-block limit, and the tensor-core instructions the
  variant declares (MMA operand dtype; ``wgmma`` on sm_90 for GEMM tiles that can use it).
* **fallback** (for the variants whose module asks for it): the same variant without any
  ``tt.divisibility`` attribute (what an unaligned pointer, size or stride gets). It must
  compile; its spills are reported, not failed.

The exit status is non-zero on any aligned check failure or any compile failure.

Compilation runs in worker subprocesses whose environment has no ``TRITON_INTERPRET``: under
the interpreter ``@triton.jit`` yields interpreter objects that cannot be compiled, and the
kernel helpers pick their interpreter code path at import time. Compiled kernels are cached
by Triton (``~/.triton/cache``), so a second run only re-runs ptxas.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Optional

from ptune_rt.kernels._aot import AotVariant

#: Modules whose ``aot_variants()`` list the kernel variants to compile.
AOT_MODULES = ("ptune_rt.kernels.lora_aot", "ptune_rt.kernels.prefix_attention_aot",
               "ptune_rt.kernels.prompt_inputs_aot", "ptune_rt.kernels.child_adamw_aot",
               "ptune_rt.kernels.ia3_aot", "ptune_rt.kernels.lora_embedding_aot")

#: Arch names accepted by ``--arch`` and their compute capability.
ARCHS = {"sm_80": 80, "sm_90": 90}

#: Largest shared memory one block may use (opt-in dynamic shared memory): A100 and H100.
SMEM_LIMIT = {80: 166912, 90: 232448}

def collect_variants(kernel_filter: Optional[list[str]] = None, full: bool = False) -> list[AotVariant]:
    """The variants of :data:`AOT_MODULES` (``full``: their complete matrix rather than the CI
    subset), optionally only kernels whose name contains one of ``kernel_filter``."""
    variants = []
    for mod_name in AOT_MODULES:
        mod = importlib.import_module(mod_name)
        variants.extend(mod.aot_variants(full=full))
    seen = set()
    for v in variants:
        if v.key in seen:
            raise ValueError(f"two AOT variants share the key {v.key!r}: give them distinct labels")
        seen.add(v.key)
    if kernel_filter:
        variants = [v for v in variants if any(f in v.kernel_name for f in kernel_filter)]
    return variants


# --------------------------------------------------------------------------------------
# ptxas and PTX parsing
# --------------------------------------------------------------------------------------

_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.[\w.]+")
_RE_MMA = re.compile(r"\bmma\.sync\.aligned\.[\w.]+")
_MMA_TYPES = ("f16", "bf16", "tf32", "e4m3", "e5m2", "s8", "u8", "f64")


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes, stack frame and static shared memory from ``ptxas -v`` output.

    Raises ``ValueError`` when the log has no register count (nothing was compiled), so a
    changed ptxas output format cannot pass as "no spills".
    """
    regs = [int(m) for m in _RE_REGS.findall(log)]
    if not regs:
        raise ValueError("ptxas -v output has no 'Used N registers' line:\n" + log.strip())
    frames = [tuple(int(x) for x in m) for m in _RE_FRAME.findall(log)]
    if not frames:
        raise ValueError("ptxas -v output has no 'bytes spill stores' line:\n" + log.strip())
    return {
        "registers": max(regs),
        "stack_frame": max(f[0] for f in frames),
        "spill_stores": sum(f[1] for f in frames),
        "spill_loads": sum(f[2] for f in frames),
        "static_smem": max([int(m) for m in _RE_SMEM.findall(log)] or [0]),
    }


def mma_summary(ptx: str) -> dict:
    """Tensor-core instructions in a PTX module: ``{"wgmma": [operand types], "mma": [...]}``."""
    def operand_types(instrs):
        found = set()
        for ins in instrs:
            parts = ins.split(".")
            found.update(p for p in parts if p in _MMA_TYPES)
        return sorted(found)
    return {"wgmma": operand_types(_RE_WGMMA.findall(ptx)), "mma": operand_types(_RE_MMA.findall(ptx))}


_RE_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_RE_VALUE = re.compile(r"%[\w.$-]+")


def _result_type(rest: str) -> str:
    """The result type at the end of one TTIR op (``... : i32``, ``... : i32 -> tensor<4xi32>``)."""
    rest = re.sub(r"\s+loc\(.*$", "", rest)
    if ":" not in rest:
        return ""
    ty = rest.rsplit(" : ", 1)[-1].strip()
    for sep in (" -> ", " to "):
        if sep in ty:
            ty = ty.rsplit(sep, 1)[-1].strip()
    return ty


def _is_i32(ty: str) -> bool:
    return ty == "i32" or ty.endswith("xi32>")


def i32_index_offsets(ttir: str) -> list[str]:
    """``tt.addptr`` ops whose offset is 32-bit and derives from a program id or a loaded index.

    Such offsets (``pid * stride``, a batch or task index times a stride) wrap past 2**31 elements:
    the kernel then reads and writes the wrong memory. Tile-internal offsets (``arange * stride``)
    and loop increments may stay 32-bit. The walk follows i32 values only: an ``arith.extsi`` to
    i64 ends it.
    """
    defs = {}
    for line in ttir.splitlines():
        m = _RE_DEF.match(line)
        if m:
            name, op, rest = m.groups()
            operands = [v.split("#")[0] for v in _RE_VALUE.findall(re.sub(r"\s+loc\(.*$", "", rest))]
            ty = _result_type(rest)
            if op == "tt.load":  # printed with its pointer type: the result is the pointee
                ty = re.sub(r"!tt\.ptr<(\w+)>", r"\1", ty)
            defs[name] = (op, ty, operands, line.strip())

    def from_index(value: str, seen: set) -> bool:
        if value in seen or value not in defs:
            return False
        seen.add(value)
        op, ty, operands, _ = defs[value]
        if not _is_i32(ty):
            return False
        if op == "tt.get_program_id" or (op == "tt.load" and ty == "i32"):
            return True
        return any(from_index(v, seen) for v in operands)

    bad = []
    for op, ty, operands, text in defs.values():
        if op != "tt.addptr" or len(operands) < 2:
            continue
        offset_ty = text.split(" : ", 1)[-1].split(",")[-1].strip().split(" loc(")[0]
        if _is_i32(offset_ty) and from_index(operands[1], set()):
            bad.append(re.sub(r"\s+loc\(.*$", "", text))
    return bad


def _sm_name(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def ptxas_path(cc: int) -> str:
    """The ptxas Triton uses to build cubins for ``cc`` (bundled with the triton wheel)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(cc).path
    except Exception:  # older layouts: fall back to the wheel's bundled binary
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"ptxas for {_sm_name(cc)} not found (looked at {path!r}); the triton "
                                "wheel bundles it under triton/backends/nvidia/bin, or set TRITON_PTXAS_PATH")
    return path


def _line_info_flags() -> list[str]:
    try:
        from triton import knobs
        if knobs.compilation.disable_line_info:
            return ["-lineinfo", "-suppress-debug-info"]
    except (ImportError, AttributeError):
        pass
    return ["-lineinfo"]


def run_ptxas(ptx: str, cc: int, *, fp_fusion: bool = True, ptx_options: Optional[str] = None) -> str:
    """Assemble ``ptx`` for ``cc`` with the flags Triton's own cubin build uses and return the
    ``-v`` report (register allocation depends on them: Triton passes ``--regAllocOptLevel=2``)."""
    ptxas = ptxas_path(cc)
    with tempfile.TemporaryDirectory(prefix="ptune-rt-ptxas-") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, *_line_info_flags(), *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", *(ptx_options.split() if ptx_options else []),
               f"--gpu-name={_sm_name(cc)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed (exit {proc.returncode}) for {_sm_name(cc)}:\n"
                           f"{proc.stderr.strip()}\ncommand: {' '.join(cmd)}")
    return proc.stderr + proc.stdout


# --------------------------------------------------------------------------------------
# Compiling one variant (inside a worker process)
# --------------------------------------------------------------------------------------


def _require_jit(variant: AotVariant):
    from triton.runtime.jit import JITFunction
    if not isinstance(variant.fn, JITFunction):
        raise TypeError(
            f"{variant.kernel_name} is a {type(variant.fn).__name__}, not a triton JITFunction: kernels "
            "can only be compiled from a process started without TRITON_INTERPRET=1 (compile-report "
            "starts its workers that way; do not set TRITON_INTERPRET in their environment)")


@contextlib.contextmanager
def _triton_ptxas_log(buf):
    """Collect the ``ptxas -v`` report of Triton's own cubin build (printed when the
    ``dump_ptxas_log`` knob is on), which saves assembling every kernel twice."""
    try:
        from triton import knobs
        nvidia = knobs.nvidia
        saved = nvidia.dump_ptxas_log
    except (ImportError, AttributeError):
        yield
        return
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        nvidia.dump_ptxas_log = saved


def compile_variant(variant: AotVariant, cc: int, aligned: bool) -> dict:
    """Compile one variant for compute capability ``cc`` and measure it (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_jit(variant)
    names = list(variant.fn.arg_names)
    attrs = {(names.index(k),): v for k, v in variant.attrs.items()} if aligned else {}
    src = ASTSource(fn=variant.fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs),
                    attrs=attrs)
    t0 = time.perf_counter()
    log = io.StringIO()
    with _triton_ptxas_log(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    ptx = compiled.asm["ptx"]
    log = log.getvalue()
    if not _RE_REGS.search(log):  # cache hit (Triton did not run ptxas): assemble the PTX again
        log = run_ptxas(ptx, cc, fp_fusion=getattr(compiled.metadata, "enable_fp_fusion", True),
                        ptx_options=getattr(compiled.metadata, "ptx_options", None))
    stats = parse_ptxas(log)
    shared = int(getattr(compiled.metadata, "shared", 0)) + stats.pop("static_smem")
    i32_offsets = i32_index_offsets(compiled.asm["ttir"])
    return {**stats, "shared": shared, **mma_summary(ptx), "i32_index_offsets": i32_offsets[:3],
            "i32_index_offset_count": len(i32_offsets), "seconds": round(time.perf_counter() - t0, 3)}


def _worker_main(full: bool = False):  # pragma: no cover - runs in a subprocess
    """Worker loop: one JSON task per stdin line, one JSON result per line on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (Triton's own diagnostics) goes to stderr
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    by_key = None
    for line in sys.stdin:
        task = json.loads(line)
        result = {"key": task["key"], "arch": task["arch"], "aligned": task["aligned"]}
        try:
            if by_key is None:
                by_key = {v.key: v for v in collect_variants(full=full)}
            variant = by_key.get(task["key"])
            if variant is None:
                raise KeyError(f"variant {task['key']!r} not found in the worker: the variant lists of "
                               "the report and its worker differ (aot_variants() must be deterministic)")
            result.update(compile_variant(variant, task["arch"], task["aligned"]), ok=True)
        except Exception as e:  # reported per variant, the run goes on
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
        proto.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------------------
# Worker pool
# --------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, full: bool):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from ptune_rt.compile_report import _worker_main; _worker_main({full})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env, bufsize=1)

    def run(self, task: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait()
            self.err.seek(0)
            tail = self.err.read()[-3000:]
            raise RuntimeError(f"compile worker exited with status {self.proc.returncode}; its stderr "
                               f"ends with:\n{tail}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def run_tasks(tasks: list[dict], jobs: int, full: bool = False, progress=None) -> list[dict]:
    """Run compile tasks on ``jobs`` worker processes; a crashed worker fails its task only."""
    pending: queue.Queue = queue.Queue()
    for t in tasks:
        pending.put(t)
    results, lock = [], threading.Lock()

    def record(res):
        with lock:
            results.append(res)
            if progress:
                progress(len(results), len(tasks))

    def loop():
        worker, crashes = _Worker(full), 0
        try:
            while True:
                try:
                    task = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    res = worker.run(task)
                    crashes = 0
                except Exception as e:
                    res = {**task, "ok": False, "error": str(e)}
                    worker.close()
                    crashes += 1
                    if crashes >= 3:  # the worker cannot run at all: fail what is left with its error
                        record(res)
                        while True:
                            try:
                                t = pending.get_nowait()
                            except queue.Empty:
                                return
                            record({**t, "ok": False, "error": f"not compiled, the compile workers keep "
                                                              f"crashing: {e}"})
                    worker = _Worker(full)
                record(res)
        finally:
            worker.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(max(1, min(jobs, len(tasks))))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


# --------------------------------------------------------------------------------------
# Checks and report
# --------------------------------------------------------------------------------------


def check_result(variant: AotVariant, res: dict) -> list[str]:
    """Problems of one result, as messages a person can act on (empty: fine)."""
    arch = _sm_name(res["arch"])
    where = f"{variant.kernel_name} [{variant.config}] {variant.label} on {arch}"
    kind = "aligned" if res["aligned"] else "unaligned fallback"
    if not res["ok"]:
        return [f"{where}: the {kind} build does not compile: {res['error']}"]
    problems = []
    if res.get("i32_index_offset_count"):
        problems.append(f"{where}: {res['i32_index_offset_count']} pointer offsets are 32-bit products of a "
                        f"program id or a loaded index (they wrap past 2**31 elements), e.g. "
                        f"{res['i32_index_offsets'][0]!r}: widen the index with .to(tl.int64) before it "
                        "multiplies a stride")
    if not res["aligned"]:
        return problems
    spills = res["spill_stores"] + res["spill_loads"]
    if spills:
        problems.append(
            f"{where}: spills ({res['spill_stores']} bytes stored, {res['spill_loads']} loaded, "
            f"{res['registers']} registers): give this config more warps or smaller tiles (BLOCK_K "
            "first), drop it from the kernel's shipped config list, or cut the kernel's register use")
    limit = SMEM_LIMIT.get(res["arch"])
    if limit is not None and res["shared"] > limit:
        problems.append(f"{where}: needs {res['shared']} bytes of shared memory, over the {limit} bytes "
                        f"one block may use on {arch}: lower num_stages or BLOCK_K")
    found = set(res["wgmma"] + res["mma"])
    missing = [t for t in variant.mma_dtypes if t not in found]
    if missing:
        problems.append(f"{where}: expected tensor-core MMAs on {', '.join(missing)} operands, found: "
                        f"{', '.join(sorted(found)) or 'none'} (an operand is converted before its dot, "
                        "or the dot's input precision changed)")
    if variant.wgmma_on_sm90 and res["arch"] >= 90 and not res["wgmma"]:
        problems.append(f"{where}: no wgmma in the sm_90 build (Triton fell back to mma.sync): check the "
                        "tile shape and num_warps of this config")
    return problems


def _mma_cell(res: dict) -> str:
    parts = [f"wgmma.{'/'.join(res['wgmma'])}"] if res["wgmma"] else []
    parts += [f"mma.{'/'.join(res['mma'])}"] if res["mma"] else []
    return "+".join(parts) or "-"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f}K" if n % 1024 == 0 else f"{n / 1024:.1f}K"


def format_table(variants: list[AotVariant], results: dict, ccs: list[int]) -> str:
    """One row per variant; per arch: aligned registers / spill bytes / shared memory / MMAs,
    and the unaligned fallback's registers/spill bytes."""
    head = ["config", "variant"]
    for cc in ccs:
        head += [f"{_sm_name(cc)} regs", "spill", "smem", "mma", "fallback"]
    rows_by_kernel: dict[str, list[list[str]]] = {}
    for v in variants:
        row = [v.config, v.label]
        for cc in ccs:
            a, f = results.get((v.key, cc, True)), results.get((v.key, cc, False))
            if a is None:
                row += ["", "", "", "", ""]
            elif not a["ok"]:
                row += ["FAIL", "", "", "", ""]
            else:
                row += [str(a["registers"]), str(a["spill_stores"] + a["spill_loads"]), _kib(a["shared"]),
                        _mma_cell(a)]
            if f is None:
                row.append("-" if a is not None else "")
            elif not f["ok"]:
                row.append("FAIL")
            else:
                row.append(f"{f['registers']}/{f['spill_stores'] + f['spill_loads']}")
        rows_by_kernel.setdefault(v.kernel_name, []).append(row)
    widths = [len(h) for h in head]
    for rows in rows_by_kernel.values():
        for r in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, r)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = []
    for kernel, rows in rows_by_kernel.items():
        lines += ["", kernel, fmt(head), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
    lines += ["", "regs/spill/smem/mma: aligned launch (spill = spill store + load bytes); "
              "fallback: regs/spill bytes without divisibility attributes"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ptune-rt compile-report",
        description="Compile every shipped kernel configuration for NVIDIA targets (no GPU needed) and "
                    "report registers, spills and shared memory. Exits non-zero when a build fails to "
                    "compile, or an aligned build spills, exceeds the arch's shared memory or lacks the "
                    "tensor-core instructions its kernel declares (unaligned fallbacks only have to compile).")
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help=f"comma-separated targets among {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--kernel", default=None,
                        help="only kernels whose name contains one of these comma-separated strings")
    parser.add_argument("--json", dest="json_path", default=None, help="also write all results to this file")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile worker processes (default: min(2, cpus))")
    parser.add_argument("--no-fallback", action="store_true",
                        help="skip the unaligned fallback builds")
    parser.add_argument("--full", action="store_true",
                        help="compile each kernel module's complete variant matrix (every dtype and launch, "
                             "with unaligned fallbacks) instead of its CI subset; about 2-3 times slower")
    args = parser.parse_args(argv)

    ccs = []
    for a in [s.strip() for s in args.arch.split(",") if s.strip()]:
        if a not in ARCHS:
            parser.error(f"unknown arch {a!r}: choose among {', '.join(ARCHS)}")
        ccs.append(ARCHS[a])
    if not ccs:
        parser.error("--arch needs at least one target")
    filters = [s.strip() for s in args.kernel.split(",") if s.strip()] if args.kernel else None
    variants = collect_variants(filters, full=args.full)
    if not variants:
        print(f"compile-report: no kernel variant matches --kernel {args.kernel!r}", file=sys.stderr)
        return 2

    tasks = [{"key": v.key, "arch": cc, "aligned": True} for v in variants for cc in ccs]
    if not args.no_fallback:
        tasks += [{"key": v.key, "arch": cc, "aligned": False} for v in variants if v.fallback for cc in ccs]
    step = max(1, len(tasks) // 10)

    def progress(done, total):
        if done % step == 0 or done == total:
            print(f"compile-report: {done}/{total} builds", file=sys.stderr, flush=True)

    print(f"compile-report: {len(variants)} variants x {len(ccs)} archs, {len(tasks)} builds on "
          f"{args.jobs} workers", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    results = {(r["key"], r["arch"], r["aligned"]): r for r in run_tasks(tasks, args.jobs, args.full, progress)}
    elapsed = time.perf_counter() - t0

    by_key = {v.key: v for v in variants}
    problems = []
    for (key, cc, al), res in sorted(results.items(), key=lambda kv: (not kv[0][2], kv[0][1])):
        problems += check_result(by_key[key], res)
    missing = [t for t in tasks if (t["key"], t["arch"], t["aligned"]) not in results]
    problems += [f"{t['key']} on {_sm_name(t['arch'])}: no result" for t in missing]

    print(format_table(variants, results, ccs))
    aligned = [r for r in results.values() if r["aligned"] and r["ok"]]
    fallback = [r for r in results.values() if not r["aligned"]]
    fb_spilling = [r for r in fallback if r["ok"] and r["spill_stores"] + r["spill_loads"]]
    for cc in ccs:
        mine = [r for r in aligned if r["arch"] == cc]
        if mine:
            print(f"{_sm_name(cc)}: aligned max {max(r['registers'] for r in mine)} registers, "
                  f"max {_kib(max(r['shared'] for r in mine))} shared memory, "
                  f"{sum(1 for r in mine if r['spill_stores'] + r['spill_loads'])} spilling")
    fb_text = (f"{sum(1 for r in fallback if r['ok'])}/{len(fallback)} unaligned fallback builds ok "
               f"({len(fb_spilling)} of them spill, reported only)" if fallback else "no fallback builds")
    print(f"summary: {len(variants)} variants x {len(ccs)} archs: {len(aligned)}/{len(variants) * len(ccs)} "
          f"aligned builds ok, {fb_text}, {len(problems)} problems, {elapsed:.0f}s")

    if args.json_path:
        payload = {
            "archs": [_sm_name(cc) for cc in ccs],
            "seconds": round(elapsed, 1),
            "problems": problems,
            "results": [
                {"kernel": by_key[r["key"]].kernel_name, "config": by_key[r["key"]].config,
                 "label": by_key[r["key"]].label, "arch": _sm_name(r["arch"]),
                 "wgmma_on_sm90": by_key[r["key"]].wgmma_on_sm90,
                 "mma_dtypes": list(by_key[r["key"]].mma_dtypes),
                 **{k: v for k, v in r.items() if k != "arch"}}
                for r in sorted(results.values(), key=lambda r: (r["key"], r["arch"], not r["aligned"]))
            ],
        }
        with open(args.json_path, "w") as f:
            json.dump(payload, f, indent=1)

    if problems:
        print(f"\ncompile-report FAILED ({len(problems)} problems):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("compile-report: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
