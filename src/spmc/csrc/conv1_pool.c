/* SimpleCNN's first block for C stacked clients: conv(3 -> 6, 5x5, no bias) fused with 2x2 max-pooling.
 *
 * Built at first use by spmc/native.py (gcc -O3 -fno-tree-loop-vectorize -march=native -fopenmp; GCC 12.2's loop
 * vectorizer miscompiled a plain masked-copy loop here for AVX-512, so every hot loop uses explicit vector types
 * and that pass is off) and called through ctypes. Its OpenMP runtime is the one torch has already loaded (same
 * libgomp.so.1), so it shares torch's worker threads instead of competing with them. Vectorised along an output
 * row: the 28 columns of a 32-float input row are two 16-lane vectors (GCC vector extensions; AVX-512 where the CPU
 * has it). Lanes 28-31 read up to 4 floats past a row, which the caller pads with finite values; they never reach a
 * result.
 * A client whose images are grey (three equal channels) stores one channel (cin[g] = 1) and its weights' channel 0
 * holds their sum over the channels: conv(x repeated 3 times, w) = conv(x, w_0 + w_1 + w_2).
 *
 * Layouts (all float32, contiguous):
 *   x    client g's images [N][cin[g]][32][32] from x + xoff[g], then 16 floats of padding; cin[g] = 3 or 1
 *   w    [G][6*nch][3][5][5]                          nch blocks of 6 output channels (student, teacher)
 *   out  [nch][N][14][14][G*6]                        pooled conv, before bias (channels_last [N, G*6, 14, 14])
 *   arg  [G][N][14][14][6] uint8                      argmax of block 0 in its 2x2 window: 2*dy + dx
 *   dp   [N][14][14][G*6]                             dL/dh for h = relu(out block 0 + bias)
 *   h    [N][14][14][G*6]                             that h (its sign is relu's mask)
 *   delta [G][N][14][14][6]                           scratch: dL/d(out block 0)
 *   grad [threads][G][6*3*25 + 6]                     dL/dw and dL/dbias of block 0, a zeroed partial sum per thread
 *                                                     (channels c >= cin[g] are left at zero)
 *
 * Ties in a pooling window go to the first maximum in row-major order, and a NaN wins, as in torch's max_pool2d.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline v16 sel(v16i m, v16 a, v16 b) { return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }

#define INLINE static inline __attribute__((always_inline))

/* One image's pooled block of 6 channels, og[(ph * 14 + pw) * gc + o], and its argmax if ag,
 * ag[(ph * 14 + pw) * 6 + o]. Inlined with a
 * constant number of channels, so that every loop but the row-pair loop is unrolled. */
INLINE void image_forward(const float *xi, const float *wg, float *og, uint8_t *ag, long gc, int channels) {
    const v16i even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const v16i odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
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
            /* as torch: a later value wins if greater or NaN (x != x) */
            const v16i right_top = (b > a) | (b != b), right_bottom = (d > c) | (d != d);
            const v16 top = sel(right_top, b, a), bottom = sel(right_bottom, d, c);
            const v16i low = (bottom > top) | (bottom != bottom);
            float m[16];
            const v16 best = sel(low, bottom, top);
            memcpy(m, &best, sizeof m);
            for (int pw = 0; pw < 14; ++pw) og[((long)ph * 14 + pw) * gc + o] = m[pw];
            if (ag) {
                const v16i which = (low & (2 + (right_bottom & 1))) | (~low & (right_top & 1));
                int k[16];
                memcpy(k, &which, sizeof k);
                for (int pw = 0; pw < 14; ++pw) ag[(ph * 14 + pw) * 6 + o] = (uint8_t)k[pw];
            }
        }
    }
}

/* Items it = n * G + g, statically split: neighbouring threads write different images. */
void conv1_pool_forward(const float *x, const long *xoff, const int *cin, const float *w, float *out, uint8_t *arg,
                        int G, int N, int nch, int threads) {
    const long gc = (long)G * 6;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long it = 0; it < (long)G * N; ++it) {
        const int n = (int)(it / G), g = (int)(it % G);
        const float *xi = x + xoff[g] + (long)n * cin[g] * 1024;
        for (int ch = 0; ch < nch; ++ch) {
            const float *wg = w + ((long)g * 6 * nch + ch * 6) * 75;
            float *og = out + ((long)ch * N + n) * 196 * gc + g * 6;
            uint8_t *ag = (ch == 0 && arg) ? arg + ((long)g * N + n) * 1176 : 0;
            if (cin[g] == 1)
                image_forward(xi, wg, og, ag, gc, 1);
            else
                image_forward(xi, wg, og, ag, gc, 3);
        }
    }
}

/* sums[o][c][kh][kw] += dy[o][h][w] * x[c][h + kh][w + kw] summed over h, w in vector lanes, for one image;
 * xs is scratch. Inlined with a constant number of channels. */
INLINE void image_weight_grad(const float *xi, const float (*dy)[28][32], float (*xs)[32][32], v16 (*sums)[3][5][5],
                              int channels) {
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

/* Items it = g * N + n in [lo, hi): sums whole runs of one client's images in vector registers and adds them to
 * grad once per client. */
static void backward_range(const float *x, const long *xoff, const int *cin, const float *delta, const uint8_t *arg,
                           float *grad, int N, long lo, long hi) {
    if (lo >= hi) return; /* an empty share (more threads than work) */
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
        const float *di = delta + ((long)g * N + n) * 1176;
        const uint8_t *ai = arg + ((long)g * N + n) * 1176;
        /* the conv output's gradient: the pooled gradient at each window's argmax, zero elsewhere and in columns
           28-31 (so the padding lanes add nothing) */
        memset(dy, 0, sizeof dy);
        for (int p = 0; p < 196; ++p) {
            const int ph = p / 14, pw = p % 14;
            for (int o = 0; o < 6; ++o) {
                const float v = di[p * 6 + o];
                const uint8_t a = ai[p * 6 + o];
                dy[o][2 * ph + (a >> 1)][2 * pw + (a & 1)] = v;
                bias[o] += v;
            }
        }
        if (channels == 1)
            image_weight_grad(xi, dy, xs, sums, 1);
        else
            image_weight_grad(xi, dy, xs, sums, 3);
    }
}

/* First delta[g][n][p][o] = dp[n][p][g * 6 + o] where h > 0 (relu's mask), else 0, over images in parallel; then
 * thread t takes the t-th of nt contiguous ranges of items g * N + n of equal cost (an item costs cin[g]) and
 * writes grad + t * G * 456. */
void conv1_pool_backward(const float *x, const long *xoff, const int *cin, const float *dp, const float *h,
                         const uint8_t *arg, float *delta, float *grad, int G, int N, int threads) {
    const long gc = (long)G * 6;
    long total = 0;
    for (int g = 0; g < G; ++g) total += (long)N * cin[g];
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc((gc + 16) * sizeof(float));
#pragma omp for schedule(static)
        for (long np = 0; np < (long)N * 196; ++np) {
            const float *dr = dp + np * gc, *hr = h + np * gc;
            const long n = np / 196, p = np % 196;
            long i = 0;
            for (; i + 16 <= gc; i += 16) {
                const v16 hv = ld(hr + i), dv = ld(dr + i);
                const v16 masked = sel(hv > 0.0f, dv, (v16){0});
                memcpy(row + i, &masked, sizeof masked);
            }
            for (; i < gc; ++i) row[i] = hr[i] > 0.0f ? dr[i] : 0.0f;
            for (int g = 0; g < G; ++g)
                memcpy(delta + (((long)g * N + n) * 196 + p) * 6, row + g * 6, 6 * sizeof(float));
        }
        free(row);
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
        backward_range(x, xoff, cin, delta, arg, grad + (long)t * G * 456, N, bounds[0], bounds[1]);
    }
}

/* Stack client g's images into x. src[g] is [N][src_cin[g]][32][32], contiguous. A one-channel source is grey by
 * construction; for a three-channel one cin[g] = 1 where all three channels of every image are equal (compared
 * bit for bit, stopping at the first difference), else 3. xoff[g] = where client g's images start in x. Writes
 * at most G * N * 3 * 1024 floats; the caller pads after sum(N * cin[g] * 1024). */
void stack_images(const float *const *src, const int *src_cin, float *x, long *xoff, int *cin, int G, int N,
                  int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < G; ++g) {
        int grey = 1;
        for (long n = 0; n < N && grey && src_cin[g] == 3; ++n) {
            const float *img = src[g] + n * 3072;
            grey = memcmp(img, img + 1024, 4096) == 0 && memcmp(img, img + 2048, 4096) == 0;
        }
        cin[g] = grey ? 1 : 3;
    }
    long at = 0;
    for (int g = 0; g < G; ++g) {
        xoff[g] = at;
        at += (long)N * cin[g] * 1024;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < G; ++g) {
        if (cin[g] == src_cin[g]) {
            memcpy(x + xoff[g], src[g], (size_t)N * cin[g] * 4096);
        } else {
            for (long n = 0; n < N; ++n) memcpy(x + xoff[g] + n * 1024, src[g] + n * 3072, 4096);
        }
    }
}

/* The training augmentation of spec 1.2 on a batch x [B][C][H][W] of [0, 1] images, in one pass:
 *   out[b][c][i][j] = (p - mean[c]) / std[c],  p = x[b][c][i + oy[b] - pad][j' + ox[b] - pad] or 0 outside,
 *   j' = W - 1 - j where flip[b] (a horizontal flip after the crop), else j;
 * the same float32 operations as torch's pad, gather, flip and (x - mean) / std, so the same bits. A source row
 * is normalised once into a padded line, from which the output row is a shifted (or reversed) copy.
 * Needs W <= 64 and pad <= 16. */
void crop_flip_normalize(const float *x, int B, int C, int H, int W, const long *oy, const long *ox,
                         const uint8_t *flip, int pad, const float *mean, const float *std, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long bc = 0; bc < (long)B * C; ++bc) {
        float line[16 + 64 + 16 + 16] __attribute__((aligned(64)));
        const int b = (int)(bc / C), c = (int)(bc % C);
        const float *src = x + bc * H * W;
        float *dst = out + bc * H * W;
        const float m = mean[c], s = std[c], outside = (0.0f - m) / s;
        const v16 mv = m - (v16){0}, sv = s - (v16){0};
        for (int k = 0; k < pad; ++k) line[k] = line[pad + W + k] = outside;
        for (int i = 0; i < H; ++i) {
            const int r = i + (int)oy[b] - pad;
            float *row = dst + i * W;
            if (r < 0 || r >= H) {
                for (int j = 0; j < W; ++j) row[j] = outside;
                continue;
            }
            const float *in = src + r * W;
            int j = 0;
            for (; j + 16 <= W; j += 16) {
                const v16 v = (ld(in + j) - mv) / sv;
                memcpy(line + pad + j, &v, sizeof v);
            }
            for (; j < W; ++j) line[pad + j] = (in[j] - m) / s;
            const float *from = line + ox[b];
            if (flip && flip[b])
                for (j = 0; j < W; ++j) row[j] = from[W - 1 - j];
            else
                memcpy(row, from, W * sizeof(float));
        }
    }
}

/* The backward pass of SimpleCNN's second block for C stacked clients, h2 = relu(maxpool(conv(a, w2)) + b2) with
 * conv 6 -> 16 channels, 5x5, on 14x14 inputs (10x10 outputs, pooled to 5x5). Only the pooled maxima carry a
 * gradient, so both gradients are scatters from the 25 maxima of each output channel:
 *   delta = dL/dh2 * [h2 > 0];  for each maximum (h, w) = divmod(idx, 10) of channel o with value delta:
 *   dL/da[c][h + kh][w + kw] += delta * w2[o][c][kh][kw],  dL/dw2[o][c][kh][kw] += delta * a[c][h + kh][w + kw],
 *   dL/db2[o] += delta.
 * A row of 5 pixels x 6 channels (channels last) is 30 contiguous floats, two 16-lane vectors; w2 comes as
 * wt[g][o][kh][32] = w2[g][o][c][kh][kw] at lane kw * 6 + c and zeros in lanes 30-31, so the two extra lanes add
 * nothing to the next pixel of da.
 * Layouts: a, da [N][14][14][G*6]; dh, h2 [N][5][5][G*16]; idx the same, int64; wt [G][16][5][32];
 * grad [threads][G][16 * 5 * 32 + 16]: dL/dw2 as [o][kh][kw * 6 + c] (lanes 30-31 unused), then dL/db2. */
void conv2_pool_backward(const float *a, const float *wt, const float *dh, const float *h2, const long *idx,
                         float *da, float *grad, int G, int N, int threads) {
    const long ga = (long)G * 6, gh = (long)G * 16;
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *gt = grad + (long)t * G * (16 * 5 * 32 + 16);
        float ai[14 * 14 * 6 + 16] __attribute__((aligned(64)));
        float di[14 * 14 * 6 + 16] __attribute__((aligned(64)));
        memset(ai + 14 * 14 * 6, 0, 16 * sizeof(float));
#pragma omp for schedule(static)
        for (long it = 0; it < (long)G * N; ++it) {
            const int n = (int)(it / G), g = (int)(it % G);
            for (int p = 0; p < 196; ++p) memcpy(ai + p * 6, a + ((long)n * 196 + p) * ga + g * 6, 6 * sizeof(float));
            memset(di, 0, sizeof di);
            const float *wg = wt + (long)g * 16 * 5 * 32;
            float *gw = gt + (long)g * (16 * 5 * 32 + 16);
            for (int p = 0; p < 25; ++p) {
                const long at = ((long)n * 25 + p) * gh + g * 16;
                for (int o = 0; o < 16; ++o) {
                    if (!(h2[at + o] > 0.0f)) continue;
                    const float d = dh[at + o];
                    if (d == 0.0f) continue;
                    const long m = idx[at + o];
                    const int base = (int)((m / 10) * 14 + m % 10) * 6;
                    const v16 dv = d - (v16){0};
                    gw[16 * 5 * 32 + o] += d;
#pragma GCC unroll 5
                    for (int kh = 0; kh < 5; ++kh) {
                        float *drow = di + base + kh * 14 * 6;
                        const float *arow = ai + base + kh * 14 * 6;
                        const float *wrow = wg + (o * 5 + kh) * 32;
                        float *grow = gw + (o * 5 + kh) * 32;
                        for (int half = 0; half < 32; half += 16) {
                            const v16 x = ld(drow + half) + dv * ld(wrow + half);
                            memcpy(drow + half, &x, sizeof x);
                            const v16 y = ld(grow + half) + dv * ld(arow + half);
                            memcpy(grow + half, &y, sizeof y);
                        }
                    }
                }
            }
            for (int p = 0; p < 196; ++p) memcpy(da + ((long)n * 196 + p) * ga + g * 6, di + p * 6, 6 * sizeof(float));
        }
    }
}
