"""Launch planning for the quantized decode kernels: pure Python, no MLX, testable on CPU.

Which shapes each kernel takes, how a cache is cut into chunks for flash decoding, and the
exact source each kernel is compiled from (read from the .cu/.cuh files beside this module,
with compile-time constants written first). Kernels are named for a digest of that source:
MLX caches compiled kernels on disk by name alone (MLX_PTX_CACHE_DIR), so a kernel changed
by an upgrade must not reuse a stale PTX. Launching is in launch.py.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from pathlib import Path

MAX_ACCUMULATORS = 32  # query rows x dims per lane held in registers (and shared memory)
ROWS_PER_WARP = 4  # scores: tokens per warp, their loads issued together
TOKENS_PER_WARP = 16  # weighted_sum: tokens per warp; 8 warps a block sum in shared memory
WARPS = 8

FLASH_BLOCKS = 264  # blocks a decode step aims for: two an SM of an H100 (measured)
FLASH_REGISTERS = 64  # query rows x dims per lane: the queries, then the output
FLASH_BLOCK_WARPS = 8  # warps a block, merged in shared memory
FLASH_SMEM = 8192  # floats of shared memory a block: a chunk's scores, then partial sums
FLASH_UNROLL = 4  # rows each lane loads before computing on any
FLASH_MMA = True  # scores on tensor cores where the shape allows (flash_tensor_cores)
PACKED_WHOLE = {2, 4, 8}  # widths whose values never straddle a 32-bit word

_BODY_MARK = "// -- compiled from here (the lines above are not part of the kernel source) --\n"
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}


@functools.cache
def text(file: str) -> str:
    """The compiled part of a kernel file (below its marker line), as shipped."""
    return _file(file).read_text(encoding="utf-8").split(_BODY_MARK, 1)[1]


def _file(file: str):
    """The shipped file: a Path where the package is on a file system."""
    return resources.files(__package__).joinpath(file)


@functools.cache
def source(file: str) -> str:
    """What a kernel's source carries for one of the files: an #include of the shipped
    file where the package is on disk (NVRTC reads it there), else its text. MLX's CUDA
    backend copies a custom kernel's whole source into a new string at every call (a
    graph node a layer a decode step) and hashes it at every launch: on the H200 the
    flash kernel's 18 KB cost 3.5 us a layer a step more than an include line. MLX
    passes an input's shape or strides only where the source names them, so the names
    the file uses travel in a comment."""
    path = _file(file)
    where = str(path.resolve()) if isinstance(path, Path) else None
    if where is None or not _includable(where):
        return text(file)  # not on a file system (a zip), or a path an #include cannot name
    names = sorted(set(re.findall(r"\b\w+_(?:shape|strides|ndim)\b", text(file))))
    return f'// {" ".join(names)}\n#include "{where}"\n'


def _includable(path: str) -> bool:
    return path.isprintable() and '"' not in path and "\\" not in path


def included(code: str) -> str:
    """`code` with each #include of a kernel file replaced by the text compiled."""
    files = {str(_file(f).resolve()): f for f in _KERNEL_FILES if isinstance(_file(f), Path)}  # path: file
    return re.sub(r'#include "([^"]+)"\n', lambda m: text(files[m[1]]) if m[1] in files else m[0], code)


_KERNEL_FILES = ("packed.cuh", "flash.cu", "scores.cu", "weighted.cu")


def header() -> str:
    """Device helpers every kernel is compiled with."""
    return source("packed.cuh")


def kernel_name(name: str, body: str) -> str:
    """`name` and a digest of the kernel's whole source as compiled (the shared helpers and
    the files it includes read in)."""
    digest = hashlib.sha256(included(header() + body).encode()).hexdigest()[:16]
    return f"mlx_lm_ext_qattn_{name}_{digest}"


# What the flash kernel declares in place of an input a launch does not pass: each input
# costs host time at every call (~0.25 us on the H200) and these are never read then.
_ABSENT = {
    "mask": "const float* mask = nullptr; const Shape mask_shape = {}; const Strides mask_strides = {};\n",
    "sinks": "const float* sinks = nullptr; const Strides sinks_strides = {};\n",
    "tail": "const OutT* tk = nullptr; const OutT* tv = nullptr; const Strides tk_strides = {};\n"
    "const Strides tv_strides = {}; const Shape tn_shape = {};\n",
    "new": "const OutT* kn = nullptr; const OutT* vn = nullptr; const Strides kn_strides = {};\n"
    "const Strides vn_strides = {};\n",
}


def flash_source(constants: tuple, absent: tuple[str, ...] = ()) -> str:
    """The flash kernel's body with its compile-time constants written first, and
    declarations for the `absent` inputs ("mask", "sinks", "tail": tk, tv and tn, "new":
    kn and vn)."""
    declared = "".join(_ABSENT[name] for name in absent)
    return "".join(_constant(name, value) for name, value in constants) + declared + source("flash.cu")


def _constant(name: str, value) -> str:
    """One compile-time constant as MLX writes a template argument (a type by its name)."""
    if isinstance(value, bool):
        return f"    constexpr bool {name} = {'true' if value else 'false'};\n"
    if isinstance(value, int):
        return f"    constexpr int {name} = {value};\n"
    return f"    using {name} = {CUDA_TYPES[str(value).rsplit('.', 1)[-1]]};\n"


def template(rows: int, dim: int, bits: int, group_size: int, **extra: int) -> list:
    return [("R", rows), ("D", dim), ("BITS", bits), ("GS", group_size), *extra.items()]


def supports(rows: int, dim: int, bits: int, group_size: int, value_bits: int | None = None) -> bool:
    """Shapes `scores` (key bits) and `weighted_sum` (value bits) handle: whole bytes per
    lane, rows x dims per lane in registers (`flash_split` says which one-query shapes
    `flash_decode` takes)."""
    return (
        {bits, value_bits or bits} <= PACKED_WHOLE
        and dim % 32 == 0
        and group_size % max(dim // 32, 1) == 0
        and rows * (dim // 32) <= MAX_ACCUMULATORS
    )


def flash_tensor_cores(rows: int, dim: int, bits: int, group_size: int) -> bool:
    """Whether `flash` scores on tensor cores (on sm_80 and later; elsewhere the kernel
    keeps its CUDA-core pass): up to 8 query rows a KV head (one m16n8k16 tile's columns),
    dims in k-steps of 16, and 4 lanes a key row whose vector loads each stay inside one
    quantization group (a group of at least 4 words: group x bits >= 128)."""
    return (
        FLASH_MMA
        and rows <= 8
        and dim % 16 == 0
        and bits in PACKED_WHOLE
        and group_size * bits >= 128
        and dim * bits >= 128
        and dim % group_size == 0
    )


def flash_tensor_core_values(dim: int, value_bits: int, group_size: int) -> bool:
    """Whether `flash` sums the weighted values on tensor cores too (with its scores there):
    each of 8 lanes takes a value group's dims in 1 to 4 whole words (group x bits in
    256..1024), in m16 tiles of 16 dims."""
    return (
        FLASH_MMA
        and dim % 16 == 0
        and value_bits in PACKED_WHOLE
        and 256 <= group_size * value_bits <= 1024
        and group_size % 16 == 0
        and dim % group_size == 0
    )


@functools.cache
def flash_split(rows: int, dim: int, bits: int, group_size: int, value_bits: int | None = None) -> int | None:
    """Dims per lane for `flash_decode` (16, 8 or 4: fewer where more query rows share a
    KV head, to stay in registers), or None where the shape has no split. Key and value
    widths must each pack whole values into 32-bit words (2, 4, 8: a 6-bit row packs
    values across words, which the kernel's reads do not follow). Remembered: each
    decode step asks it for every layer."""
    widths = (bits, value_bits or bits)
    if not set(widths) <= PACKED_WHOLE:
        return None
    for per_lane in (16, 8, 4):
        lanes = dim // per_lane
        if (
            rows * per_lane <= FLASH_REGISTERS
            and dim % per_lane == 0
            and group_size % per_lane == 0
            and all(per_lane * w % 32 == 0 for w in widths)
            and lanes <= 32
            and 32 % lanes == 0
            and rows * dim <= FLASH_SMEM
        ):
            return per_lane
    return None


def flash_chunks(batch_heads: int, length: int, rows: int, step: int, extra: int = 0) -> int | None:
    """Chunks a (batch, KV head) is cut into, spreading the cache over about FLASH_BLOCKS
    blocks with the `extra` chunks a KV head (the tail's) among them. A chunk's rows (a
    multiple of a block's step; the kernel takes ceil(length / chunks) rounded up to one)
    fit its scores in shared memory, and the chunks' weights must fit there too: None past
    that length (262K tokens at 16 query rows, 4M at 4)."""
    most = FLASH_SMEM // rows // step * step
    per_block = -(-batch_heads * length // max(FLASH_BLOCKS - batch_heads * extra, batch_heads))
    per_block = max(per_block, -(-length // most))
    per_block = min(most, max(step, -(-per_block // step) * step))
    chunks = -(-length // per_block)
    return chunks if (chunks + extra) * rows <= FLASH_SMEM else None


def flash_plan(
    rows: int,
    dim: int,
    bits: int,
    group_size: int,
    batch_heads: int,
    length: int,
    tail: int = 0,
    value_bits: int | None = None,
):
    """(dims a lane, warps a block, chunks a KV head over the quantized rows) for
    `flash_decode`, or None where the shape has no `flash_split` or the length is past
    what a block's merge holds. `tail`: rows of a 16-bit tail, one chunk more (its scores
    must fit a block's shared memory). `value_bits`: the values' width where it is not
    the keys'."""
    if tail * rows > FLASH_SMEM:
        return None
    return _plan(rows, dim, bits, value_bits or bits, group_size, batch_heads, length, tail > 0)


@functools.lru_cache(maxsize=256)
def _plan(
    rows: int,
    dim: int,
    bits: int,
    value_bits: int,
    group_size: int,
    batch_heads: int,
    length: int,
    tail: bool,
):
    """`flash_plan` for a shape: remembered, as the quantized rows a layer reads change
    once a tail's block (64 steps) and every layer of a model shares them."""
    per_lane = flash_split(rows, dim, bits, group_size, value_bits)
    if per_lane is None:
        return None
    warps = max(1, min(FLASH_BLOCK_WARPS, FLASH_SMEM // (rows * dim)))  # partial sums fit
    chunks = flash_chunks(batch_heads, length, rows, warps * 32 * per_lane // dim, int(tail))
    return None if chunks is None else (per_lane, warps, chunks)
