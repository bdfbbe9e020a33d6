"""fxopt::latent_decode_attention: the reference's semantics, the op's registration, the Triton
decode kernel under TRITON_INTERPRET=1 against the reference (Hypothesis: odd sizes, b=1, ragged
and left-padded rows, split-K, strided caches, fp16/bf16/fp32, magnitudes from subnormal to near
max), and its sm_90 compilation (no spills, shared memory within the limit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.errors import FxoptError
from fxopt.ops import latent_attention as la
from fxopt.testing.contracts import fp64_relative

# The kernel's output vs the reference's (fp32 arithmetic, one rounding to the output dtype at the
# end), both against fp64: the kernel also rounds the softmax weights to the cache dtype for the
# P @ C dot (as flash attention does) and sums tile by tile with exp2 and a folded log2(e).
# Measured <= 2.4x over 60 random cases (fp32 the worst: there the output rounding is no longer
# what dominates); 3 leaves room.
KERNEL = fp64_relative(3.0)


def _naive(q, qr, c, kr, lengths, starts, scale, key_mask=None):
    """Row by row, head by head, in fp64: the definition the reference must match."""
    b, H, r = q.shape
    T = c.shape[1]
    out = torch.zeros(b, H, r, dtype=torch.float64)
    for i in range(b):
        lo = 0 if starts is None else max(int(starts[i]), 0)
        hi = min(max(int(lengths[i]), 0), T)
        keys = [j for j in range(lo, hi) if key_mask is None or bool(key_mask[i, j])]
        if not keys:
            continue
        for h in range(H):
            s = (c[i, keys].double() @ q[i, h].double() + kr[i, keys, h].double() @ qr[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ c[i, keys].double()
    return out


def _case(b, H, r, R, T, dtype, seed, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)

    big = torch.finfo(dtype).max

    def rnd(*shape):  # clamped: values up to the dtype's largest finite number, never inf
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * magnitude).clamp(-big, big).to(dtype)

    return rnd(b, H, r), rnd(b, H, R), rnd(b, T, r), rnd(b, T, H, R)


def test_reference_matches_naive_definition():
    q, qr, c, kr = _case(4, 3, 5, 2, 9, torch.float64, 0)
    lengths = torch.tensor([9, 0, 20, 4])      # full, empty, beyond T (clamped), ragged
    starts = torch.tensor([0, 0, 3, 6])        # left padding; starts > lengths: empty
    key_mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    key_mask[0] = False  # a row whose mask hides every key
    for st_ in (None, starts):
        out = la.latent_decode_attention_ref(q, qr, c, kr, lengths, st_, 0.7)
        torch.testing.assert_close(out, _naive(q, qr, c, kr, lengths, st_, 0.7), rtol=1e-12, atol=1e-12)
        out = la.latent_decode_attention_ref(q, qr, c, kr, lengths, st_, 0.7, key_mask)
        torch.testing.assert_close(out, _naive(q, qr, c, kr, lengths, st_, 0.7, key_mask), rtol=1e-12, atol=1e-12)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
    out = la.latent_decode_attention_ref(q, qr, c, kr, lengths, starts, 0.7)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))


def test_op_registration_and_fake():
    q, qr, c, kr = _case(2, 3, 8, 4, 6, torch.float32, 1)
    lengths = torch.tensor([6, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fxopt.latent_decode_attention.default, (q, qr, c, kr, lengths, None, 0.5))
    torch.library.opcheck(torch.ops.fxopt.latent_decode_attention.default, (q, qr, c, kr, lengths, lengths - 3, 0.5))
    torch.library.opcheck(torch.ops.fxopt.latent_decode_attention.default,
                          (q, qr, c, kr, lengths, None, 0.5, torch.rand(2, 6) > 0.5))
    out = la.latent_decode_attention(q, qr, c, kr, lengths, None, 0.5)
    assert torch.equal(out, la.latent_decode_attention_ref(q, qr, c, kr, lengths, None, 0.5))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fqr, fc, fkr, fl = (mode.from_tensor(t) for t in (q, qr, c, kr, lengths))
        fo = la.latent_decode_attention(fq, fqr, fc, fkr, fl, None, 0.5)
        assert fo.shape == (2, 3, 8) and fo.dtype == torch.float32


@pytest.mark.parametrize("bad", ["rank", "heads", "lengths_dtype", "lengths_shape", "dtype", "mask"])
def test_bad_inputs_get_clear_errors(bad):
    q, qr, c, kr = _case(2, 3, 8, 4, 6, torch.float32, 1)
    lengths = torch.tensor([6, 3])
    key_mask = None
    if bad == "rank":
        c = c[..., :5]
    elif bad == "heads":
        kr = kr[:, :, :2]
    elif bad == "lengths_dtype":
        lengths = lengths.float()
    elif bad == "lengths_shape":
        lengths = lengths[:1]
    elif bad == "mask":
        key_mask = torch.ones(2, 5, dtype=torch.bool)
    else:
        qr = qr.half()
    with pytest.raises(FxoptError, match="latent_decode_attention"):
        la.latent_decode_attention_ref(q, qr, c, kr, lengths, None, 1.0, key_mask)


# ----------------------------------------------------------------------------- the Triton kernel
# triton.jit decides interpretation when a function is defined, Triton's own library functions
# included: interpreted kernels need TRITON_INTERPRET=1 from the start of the process (as the
# suite is run). Without it, test_kernel_tests_under_the_interpreter runs them in a subprocess.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def kernel():
    pytest.importorskip("triton")
    if not INTERPRETED:
        pytest.skip("run in a TRITON_INTERPRET=1 subprocess by test_kernel_tests_under_the_interpreter")
    from fxopt.codegen import latent_decode

    return latent_decode


@pytest.mark.skipif(INTERPRETED, reason="the kernel tests run in this process (TRITON_INTERPRET=1)")
def test_kernel_tests_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
                        "-k", "kernel and not under_the_interpreter and not sm90 and not cuda"],
                       env=env, capture_output=True, text=True, timeout=1200, cwd=root)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def _check(kernel, q, qr, c, kr, lengths, starts, scale, key_mask=None, **cfg):
    out = kernel.latent_decode_attention_triton(q, qr, c, kr, lengths, starts, scale, key_mask, **cfg)
    ref = la.latent_decode_attention_ref(q, qr, c, kr, lengths, starts, scale, key_mask)
    ref64 = la.latent_decode_attention_ref(q.double(), qr.double(), c.double(), kr.double(), lengths, starts, scale,
                                           key_mask)
    assert out.shape == ref.shape and out.dtype == q.dtype
    return KERNEL.check(ref, out, fp64_ref=ref64)


@settings(max_examples=30, deadline=None)
@given(
    b=st.sampled_from([1, 2, 3]),
    H=st.sampled_from([1, 2, 3, 5, 17]),
    r=st.sampled_from([1, 5, 16, 33, 70]),
    R=st.sampled_from([0, 2, 4, 6]),
    T=st.sampled_from([1, 7, 37, 70]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    magnitude=st.sampled_from([1.0, 1e-3, 30.0, 2e4]),
    ragged=st.booleans(),
    padded=st.booleans(),
    holes=st.sampled_from([None, 0.3, 0.9]),
    n_splits=st.sampled_from([None, 1, 2, 3, 7]),
    chunked=st.sampled_from([False, "unrolled", "loop"]),
    small_tiles=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(kernel, b, H, r, R, T, dtype, magnitude, ragged, padded, holes, n_splits, chunked,
                                  small_tiles, strided, seed):
    scale = 1.0 / max(magnitude, 1.0) ** 2 / max(r, 1) ** 0.5  # scores of a sane size
    q, qr, c, kr = _case(b, H, r, R, T, dtype, seed, magnitude)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 3, (b,), generator=g) if ragged else torch.full((b,), T)
    starts = torch.randint(0, max(1, T // 2 + 1), (b,), generator=g) if padded else None
    # a key mask with holes (fraction ``holes`` of the keys hidden; whole tiles masked at 0.9)
    key_mask = None if holes is None else torch.rand(b, T, generator=g) >= holes
    if strided:  # caches that are views of bigger (layer, batch, T, ...) buffers, k_rot with R outermost
        c = torch.cat([c, c], dim=-1)[..., :r]
        kr = kr.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    cfg = {}
    if n_splits is not None:
        cfg["n_splits"] = n_splits
    if chunked:  # the large-r path: output blocks of 16, scores in chunks of 16 (unrolled or a loop); rotary in chunks
        cfg.update(BLOCK_RO=16, BLOCK_RC=16, BLOCK_K=16, RC_LOOP=chunked == "loop")
    if small_tiles:  # many context tiles per program: the online softmax's rescaling matters
        cfg["BLOCK_T"] = 16
    _check(kernel, q, qr, c, kr, lengths.to(torch.int32), None if starts is None else starts.to(torch.int32), scale,
           key_mask, **cfg)


def test_kernel_fixed_cases(kernel):
    """Named corners: b=1 with a non-power-of-two length and many splits (some empty), a head block
    boundary (17 heads), Pythia's rotary width (R=20) in chunks, empty rows, int64 lengths."""
    q, qr, c, kr = _case(1, 4, 40, 20, 53, torch.float16, 3)
    _check(kernel, q, qr, c, kr, torch.tensor([53]), None, 0.1, n_splits=13)
    _check(kernel, q, qr, c, kr, torch.tensor([53]), None, 0.1, n_splits=1, BLOCK_K=64)
    q, qr, c, kr = _case(3, 17, 24, 4, 30, torch.bfloat16, 4)
    _check(kernel, q, qr, c, kr, torch.tensor([0, 30, 11]), torch.tensor([0, 29, 12]), 0.2, n_splits=4)
    out = kernel.latent_decode_attention_triton(q, qr, c, kr, torch.tensor([0, 30, 0]), None, 0.2, n_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    # the runtime's decode mask: left padding and everything after the current slot hidden; the first
    # tiles of row 1 are entirely masked (running max -inf across a tile)
    km = torch.zeros(3, 30, dtype=torch.bool)
    km[0, :5] = True
    km[1, 20:] = True
    km[2, 3:17] = True
    _check(kernel, q, qr, c, kr, torch.tensor([30, 30, 30]), None, 0.2, km, BLOCK_T=16)
    _check(kernel, q, qr, c, kr, torch.tensor([30, 30, 30]), None, 0.2, km, BLOCK_T=16, n_splits=3)
    empty = kernel.latent_decode_attention_triton(q, qr, c[:, :0], kr[:, :0], torch.tensor([0, 0, 0]), None, 0.2)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_kernel_online_softmax_rescales(kernel):
    """Scores that grow along the context: every tile raises the running maximum, so a kernel that
    did not rescale its accumulator would be far off."""
    q, qr, c, kr = _case(2, 3, 16, 4, 90, torch.float16, 6)
    ramp = torch.linspace(0.1, 3.0, 90, dtype=torch.float64)[None, :, None]
    c = (c.double().abs() * ramp).half()
    q = q.double().abs().half()
    for cfg in (dict(BLOCK_T=16), dict(BLOCK_T=16, n_splits=2), dict(BLOCK_T=16, BLOCK_RO=16, BLOCK_RC=16)):
        _check(kernel, q, qr, c, kr, torch.tensor([90, 77]), None, 0.5, **cfg)


def test_unattended_slots_may_hold_anything(kernel):
    """inf / nan in padding, beyond a row's length or under the key mask change nothing (reference and
    kernel); a nan in an attended key makes that row nan in both."""
    q, qr, c, kr = _case(2, 3, 16, 4, 40, torch.float16, 9)
    lengths, starts = torch.tensor([30, 40]), torch.tensor([5, 0])
    km = torch.ones(2, 40, dtype=torch.bool)
    km[1, 10:14] = False
    dirty_c, dirty_kr = c.clone(), kr.clone()
    for row, slot in ((0, 2), (0, 35), (1, 11)):
        dirty_c[row, slot] = float("nan")
        dirty_kr[row, slot] = float("inf")
    for fn in (la.latent_decode_attention_ref, kernel.latent_decode_attention_triton):
        clean = fn(q, qr, c, kr, lengths, starts, 0.3, km)
        assert torch.equal(fn(q, qr, dirty_c, dirty_kr, lengths, starts, 0.3, km), clean)
        poisoned = c.clone()
        poisoned[0, 7] = float("nan")
        out = fn(q, qr, poisoned, kr, lengths, starts, 0.3, km)
        assert bool(out[0].isnan().all()) and torch.equal(out[1], clean[1])


def test_kernel_detects_a_wrong_answer(kernel):
    """The comparison can fail: a cache with one key changed after the reference ran differs."""
    q, qr, c, kr = _case(2, 3, 16, 4, 9, torch.float16, 5)
    lengths = torch.tensor([9, 9])
    ref = la.latent_decode_attention_ref(q, qr, c, kr, lengths, None, 0.3)
    ref64 = la.latent_decode_attention_ref(q.double(), qr.double(), c.double(), kr.double(), lengths, None, 0.3)
    c2 = c.clone()
    c2[0, 4] += 1.0
    out = kernel.latent_decode_attention_triton(q, qr, c2, kr, lengths, None, 0.3)
    with pytest.raises(AssertionError, match="fp64_relative"):
        KERNEL.check(ref, out, fp64_ref=ref64)


def test_kernel_chunk_loop(kernel):
    """The pipelined scoring loop of large r (RC_LOOP): against the fp64 reference with size-1 and
    non-power-of-two dims, rows of different lengths (one empty, one beyond T), left padding, a key
    mask, split-K and an output block wider than the score chunk; and it agrees with the unrolled
    chunks it replaces."""
    for (b, H, r, R, T), cfg in (((1, 1, 1, 1, 1), dict(BLOCK_RO=16, BLOCK_RC=16)),
                                 ((4, 5, 70, 6, 53), dict(BLOCK_RO=32, BLOCK_RC=16, BLOCK_T=16)),
                                 ((3, 17, 37, 20, 41), dict(BLOCK_RO=16, BLOCK_RC=32, BLOCK_K=64, n_splits=3))):
        q, qr, c, kr = _case(b, H, r, R, T, torch.float16, b + r)
        lengths = torch.tensor([T, 0, T + 5, max(T - 7, 1)][:b])
        starts = torch.tensor([0, 0, 2, 1][:b])
        km = torch.rand(b, T, generator=torch.Generator().manual_seed(r)) > 0.25
        for st_, m in ((None, None), (starts, km)):
            _check(kernel, q, qr, c, kr, lengths, st_, 0.3, m, RC_LOOP=True, **cfg)
            loop = kernel.latent_decode_attention_triton(q, qr, c, kr, lengths, st_, 0.3, m, RC_LOOP=True, **cfg)
            unrolled = kernel.latent_decode_attention_triton(q, qr, c, kr, lengths, st_, 0.3, m, RC_LOOP=False, **cfg)
            torch.testing.assert_close(loop, unrolled, rtol=0, atol=0)  # the same sums in the same order


def test_tuned_table_applies_by_regime():
    """A TUNED entry is used for its regime key only; explicit overrides beat it; unknown keys and
    block sizes that are not powers of two get a clear error."""
    from fxopt.codegen.latent_decode import decode_config, tuned_key

    split_key = tuned_key(1, 32, 512, torch.float16, 132)
    batch_key = tuned_key(64, 32, 512, torch.float16, 132)
    assert split_key == (2, 512, "split") and batch_key == (2, 512, "batch")
    table = {split_key: dict(BLOCK_K=64, num_stages=3, split_waves=4, partial_frac=0.5)}
    one = decode_config(1, 32, 512, 20, 16384, torch.float16, 132, tuned=table)
    assert one["BLOCK_K"] == 64 and one["num_stages"] == 3
    plain = decode_config(1, 32, 512, 20, 16384, torch.float16, 132, tuned={})
    assert one["n_splits"] > plain["n_splits"]  # four waves and a larger partial budget
    # look-alike: the same r in the batch regime, and another r in the split regime, keep the heuristic
    assert decode_config(64, 32, 512, 20, 4096, torch.float16, 132, tuned=table) == \
        decode_config(64, 32, 512, 20, 4096, torch.float16, 132, tuned={})
    assert decode_config(1, 32, 1024, 20, 16384, torch.float16, 132, tuned=table) == \
        decode_config(1, 32, 1024, 20, 16384, torch.float16, 132, tuned={})
    assert decode_config(1, 32, 512, 20, 16384, torch.float16, 132, tuned=table, BLOCK_K=128)["BLOCK_K"] == 128
    with pytest.raises(FxoptError, match="unknown launch parameter"):
        decode_config(1, 32, 512, 20, 16384, torch.float16, 132, BLOCK_X=1)
    with pytest.raises(FxoptError, match="power of two"):
        decode_config(1, 32, 512, 20, 16384, torch.float16, 132, BLOCK_T=24)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 200), H=st.integers(1, 64), r=st.integers(1, 4096), R=st.integers(0, 32),
       T=st.integers(1, 40000), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       waves=st.sampled_from([None, 1, 4, 8]), frac=st.sampled_from([None, 0.125, 1.0]))
def test_decode_config_invariants(b, H, r, R, T, dtype, waves, frac):
    """Any call's configuration: power-of-two blocks, at least one split and no split shorter than
    two tiles (unless one), within the shared-memory estimate when stages were chosen, and the
    chunk loop only where the scores are chunked."""
    from fxopt.codegen.latent_decode import decode_config

    kw = {k: v for k, v in (("split_waves", waves), ("partial_frac", frac)) if v is not None}
    cfg = decode_config(b, H, r, R, T, dtype, 132, tuned={}, **kw)
    for k in ("BLOCK_H", "BLOCK_T", "BLOCK_RO", "BLOCK_RC", "BLOCK_K"):
        assert cfg[k] >= 16 and cfg[k] & (cfg[k] - 1) == 0
    assert cfg["n_splits"] >= 1 and (cfg["n_splits"] == 1 or T // cfg["n_splits"] >= 2 * cfg["BLOCK_T"])
    assert 1 <= cfg["num_stages"] <= 2
    single = cfg["BLOCK_RO"] >= r and cfg["BLOCK_RC"] == cfg["BLOCK_RO"]
    assert not (cfg["RC_LOOP"] and single)


def test_split_heuristic():
    """Few rows: split the context (enough programs for the GPU) but keep the fp32 partials small
    against the cache read; many rows: no split."""
    from fxopt.codegen.latent_decode import decode_config

    one = decode_config(1, 32, 512, 20, 16384, torch.float16, 132, tuned={})
    assert one["n_splits"] > 16
    partial = one["n_splits"] * 32 * 512 * 4
    assert partial <= 16384 * (512 + 640) * 2 / 8
    assert decode_config(64, 32, 512, 20, 4096, torch.float16, 132, tuned={})["n_splits"] <= 3
    assert decode_config(1, 32, 512, 20, 16, torch.float16, 132, tuned={})["n_splits"] == 1


_COMPILE = textwrap.dedent("""
    import json, sys
    from fxopt.codegen import latent_decode
    from fxopt.tools.sass import disassemble, local_accesses_in_longest_loop, resource_usage
    out = []
    for kw in json.loads(sys.argv[1]):
        k, cfg = latent_decode.compile_for_target(**kw)
        sass = disassemble(k)
        out.append(dict(kw=kw, shared=k.metadata.shared, res=resource_usage(k),
                        spills=local_accesses_in_longest_loop(sass),
                        async_copies=k.asm["ttgir"].count("async_copy_global_to_local"), stages=cfg["num_stages"]))
    print(json.dumps(out))
""")

# the benchmark's shapes (Pythia-2.8B: 32 heads, 20 rotary dims): r = 512, 1024, lossless 2560
_SM90 = [dict(r=512), dict(r=1024, b=1, T=16384, has_mask=True), dict(r=2560, dtype="bf16"),
         dict(r=2560, b=1, T=16384, BLOCK_K=64), dict(r=512, b=1, T=16384, BLOCK_K=64, num_stages=3),
         dict(r=1024, BLOCK_RO=512, BLOCK_RC=256, RC_LOOP=True, BLOCK_K=64, num_stages=3),
         dict(r=256, H=4, R=16, b=4, T=600, dtype="fp32")]  # ... and the trained GPTNeoX in fp32


def test_kernel_compiles_for_sm90(tmp_path):
    """The default configurations lower to sm_90 code without spills in the context loop, within
    the 227 KiB of shared memory a block may have, and with the cache loads software-pipelined
    (async copies) where two stages fit. In a subprocess without TRITON_INTERPRET (ptxas ships
    with Triton; no GPU needed) and an empty Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(_SM90)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == len(_SM90)
    for res in results:
        assert res["spills"] == 0, res
        assert res["shared"] <= 227 * 1024, res
        assert res["res"].get("LOCAL", 0) == 0, res
        if res["stages"] > 1:
            assert res["async_copies"] >= 2, res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("r,b,T", [(512, 64, 4096), (1024, 1, 16384), (2560, 4, 1000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_on_cuda(r, b, T, dtype):
    q, qr, c, kr = (t.cuda() for t in _case(b, 32, r, 20, T, dtype, 7))
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(T // 2, T + 1, (b,), generator=g).cuda()
    starts = torch.randint(0, 9, (b,), generator=g).cuda()
    for key_mask in (None, (torch.rand(b, T, generator=g) > 0.2).cuda()):
        out = la.latent_decode_attention(q, qr, c, kr, lengths, starts, 80 ** -0.5 / 4, key_mask)
        ref = la.latent_decode_attention_ref(q, qr, c, kr, lengths, starts, 80 ** -0.5 / 4, key_mask)
        ref64 = la.latent_decode_attention_ref(q.double(), qr.double(), c.double(), kr.double(), lengths, starts,
                                               80 ** -0.5 / 4, key_mask)
        KERNEL.check(ref, out, fp64_ref=ref64)
