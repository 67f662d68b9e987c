// A soak check of the tcd-ort C ABI: one engine, many generations in one process, the resident
// set size sampled as it goes. A host that keeps an engine for days (a server, a plugin) needs
// memory to stay flat once the first runs have warmed the allocators and ONNX Runtime's arenas.
//
// usage: tcd_soak [--model DIR] [--runs N] [--every K] [--warmup W] [--steps S] [--threads T]
//                 [--max-growth-kib KIB]
//
// Prints one line per sample (generation, VmRSS in KiB, change since the warm-up sample), then
// the verdict: exits 1 when RSS after the warm-up sample grew by more than --max-growth-kib
// (default 8192) at the end, 0 otherwise. Linux only (it reads /proc/self/status).
// tests/soak.sh builds and runs it.

#include "tcd_ort.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

// VmRSS of this process in KiB, or -1 where /proc is not there.
long rss_kib() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
    }
    return -1;
}

std::string last_error() {
    size_t len = tcd_last_error_message(nullptr, 0);
    std::string message(len + 1, '\0');
    tcd_last_error_message(message.data(), message.size());
    message.resize(len);
    return message;
}

int fail(const char* what) {
    std::fprintf(stderr, "FAILED: %s: %s\n", what, last_error().c_str());
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    std::string model = "models/tiny-sd15";
    unsigned long runs = 200, every = 10, warmup = 20, steps = 4, threads = 0;
    long max_growth = 8192;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string flag = argv[i];
        unsigned long value = std::strtoul(argv[i + 1], nullptr, 10);
        if (flag == "--model") model = argv[i + 1];
        else if (flag == "--runs") runs = value;
        else if (flag == "--every") every = value > 0 ? value : 1;
        else if (flag == "--warmup") warmup = value;
        else if (flag == "--steps") steps = value;
        else if (flag == "--threads") threads = value;
        else if (flag == "--max-growth-kib") max_growth = long(value);
        else {
            std::fprintf(stderr, "unknown flag %s\n", argv[i]);
            return 2;
        }
    }

    tcd_engine_options* options = tcd_engine_options_new();
    if (tcd_engine_options_set_model(options, model.c_str()) != TCD_OK ||
        tcd_engine_options_set_threads(options, uint32_t(threads)) != TCD_OK) {
        tcd_engine_options_free(options);
        return fail("options");
    }
    tcd_engine* engine = nullptr;
    tcd_status loaded = tcd_engine_new(options, &engine);
    tcd_engine_options_free(options);
    if (loaded != TCD_OK) return fail("load the model");
    long at_load = rss_kib();

    tcd_request* request = tcd_request_new();
    tcd_request_set_prompt(request, "a photo of an astronaut riding a horse on mars");
    tcd_request_set_steps(request, uint32_t(steps));
    tcd_request_set_eta(request, 0.3f);

    std::printf("soak: %lu generations of %lu steps on %s, RSS every %lu\n", runs, steps,
                model.c_str(), every);
    std::printf("%10s %12s %14s\n", "generation", "rss_kib", "since_warmup");
    std::printf("%10s %12ld %14s\n", "loaded", at_load, "");
    long warm = -1, last = -1, low = -1, high = -1;
    int status = 0;
    for (unsigned long n = 1; n <= runs && status == 0; ++n) {
        tcd_request_set_seed(request, n);
        tcd_result* result = nullptr;
        if (tcd_engine_generate(engine, request, nullptr, nullptr, &result) != TCD_OK) {
            status = fail("generate");
            break;
        }
        uint32_t w = 0, h = 0;
        size_t stride = 0;
        const uint8_t* pixels = nullptr;
        if (tcd_result_image(result, 0, &w, &h, &stride, &pixels) != TCD_OK) status = fail("image");
        tcd_result_free(result);
        if (n % every != 0 && n != runs) continue;
        last = rss_kib();
        if (n >= warmup && warm < 0) warm = last;
        if (warm >= 0) {
            low = low < 0 || last < low ? last : low;
            high = last > high ? last : high;
            std::printf("%10lu %12ld %+14ld\n", n, last, last - warm);
        } else {
            std::printf("%10lu %12ld %14s\n", n, last, "(warm-up)");
        }
        std::fflush(stdout);
    }
    tcd_request_free(request);
    tcd_engine_free(engine);
    if (status != 0) return status;
    if (warm < 0 || last < 0) {
        std::printf("no sample after the warm-up (or no /proc): nothing to judge\n");
        return 0;
    }
    long growth = last - warm;
    std::printf("after warm-up: %ld KiB, min %ld, max %ld, end %ld (%+ld KiB, limit %ld)\n", warm,
                low, high, last, growth, max_growth);
    if (growth > max_growth) {
        std::printf("FAILED: RSS grew after warm-up\n");
        return 1;
    }
    std::printf("flat: RSS after warm-up within the limit\n");
    return 0;
}
