/* A driver for rwkv.cpp that measures what `aviary bench --json` measures, the same way:
 * load time, prompt processing in sequence mode (rwkv_eval_sequence_in_chunks), generation one
 * token at a time with greedy argmax, peak RSS; medians over repeats; one JSON line.
 *
 * rwkv.cpp ships no benchmark program, so compare.sh runs this one. Build it yourself against an
 * rwkv.cpp build (compare.sh never builds peers), e.g.:
 *   cc -O2 -o /tmp/rwkvcpp_bench bench/rwkvcpp_bench.c -I/tmp/rwkv.cpp \
 *      -L/tmp/rwkv.cpp/build -lrwkv -Wl,-rpath,/tmp/rwkv.cpp/build -lm
 * Usage: rwkvcpp_bench MODEL.bin THREADS PROMPT_TOKENS GEN_TOKENS REPEAT [CHUNK]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "rwkv.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static double median(double* v, int n) {
  qsort(v, n, sizeof *v, cmp);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint32_t argmax(const float* v, size_t n) {
  size_t best = 0;
  for (size_t i = 1; i < n; ++i) {
    if (v[i] > v[best]) best = i;
  }
  return (uint32_t)best;
}

static void print_list(const char* key, const double* v, int n) {
  printf(", \"%s\": [", key);
  for (int i = 0; i < n; ++i) printf("%s%.4g", i ? ", " : "", v[i]);
  printf("]");
}

int main(int argc, char** argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s MODEL THREADS PROMPT_TOKENS GEN_TOKENS REPEAT [CHUNK]\n", argv[0]);
    return 2;
  }
  const char* path = argv[1];
  const int threads = atoi(argv[2]), n_prompt = atoi(argv[3]), n_gen = atoi(argv[4]);
  const int repeat = atoi(argv[5]);
  const int chunk = argc > 6 ? atoi(argv[6]) : 64;
  if (threads < 1 || n_prompt < 1 || n_gen < 0 || repeat < 1 || chunk < 1) return 2;

  double* load_ms = calloc(repeat, sizeof(double));
  double* pp = calloc(repeat, sizeof(double));
  double* tg = calloc(repeat, sizeof(double));
  struct rwkv_context* ctx = NULL;
  for (int r = 0; r < repeat; ++r) {
    if (ctx) rwkv_free(ctx);
    const double t0 = now();
    ctx = rwkv_init_from_file(path, (uint32_t)threads, 0);
    load_ms[r] = 1e3 * (now() - t0);
    if (!ctx) {
      fprintf(stderr, "rwkvcpp_bench: cannot load %s\n", path);
      return 1;
    }
  }
  const size_t n_vocab = rwkv_get_n_vocab(ctx), state_len = rwkv_get_state_len(ctx);
  float* state = malloc(state_len * sizeof(float));
  float* logits = malloc(rwkv_get_logits_len(ctx) * sizeof(float));
  uint32_t* prompt = malloc(n_prompt * sizeof(uint32_t));
  uint64_t x = 12345; /* the same token ids as aviary bench */
  for (int i = 0; i < n_prompt; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    prompt[i] = (uint32_t)((x >> 33) % n_vocab);
  }
  /* warm-up: pages the weights in, builds the cached graphs */
  rwkv_init_state(ctx, state);
  rwkv_eval_sequence_in_chunks(ctx, prompt, n_prompt < 64 ? n_prompt : 64, chunk, state, state, logits);
  rwkv_eval(ctx, argmax(logits, n_vocab), state, state, logits);

  for (int r = 0; r < repeat; ++r) {
    rwkv_init_state(ctx, state);
    double t0 = now();
    if (!rwkv_eval_sequence_in_chunks(ctx, prompt, n_prompt, chunk, state, state, logits)) return 1;
    pp[r] = n_prompt / (now() - t0);
    uint32_t token = argmax(logits, n_vocab);
    t0 = now();
    for (int i = 0; i < n_gen; ++i) {
      if (!rwkv_eval(ctx, token, state, state, logits)) return 1;
      token = argmax(logits, n_vocab);
    }
    tg[r] = n_gen > 0 ? n_gen / (now() - t0) : 0;
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("{\"engine\": \"rwkv.cpp\", \"threads\": %d, \"chunk\": %d, \"prompt_tokens\": %d, "
         "\"gen_tokens\": %d, \"repeat\": %d",
         threads, chunk, n_prompt, n_gen, repeat);
  print_list("load_ms_all", load_ms, repeat);
  print_list("prompt_tok_s_all", pp, repeat);
  print_list("gen_tok_s_all", tg, repeat);
  printf(", \"load_ms\": %.3f", median(load_ms, repeat));
  printf(", \"prompt_tok_s\": %.3f", median(pp, repeat));
  printf(", \"gen_tok_s\": %.3f", median(tg, repeat));
  printf(", \"peak_rss_bytes\": %llu}\n", (unsigned long long)ru.ru_maxrss * 1024ull);
  rwkv_free(ctx);
  return 0;
}
