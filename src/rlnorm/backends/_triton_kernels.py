"""The Triton kernels behind :mod:`rlnorm.backends.fused` (imported on first use: needs triton).

Every kernel applies exactly the formulas of :mod:`rlnorm.algebra` (see each docstring for the
function it mirrors), accumulates in float64, and reduces in a fixed order: no float atomics,
so the same input gives bitwise the same output on every call and on every rank. They are
launched with ``enable_fp_fusion=False``: no multiply-add contraction, so the merge's
compensated sums (``two_sum``) stay exact and the arithmetic is that of the torch code, one
rounding per operation.

Float literals inside the kernels are limited to values exact in float32 (0, 1, inf, NaN) or
outside its range (float64's max and tiny): Triton types other Python floats as float32.
Run-time float64 parameters (momentum, epsilon, ...) come in a small float64 tensor.

Example:
    >>> from rlnorm.backends import _triton_kernels  # doctest: +SKIP
    >>> _triton_kernels.update_sums_kernel  # doctest: +SKIP
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "discounted_returns_kernel",
    "normalize_kernel",
    "update_merge_kernel",
    "update_shift_kernel",
    "update_sums_kernel",
]

INF: tl.constexpr = tl.constexpr(float("inf"))
NAN: tl.constexpr = tl.constexpr(float("nan"))
F64_MAX: tl.constexpr = tl.constexpr(1.7976931348623157e308)
F64_TINY: tl.constexpr = tl.constexpr(2.2250738585072014e-308)


@triton.jit
def _usable_row_weights(
    w_ptr,
    count_ptr,
    until,
    rows,
    row_in,
    stride_w,
    HAS_WEIGHTS: tl.constexpr,
    HAS_UNTIL: tl.constexpr,
):
    """``usable_weights(weights)`` (1 without weights) times ``count < until``; 0 past the end."""
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + rows * stride_w, mask=row_in, other=0.0).to(tl.float64)
        w = tl.where((w > 0.0) & (w < INF), w, 0.0)
    else:
        w = tl.where(row_in, 1.0, 0.0).to(tl.float64)
    if HAS_UNTIL:
        active = tl.load(count_ptr) < until
        w = tl.where(active, w, 0.0)
    return w


@triton.jit
def update_shift_kernel(
    x_ptr,
    w_ptr,
    count_ptr,
    until,
    shift_ptr,
    n_rows,
    n_feat,
    stride_xn,
    stride_xd,
    stride_w,
    HAS_WEIGHTS: tl.constexpr,
    HAS_UNTIL: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: :func:`~rlnorm.algebra.moments.batch_shift` of the first ``HEAD`` rows.

    A head row counts if the sum of its squares (around 0, float64) is finite, times its usable
    weight and ``count < until``; the shift is the weighted mean of the counted rows (0: none).
    """
    rows = tl.arange(0, HEAD).to(tl.int64)
    row_in = rows < n_rows
    row_sq = tl.zeros([HEAD], dtype=tl.float64)
    for start in range(0, n_feat, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        tile = row_in[:, None] & (cols < n_feat)[None, :]
        ptrs = x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd
        v = tl.load(ptrs, mask=tile, other=0.0).to(tl.float64)
        row_sq += tl.sum(v * v, axis=1)
    ok = tl.where(tl.abs(row_sq) < INF, 1.0, 0.0).to(tl.float64)
    w = ok * _usable_row_weights(
        w_ptr, count_ptr, until, rows, row_in, stride_w, HAS_WEIGHTS, HAS_UNTIL
    )
    total = tl.maximum(tl.sum(w, axis=0), F64_TINY)
    for start in range(0, n_feat, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        col_in = cols < n_feat
        tile = row_in[:, None] & col_in[None, :]
        ptrs = x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd
        v = tl.load(ptrs, mask=tile, other=0.0).to(tl.float64)
        v = tl.where(tl.abs(v) < INF, v, 0.0)  # nan_to_num
        head_sum = tl.sum(w[:, None] * v, axis=0)
        tl.store(shift_ptr + cols, head_sum / total, mask=col_in)


@triton.jit
def update_sums_kernel(
    x_ptr,
    w_ptr,
    count_ptr,
    until,
    shift_ptr,
    part_f_ptr,
    part_i_ptr,
    n_rows,
    n_feat,
    stride_xn,
    stride_xd,
    stride_w,
    part_stride,
    HAS_WEIGHTS: tl.constexpr,
    HAS_UNTIL: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per-program partial :func:`~rlnorm.algebra.moments.shifted_sums` over row blocks.

    Program ``p`` takes row blocks ``p, p + P, p + 2P, ...`` and writes, at row ``p`` of the
    partials, ``[weight, sum (n_feat), sum_sq (n_feat)]`` (float64) and ``[count, nonfinite]``
    (int64). A row is left out when the float64 sum of the squares of its centered values is
    not finite (NaN, Inf, overflow); it counts as non-finite when its usable weight is > 0.
    With ``ONE_BLOCK`` all features fit one tile, loaded once per row block; otherwise each row
    block is read twice (its rows' finiteness first, then the sums), and the program's sums
    go through its own row of the partials.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_N)
    part_f = part_f_ptr + pid.to(tl.int64) * part_stride
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc_count = tl.zeros([BLOCK_N], dtype=tl.int64)
    acc_bad = tl.zeros([BLOCK_N], dtype=tl.int64)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D).to(tl.int64)
        col_in = cols < n_feat
        shift = tl.load(shift_ptr + cols, mask=col_in, other=0.0)
        acc_sum = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
        acc_sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
        for block in range(pid, n_blocks, n_prog):
            rows = block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            row_in = rows < n_rows
            tile = row_in[:, None] & col_in[None, :]
            ptrs = x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd
            v = tl.load(ptrs, mask=tile, other=0.0).to(tl.float64)
            c = tl.where(tile, v - shift[None, :], 0.0)
            q = c * c
            finite = tl.abs(tl.sum(q, axis=1)) < INF
            usable = _usable_row_weights(
                w_ptr, count_ptr, until, rows, row_in, stride_w, HAS_WEIGHTS, HAS_UNTIL
            )
            w = tl.where(finite, usable, 0.0)
            keep = (w > 0.0)[:, None]
            acc_sum += tl.where(keep, w[:, None] * c, 0.0)
            acc_sq += tl.where(keep, w[:, None] * q, 0.0)
            acc_w += w
            acc_count += (w > 0.0).to(tl.int64)
            acc_bad += ((usable > 0.0) & (finite == 0)).to(tl.int64)
        tl.store(part_f + 1 + cols, tl.sum(acc_sum, axis=0), mask=col_in)
        tl.store(part_f + 1 + n_feat + cols, tl.sum(acc_sq, axis=0), mask=col_in)
    else:
        for start in range(0, n_feat, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
            col_in = cols < n_feat
            zero = tl.zeros([BLOCK_D], dtype=tl.float64)
            tl.store(part_f + 1 + cols, zero, mask=col_in)
            tl.store(part_f + 1 + n_feat + cols, zero, mask=col_in)
        tl.debug_barrier()
        for block in range(pid, n_blocks, n_prog):
            rows = block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            row_in = rows < n_rows
            row_sq = tl.zeros([BLOCK_N], dtype=tl.float64)
            for start in range(0, n_feat, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
                col_in = cols < n_feat
                tile = row_in[:, None] & col_in[None, :]
                shift = tl.load(shift_ptr + cols, mask=col_in, other=0.0)
                ptrs = x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd
                v = tl.load(ptrs, mask=tile, other=0.0).to(tl.float64)
                c = tl.where(tile, v - shift[None, :], 0.0)
                row_sq += tl.sum(c * c, axis=1)
            finite = tl.abs(row_sq) < INF
            usable = _usable_row_weights(
                w_ptr, count_ptr, until, rows, row_in, stride_w, HAS_WEIGHTS, HAS_UNTIL
            )
            w = tl.where(finite, usable, 0.0)
            keep = (w > 0.0)[:, None]
            for start in range(0, n_feat, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
                col_in = cols < n_feat
                tile = row_in[:, None] & col_in[None, :]
                shift = tl.load(shift_ptr + cols, mask=col_in, other=0.0)
                ptrs = x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd
                v = tl.load(ptrs, mask=tile, other=0.0).to(tl.float64)
                c = tl.where(tile, v - shift[None, :], 0.0)
                block_sum = tl.sum(tl.where(keep, w[:, None] * c, 0.0), axis=0)
                block_sq = tl.sum(tl.where(keep, w[:, None] * (c * c), 0.0), axis=0)
                sum_ptrs = part_f + 1 + cols
                sq_ptrs = part_f + 1 + n_feat + cols
                # Program-private rows of the partials; the barrier orders this program's own
                # store of the previous block before this load, whichever thread made it.
                tl.store(sum_ptrs, tl.load(sum_ptrs, mask=col_in) + block_sum, mask=col_in)
                tl.store(sq_ptrs, tl.load(sq_ptrs, mask=col_in) + block_sq, mask=col_in)
                tl.debug_barrier()
            acc_w += w
            acc_count += (w > 0.0).to(tl.int64)
            acc_bad += ((usable > 0.0) & (finite == 0)).to(tl.int64)
    tl.store(part_f, tl.sum(acc_w, axis=0))
    part_i = part_i_ptr + pid.to(tl.int64) * 2
    tl.store(part_i, tl.sum(acc_count, axis=0))
    tl.store(part_i + 1, tl.sum(acc_bad, axis=0))


@triton.jit
def _two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


@triton.jit
def update_merge_kernel(
    part_f_ptr,
    part_i_ptr,
    n_parts,
    part_stride,
    shift_ptr,
    mean_ptr,
    var_ptr,
    residual_ptr,
    weight_sum_ptr,
    count_ptr,
    nonfinite_ptr,
    params_ptr,
    out_ptr,
    n_feat,
    FINALIZE: tl.constexpr,
    EMA: tl.constexpr,
    VAR_FLOOR: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: reduce the partials in a fixed order, then merge them into the state.

    With ``FINALIZE`` it only writes the reduced partials, in their own layout, to ``out``
    (``[weight, sum, sum_sq]`` float64, then ``[count, nonfinite]`` int64 through
    ``part_i``-like slots after them: see the launcher). Otherwise it computes the batch
    moments (:func:`~rlnorm.algebra.moments.batch_moments`), merges them into the state buffers
    in place (:func:`~rlnorm.algebra.moments.merge`, or ``merge_ema`` with ``params =
    [momentum, 1 - momentum, var_floor]``), and writes the batch moments to ``out`` as
    ``[weight, count (int64 bits), mean, var, mean_residual]``.
    """
    p_offs = tl.arange(0, BLOCK_P).to(tl.int64)
    acc_w = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_count = tl.zeros([BLOCK_P], dtype=tl.int64)
    acc_bad = tl.zeros([BLOCK_P], dtype=tl.int64)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + p_offs
        p_in = parts < n_parts
        acc_w += tl.load(part_f_ptr + parts * part_stride, mask=p_in, other=0.0)
        acc_count += tl.load(part_i_ptr + parts * 2, mask=p_in, other=0)
        acc_bad += tl.load(part_i_ptr + parts * 2 + 1, mask=p_in, other=0)
    w_b = tl.sum(acc_w, axis=0)
    count_b = tl.sum(acc_count, axis=0)
    bad_b = tl.sum(acc_bad, axis=0)
    if FINALIZE:
        tl.store(out_ptr, w_b)
        tl.store(out_ptr + 1 + 2 * n_feat, count_b.to(tl.float64, bitcast=True))
        tl.store(out_ptr + 2 + 2 * n_feat, bad_b.to(tl.float64, bitcast=True))
    else:
        w_a = tl.load(weight_sum_ptr)
        count_a = tl.load(count_ptr)
        bad_a = tl.load(nonfinite_ptr)
        has_data = w_b > 0.0
        if EMA:
            momentum = tl.load(params_ptr)
            weight_a = tl.where(has_data, momentum * w_a, w_a)
            weight_b = tl.where(has_data, tl.load(params_ptr + 1), 0.0)
        else:
            weight_a = w_a
            weight_b = w_b
        total = weight_a + weight_b
        has_weight = total > 0.0
        safe_total = tl.where(has_weight, total, 1.0)
        frac_a = weight_a / safe_total
        frac_b = weight_b / safe_total
        safe_w_b = tl.maximum(w_b, F64_TINY)
    for start in range(0, n_feat, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        col_in = cols < n_feat
        acc_sum = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float64)
        acc_sq = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float64)
        for p0 in range(0, n_parts, BLOCK_P):
            parts = p0 + p_offs
            tile = (parts < n_parts)[:, None] & col_in[None, :]
            rows = part_f_ptr + parts[:, None] * part_stride + 1 + cols[None, :]
            acc_sum += tl.load(rows, mask=tile, other=0.0)
            acc_sq += tl.load(rows + n_feat, mask=tile, other=0.0)
        s = tl.sum(acc_sum, axis=0)
        q = tl.sum(acc_sq, axis=0)
        if FINALIZE:
            tl.store(out_ptr + 1 + cols, s, mask=col_in)
            tl.store(out_ptr + 1 + n_feat + cols, q, mask=col_in)
        else:
            # batch_moments
            shift = tl.load(shift_ptr + cols, mask=col_in, other=0.0)
            offset = s / safe_w_b
            var_b = q / safe_w_b - offset * offset
            var_b = tl.where(var_b < 0.0, 0.0, var_b)
            var_b = tl.where(var_b > F64_MAX, F64_MAX, var_b)
            mean_b, res_b = _two_sum(shift, offset)
            # _mix
            mean_a = tl.load(mean_ptr + cols, mask=col_in, other=0.0)
            var_a = tl.load(var_ptr + cols, mask=col_in, other=1.0)
            res_a = tl.load(residual_ptr + cols, mask=col_in, other=0.0)
            delta_hi, delta_lo = _two_sum(mean_b, -mean_a)
            delta_lo = delta_lo + (res_b - res_a)
            delta = delta_hi + delta_lo
            hi, lo = _two_sum(mean_a, frac_b * delta_hi)
            mean, mean_res = _two_sum(hi, lo + frac_b * delta_lo + res_a)
            within = tl.where(
                frac_b <= frac_a,
                var_a + frac_b * (var_b - var_a),
                var_b + frac_a * (var_a - var_b),
            )
            var = within + (frac_a * frac_b) * (delta * delta)
            var = tl.where(var > F64_MAX, F64_MAX, var)
            mean = tl.where(has_weight, mean, mean_a)
            var = tl.where(has_weight, var, var_a)
            mean_res = tl.where(has_weight, mean_res, res_a)
            if VAR_FLOOR:
                gap = mean_b - mean
                floor = tl.load(params_ptr + 2) * (var_b + gap * gap)
                raised = tl.where(floor != floor, floor, tl.where(floor > var, floor, var))
                var = tl.where(has_data, raised, var)
            tl.store(mean_ptr + cols, mean, mask=col_in)
            tl.store(var_ptr + cols, var, mask=col_in)
            tl.store(residual_ptr + cols, mean_res, mask=col_in)
            tl.store(out_ptr + 2 + cols, mean_b, mask=col_in)
            tl.store(out_ptr + 2 + n_feat + cols, var_b, mask=col_in)
            tl.store(out_ptr + 2 + 2 * n_feat + cols, res_b, mask=col_in)
    if not FINALIZE:
        tl.store(weight_sum_ptr, total)
        tl.store(count_ptr, count_a + count_b)
        tl.store(nonfinite_ptr, bad_a + bad_b)
        tl.store(out_ptr, w_b)
        tl.store(out_ptr + 1, count_b.to(tl.float64, bitcast=True))


@triton.jit
def normalize_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    var_ptr,
    residual_ptr,
    weight_sum_ptr,
    params_ptr,
    clipped_ptr,
    n_rows,
    n_feat,
    stride_xn,
    stride_xd,
    COMPUTE: tl.constexpr,
    CENTER: tl.constexpr,
    CLAMP: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``normalize`` of a ``(BLOCK_N, BLOCK_D)`` tile, its affine map computed from the state.

    The map is :func:`~rlnorm.algebra.affine.affine` with ``params = [epsilon, clip]`` (clip
    inf for none), in the computing dtype ``COMPUTE`` (float64 for float64 ``y``, else
    float32). With
    ``COUNT`` the values the clamp set to a finite bound are added to ``clipped`` (int64).
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_in = cols < n_feat
    seen = tl.load(weight_sum_ptr) > 0.0
    epsilon = tl.load(params_ptr)
    bound = tl.load(params_ptr + 1)
    var = tl.load(var_ptr + cols, mask=col_in, other=1.0)
    scale = tl.where(seen, 1.0 / tl.sqrt(var + epsilon), 1.0).to(COMPUTE)
    high = tl.where(seen, bound, INF).to(COMPUTE)  # one bound for every feature
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = (rows < n_rows)[:, None] & col_in[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=tile)
    y = x.to(COMPUTE)
    if CENTER:
        mean = tl.where(seen, tl.load(mean_ptr + cols, mask=col_in, other=0.0), 0.0)
        offset = mean.to(COMPUTE)
        lost = tl.where(seen, tl.load(residual_ptr + cols, mask=col_in, other=0.0), 0.0)
        offset_lo = ((mean - offset.to(tl.float64)) + lost).to(COMPUTE)
        y = (y - offset[None, :]) - offset_lo[None, :]
    y = y * scale[None, :]
    if CLAMP:
        y = tl.where(y < -high, -high, y)
        y = tl.where(y > high, high, y)
        if COUNT:
            at_bound = tl.sum(((tl.abs(y) == high) & tile).to(tl.int64), axis=None)
            tl.atomic_add(clipped_ptr, tl.where(high < INF, at_bound, 0))
    out = y_ptr + rows[:, None] * n_feat + cols[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=tile)


@triton.jit
def discounted_returns_kernel(
    rewards_ptr,
    dones_ptr,
    returns_ptr,
    trajectory_ptr,
    new_returns_ptr,
    params_ptr,
    n_steps,
    n_envs,
    stride_rt,
    stride_re,
    stride_dt,
    stride_de,
    BLOCK_E: tl.constexpr,
):
    """:func:`~rlnorm.algebra.returns.discounted_returns` for a block of environments.

    Steps ``ret = ret * gamma + r`` (``params = [gamma]``) through the rollout; a non-finite
    reward leaves the return unchanged and enters the trajectory as NaN; a done resets to 0.
    """
    envs = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    env_in = envs < n_envs
    gamma = tl.load(params_ptr)
    ret = tl.load(returns_ptr + envs, mask=env_in, other=0.0)
    for t in range(n_steps):
        step = envs * 0 + t  # int64 offsets: T * envs may pass 2**31
        r = tl.load(rewards_ptr + step * stride_rt + envs * stride_re, mask=env_in, other=0.0)
        r = r.to(tl.float64)
        done = tl.load(dones_ptr + step * stride_dt + envs * stride_de, mask=env_in, other=0)
        finite = tl.abs(r) < INF
        ret = tl.where(finite, ret * gamma + r, ret)
        tl.store(trajectory_ptr + step * n_envs + envs, tl.where(finite, ret, NAN), mask=env_in)
        ret = tl.where(done != 0, 0.0, ret)
    tl.store(new_returns_ptr + envs, ret, mask=env_in)
