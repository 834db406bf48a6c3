"""Hand schedules for the CPU: parallel loops and SIMD where TVM's default build has none.

``tvm.compile`` on an ``llvm`` target lowers every op to naive, single-threaded loop nests;
that is why an untuned build ran 80x slower than onnxruntime. These rules, applied with
dlight's ``ApplyDefaultSchedule`` after operator fusion, give every kernel:

- reductions with spatial axes (MatMul, Gemm, Conv, MatMulNBits): the innermost spatial axis
  is split into ``vector`` lanes and moved inside the reduction loops, so the body is
  ``C[i, j:j+v] += A[i, k] * B[k, j:j+v]`` (an outer-product update LLVM turns into FMAs on
  whole vectors); ``rows`` output rows are computed per reduction step to reuse each loaded
  ``B`` vector; the column blocks are the outermost (parallel) loop, so one ``[K, v]`` slice
  of ``B`` stays in L1 while all rows use it. For MatMulNBits that slice is dequantized right
  there, once per call. Fused epilogues (bias, GELU...) run per column block while the output
  is still in cache. Kernels below ~32K multiply-adds stay on the calling thread.
- injective kernels (elementwise, transpose, broadcast): loops fused, split by the vector
  width, outer part parallel, inner part vectorized.
- layer norm style kernels with rows of whole SIMD vectors: every pass per row, injective
  passes vectorized; softmax over short rows: dlight's own CPU ``Reduction`` rule.

``vector``, ``rows`` and whether a kernel is worth parallelizing at all are the knobs that
:mod:`.tune` searches per kernel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from graphsurgeon.kernels.tvm.lowbit import DEQUANT_BLOCK
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width


@dataclass(frozen=True)
class Knobs:
    """One point of a kernel's schedule space (what the tuner picks per kernel)."""

    vector: int = 0  # lanes of the innermost spatial axis; 0 = the target's SIMD width
    rows: int = 8  # output rows per reduction step (register reuse of the B vector)
    parallel: bool = True


def simd_lanes(target: Target, bits: int = 32) -> int:
    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 4)


#: Block names of TOPI's padding stages (``pad_temp`` for conv2d and pooling).
PAD_BLOCKS = ("pad_temp", "data_pad", "PadInput")

#: TOPI's NCHW conv2d block, and the most elements its im2col copy may have (16 MB).
CONV_BLOCK = "conv2d_nchw"
IM2COL_MAX_ELEMENTS = 1 << 22

#: Waking the thread pool costs microseconds: smaller kernels run on the calling thread.
PARALLEL_MIN_ELEMENTS = 1 << 15


def _worth_threads(red) -> bool:
    """Multiply-adds of a reduction kernel (its iteration domain) above the threshold."""
    work = 1
    for extent in red.dom():
        if not isinstance(extent, int):
            return True
        work *= extent
    return work >= PARALLEL_MIN_ELEMENTS


def _divisor_at_most(extent: int, limit: int) -> int:
    for d in range(min(limit, extent), 0, -1):
        if extent % d == 0:
            return d
    return 1


def schedule_func(func: tirx.PrimFunc, target: Target, knobs: Knobs) -> s_tir.Schedule | None:
    """A schedule for one fused kernel, or None when no rule applies."""
    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return None  # written scheduled (the BSR kernels of :mod:`.sparse`)
    sch = s_tir.Schedule(func)
    col = _im2col(sch)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    staged = [b for b in infos if sch.get(b.block_rv).name_hint == DEQUANT_BLOCK]
    # padding (or the im2col copy) stays a stage of its own: inlined, every multiply-add of a
    # conv would test the bounds (a masked gather instead of one vector load)
    pads = [
        b
        for b in infos
        if sch.get(b.block_rv).name_hint.startswith(PAD_BLOCKS)
        or sch.get(b.block_rv).name_hint == col
    ]
    infos = try_inline(sch, [b for b in infos if b not in staged and b not in pads])
    reductions = [b for b in infos if not b.is_injective()]
    if staged and (len(staged) > 1 or len(reductions) != 1):
        return None
    try:
        if not reductions:
            return _injective(sch, infos, target, knobs)
        if len(reductions) == 1 and reductions[0].dom_kind().startswith("S"):
            cols = [b for b in pads if sch.get(b.block_rv).name_hint == col]
            return _reduction(sch, infos, reductions[0], target, knobs, staged, cols)
        return _rowwise(sch, infos, target, knobs)
    except Exception:  # a primitive refused (ScheduleError): leave the kernel to other rules
        return None
    return None


def _im2col(sch: s_tir.Schedule) -> str | None:
    """An NCHW conv as a matmul over the output pixels: ``Y[n, f, y*W + x] = sum_{c,r,s}
    K[f, c, r, s] * col[n, c, r, s, y*W + x]``, with ``col`` the padded input gathered once
    (``im2col``, bounds tests included, laid out pixels last). The matmul schedule then runs
    ``rows`` output channels per step against one contiguous vector of ``col``: all ``H*W``
    pixels are SIMD lanes, not just one row of ``W`` (4 or 8 lanes on small images, where half
    a 512-bit vector went idle), and the inner loop has no bounds test. Returns the name of the
    ``col`` block (left out of inlining), or None when the kernel is no plain conv2d or ``col``
    would exceed :data:`IM2COL_MAX_ELEMENTS`."""
    try:
        conv = sch.get_sblock(CONV_BLOCK)
    except Exception:  # no such block: not a conv2d kernel
        return None
    block = sch.get(conv)
    iters = block.iter_vars
    kinds = "".join("S" if int(v.iter_type) == 0 else "R" for v in iters)
    if kinds != "SSSSRRR" or not block.reads:
        return None
    try:
        n, _f, h, w, c, r, s = (int(v.dom.extent) for v in iters)
    except TypeError:  # symbolic extent
        return None
    if n * h * w * c * r * s > IM2COL_MAX_ELEMENTS:
        return None
    out_extents = [n, _f, h, w]
    col = sch.reindex(conv, ("read", 0))  # col[n, y, x, c, r, s]: the read, per block iter
    for producer in sch.get_producers(col):
        if sch.get(producer).name_hint.startswith(PAD_BLOCKS):
            sch.compute_inline(producer)
    sch.transform_layout(conv, ("read", 0), lambda n, y, x, c, r, s: (n, c, r, s, y, x))
    sch.transform_block_layout(conv, lambda n, f, y, x, c, r, s: (n, f, y * w + x, c, r, s))
    sch.transform_block_layout(col, lambda n, y, x, c, r, s: (n, c, r, s, y * w + x))
    for other in sch.get_child_blocks(sch.get_sblock("root")):
        info = sch.get(other)
        extents = [v.dom.extent for v in info.iter_vars]
        if (
            other == conv
            or len(extents) != 4
            or not all(isinstance(e, tirx.IntImm) for e in extents)
        ):
            continue
        if [int(e) for e in extents] == out_extents:  # epilogues (bias, ReLU): same fusion
            with contextlib.suppress(Exception):
                sch.transform_block_layout(other, lambda n, f, y, x: (n, f, y * w + x))
    return sch.get(col).name_hint


def _injective(sch, infos, target, knobs) -> s_tir.Schedule | None:
    lanes = knobs.vector or simd_lanes(target)
    for info in infos:
        loops = sch.get_loops(info.block_rv)
        if not loops:
            continue
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        extent = get_extent(sch, fused)
        if not isinstance(extent, int):
            return None
        inner = _divisor_at_most(extent, lanes)
        if inner > 1:
            outer, vec = sch.split(fused, factors=[None, inner])
            sch.vectorize(vec)
        else:
            outer = fused
        if knobs.parallel and extent >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
    return sch


def _reduction(sch, infos, red, target, knobs, staged=(), cols=()) -> s_tir.Schedule | None:
    """The matmul schedule of the module docstring. A conv (im2col stage ``cols``) over a batch
    instead runs image by image, each image's ``col`` gathered right before its matmul: tens
    of KB that stay in L2, where the whole batch's (2.4 MB for the digits CNN at batch 64)
    would not. Timed alone the batch-wide copy looked faster; inside the model run, between
    the other kernels, per image is 3-5% faster end to end (the number that counts)."""
    block = red.block_rv
    kinds = red.dom_kind()
    loops = sch.get_loops(block)
    spatial = [lp for lp, kind in zip(loops, kinds, strict=False) if kind == "S"]
    reduce = [lp for lp, kind in zip(loops, kinds, strict=False) if kind == "R"]
    if not spatial or not reduce or kinds != "S" * len(spatial) + "R" * len(reduce):
        return None
    extents = [get_extent(sch, lp) for lp in spatial]
    if not all(isinstance(e, int) for e in extents):
        return None
    lanes = knobs.vector or simd_lanes(target)
    vec = _divisor_at_most(extents[-1], lanes)
    j_outer, j_vec = sch.split(spatial[-1], factors=[None, vec])
    rows_loop = None
    outer_spatial = spatial[:-1]
    if knobs.rows > 1 and outer_spatial:
        rows = _divisor_at_most(extents[-2], knobs.rows)
        if rows > 1:
            i_outer, rows_loop = sch.split(outer_spatial[-1], factors=[None, rows])
            outer_spatial = [*outer_spatial[:-1], i_outer]
    # j blocks outermost: one [K, vector] slice of B stays in L1 while every row uses it
    order = [j_outer, *outer_spatial, *reduce]
    per_image = bool(cols) and len(outer_spatial) > 1 and extents[0] > 1
    if per_image:  # conv: [n, pixel blocks, channel blocks, ...]
        order = [outer_spatial[0], j_outer, *outer_spatial[1:], *reduce]
    order += [rows_loop] if rows_loop is not None else []
    order.append(j_vec)
    sch.reorder(*order)
    if per_image:
        par = outer_spatial[0]
        for info in cols:
            sch.compute_at(info.block_rv, par, preserve_unit_loops=True)
    else:
        par = sch.fuse(j_outer, *outer_spatial[:-1]) if len(outer_spatial) > 1 else j_outer
    for info in staged:  # dequantize the [K, vector] weight slice this column block reads
        sch.compute_at(info.block_rv, par, preserve_unit_loops=True)
        inner = sch.get_loops(info.block_rv)[-1]
        if get_extent(sch, inner) == vec > 1:
            sch.vectorize(inner)
    for info in infos:  # epilogues (bias, activation) per parallel chunk, while in cache
        if info.block_rv is not block and info.is_injective():
            sch.reverse_compute_at(info.block_rv, par)
            epilogue_loops = sch.get_loops(info.block_rv)
            if len(epilogue_loops) > 1 and get_extent(sch, epilogue_loops[-1]) == vec > 1:
                sch.vectorize(epilogue_loops[-1])
    if vec > 1:  # before the init is split off: vectorizing needs a complete reduction block
        sch.vectorize(j_vec)
    if rows_loop is not None:
        sch.unroll(rows_loop)
    sch.decompose_reduction(block, reduce[0])  # zeroing hoisted out of the k loop
    if knobs.parallel and get_extent(sch, par) != 1 and _worth_threads(red):
        with contextlib.suppress(Exception):  # an epilogue reading across chunks: serial
            sch.parallel(par)
    return sch


def _rowwise(sch, infos, target, knobs) -> s_tir.Schedule | None:
    """Softmax / layer norm: several reductions over the last axes of the same rows. Every
    block is computed per row (the row stays in L1 between the passes), injective passes are
    vectorized. Unlike dlight's CPU ``Reduction`` rule the row loop is only parallel when the
    kernel is big enough to pay for waking the thread pool (with one row of 384 floats per
    step it rarely is) or when the tuner says so."""
    last = infos[-1]
    if not last.is_injective():
        return None
    leading = min(len(b.dom_kind()) - len(b.dom_kind().lstrip("S")) for b in infos)
    if leading == 0:
        return None
    loops = sch.get_loops(last.block_rv)
    rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
    work = 1
    for extent in last.dom():
        work *= int(extent) if isinstance(extent, int) or hasattr(extent, "value") else 1 << 20
    if knobs.parallel and work >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(rows)
    lanes = knobs.vector or simd_lanes(target)
    row = get_extent(sch, sch.get_loops(last.block_rv)[-1])
    if not isinstance(row, int) or row % lanes or row < 2 * lanes:
        return None  # short rows (softmax over 35 keys): dlight's rule does better
    for info in reversed(infos[:-1]):
        sch.compute_at(info.block_rv, rows, preserve_unit_loops=True)
    for info in infos:
        if info.is_injective():
            inner = sch.get_loops(info.block_rv)[-1]
            if get_extent(sch, inner) == row:
                _, vec = sch.split(inner, factors=[None, lanes])
                sch.vectorize(vec)
    return sch


class _Rule(dl.ScheduleRule):
    """dlight adapter: knobs per kernel from the tuning database, defaults otherwise."""

    def __init__(self, choose) -> None:
        self.choose = choose

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        return schedule_func(func, target, self.choose(func))


def cpu_schedule_pass(choose=lambda func: Knobs()):
    """``ApplyDefaultSchedule`` with ours first; kernels with several reductions (softmax,
    layer norm) fall through to dlight's CPU ``Reduction`` rule."""
    return dl.ApplyDefaultSchedule(_Rule(choose), dl.cpu.Reduction())
