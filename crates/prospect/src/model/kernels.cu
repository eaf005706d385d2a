// CUDA forms of the fused training kernels in kernels.rs: the same formulas, f32 in and out, compiled at
// run time with NVRTC (kernels_cuda.rs). Row kernels run one block of BLOCK threads per row and reduce
// with warp shuffles; element kernels run one thread per output.
//
// Shapes as in kernels.rs: `n` rows, `v` vocab, `d` width, `t` keys per attention row, `e` head dim.

#define BLOCK 256
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned int u32;

// The block-wide sum (op 0) or max (op 1) of one value per thread; every thread gets the result.
__device__ float block_reduce(float x, int op) {
    __shared__ float part[BLOCK / 32];
    for (int o = 16; o > 0; o /= 2) {
        float y = __shfl_xor_sync(0xffffffff, x, o);
        x = op == 0 ? x + y : fmaxf(x, y);
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads(); // `part` may still be read by an earlier call
    if (lane == 0) part[warp] = x;
    __syncthreads();
    x = lane < BLOCK / 32 ? part[lane] : (op == 0 ? 0.0f : NEG_INF);
    for (int o = 16; o > 0; o /= 2) {
        float y = __shfl_xor_sync(0xffffffff, x, o);
        x = op == 0 ? x + y : fmaxf(x, y);
    }
    return x;
}

// max_j x_j and sum_j exp(x_j - max) of one row of `v` logits.
__device__ void max_and_sum_exp(const float* row, int v, float* max_out, float* sum_out) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += BLOCK) m = fmaxf(m, row[j]);
    m = block_reduce(m, 1);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += BLOCK) s += expf(row[j] - m);
    *max_out = m;
    *sum_out = block_reduce(s, 0);
}

// logp_i = x_i[t_i] - max_i - ln sum_j exp(x_ij - max_i). Grid: n blocks.
extern "C" __global__ void token_logps(const float* logits, const u32* targets, float* out, int v) {
    const float* row = logits + (size_t)blockIdx.x * v;
    float m, s;
    max_and_sum_exp(row, v, &m, &s);
    if (threadIdx.x == 0) out[blockIdx.x] = row[targets[blockIdx.x]] - m - logf(s);
}

// dx_ij = g_i (1[j = t_i] - softmax(x_i)_j). Grid: n blocks.
extern "C" __global__ void token_logps_backward(const float* logits, const u32* targets, const float* grad,
                                                float* dx, int v) {
    size_t i = blockIdx.x;
    const float* row = logits + i * v;
    float* out = dx + i * v;
    float g = grad[i];
    if (g == 0.0f) { // masked positions contribute nothing
        for (int j = threadIdx.x; j < v; j += BLOCK) out[j] = 0.0f;
        return;
    }
    float m, s;
    max_and_sum_exp(row, v, &m, &s);
    float scale = -g / s;
    u32 t = targets[i];
    for (int j = threadIdx.x; j < v; j += BLOCK) out[j] = scale * expf(row[j] - m) + (j == (int)t ? g : 0.0f);
}

// 1 / sqrt(mean(x^2) + eps) of one row.
__device__ float inv_rms(const float* x, int d, float eps) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) s += x[j] * x[j];
    s = block_reduce(s, 0);
    return 1.0f / sqrtf(s / d + eps);
}

// y = (x r) w. Grid: n blocks.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int d, float eps) {
    const float* row = x + (size_t)blockIdx.x * d;
    float* out = y + (size_t)blockIdx.x * d;
    float r = inv_rms(row, d, eps);
    for (int j = threadIdx.x; j < d; j += BLOCK) out[j] = (row[j] * r) * w[j];
}

// dx = r w dy - x r^3 / d sum_j (w_j dy_j x_j). Grid: n blocks.
extern "C" __global__ void rms_norm_backward(const float* x, const float* w, const float* dy, float* dx, int d,
                                             float eps) {
    size_t off = (size_t)blockIdx.x * d;
    float r = inv_rms(x + off, d, eps);
    float dot = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) dot += w[j] * dy[off + j] * x[off + j];
    dot = block_reduce(dot, 0);
    float c = r * r * r * dot / d;
    for (int j = threadIdx.x; j < d; j += BLOCK) dx[off + j] = r * w[j] * dy[off + j] - c * x[off + j];
}

// softmax(scale s) over keys 0..=q of each row, where row i is query q = i mod t; masked keys get 0.
// Grid: one block per row of t.
extern "C" __global__ void causal_softmax(const float* s, float* y, int t, float scale) {
    size_t i = blockIdx.x;
    int q = (int)(i % t);
    const float* row = s + i * t;
    float* out = y + i * t;
    float m = NEG_INF;
    for (int k = threadIdx.x; k <= q; k += BLOCK) m = fmaxf(m, row[k] * scale);
    m = block_reduce(m, 1);
    float sum = 0.0f;
    for (int k = threadIdx.x; k <= q; k += BLOCK) sum += expf(row[k] * scale - m);
    sum = block_reduce(sum, 0);
    for (int k = threadIdx.x; k < t; k += BLOCK) out[k] = k <= q ? expf(row[k] * scale - m) / sum : 0.0f;
}

// ds = scale y (dy - sum_k dy_k y_k). Grid: one block per row of t.
extern "C" __global__ void softmax_backward(const float* y, const float* dy, float* ds, int t, float scale) {
    size_t off = (size_t)blockIdx.x * t;
    float dot = 0.0f;
    for (int k = threadIdx.x; k < t; k += BLOCK) dot += y[off + k] * dy[off + k];
    dot = block_reduce(dot, 0);
    for (int k = threadIdx.x; k < t; k += BLOCK) ds[off + k] = scale * y[off + k] * (dy[off + k] - dot);
}

// Rotate-half RoPE of x [b, h, t, e] read through its strides (st0..st3, offset off) into a contiguous y;
// sign -1 rotates by minus the angle (the backward pass). One thread per (row, i < e/2).
extern "C" __global__ void rope(const float* x, const float* cos, const float* sin, float* y, int h, int t, int e,
                                long long st0, long long st1, long long st2, long long st3, long long off,
                                float sign, long long rows) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int half = e / 2;
    if (k >= rows * half) return;
    long long row = k / half;
    int i = (int)(k % half);
    long long pos = row % t, head = (row / t) % h, batch = row / ((long long)t * h);
    long long base = off + batch * st0 + head * st1 + pos * st2;
    float x1 = x[base + i * st3], x2 = x[base + (i + half) * st3];
    const float* c = cos + pos * e;
    const float* s = sin + pos * e;
    y[row * e + i] = x1 * c[i] - sign * x2 * s[i];
    y[row * e + i + half] = x2 * c[i + half] + sign * x1 * s[i + half];
}

// y = silu(g) u = g sigmoid(g) u. One thread per element.
extern "C" __global__ void swiglu(const float* g, const float* u, float* y, long long count) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k < count) y[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
}

// Both gradients side by side per row of f: out [.., 2f] = [dg | du]. One thread per element of g.
extern "C" __global__ void swiglu_backward(const float* g, const float* u, const float* dy, float* out, int f,
                                           long long count) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= count) return;
    long long row = k / f;
    int i = (int)(k % f);
    float sig = 1.0f / (1.0f + expf(-g[k]));
    out[row * 2 * f + f + i] = dy[k] * g[k] * sig;
    out[row * 2 * f + i] = dy[k] * u[k] * sig * (1.0f + g[k] * (1.0f - sig));
}
