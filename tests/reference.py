"""NumPy reference model of bitsandbytes' 8-bit blockwise quantization (NUMERICS.md §1.3, §2.2-§2.5).

Everything here is independent of bnbcy: the two 8-bit dynamic maps are embedded as the float32 bit
patterns of NUMERICS.md §1.3 (not regenerated, not read from ../shared), and the quantizer is the
literal 7-step search of §2.2 evaluated with IEEE float32 NumPy arithmetic:

    m  = max |x| over the block (NaN ignored, start -FLT_MAX; m < 2**-126 flushed to 0;
         a partial last block is padded with 0.0, as bnb's CUDA kernel loads it)
    r  = np.float32(1) / m                 (IEEE float32 reciprocal, result flushed to 0 if denormal)
    xn = ftz(ftz(x) * r)                   (one IEEE float32 rounding; denormal x and xn flushed,
                                            as CUDA's mul.ftz)
         -- except m == 0: xn = NaN for every element (0*inf)
    q  = search(code, xn)                  (literal §2.2 search, vectorised)

The flushes are CUDA's ``.ftz`` behaviour at the points where it changes a result the CPU can see:
an all-zero/all-denormal block gives code 0 everywhere (NaN path), a block with 2**126 < m <= FLT_MAX
has r = rcp.ftz(m) = 0 (every finite element -> code of 0.0, like an inf block).  This is the
contract of bnbcy's CPU kernel.  bnb's CUDA kernel uses rcp.approx and flushes denormal x as well,
so on the GPU codes may differ from this model by one index where the reciprocal differs (see
``codes_with_reciprocal_slack``).

Dequantization (§2.4): ``y = T(ftz(fl32(code[q] * absmax[i // blocksize])))`` (ftz: a denormal
float32 product is flushed to a signed zero, as CUDA's ``mul.ftz``; code and absmax are flushed too).
"""
from __future__ import annotations


import numpy as np

try:  # torch is a hard dependency of bnbcy, but keep the reference importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None

try:
    import cupy
except Exception:  # pragma: no cover - no CuPy / no GPU
    cupy = None

FLT_MAX = np.float32(np.finfo(np.float32).max)
FLT_MIN_NORMAL = np.float32(np.finfo(np.float32).tiny)  # 2**-126

# --------------------------------------------------------------------------------------------------
# §1.3 maps, float32 bit patterns (row label = first index of the row)
# --------------------------------------------------------------------------------------------------
SIGNED_DYNAMIC_HEX = """
  0: bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000
  8: bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333
 16: bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666
 24: bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a
 32: bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a
 40: bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000
 48: bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd
 56: be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334
 64: bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a
 72: bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d
 80: bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148
 88: bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148
 96: bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4
104: bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d
112: ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b
120: b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000
128: 3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b
136: 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d
144: 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4
152: 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148
160: 3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148
168: 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d
176: 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a
184: 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334
192: 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd
200: 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000
208: 3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a
216: 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a
224: 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666
232: 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
240: 3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000
248: 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000
"""

UNSIGNED_DYNAMIC_HEX = """
  0: 00000000 34ae7baa 35500998 360e9b38 3692ccf6 36de4c51 3714e5d5 3783126e
  8: 37e171a0 381fe868 384f1800 387e479a 3896bb99 38ae5364 38c5eb31 3906594b
 16: 394154ca 397c5049 399ba5e4 39b923a2 39d6a163 39f41f22 3a08ce71 3a178d50
 24: 3a264c30 3a350b10 3a43c9ef 3a5288d0 3a6147af 3a70068e 3a7ec56e 3a958106
 32: 3aba5e35 3adf3b64 3b020c4a 3b147ae1 3b26e978 3b395810 3b4bc6a7 3b5e3540
 40: 3b70a3d7 3b818937 3b8ac082 3b93f7cf 3b9d2f1a 3ba66666 3baf9db2 3bb8d4fd
 48: 3bc20c4a 3bcb4395 3bd47ae1 3bddb22e 3be6e978 3bf020c5 3bf9580f 3c0147ae
 56: 3c05e354 3c0a7ef9 3c0f1aa0 3c13b645 3c1851eb 3c1ced92 3c218937 3c2f5c2a
 64: 3c466667 3c5d70a3 3c747ae2 3c85c28f 3c9147af 3c9ccccd 3ca851eb 3cb3d70b
 72: 3cbf5c29 3ccae147 3cd66667 3ce1eb87 3ced70a3 3cf8f5c3 3d023d70 3d080000
 80: 3d0dc28f 3d13851f 3d1947af 3d1f0a3d 3d24cccd 3d2a8f5c 3d3051eb 3d36147b
 88: 3d3bd70a 3d41999a 3d475c28 3d4d1eb8 3d52e147 3d58a3d7 3d5e6667 3d6428f7
 96: 3d69eb87 3d6fae15 3d7570a3 3d7b3333 3d807ae2 3d835c2a 3d863d71 3d891eb8
104: 3d8c0000 3d8ee148 3d91c290 3d94a3d7 3d97851f 3d9a6667 3d9d47af 3da028f6
112: 3da30a3e 3da5eb85 3da8cccd 3dabae15 3dae8f5c 3db170a4 3db451eb 3db73333
120: 3dba147b 3dbcf5c3 3dbfd70b 3dc2b852 3dc5999a 3dc87ae2 3dcb5c29 3dd40000
128: 3de26666 3df0cccd 3dff3333 3e06cccc 3e0e0000 3e153334 3e1c6666 3e23999a
136: 3e2acccc 3e320000 3e393334 3e406666 3e47999a 3e4ecccc 3e560000 3e5d3334
144: 3e646666 3e6b999a 3e72cccc 3e7a0000 3e809999 3e843333 3e87cccd 3e8b6666
152: 3e8f0000 3e92999a 3e963333 3e99cccc 3e9d6666 3ea10000 3ea4999a 3ea83333
160: 3eabcccc 3eaf6666 3eb30000 3eb6999a 3eba3333 3ebdcccc 3ec16666 3ec50000
168: 3ec8999a 3ecc3333 3ecfcccc 3ed36666 3ed70000 3eda999a 3ede3333 3ee1cccc
176: 3ee56666 3ee90000 3eec999a 3ef03333 3ef3cccc 3ef76666 3efb0000 3efe9999
184: 3f01199a 3f02e666 3f04b333 3f068000 3f084ccc 3f0a199a 3f0be666 3f0db334
192: 3f0f8000 3f114ccd 3f13199a 3f14e666 3f16b334 3f188000 3f1a4ccd 3f1c199a
200: 3f1de666 3f1fb334 3f218000 3f234ccd 3f25199a 3f26e666 3f28b334 3f2a8000
208: 3f2c4ccd 3f2e199a 3f2fe666 3f31b334 3f338000 3f354ccd 3f37199a 3f38e666
216: 3f3ab334 3f3c8000 3f3e4ccd 3f40199a 3f41e666 3f43b334 3f458000 3f474ccc
224: 3f49199a 3f4ae666 3f4cb334 3f4e8000 3f504ccc 3f52199a 3f53e666 3f55b334
232: 3f578000 3f594ccc 3f5b199a 3f5ce666 3f5eb334 3f608000 3f624ccc 3f64199a
240: 3f65e666 3f67b334 3f698000 3f6b4ccc 3f6d199a 3f6ee666 3f70b334 3f728000
248: 3f744ccc 3f76199a 3f77e666 3f79b334 3f7b8000 3f7d4ccc 3f7f199a 3f800000
"""


def parse_hex_map(text: str) -> np.ndarray:
    """Parse a §1.3 table ("<row>: hex hex ...") into a read-only float32[256] array."""
    words = []
    for line in text.strip().splitlines():
        label, _, rest = line.partition(":")
        assert int(label) == len(words), f"row label {label} != index {len(words)}"
        words.extend(rest.split())
    assert len(words) == 256, len(words)
    out = np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32)
    out.setflags(write=False)
    return out


DYNAMIC_SIGNED = parse_hex_map(SIGNED_DYNAMIC_HEX)
DYNAMIC_UNSIGNED = parse_hex_map(UNSIGNED_DYNAMIC_HEX)

# unit roundoff (half an ulp at 1.0) and half the smallest subnormal of each output dtype
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
HALF_MIN_SUBNORMAL = {"float32": 2.0 ** -150, "float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
FTZ_SLACK = 2.0 ** -126  # a flushed denormal float32 product


# --------------------------------------------------------------------------------------------------
# array-kind helpers (torch / numpy / cupy)
# --------------------------------------------------------------------------------------------------
def kind_of(x) -> str:
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    raise TypeError(f"not an array: {type(x)!r}")


def dtype_name(x) -> str:
    """'float32' / 'float16' / 'bfloat16' / 'uint8' ... for torch, numpy and cupy arrays/dtypes."""
    dt = getattr(x, "dtype", x)
    if torch is not None and isinstance(dt, torch.dtype):
        return str(dt).replace("torch.", "")
    return np.dtype(dt).name


def to_numpy(x) -> np.ndarray:
    """Host NumPy copy of any array; bfloat16 becomes (exactly) float32."""
    k = kind_of(x)
    if k == "torch":
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy().copy()
    if k == "cupy":
        return cupy.asnumpy(x)
    return np.array(x, copy=True)


def to_f32(x) -> np.ndarray:
    """Exact float32 NumPy copy of a float32/float16/bfloat16 array (any kind)."""
    a = to_numpy(x)
    assert a.dtype in (np.float32, np.float16), a.dtype
    return a.astype(np.float32)


def bits_of(x) -> np.ndarray:
    """Bit patterns (uint32 for float32, uint16 for float16/bfloat16) of any array kind."""
    k = kind_of(x)
    name = dtype_name(x)
    if k == "torch":
        x = x.detach().cpu().contiguous()
        if name == "bfloat16":
            return x.view(torch.int16).numpy().view(np.uint16).copy()
        x = x.numpy()
    elif k == "cupy":
        x = cupy.asnumpy(x)
    x = np.ascontiguousarray(x)
    return x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16).copy()


def f32_to_bf16_bits(a) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round-to-nearest-even (NaN -> quiet NaN, sign kept)."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    rounded[nan] = ((b[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def f32_to_dtype_bits(a, name: str) -> np.ndarray:
    """Round float32 values to ``name`` (RNE) and return the bit patterns."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if name == "float32":
        return a.view(np.uint32).copy()
    if name == "float16":
        with np.errstate(over="ignore"):
            return a.astype(np.float16).view(np.uint16)
    if name == "bfloat16":
        return f32_to_bf16_bits(a)
    raise ValueError(name)


def bits_to_f64(bits: np.ndarray, name: str) -> np.ndarray:
    """Decode bit patterns of ``name`` into float64 values."""
    if name == "float32":
        return bits.view(np.float32).astype(np.float64)
    if name == "float16":
        return bits.view(np.float16).astype(np.float64)
    if name == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    raise ValueError(name)


def round_f32_to(a, name: str) -> np.ndarray:
    """float32 values rounded to ``name`` (RNE), returned as float32 (exact)."""
    return bits_to_f64(f32_to_dtype_bits(a, name), name).astype(np.float32)


def assert_bits_equal(got_bits: np.ndarray, exp_bits: np.ndarray, name: str, what: str = "values"):
    """Bit-exact comparison; any NaN equals any NaN (payload/sign of NaN is not part of the contract)."""
    got_bits = np.asarray(got_bits).ravel()
    exp_bits = np.asarray(exp_bits).ravel()
    assert got_bits.shape == exp_bits.shape, (got_bits.shape, exp_bits.shape)
    gv, ev = bits_to_f64(got_bits, name), bits_to_f64(exp_bits, name)
    both_nan = np.isnan(gv) & np.isnan(ev)
    bad = np.nonzero((got_bits != exp_bits) & ~both_nan)[0]
    if bad.size:
        i = bad[:8]
        raise AssertionError(
            f"{what}: {bad.size} of {got_bits.size} elements differ ({name}); first at {i.tolist()}: "
            f"got {gv[i].tolist()} (bits {[hex(int(v)) for v in got_bits[i]]}), "
            f"expected {ev[i].tolist()} (bits {[hex(int(v)) for v in exp_bits[i]]})")


def assert_codes_equal(got, exp, x=None, absmax=None, blocksize=None, what="codes"):
    got = np.asarray(got).ravel()
    exp = np.asarray(exp).ravel()
    assert got.shape == exp.shape, (got.shape, exp.shape)
    bad = np.nonzero(got != exp)[0]
    if bad.size:
        i = bad[:8]
        msg = (f"{what}: {bad.size} of {got.size} codes differ; first at {i.tolist()}: "
               f"got {got[i].tolist()}, expected {exp[i].tolist()}")
        if x is not None:
            xs = np.asarray(x, dtype=np.float32).ravel()[i]
            msg += f"; x = {[float(v) for v in xs]} (hex {[hex(int(v)) for v in xs.view(np.uint32)]})"
        if absmax is not None and blocksize is not None:
            msg += f"; absmax = {[float(np.asarray(absmax).ravel()[j // blocksize]) for j in i]}"
        raise AssertionError(msg)


# --------------------------------------------------------------------------------------------------
# §2.2 search
# --------------------------------------------------------------------------------------------------
_STEPS = (64, 32, 16, 8, 4, 2, 1)


def search_literal(code, xn) -> np.ndarray:
    """The literal 7-step binary search of NUMERICS §2.2, vectorised, float32 throughout.

    Correct for any sorted 256-entry map, including maps with duplicated values (zero-padded maps).
    Returns uint8 codes of xn's shape.  NaN -> 0.
    """
    code = np.ascontiguousarray(code, dtype=np.float32).ravel()
    assert code.shape == (256,)
    xn = np.asarray(xn, dtype=np.float32)
    shape = xn.shape
    xn = xn.ravel()
    p = np.full(xn.shape, 127, dtype=np.int32)
    lo_i = np.zeros(xn.shape, dtype=np.int32)
    hi_i = np.full(xn.shape, 255, dtype=np.int32)
    lo = np.full(xn.shape, -1.0, dtype=np.float32)
    hi = np.full(xn.shape, 1.0, dtype=np.float32)
    v = code[p]
    for step in _STEPS:
        gt = xn > v
        lo_i = np.where(gt, p, lo_i)
        lo = np.where(gt, v, lo)
        hi_i = np.where(gt, hi_i, p)
        hi = np.where(gt, hi, v)
        p = np.where(gt, p + step, p - step)
        v = code[p]
    hi = np.where(hi_i == 255, code[255], hi)
    lo = np.where(lo_i == 0, code[0], lo)
    half = np.float32(0.5)
    with np.errstate(over="ignore", invalid="ignore"):
        mid_hi = (hi + v).astype(np.float32) * half
        mid_lo = (lo + v).astype(np.float32) * half
    assert mid_hi.dtype == np.float32 and mid_lo.dtype == np.float32
    gt = xn > v
    res = np.where(gt, np.where(xn > mid_hi, hi_i, p), np.where(xn < mid_lo, lo_i, p))
    return res.astype(np.uint8).reshape(shape)


def search_closed_form(code, xn) -> np.ndarray:
    """§2.2 closed form, valid only for strictly increasing maps: q = #{i: m_i < xn}, exact ties of an
    odd q go up to the even index; NaN -> 0.  Used to cross-check ``search_literal``."""
    code = np.asarray(code, dtype=np.float32).ravel()
    assert np.all(np.diff(code.astype(np.float64)) > 0), "closed form needs a strictly increasing map"
    mids = ((code[:-1] + code[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    xn = np.asarray(xn, dtype=np.float32)
    shape = xn.shape
    xn = xn.ravel()
    q = np.searchsorted(mids, xn, side="left").astype(np.int64)  # #{m_i < xn}
    qc = np.minimum(q, 254)
    tie = (q <= 254) & (xn == mids[qc]) & (q % 2 == 1)
    q = np.where(tie, q + 1, q)
    q = np.where(np.isnan(xn), 0, q)
    return q.astype(np.uint8).reshape(shape)


def nearest_f64(code, xn64) -> np.ndarray:
    """Float64 'ideal nearest' code value of each xn (ties resolved either way; NaN -> NaN)."""
    c = np.unique(np.asarray(code, dtype=np.float64))
    xn64 = np.asarray(xn64, dtype=np.float64)
    k = np.clip(np.searchsorted(c, xn64), 1, len(c) - 1)
    left, right = c[k - 1], c[k]
    out = np.where(np.abs(xn64 - left) <= np.abs(right - xn64), left, right)
    return np.where(np.isnan(xn64), np.nan, out)


# --------------------------------------------------------------------------------------------------
# §2.2-§2.5 quantize / dequantize
# --------------------------------------------------------------------------------------------------
def nblocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def block_absmax(x32, blocksize: int) -> np.ndarray:
    """absmax per block (§2.2 step 1): fmaxf from -FLT_MAX over the valid elements, NaN ignored,
    float32-denormal |x| flushed to 0 (CUDA ftz; bnbcy's CPU kernel does the same)."""
    a = np.abs(np.asarray(x32, dtype=np.float32).ravel())
    a = np.where(a < FLT_MIN_NORMAL, np.float32(0), a)  # NaN compares False: stays NaN
    a = np.where(np.isnan(a), -FLT_MAX, a).astype(np.float32)
    n = a.size
    nb = nblocks(n, blocksize)
    pad = np.zeros(nb * blocksize - n, dtype=np.float32)  # bnb's CUDA load pads with 0.0
    return np.concatenate([a, pad]).reshape(nb, blocksize).max(axis=1).astype(np.float32)


def expand(per_block, n: int, blocksize: int) -> np.ndarray:
    return np.repeat(np.asarray(per_block), blocksize)[:n]


def ftz(a) -> np.ndarray:
    """Flush float32 denormals to a zero of the same sign."""
    a = np.asarray(a, dtype=np.float32)
    return np.where(np.abs(a) < FLT_MIN_NORMAL, a * np.float32(0), a).astype(np.float32)


def normalize(x32, absmax, blocksize: int, r_shift_ulps: int = 0, ftz_x: bool = True) -> np.ndarray:
    """xn per the model above: r = ftz(fl32(1/m)) (optionally moved by r_shift_ulps float32 ulps),
    xn = fl32(x * r), NaN for m == 0 blocks.  ftz_x: also flush denormal x and xn (CUDA)."""
    x32 = np.asarray(x32, dtype=np.float32).ravel()
    absmax = np.asarray(absmax, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        r = (np.float32(1) / absmax).astype(np.float32)
        direction = np.float32(np.inf) if r_shift_ulps > 0 else np.float32(-np.inf)
        for _ in range(abs(r_shift_ulps)):
            r = np.where(np.isfinite(r) & (r != 0), np.nextafter(r, direction), r).astype(np.float32)
        r = ftz(r)
        if ftz_x:
            x32 = ftz(x32)
        xn = (x32 * expand(r, x32.size, blocksize)).astype(np.float32)
        xn = np.where(expand(absmax == 0, x32.size, blocksize), np.float32(np.nan), xn)
        if ftz_x:
            xn = ftz(xn)
    return xn.astype(np.float32)


def quantize_ref(x, blocksize: int, code=None):
    """Reference ``quantize_blockwise``: returns (codes uint8 of x's shape, absmax float32[nblocks]).
    ``x`` may be any array kind of float32/float16/bfloat16 (converted exactly to float32)."""
    code = DYNAMIC_SIGNED if code is None else to_f32(code) if not isinstance(code, np.ndarray) \
        else code.astype(np.float32)
    x32 = x if isinstance(x, np.ndarray) and x.dtype == np.float32 else to_f32(x)
    shape = x32.shape
    flat = x32.ravel()
    absmax = block_absmax(flat, blocksize)
    q = search_literal(code, normalize(flat, absmax, blocksize))
    return q.reshape(shape), absmax


def codes_with_reciprocal_slack(x, absmax, blocksize: int, code=None, ulps: int = 2, ftz_x: bool = True):
    """Codes obtained when r is moved by -ulps..+ulps float32 ulps (CUDA's rcp.approx is within 1 ulp
    of the IEEE reciprocal).  Returns int array [2*ulps+1, n]."""
    code = DYNAMIC_SIGNED if code is None else np.asarray(code, dtype=np.float32)
    flat = to_f32(x).ravel() if not isinstance(x, np.ndarray) else x.astype(np.float32).ravel()
    return np.stack([search_literal(code, normalize(flat, absmax, blocksize, s, ftz_x=ftz_x)).astype(np.int32)
                     for s in range(-ulps, ulps + 1)])


def dequantize_f32(q, absmax, blocksize: int, code=None) -> np.ndarray:
    """ftz(fl32(code[q] * absmax[i // blocksize])) (§2.4), float32, flattened."""
    code = ftz(DYNAMIC_SIGNED if code is None else np.asarray(code, dtype=np.float32))
    q = np.asarray(q).ravel().astype(np.intp)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return ftz(code[q] * expand(ftz(absmax), q.size, blocksize))


def dequantize_ref_bits(q, absmax, blocksize: int, out_dtype: str, code=None) -> np.ndarray:
    """Bit patterns of ``T(fl32(code[q] * absmax[i // blocksize]))`` for T = out_dtype."""
    return f32_to_dtype_bits(dequantize_f32(q, absmax, blocksize, code), out_dtype)


def torch_mean_f32(a) -> np.float32:
    """``absmax.mean()`` exactly as torch computes it (float32, torch's reduction order)."""
    return np.float32(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).mean().item())


def nested_quantize_ref(x, blocksize: int, code=None, offset=None):
    """§2.5: returns dict(q, absmax (float32, first level), offset, centred, qabs, absmax2).
    ``offset`` defaults to torch's float32 mean of the absmax."""
    q, absmax = quantize_ref(x, blocksize, code)
    offset = torch_mean_f32(absmax) if offset is None else np.float32(offset)
    centred = (absmax - offset).astype(np.float32)
    qabs, absmax2 = quantize_ref(centred, blocksize)
    return dict(q=q, absmax=absmax, offset=offset, centred=centred, qabs=qabs, absmax2=absmax2)


def nested_absmax_ref(qabs, absmax2, offset, blocksize: int) -> np.ndarray:
    """First-level absmax recovered from a nested state: fl32(fl32(code[qabs]*absmax2) + offset)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (dequantize_f32(qabs, absmax2, blocksize) + np.float32(offset)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# error bound for the round trip
# --------------------------------------------------------------------------------------------------
def roundtrip_error_bound(x64, absmax, blocksize: int, out_dtype: str, code=None):
    """Per-element bound on |dequant(quant(x)) - x| (float64), and the mask where it applies.

    For xn = x/m inside [c_k, c_{k+1}] (distinct map values), the nearest code is within
    (c_{k+1}-c_k)/2; outside [c_0, c_255] it is the end value.  The float32 search (fl32 reciprocal,
    fl32 product, fl32 midpoints) can pick the farther neighbour only within 2**-20 of a midpoint,
    which adds 2**-20·m.  Then the float32 product code·m (2**-24 relative, plus 2**-126 absolute for
    the flush of a denormal product) and the rounding to the output dtype (unit roundoff u_T relative,
    plus half its smallest subnormal) are added.
    The bound applies to finite x in blocks whose absmax is non-zero and at most 2**126 (above that,
    r = ftz(1/m) = 0 and the block quantizes like an inf block).
    """
    code = DYNAMIC_SIGNED if code is None else np.asarray(code, dtype=np.float32)
    c = np.unique(code.astype(np.float64))
    x64 = np.asarray(x64, dtype=np.float64).ravel()
    m = expand(np.asarray(absmax, dtype=np.float64), x64.size, blocksize)
    ok = np.isfinite(x64) & np.isfinite(m) & (m > 0) & (m <= 2.0 ** 126)
    with np.errstate(invalid="ignore", divide="ignore"):
        xn = np.where(ok, x64 / np.where(ok, m, 1.0), 0.0)
    k = np.clip(np.searchsorted(c, xn), 1, len(c) - 1)
    local = (c[k] - c[k - 1]) / 2
    local = np.where(xn < c[0], c[0] - xn, local)
    local = np.where(xn > c[-1], xn - c[-1], local)
    bound_n = local + 2.0 ** -20
    ymax = (np.abs(xn) + bound_n) * m
    bound = bound_n * m + ymax * (2.0 ** -24 + UNIT_ROUNDOFF[out_dtype]) * 1.0001 \
        + HALF_MIN_SUBNORMAL[out_dtype] + FTZ_SLACK
    return np.where(ok, bound, np.inf), ok


def max_gap_bound(code=None) -> float:
    """Half the largest gap between adjacent distinct map values (the coarse, map-wide bound)."""
    code = DYNAMIC_SIGNED if code is None else np.asarray(code, dtype=np.float32)
    c = np.unique(code.astype(np.float64))
    return float(np.max(np.diff(c)) / 2)


# --------------------------------------------------------------------------------------------------
# test-data helpers
# --------------------------------------------------------------------------------------------------
DISTRIBUTIONS = ("normal", "student_t", "outliers", "zero_blocks", "nan", "inf", "denormal",
                 "tiny", "huge")

FP16_MAX = 65504.0


def make_values(dist: str, n: int, rng: np.random.Generator, blocksize: int = 64) -> np.ndarray:
    """float64 test values of the named distribution (before rounding to the input dtype)."""
    v = rng.standard_normal(n)
    nb = nblocks(n, blocksize)
    if dist == "normal":
        pass
    elif dist == "student_t":
        v = rng.standard_t(2, n)
    elif dist == "outliers":
        idx = rng.choice(n, size=max(1, n // 200), replace=False)
        v[idx] *= 100.0
    elif dist == "zero_blocks":
        zero = rng.random(nb) < 0.5
        zero[0] = zero[-1] = True                         # first and (possibly partial) last block
        if nb > 2:
            zero[1] = False                               # and at least one non-zero block
        for b in np.nonzero(zero)[0]:
            sl = slice(b * blocksize, min(n, (b + 1) * blocksize))
            v[sl] = np.where(rng.random(v[sl].size) < 0.5, 0.0, -0.0)   # +0.0 and -0.0
    elif dist == "nan":
        v[rng.random(n) < 0.05] = np.nan
        v[::blocksize] = 1.0 + rng.random(v[::blocksize].size)  # no all-NaN block
    elif dist == "inf":
        for b in rng.choice(nb, size=max(1, nb // 3), replace=False):
            lo, hi = b * blocksize, min(n, (b + 1) * blocksize)
            k = rng.integers(lo, hi)
            v[k] = np.inf if rng.random() < 0.5 else -np.inf
        if n > 2:
            v[rng.integers(0, n)] = -np.inf
    elif dist == "denormal":
        d = rng.uniform(-1, 1, n) * 2.0 ** -127          # float32 denormals (and zeros)
        kind = rng.integers(0, 3, nb)
        for b in range(nb):
            sl = slice(b * blocksize, min(n, (b + 1) * blocksize))
            if kind[b] == 0:     # only denormals / zeros: absmax flushes to 0
                v[sl] = d[sl]
                v[sl][::3] = 0.0
            elif kind[b] == 1:   # normal values with denormals sprinkled in
                v[sl][::2] = d[sl][::2]
            else:                # tiny normals + denormals: xn of a denormal is not negligible
                v[sl] = d[sl]
                v[sl.start] = 3.0 * 2.0 ** -126
    elif dist == "tiny":
        v = v * 1e-30
    elif dist == "huge":
        v = v * 1e30
    else:
        raise ValueError(dist)
    return v


def supports(dist: str, dtype: str) -> bool:
    """Distributions that make sense for a dtype (float16 has no 1e±30 / float32-denormal range)."""
    if dtype == "float16" and dist in ("tiny", "huge", "denormal"):
        return False
    return True


def make_input(values, dtype: str, kind: str = "torch", device: str = "cpu"):
    """An array of ``kind`` ('torch', 'numpy', 'cupy') and dtype from float64 values."""
    v = np.asarray(values, dtype=np.float64)
    if dtype == "float16":
        v = np.where(np.isfinite(v), np.clip(v, -FP16_MAX, FP16_MAX), v)
    with np.errstate(over="ignore"):
        v32 = v.astype(np.float32)
    if kind == "torch":
        t = torch.from_numpy(v32.copy())
        t = t.to(getattr(torch, dtype))
        return t.to(device)
    if kind == "numpy":
        assert dtype != "bfloat16", "NumPy has no bfloat16"
        return v32.astype(dtype)
    if kind == "cupy":
        assert dtype != "bfloat16", "CuPy has no bfloat16"
        return cupy.asarray(v32.astype(dtype))
    raise ValueError(kind)


def seed_of(*parts) -> int:
    """A stable per-test seed (different for every parametrization)."""
    import zlib
    return zlib.crc32(repr(parts).encode())


# --------------------------------------------------------------------------------------------------
# 4-bit NF4 / FP4 (NUMERICS.md §1.4, §1.5, §3), written from the spec's tables, not from bnbcy
# --------------------------------------------------------------------------------------------------
def _f32_from_hex(words) -> np.ndarray:
    return np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32)


# §1.4 table, code order
NF4 = _f32_from_hex("bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
                    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000".split())
# §1.5: the CUDA dequantizer's values (code 8 is -0.0) and QuantState.code (+0.0 at 8)
FP4_DEQUANT = _f32_from_hex("00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000 "
                            "80000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000".split())
FP4_CODE = np.where(FP4_DEQUANT == 0, np.float32(0), FP4_DEQUANT).astype(np.float32)
# §3.2: NF4 thresholds are the float32 midpoints of the table
NF4_THRESHOLDS = ((NF4[:-1] + NF4[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
# §3.2: FP4 literal tree constants
_FP4_T = dict(zip(("t0259", "t0086", "t0208", "t0292", "t0417", "t0583", "t0833"),
                  _f32_from_hex("3b2aaab9 3db00000 3e555555 3e955555 3ed55556 3f155550 3f555555".split())))


def nf4_codes(xn) -> np.ndarray:
    """code = #{k : xn > t_k}; NaN -> 0."""
    xn = np.asarray(xn, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return (xn[..., None] > NF4_THRESHOLDS).sum(axis=-1).astype(np.uint8)


def fp4_codes(xn) -> np.ndarray:
    """bitsandbytes' FP4 tree, literally: sign for xn < 0, magnitude by strict '>' tests."""
    xn = np.asarray(xn, dtype=np.float32)
    t = _FP4_T
    with np.errstate(invalid="ignore"):
        a = np.abs(xn)
        mag = np.where(a > t["t0292"],
                       np.where(a > t["t0583"], np.where(a > t["t0833"], 0b011, 0b010),
                                np.where(a > t["t0417"], 0b101, 0b100)),
                       np.where(a > t["t0086"], np.where(a > t["t0208"], 0b111, 0b110),
                                np.where(a > t["t0259"], 0b001, 0b000)))
        return (mag | np.where(xn < 0, 0b1000, 0)).astype(np.uint8)


def quantize4_ref(x, blocksize: int, quant_type: str):
    """Reference ``quantize_4bit``: (per-element codes uint8[n + n % 2] including the padding code of an
    odd tail, absmax float32[nblocks])."""
    flat = (x if isinstance(x, np.ndarray) and x.dtype == np.float32 else to_f32(x)).ravel()
    n = flat.size
    absmax = block_absmax(flat, blocksize)
    padded = np.concatenate([flat, np.zeros(n % 2, dtype=np.float32)])  # the pad element is 0.0 * r
    xn = normalize(padded, absmax, blocksize)  # blocksize is even: the pad lies in the last block
    codes = nf4_codes(xn) if quant_type == "nf4" else fp4_codes(xn)
    return codes, absmax


def pack4(codes) -> np.ndarray:
    """Element 2j -> high nibble of byte j, 2j+1 -> low nibble (len(codes) even)."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1, 2)
    return ((c[:, 0] << 4) | c[:, 1]).astype(np.uint8)


def unpack4(packed, n: int) -> np.ndarray:
    b = np.asarray(packed, dtype=np.uint8).ravel()
    return np.stack([b >> 4, b & 15], axis=1).ravel()[:n]


def dequantize4_f32(codes, absmax, blocksize: int, quant_type: str) -> np.ndarray:
    """ftz(fl32(table[c] * absmax[i // blocksize])) with the CUDA dequantizer's tables (§3.3)."""
    table = NF4 if quant_type == "nf4" else FP4_DEQUANT
    c = np.asarray(codes).ravel().astype(np.intp)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return ftz(table[c] * expand(ftz(absmax), c.size, blocksize))
