/* SimpleCNN's first block for C stacked clients: conv(3 -> 6, 5x5, no bias) fused with 2x2 max-pooling.
 *
 * Built at first use by spmc/native.py (gcc -O3 -march=native -fopenmp) and called through ctypes. Its OpenMP
 * runtime is the one torch has already loaded (same libgomp.so.1), so it shares torch's worker threads instead of
 * competing with them. Vectorised along an output row: the 28 columns of a 32-float input row are two 16-lane
 * vectors (GCC vector extensions; AVX-512 where the CPU has it). Lanes 28-31
 * read up to 4 floats past a row, which the caller pads with finite values; they never reach a result.
 * A client whose images are grey (three equal channels) stores one channel (cin[g] = 1) and its weights' channel 0
 * holds their sum over the channels: conv(x repeated 3 times, w) = conv(x, w_0 + w_1 + w_2).
 *
 * Layouts (all float32, contiguous):
 *   x    client g's images [N][cin[g]][32][32] from x + xoff[g], then 16 floats of padding; cin[g] = 3 or 1
 *   w    [G][6*nch][3][5][5]                          nch blocks of 6 output channels (student, teacher)
 *   out  [nch][N][14][14][G*6]                        pooled conv, before bias (channels_last [N, G*6, 14, 14])
 *   arg  [N][14][14][G*6] uint8                       argmax of block 0 in its 2x2 window: 2*dy + dx
 *   dp   [N][14][14][G*6]                             dL/dh for h = relu(out block 0 + bias)
 *   h    [N][14][14][G*6]                             that h (its sign is relu's mask)
 *   grad [threads][G][6*3*25 + 6]                     dL/dw and dL/dbias of block 0, a zeroed partial sum per thread
 *                                                     (channels c >= cin[g] are left at zero)
 *
 * Ties in a pooling window go to the first maximum in row-major order, as in torch's max_pool2d.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline v16 sel(v16i m, v16 a, v16 b) { return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }

/* Items it = n * G + g, statically split: neighbouring threads write different images. */
void conv1_pool_forward(const float *x, const long *xoff, const int *cin, const float *w, float *out, uint8_t *arg,
                        int G, int N, int nch, int threads) {
    const v16i even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const v16i odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    const long gc = (long)G * 6;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long it = 0; it < (long)G * N; ++it) {
        const int n = (int)(it / G), g = (int)(it % G);
        const int channels = cin[g];
        const float *xi = x + xoff[g] + (long)n * channels * 1024;
        for (int ch = 0; ch < nch; ++ch) {
            const float *wg = w + ((long)g * 6 * nch + ch * 6) * 75;
            float *og = out + ((long)ch * N + n) * 196 * gc + g * 6;
            uint8_t *ag = (ch == 0 && arg) ? arg + (long)n * 196 * gc + g * 6 : 0;
            for (int ph = 0; ph < 14; ++ph) {
                /* acc[o][row][half]: conv rows 2ph and 2ph+1, columns 0-15 and 16-31 */
                v16 acc[6][2][2];
                memset(acc, 0, sizeof acc);
                for (int c = 0; c < channels; ++c) {
#pragma GCC unroll 6
                    for (int r = 0; r < 6; ++r) {
                        const float *row = xi + c * 1024 + (2 * ph + r) * 32;
#pragma GCC unroll 5
                        for (int kw = 0; kw < 5; ++kw) {
                            const v16 xa = ld(row + kw), xb = ld(row + kw + 16);
#pragma GCC unroll 6
                            for (int o = 0; o < 6; ++o) {
                                if (r < 5) {
                                    const float wv = wg[o * 75 + c * 25 + r * 5 + kw];
                                    acc[o][0][0] += wv * xa;
                                    acc[o][0][1] += wv * xb;
                                }
                                if (r > 0) {
                                    const float wv = wg[o * 75 + c * 25 + (r - 1) * 5 + kw];
                                    acc[o][1][0] += wv * xa;
                                    acc[o][1][1] += wv * xb;
                                }
                            }
                        }
                    }
                }
                for (int o = 0; o < 6; ++o) {
                    const v16 a = __builtin_shuffle(acc[o][0][0], acc[o][0][1], even);
                    const v16 b = __builtin_shuffle(acc[o][0][0], acc[o][0][1], odd);
                    const v16 c = __builtin_shuffle(acc[o][1][0], acc[o][1][1], even);
                    const v16 d = __builtin_shuffle(acc[o][1][0], acc[o][1][1], odd);
                    const v16i right_top = b > a, right_bottom = d > c;
                    const v16 top = sel(right_top, b, a), bottom = sel(right_bottom, d, c);
                    const v16i low = bottom > top;
                    float m[16];
                    const v16 best = sel(low, bottom, top);
                    memcpy(m, &best, sizeof m);
                    for (int pw = 0; pw < 14; ++pw) og[((long)ph * 14 + pw) * gc + o] = m[pw];
                    if (ag) {
                        const v16i which = (low & (2 + (right_bottom & 1))) | (~low & (right_top & 1));
                        int k[16];
                        memcpy(k, &which, sizeof k);
                        for (int pw = 0; pw < 14; ++pw) ag[((long)ph * 14 + pw) * gc + o] = (uint8_t)k[pw];
                    }
                }
            }
        }
    }
}

/* Items it = g * N + n in [lo, hi): sums whole runs of one client's images in vector registers and adds them to
 * grad once per client. */
static void backward_range(const float *x, const long *xoff, const int *cin, const float *dp, const float *h,
                           const uint8_t *arg, float *grad, int G, int N, long lo, long hi) {
    const long gc = (long)G * 6;
    float dy[6][28][32] __attribute__((aligned(64)));
    float xs[5][32][32] __attribute__((aligned(64)));
    v16 sums[6][3][5][5];
    float bias[6];
    int cur = -1;
    for (long it = lo; it <= hi; ++it) {
        const int g = it < hi ? (int)(it / N) : -1;
        if (g != cur) {
            if (cur >= 0) {
                float *d = grad + (long)cur * 456;
                for (int i = 0; i < 450; ++i) {
                    float s[16], t = 0.0f;
                    memcpy(s, &((v16 *)sums)[i], sizeof s);
                    for (int l = 0; l < 16; ++l) t += s[l];
                    d[i] += t;
                }
                for (int o = 0; o < 6; ++o) d[450 + o] += bias[o];
            }
            if (g < 0) break;
            memset(sums, 0, sizeof sums);
            memset(bias, 0, sizeof bias);
            cur = g;
        }
        const int n = (int)(it % N);
        const int channels = cin[g];
        const float *xi = x + xoff[g] + (long)n * channels * 1024;
        const long at = (long)n * 196 * gc + g * 6;
        /* the conv output's gradient: the pooled gradient (zero where relu cut it) at each window's argmax, zero
           elsewhere and in columns 28-31 (so the padding lanes add nothing) */
        memset(dy, 0, sizeof dy);
        for (int p = 0; p < 196; ++p) {
            const int ph = p / 14, pw = p % 14;
            for (int o = 0; o < 6; ++o) {
                const long i = at + p * gc + o;
                const float v = h[i] > 0.0f ? dp[i] : 0.0f;
                const uint8_t a = arg[i];
                dy[o][2 * ph + (a >> 1)][2 * pw + (a & 1)] = v;
                bias[o] += v;
            }
        }
        /* dw[o][c][kh][kw] = sum_{h, w} dy[o][h][w] * x[c][h + kh][w + kw] */
        for (int c = 0; c < channels; ++c) {
            /* xs[kw][r] = x[c][r][kw : kw + 32], aligned: the inner loop then makes no cache-line-splitting loads */
            for (int kw = 0; kw < 5; ++kw)
                for (int r = 0; r < 32; ++r) {
                    memcpy(&xs[kw][r][0], xi + c * 1024 + r * 32 + kw, 64);
                    memcpy(&xs[kw][r][16], xi + c * 1024 + r * 32 + kw + 16, 64);
                }
            for (int kh = 0; kh < 5; ++kh)
                for (int o0 = 0; o0 < 6; o0 += 3) {
                    v16 acc[3][5];
                    for (int o = 0; o < 3; ++o)
                        for (int kw = 0; kw < 5; ++kw) acc[o][kw] = sums[o0 + o][c][kh][kw];
                    for (int row = 0; row < 28; ++row) {
#pragma GCC unroll 2
                        for (int col = 0; col < 32; col += 16) {
                            const v16 d0 = *(const v16 *)&dy[o0][row][col];
                            const v16 d1 = *(const v16 *)&dy[o0 + 1][row][col];
                            const v16 d2 = *(const v16 *)&dy[o0 + 2][row][col];
#pragma GCC unroll 5
                            for (int kw = 0; kw < 5; ++kw) {
                                const v16 xv = *(const v16 *)&xs[kw][row + kh][col];
                                acc[0][kw] += d0 * xv;
                                acc[1][kw] += d1 * xv;
                                acc[2][kw] += d2 * xv;
                            }
                        }
                    }
                    for (int o = 0; o < 3; ++o)
                        for (int kw = 0; kw < 5; ++kw) sums[o0 + o][c][kh][kw] = acc[o][kw];
                }
        }
    }
}

/* Thread t takes the t-th of nt contiguous ranges of items g * N + n of equal cost (an item costs cin[g]) and
 * writes grad + t * G * 456. */
void conv1_pool_backward(const float *x, const long *xoff, const int *cin, const float *dp, const float *h,
                         const uint8_t *arg, float *grad, int G, int N, int threads) {
    long total = 0;
    for (int g = 0; g < G; ++g) total += (long)N * cin[g];
#pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        /* bounds[k] = the first item whose cost prefix reaches total * k / nt */
        long bounds[2], prefix = 0;
        int k = 0;
        const long want[2] = {total * t / nt, total * (t + 1) / nt};
        bounds[0] = bounds[1] = (long)G * N;
        for (long it = 0; it < (long)G * N && k < 2; prefix += cin[it / N], ++it)
            while (k < 2 && prefix >= want[k]) bounds[k++] = it;
        backward_range(x, xoff, cin, dp, h, arg, grad + (long)t * G * 456, G, N, bounds[0], bounds[1]);
    }
}
