/*
 * Native CPU kernels of rlnorm: one fused pass over the batch where torch needs several.
 *
 * The formulas are those of rlnorm/algebra/moments.py (batch_shift, shifted_sums, batch_moments,
 * merge, merge_ema) and RunningMeanStd.normalize, operation for operation, so that results
 * agree with the torch code path to rounding (the merge and normalize bitwise; the sums differ
 * only in summation order). The module is optional: without it rlnorm runs the torch code.
 *
 * Functions take raw addresses of contiguous CPU tensors (Tensor.data_ptr()) and release the
 * GIL while they run. Python-side checks (rlnorm/backends/native.py) guarantee shapes, dtypes and
 * contiguity before a call; nothing here re-validates them.
 *
 * Memory: the kernels' scratch is fixed by the number of features and threads, never by the
 * number of rows (see shifted_sums), and counted (scratch_peak) so that the tests can check it.
 *
 * Compiled with -ffp-contract=off: a fused multiply-add would change roundings relative to
 * the torch formulas.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One AVX2 and one baseline version of each hot loop, picked at load time by the CPU. */
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

#ifndef _WIN32
#include <pthread.h>
#define HAVE_THREADS 1
#else
#define HAVE_THREADS 0
#endif

/* Rows summed into a block partial before it is added to the running partial: keeps the
 * summation error near (BLOCK_ROWS + rows / BLOCK_ROWS) * eps instead of rows * eps. */
#define BLOCK_ROWS 128
/* Elements per chunk. Chunks are fixed by the shape alone, never by the thread count, and
 * their partials are added in order, so results do not depend on how many threads ran. */
#define CHUNK_ELEMENTS (1 << 18)
#define SHIFT_ROWS 32
#define MAX_THREADS 64

/* Calls on fewer elements keep the GIL: releasing it hands it to any waiting Python thread
 * first, which can cost far more than a per-step normalize itself. */
#define RELEASE_GIL_ELEMENTS (1 << 16)
#define BEGIN_WORK(elements) \
    PyThreadState *saved_ = (elements) >= RELEASE_GIL_ELEMENTS ? PyEval_SaveThread() : NULL;
#define END_WORK \
    if (saved_) PyEval_RestoreThread(saved_);

/* moments.usable_weights: negative, NaN and infinite weights count as 0. */
static inline double usable(double w) { return w > 0 && w < INFINITY ? w : 0.0; }

/* ------------------------------------------------------------------------ sums */

typedef struct {
    const void *x;
    int is_f64;
    int64_t d;
    const double *w;      /* row weights or NULL */
    const double *shift;
    int64_t row_begin, row_end;
    double *sum, *sq, *sq_raw; /* outputs of length d; sq_raw only with weights */
    double *block;        /* scratch of length 3 * d */
} SumsTask;

HOT static void sums_rows(const SumsTask *t) {
    const int64_t d = t->d;
    double *bs = t->block, *bq = t->block + d, *br = t->block + 2 * d;
    memset(t->sum, 0, sizeof(double) * d);
    memset(t->sq, 0, sizeof(double) * d);
    if (t->w) memset(t->sq_raw, 0, sizeof(double) * d);
    for (int64_t r0 = t->row_begin; r0 < t->row_end; r0 += BLOCK_ROWS) {
        int64_t r1 = r0 + BLOCK_ROWS < t->row_end ? r0 + BLOCK_ROWS : t->row_end;
        memset(bs, 0, sizeof(double) * d);
        memset(bq, 0, sizeof(double) * d);
        if (t->w) memset(br, 0, sizeof(double) * d);
        for (int64_t i = r0; i < r1; i++) {
            const double *s = t->shift;
            if (t->w) {
                const double wi = usable(t->w[i]);
                if (t->is_f64) {
                    const double *row = (const double *)t->x + i * d;
                    for (int64_t j = 0; j < d; j++) {
                        double c = row[j] - s[j], c2 = c * c;
                        bs[j] += wi * c;
                        bq[j] += wi * c2;
                        br[j] += c2;
                    }
                } else {
                    const float *row = (const float *)t->x + i * d;
                    for (int64_t j = 0; j < d; j++) {
                        double c = (double)row[j] - s[j], c2 = c * c;
                        bs[j] += wi * c;
                        bq[j] += wi * c2;
                        br[j] += c2;
                    }
                }
            } else if (t->is_f64) {
                const double *row = (const double *)t->x + i * d;
                for (int64_t j = 0; j < d; j++) {
                    double c = row[j] - s[j];
                    bs[j] += c;
                    bq[j] += c * c;
                }
            } else {
                const float *row = (const float *)t->x + i * d;
                for (int64_t j = 0; j < d; j++) {
                    double c = (double)row[j] - s[j];
                    bs[j] += c;
                    bq[j] += c * c;
                }
            }
        }
        for (int64_t j = 0; j < d; j++) {
            t->sum[j] += bs[j];
            t->sq[j] += bq[j];
        }
        if (t->w)
            for (int64_t j = 0; j < d; j++) t->sq_raw[j] += br[j];
    }
}

static inline double value_at(const void *x, int is_f64, int64_t k) {
    return is_f64 ? ((const double *)x)[k] : (double)((const float *)x)[k];
}

/* The reference algorithm row by row: a row whose sum of squares around the shift is not
 * finite is left out, and counted when its weight is non-zero. Used only when the fused pass
 * met a non-finite value (or an overflow), so it favours clarity over speed. */
static void sums_exact(const void *x, int is_f64, int64_t n, int64_t d, const double *w,
                       const double *shift, double *sum, double *sq, double *weight,
                       int64_t *count, int64_t *nonfinite, double *row) {
    memset(sum, 0, sizeof(double) * d);
    memset(sq, 0, sizeof(double) * d);
    *weight = 0.0;
    *count = 0;
    *nonfinite = 0;
    for (int64_t i = 0; i < n; i++) {
        double row_sq = 0.0;
        for (int64_t j = 0; j < d; j++) {
            row[j] = value_at(x, is_f64, i * d + j) - shift[j];
            row_sq += row[j] * row[j];
        }
        const double wi = w ? usable(w[i]) : 1.0;
        if (!isfinite(row_sq)) {
            if (wi > 0) (*nonfinite)++;
            continue;
        }
        for (int64_t j = 0; j < d; j++) {
            sum[j] += wi * row[j];
            sq[j] += wi * (row[j] * row[j]);
        }
        *weight += wi;
        if (wi > 0) (*count)++;
    }
}

/* One call of shifted_sums shared by its workers. Chunks are handed out in order; a worker
 * sums its chunk into a slot of a ring of `slots` chunk partials, and the partials are added
 * to the column totals strictly in chunk order (by whichever worker finds the next one ready
 * while no other is merging). Every total is thus the in-order sum of the chunk partials,
 * whatever the number of workers, and the scratch is a few rows of `d` values per worker: it
 * does not grow with the number of rows. A chunk is handed out only once its slot's previous
 * chunk was merged, so a worker waits only when it ran a whole ring ahead of a slow one. */
typedef struct {
    const void *x;
    int is_f64;
    int64_t n, d, chunk_rows, chunks;
    const double *w, *shift;
    double *sum, *sq, *raw; /* column totals; raw: unweighted squares (weights only) */
    double *slots;          /* `slots` x 3 * d chunk partials (sum, sq, sq_raw) */
    double *blocks;         /* one 3 * d block scratch per worker */
    int64_t slots_n;
    /* under the lock: */
    int64_t next;     /* first chunk not handed out */
    int64_t merged;   /* chunks added to the totals */
    int64_t *ready;   /* per slot: the chunk whose partial it holds, or -1 */
    int merging;      /* a worker is adding a partial to the totals */
#if HAVE_THREADS
    pthread_mutex_t lock;
    pthread_cond_t cond;
#endif
} SumsJob;

typedef struct {
    SumsJob *job;
    int id;
} SumsWorker;

#if HAVE_THREADS
#define JOB_LOCK(job) pthread_mutex_lock(&(job)->lock)
#define JOB_UNLOCK(job) pthread_mutex_unlock(&(job)->lock)
#define JOB_WAIT(job) pthread_cond_wait(&(job)->cond, &(job)->lock)
#define JOB_WAKE(job) pthread_cond_broadcast(&(job)->cond)
#else /* one worker: it never waits */
#define JOB_LOCK(job)
#define JOB_UNLOCK(job)
#define JOB_WAIT(job)
#define JOB_WAKE(job)
#endif

static void sums_work(SumsJob *job, int id) {
    const int64_t d = job->d, slots = job->slots_n;
    JOB_LOCK(job);
    while (job->merged < job->chunks) {
        const int64_t m = job->merged;
        if (!job->merging && job->ready[m % slots] == m) {
            job->merging = 1;
            JOB_UNLOCK(job);
            const double *ps = job->slots + 3 * (m % slots) * d, *pq = ps + d, *pr = ps + 2 * d;
            for (int64_t j = 0; j < d; j++) {
                job->sum[j] += ps[j];
                job->sq[j] += pq[j];
            }
            if (job->w)
                for (int64_t j = 0; j < d; j++) job->raw[j] += pr[j];
            JOB_LOCK(job);
            job->ready[m % slots] = -1;
            job->merged = m + 1;
            job->merging = 0;
            JOB_WAKE(job); /* a slot is free, and the totals may be complete */
        } else if (job->next < job->chunks && job->next - m < slots) {
            const int64_t c = job->next++;
            JOB_UNLOCK(job);
            double *slot = job->slots + 3 * (c % slots) * d;
            const int64_t end = (c + 1) * job->chunk_rows;
            SumsTask t = {job->x, job->is_f64, d, job->w, job->shift, c * job->chunk_rows,
                          end < job->n ? end : job->n, slot, slot + d, slot + 2 * d,
                          job->blocks + 3 * (int64_t)id * d};
            sums_rows(&t);
            JOB_LOCK(job);
            job->ready[c % slots] = c; /* this worker merges it next if it is due */
        } else {
            /* The next partial is being summed, or merged by another worker, and no slot is
             * free: whoever finishes a merge wakes us. */
            JOB_WAIT(job);
        }
    }
    JOB_UNLOCK(job);
}

#if HAVE_THREADS
static void *sums_thread(void *arg) {
    SumsWorker *worker = (SumsWorker *)arg;
    sums_work(worker->job, worker->id);
    return NULL;
}
#endif

/* Bytes of scratch the kernels hold now and the most held at once since scratch_peak() last
 * read it: the tests check that it does not grow with the number of rows. Every malloc of the
 * kernels goes through scratch_alloc; the GIL may be released, hence the lock. */
static int64_t scratch_now = 0, scratch_peak = 0;
#if HAVE_THREADS
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
#endif

static void *scratch_alloc(size_t bytes) {
    /* A size header in front of the block so scratch_free knows what it returns. */
    int64_t *p = malloc(bytes + sizeof(int64_t) * 2);
    if (!p) return NULL;
    p[0] = (int64_t)bytes;
#if HAVE_THREADS
    pthread_mutex_lock(&scratch_lock);
#endif
    scratch_now += (int64_t)bytes;
    if (scratch_now > scratch_peak) scratch_peak = scratch_now;
#if HAVE_THREADS
    pthread_mutex_unlock(&scratch_lock);
#endif
    return p + 2; /* 16 bytes: keeps malloc's alignment */
}

static void scratch_free(void *ptr) {
    if (!ptr) return;
    int64_t *p = (int64_t *)ptr - 2;
#if HAVE_THREADS
    pthread_mutex_lock(&scratch_lock);
#endif
    scratch_now -= p[0];
#if HAVE_THREADS
    pthread_mutex_unlock(&scratch_lock);
#endif
    free(p);
}

/* Weighted sums around `shift` (moments.shifted_sums). Returns 0, or -1 when out of memory. */
static int shifted_sums(const void *x, int is_f64, int64_t n, int64_t d, const double *w,
                        const double *shift, double *sum, double *sq, double *weight,
                        int64_t *count, int64_t *nonfinite, int threads) {
    int64_t chunk_rows = CHUNK_ELEMENTS / (d > 0 ? d : 1);
    if (chunk_rows < BLOCK_ROWS) chunk_rows = BLOCK_ROWS;
    int64_t chunks = n > 0 ? (n + chunk_rows - 1) / chunk_rows : 0;
    memset(sum, 0, sizeof(double) * (d > 0 ? d : 0));
    memset(sq, 0, sizeof(double) * (d > 0 ? d : 0));
    if (chunks == 0 || d == 0) {
        *weight = 0.0;
        *count = 0;
        *nonfinite = 0;
        return 0;
    }
    if (threads > chunks) threads = (int)chunks;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1 || !HAVE_THREADS) threads = 1;
    /* A ring of two chunk partials per worker, a block scratch per worker and the unweighted
     * squares' totals: (9 * threads + 1) * d values, whatever the number of rows. */
    const int64_t slots = 2 * (int64_t)threads;
    double *mem = scratch_alloc(sizeof(double) * d * (9 * (int64_t)threads + 1) +
                                sizeof(int64_t) * slots);
    if (!mem) return -1;
    double *raw = mem;
    memset(raw, 0, sizeof(double) * d);
    int64_t *ready = (int64_t *)(mem + d * (9 * (int64_t)threads + 1));
    for (int64_t k = 0; k < slots; k++) ready[k] = -1;
    SumsJob job = {x, is_f64, n, d, chunk_rows, chunks, w, shift, sum, sq, raw,
                   mem + d, mem + d + 3 * slots * d, slots, 0, 0, ready, 0};
#if HAVE_THREADS
    pthread_t ids[MAX_THREADS];
    SumsWorker workers[MAX_THREADS];
    int started = 0;
    pthread_mutex_init(&job.lock, NULL);
    pthread_cond_init(&job.cond, NULL);
    /* A thread that fails to start only leaves more chunks to the others. */
    for (int k = 1; k < threads; k++) {
        workers[started] = (SumsWorker){&job, started + 1};
        if (pthread_create(&ids[started], NULL, sums_thread, &workers[started]) != 0) break;
        started++;
    }
    sums_work(&job, 0);
    for (int k = 0; k < started; k++) pthread_join(ids[k], NULL);
    pthread_cond_destroy(&job.cond);
    pthread_mutex_destroy(&job.lock);
#else
    sums_work(&job, 0);
#endif
    const double *squares = w ? raw : sq;
    double total = 0.0;
    for (int64_t j = 0; j < d; j++) total += squares[j];
    for (int64_t j = 0; j < d; j++) total += sum[j] * 0.0; /* NaN or Inf in a sum poisons it */
    /* A finite total of squares bounds every row's sum of squares, so no row overflowed and
     * no value was NaN or Inf (a NaN or Inf anywhere, even at weight 0, reaches the total). */
    if (isfinite(total)) {
        if (w) {
            double ws = 0.0;
            int64_t cnt = 0;
            for (int64_t i = 0; i < n; i++) {
                const double wi = usable(w[i]);
                ws += wi;
                cnt += wi > 0;
            }
            *weight = ws;
            *count = cnt;
        } else {
            *weight = (double)n;
            *count = n;
        }
        *nonfinite = 0;
    } else {
        sums_exact(x, is_f64, n, d, w, shift, sum, sq, weight, count, nonfinite, mem);
    }
    scratch_free(mem);
    return 0;
}

/* moments.batch_shift: weighted mean of the first SHIFT_ROWS rows whose sum of squares is
 * finite. */
static void batch_shift(const void *x, int is_f64, int64_t n, int64_t d, const double *w,
                        double *shift) {
    int64_t rows = n < SHIFT_ROWS ? n : SHIFT_ROWS;
    double total = 0.0;
    memset(shift, 0, sizeof(double) * d);
    for (int64_t i = 0; i < rows; i++) {
        double row_sq = 0.0;
        for (int64_t j = 0; j < d; j++) {
            double v = value_at(x, is_f64, i * d + j);
            row_sq += v * v;
        }
        double wi = isfinite(row_sq) ? (w ? usable(w[i]) : 1.0) : 0.0;
        if (wi == 0.0) continue;
        for (int64_t j = 0; j < d; j++) shift[j] += wi * value_at(x, is_f64, i * d + j);
        total += wi;
    }
    if (total < DBL_MIN) total = DBL_MIN;
    for (int64_t j = 0; j < d; j++) shift[j] /= total;
}

/* ------------------------------------------------------------------------ merge */

static inline void two_sum(double a, double b, double *s, double *e) {
    double sum = a + b, bv = sum - a;
    *s = sum;
    *e = (a - (sum - bv)) + (b - bv);
}

/* moments._mix of the running state (mean, var, res; weight wa) and a batch (weight wb),
 * written back into the state arrays. */
static void mix_into(double *mean, double *var, double *res, const double *b_mean,
                     const double *b_var, const double *b_res, int64_t d, double wa, double wb) {
    double total = wa + wb;
    if (!(total > 0)) return;
    double fa = wa / total, fb = wb / total;
    for (int64_t j = 0; j < d; j++) {
        double dh, dl, hi, lo, m, r;
        two_sum(b_mean[j], -mean[j], &dh, &dl);
        dl = dl + (b_res[j] - res[j]);
        double delta = dh + dl;
        two_sum(mean[j], fb * dh, &hi, &lo);
        two_sum(hi, lo + fb * dl + res[j], &m, &r);
        double within = fb <= fa ? var[j] + fb * (b_var[j] - var[j])
                                 : b_var[j] + fa * (var[j] - b_var[j]);
        double v = within + (fa * fb) * (delta * delta);
        var[j] = v > DBL_MAX ? DBL_MAX : v;
        mean[j] = m;
        res[j] = r;
    }
}

/* ------------------------------------------------------------------------ entry points */

/* update(x, is_f64, n, d, w, mean, var, res, weight_sum, count, nonfinite_count, momentum,
 *        var_floor, until, raise_nonfinite, out_mean, out_var, out_res, out_weight, out_count,
 *        threads) -> (nonfinite, applied)
 * momentum < 0: exact merge; var_floor < 0: none; until < 0: none. The out_* arguments
 * receive the batch moments. With raise_nonfinite and non-finite rows the state is not
 * written and applied is 0. */
static PyObject *k_update(PyObject *self, PyObject *args) {
    unsigned long long px, pw, pmean, pvar, pres, pwsum, pcount, pnonf;
    unsigned long long pom, pov, por, pow_, poc;
    long long n, d, until;
    int is_f64, raise_nonfinite, threads;
    double momentum, var_floor;
    if (!PyArg_ParseTuple(args, "KpLLKKKKKKKddLpKKKKKi", &px, &is_f64, &n, &d, &pw, &pmean,
                          &pvar, &pres, &pwsum, &pcount, &pnonf, &momentum, &var_floor, &until,
                          &raise_nonfinite, &pom, &pov, &por, &pow_, &poc, &threads))
        return NULL;
    const void *x = (const void *)(uintptr_t)px;
    const double *w = (const double *)(uintptr_t)pw;
    double *mean = (double *)(uintptr_t)pmean, *var = (double *)(uintptr_t)pvar;
    double *res = (double *)(uintptr_t)pres, *wsum = (double *)(uintptr_t)pwsum;
    int64_t *count = (int64_t *)(uintptr_t)pcount, *nonf = (int64_t *)(uintptr_t)pnonf;
    double *b_mean = (double *)(uintptr_t)pom, *b_var = (double *)(uintptr_t)pov;
    double *b_res = (double *)(uintptr_t)por, *b_weight = (double *)(uintptr_t)pow_;
    int64_t *b_count_out = (int64_t *)(uintptr_t)poc;

    double weight = 0.0;
    int64_t b_count = 0, nonfinite = 0;
    int applied = 1, failed = 0;
    BEGIN_WORK(n * d)
    double *sums = scratch_alloc(sizeof(double) * (d > 0 ? 3 * d : 1));
    if (!sums) {
        failed = 1;
    } else {
        double *shift = sums, *s = sums + d, *q = sums + 2 * d;
        int active = until < 0 || *count < until;
        if (active) {
            batch_shift(x, is_f64, n, d, w, shift);
            failed = shifted_sums(x, is_f64, n, d, w, shift, s, q, &weight, &b_count, &nonfinite,
                                  threads) != 0;
        } else {
            /* Past `until` every row has weight 0: an empty batch around shift 0. */
            memset(sums, 0, sizeof(double) * 3 * d);
        }
        if (!failed && raise_nonfinite && nonfinite > 0) applied = 0;
        if (!failed && applied) {
            /* moments.batch_moments */
            double wdiv = weight > DBL_MIN ? weight : DBL_MIN;
            for (int64_t j = 0; j < d; j++) {
                double offset = s[j] / wdiv;
                double v = q[j] / wdiv - offset * offset;
                b_var[j] = v < 0.0 ? 0.0 : (v > DBL_MAX ? DBL_MAX : v);
                two_sum(shift[j], offset, &b_mean[j], &b_res[j]);
            }
            /* moments.merge / moments.merge_ema */
            double wa = *wsum, wb = weight;
            if (momentum >= 0.0) {
                int has_data = weight > 0;
                wa = has_data ? momentum * wa : wa;
                wb = (1.0 - momentum) * (has_data ? 1.0 : 0.0);
            }
            mix_into(mean, var, res, b_mean, b_var, b_res, d, wa, wb);
            if (var_floor >= 0.0 && weight > 0) {
                for (int64_t j = 0; j < d; j++) {
                    double gap = b_mean[j] - mean[j];
                    double floor = var_floor * (b_var[j] + gap * gap);
                    if (floor > var[j]) var[j] = floor;
                }
            }
            *wsum = wa + wb;
            *count += b_count;
            *nonf += nonfinite;
        }
        scratch_free(sums);
    }
    END_WORK
    if (failed) return PyErr_NoMemory();
    *b_weight = weight;
    *b_count_out = b_count;
    return Py_BuildValue("Li", (long long)nonfinite, applied);
}

/* shifted_sums(x, is_f64, n, d, w, shift, out_sum, out_sq, threads)
 *   -> (weight, count, nonfinite) */
static PyObject *k_shifted_sums(PyObject *self, PyObject *args) {
    unsigned long long px, pw, pshift, ps, pq;
    long long n, d;
    int is_f64, threads;
    if (!PyArg_ParseTuple(args, "KpLLKKKKi", &px, &is_f64, &n, &d, &pw, &pshift, &ps, &pq,
                          &threads))
        return NULL;
    double weight = 0.0;
    int64_t count = 0, nonfinite = 0;
    int failed;
    BEGIN_WORK(n * d)
    failed = shifted_sums((const void *)(uintptr_t)px, is_f64, n, d,
                          (const double *)(uintptr_t)pw, (const double *)(uintptr_t)pshift,
                          (double *)(uintptr_t)ps, (double *)(uintptr_t)pq, &weight, &count,
                          &nonfinite, threads);
    END_WORK
    if (failed) return PyErr_NoMemory();
    return Py_BuildValue("dLL", weight, (long long)count, (long long)nonfinite);
}

/* ------------------------------------------------------------------------ normalize */

typedef struct {
    const void *x;
    void *y;
    int is_f64;
    int64_t d, begin, end; /* element range, a whole number of rows */
    const void *offset, *offset_lo, *scale;
    int clip;
    double bound;
    int64_t at_bound; /* output: values equal to +-bound after the clamp */
} NormTask;

HOT static void normalize_range(NormTask *t) {
    const int64_t d = t->d;
    int64_t at_bound = 0;
    if (t->is_f64) {
        const double *x = t->x, *o = t->offset, *ol = t->offset_lo, *sc = t->scale;
        double *y = t->y;
        const double hi = t->bound, lo = -t->bound;
        for (int64_t k = t->begin; k < t->end; k += d) {
            int64_t row_hits = 0; /* counted in lanes of the value's width: vectorizes */
            for (int64_t j = 0; j < d; j++) {
                double v = ((x[k + j] - o[j]) - ol[j]) * sc[j];
                if (t->clip) {
                    v = v < lo ? lo : (v > hi ? hi : v);
                    row_hits += fabs(v) == hi;
                }
                y[k + j] = v;
            }
            at_bound += row_hits;
        }
    } else {
        const float *x = t->x, *o = t->offset, *ol = t->offset_lo, *sc = t->scale;
        float *y = t->y;
        const float hi = (float)t->bound, lo = -(float)t->bound;
        for (int64_t k = t->begin; k < t->end; k += d) {
            int32_t row_hits = 0;
            for (int64_t j = 0; j < d; j++) {
                float v = ((x[k + j] - o[j]) - ol[j]) * sc[j];
                if (t->clip) {
                    v = v < lo ? lo : (v > hi ? hi : v);
                    row_hits += fabsf(v) == hi;
                }
                y[k + j] = v;
            }
            at_bound += row_hits;
        }
    }
    t->at_bound = at_bound;
}

#if HAVE_THREADS
static void *normalize_worker(void *arg) {
    normalize_range((NormTask *)arg);
    return NULL;
}
#endif

/* normalize(x, y, numel, map, threads) -> at_bound, map = (offset, offset_lo, scale, bound, d,
 * is_f64) (native.KernelMap): y = clamp(((x - offset) - offset_lo) * scale, -bound, bound) in
 * x's dtype, the map's (bound may be inf), over numel values in rows of d; NaN stays NaN as in
 * torch.clamp. Returns how many values of y equal +-bound. Threads matter from
 * PARALLEL_ELEMENTS values on. The per-step call: vectorcall, and the map a tuple made once,
 * since converting ten arguments through a format string costs more than the kernel there. */
static PyObject *k_normalize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[3]) != 6) {
        PyErr_SetString(PyExc_TypeError, "normalize(x, y, numel, map, threads): map of 6 fields");
        return NULL;
    }
    PyObject *const *map = &PyTuple_GET_ITEM(args[3], 0);
    const unsigned long long px = PyLong_AsUnsignedLongLong(args[0]);
    const unsigned long long py = PyLong_AsUnsignedLongLong(args[1]);
    const long long numel = PyLong_AsLongLong(args[2]);
    const int threads = PyLong_AsLong(args[4]);
    const unsigned long long po = PyLong_AsUnsignedLongLong(map[0]);
    const unsigned long long pol = PyLong_AsUnsignedLongLong(map[1]);
    const unsigned long long ps = PyLong_AsUnsignedLongLong(map[2]);
    const double clip = PyFloat_AsDouble(map[3]);
    const long long d = PyLong_AsLongLong(map[4]);
    const int is_f64 = PyObject_IsTrue(map[5]);
    if (PyErr_Occurred()) return NULL;
    const long long n = d > 0 ? numel / d : 0;
    NormTask base = {(const void *)(uintptr_t)px, (void *)(uintptr_t)py, is_f64, d, 0, n * d,
                     (const void *)(uintptr_t)po, (const void *)(uintptr_t)pol,
                     (const void *)(uintptr_t)ps, !isinf(clip), clip, 0};
    if (d <= 0 || n <= 0) return PyLong_FromLong(0);
    int64_t parts = (n * d) / CHUNK_ELEMENTS;
    if (parts > threads) parts = threads;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts < 1) parts = 1;
    BEGIN_WORK(n * d)
#if HAVE_THREADS
    if (parts > 1) {
        NormTask tasks[MAX_THREADS];
        pthread_t ids[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        for (int64_t k = 0; k < parts; k++) {
            tasks[k] = base;
            tasks[k].begin = (n * k / parts) * d;
            tasks[k].end = (n * (k + 1) / parts) * d;
        }
        for (int64_t k = 1; k < parts; k++)
            started[k] = pthread_create(&ids[k], NULL, normalize_worker, &tasks[k]) == 0;
        normalize_range(&tasks[0]);
        for (int64_t k = 1; k < parts; k++) {
            if (started[k])
                pthread_join(ids[k], NULL);
            else
                normalize_range(&tasks[k]);
        }
        for (int64_t k = 0; k < parts; k++) base.at_bound += tasks[k].at_bound;
    } else {
        normalize_range(&base);
    }
#else
    normalize_range(&base);
#endif
    END_WORK
    return PyLong_FromLongLong((long long)base.at_bound);
}

/* affine(mean, var, mean_residual, weight, d, bound, epsilon, center, is_f64, out) -> high: the
 * map of rlnorm.algebra.affine.affine, operation for operation, into out (rows offset,
 * offset_lo, scale, low, high of d values each, in float64 or float32); returns the value of
 * high, as a float64. Without weight (nothing seen) the map is the identity with infinite
 * bounds; bound is the clip, or inf for none. The inverse square root is
 * 1 / sqrt(var + epsilon), each step rounded (torch.rsqrt is that on short vectors; on long
 * ones it may differ from it by an ulp). */
static PyObject *k_affine(PyObject *self, PyObject *args) {
    unsigned long long pm, pv, pr, pw, pout;
    long long d;
    double bound, epsilon;
    int center, is_f64;
    if (!PyArg_ParseTuple(args, "KKKKLddppK", &pm, &pv, &pr, &pw, &d, &bound, &epsilon, &center,
                          &is_f64, &pout))
        return NULL;
    const double *mean = (const double *)(uintptr_t)pm, *var = (const double *)(uintptr_t)pv;
    const double *res = (const double *)(uintptr_t)pr;
    const int seen = *(const double *)(uintptr_t)pw > 0;
    const double high = seen ? bound : INFINITY;
    for (int64_t j = 0; j < d; j++) {
        const double scale = seen ? 1.0 / sqrt(var[j] + epsilon) : 1.0;
        const double m = seen ? mean[j] : 0.0, lost = seen ? res[j] : 0.0;
        if (is_f64) {
            double *out = (double *)(uintptr_t)pout;
            out[j] = center ? m : 0.0;
            out[d + j] = center ? (m - out[j]) + lost : 0.0;
            out[2 * d + j] = scale;
            out[3 * d + j] = -high;
            out[4 * d + j] = high;
        } else {
            float *out = (float *)(uintptr_t)pout;
            const float offset = (float)m;
            out[j] = center ? offset : 0.0f;
            out[d + j] = center ? (float)((m - (double)offset) + lost) : 0.0f;
            out[2 * d + j] = (float)scale;
            out[3 * d + j] = -(float)high;
            out[4 * d + j] = (float)high;
        }
    }
    return PyFloat_FromDouble(is_f64 ? high : (double)(float)high);
}

/* batch_shift(batch_mean, mean, var, d, batch_weight) -> shift: rlnorm.algebra.drift.batch_shift,
 * max over the d features of |batch_mean - mean| / max(sqrt(var), 1e-12); NaN if any term is
 * NaN (as torch's max), 0 for a batch without weight. Pointers to float64 values. */
static PyObject *k_batch_shift(PyObject *self, PyObject *args) {
    unsigned long long pbm, pm, pv, pw;
    long long d;
    if (!PyArg_ParseTuple(args, "KKKLK", &pbm, &pm, &pv, &d, &pw)) return NULL;
    const double *bm = (const double *)(uintptr_t)pbm, *m = (const double *)(uintptr_t)pm;
    const double *var = (const double *)(uintptr_t)pv;
    if (!(*(const double *)(uintptr_t)pw > 0)) return PyFloat_FromDouble(0.0);
    double shift = -INFINITY;
    for (int64_t j = 0; j < d; j++) {
        double std = sqrt(var[j]);
        std = std < 1e-12 ? 1e-12 : std; /* clamp_min: NaN stays NaN */
        const double v = fabs(bm[j] - m[j]) / std;
        if (isnan(v)) return PyFloat_FromDouble(NAN);
        if (v > shift) shift = v;
    }
    return PyFloat_FromDouble(shift);
}

/* ------------------------------------------------------------------------ returns */

/* discounted_returns(rewards, dones, returns, trajectory, steps, envs, gamma):
 * for each step t: a finite reward r advances ret = ret * gamma + r and trajectory[t] = ret; a
 * non-finite one leaves ret and gives trajectory[t] = NaN; then ret = 0 where dones[t]. The
 * recursion of RewardNormalizer.update, float64 rewards and returns, bool (uint8) dones;
 * `returns` is updated in place. */
static PyObject *k_discounted_returns(PyObject *self, PyObject *args) {
    unsigned long long pr, pd, pret, ptraj;
    long long steps, envs;
    double gamma;
    if (!PyArg_ParseTuple(args, "KKKKLLd", &pr, &pd, &pret, &ptraj, &steps, &envs, &gamma))
        return NULL;
    const double *rewards = (const double *)(uintptr_t)pr;
    const uint8_t *dones = (const uint8_t *)(uintptr_t)pd;
    double *ret = (double *)(uintptr_t)pret, *traj = (double *)(uintptr_t)ptraj;
    BEGIN_WORK(steps * envs)
    for (int64_t t = 0; t < steps; t++) {
        for (int64_t e = 0; e < envs; e++) {
            const int64_t k = t * envs + e;
            const double r = rewards[k];
            if (isfinite(r)) {
                ret[e] = ret[e] * gamma + r;
                traj[k] = ret[e];
            } else {
                traj[k] = NAN;
            }
            if (dones[k]) ret[e] = 0.0;
        }
    }
    END_WORK
    Py_RETURN_NONE;
}

/* scratch_peak() -> the most bytes of scratch held at once since the last call; resets it to
 * what is held now (0 between calls). */
static PyObject *k_scratch_peak(PyObject *self, PyObject *unused) {
#if HAVE_THREADS
    pthread_mutex_lock(&scratch_lock);
#endif
    long long peak = (long long)scratch_peak;
    scratch_peak = scratch_now;
#if HAVE_THREADS
    pthread_mutex_unlock(&scratch_lock);
#endif
    return PyLong_FromLongLong(peak);
}

static PyMethodDef methods[] = {
    {"scratch_peak", k_scratch_peak, METH_NOARGS,
     "Most bytes of scratch held at once since the last call (see backends/native.py)."},
    {"discounted_returns", k_discounted_returns, METH_VARARGS,
     "RewardNormalizer's return recursion over a rollout (see backends/native.py)."},
    {"update", k_update, METH_VARARGS, "Fused RunningMeanStd update (see backends/native.py)."},
    {"shifted_sums", k_shifted_sums, METH_VARARGS, "Fused shifted sums (see backends/native.py)."},
    {"normalize", (PyCFunction)(void (*)(void))k_normalize, METH_FASTCALL,
     "Fused normalize (see backends/native.py)."},
    {"affine", k_affine, METH_VARARGS, "Normalize's affine map (see backends/native.py)."},
    {"batch_shift", k_batch_shift, METH_VARARGS, "A batch's drift (see backends/native.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Native CPU kernels of rlnorm.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    /* The fewest values a normalize splits between threads (two chunks): below, the caller
     * need not ask torch how many threads it may use. */
    if (m && PyModule_AddIntConstant(m, "PARALLEL_ELEMENTS", 2 * CHUNK_ELEMENTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
