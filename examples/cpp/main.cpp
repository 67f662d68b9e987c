// A C++17 host for the tcd-ort C ABI: loads a model, generates an image and writes it as a PNG,
// cancels a second run from the progress callback, and shows how errors from bad input come
// back. With --controlnet it also loads a ControlNet and steers a generation with a control
// image drawn here (RGBA in memory). Exits 0 only when every step behaved as documented in
// tcd_ort.h.
//
// usage: tcd_example [--model DIR] [--output PNG] [--steps N] [--threads N]
//                    [--controlnet DIR --control-output PNG]

#include "tcd_ort.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

// Owning handles: every _free accepts NULL, so a default-constructed handle is fine to drop.
struct OptionsFree { void operator()(tcd_engine_options* p) const { tcd_engine_options_free(p); } };
struct EngineFree { void operator()(tcd_engine* p) const { tcd_engine_free(p); } };
struct RequestFree { void operator()(tcd_request* p) const { tcd_request_free(p); } };
struct ResultFree { void operator()(tcd_result* p) const { tcd_result_free(p); } };
using Options = std::unique_ptr<tcd_engine_options, OptionsFree>;
using Engine = std::unique_ptr<tcd_engine, EngineFree>;
using Request = std::unique_ptr<tcd_request, RequestFree>;
using Result = std::unique_ptr<tcd_result, ResultFree>;

// The calling thread's last error, sized with a first call as tcd_last_error_message allows.
std::string last_error() {
    size_t len = tcd_last_error_message(nullptr, 0);
    std::string message(len + 1, '\0');
    tcd_last_error_message(message.data(), message.size());
    message.resize(len);
    return message;
}

int failures = 0;

// Checks a status against the expected one and reports both the code and the message.
bool expect(tcd_status got, tcd_status want, const char* what) {
    if (got == want) {
        if (got != TCD_OK) {
            std::printf("ok: %s -> %s: %s\n", what, tcd_status_name(got), last_error().c_str());
        }
        return true;
    }
    std::fprintf(stderr, "FAILED: %s returned %s (expected %s): %s\n", what, tcd_status_name(got),
                 tcd_status_name(want), last_error().c_str());
    ++failures;
    return false;
}

// --- A control image: white circles on black, the kind of edge map a Canny ControlNet reads. ---

std::vector<uint8_t> circles_rgba(uint32_t width, uint32_t height) {
    std::vector<uint8_t> rgba(size_t(width) * height * 4, 0);
    for (uint32_t y = 0; y < height; ++y) {
        for (uint32_t x = 0; x < width; ++x) {
            int dx = int(x) - int(width / 2), dy = int(y) - int(height / 2);
            int r2 = dx * dx + dy * dy;
            bool edge = false;
            for (int r : {int(width) / 8, int(width) / 4, int(width) * 3 / 8}) {
                edge = edge || (r2 >= (r - 1) * (r - 1) && r2 <= r * r);
            }
            uint8_t* p = &rgba[(size_t(y) * width + x) * 4];
            p[0] = p[1] = p[2] = edge ? 255 : 0;
            p[3] = 255;
        }
    }
    return rgba;
}

// --- Progress callbacks. ----------------------------------------------------------------------

// noexcept: an exception must not leave a callback (the library cannot catch it).
int print_progress(void* /*user_data*/, uint32_t step, uint32_t total) noexcept {
    std::printf("step %u/%u\n", step, total);
    return 0;  // go on
}

struct CancelAfter {
    uint32_t step;
    uint32_t calls;
};

int cancel_after(void* user_data, uint32_t step, uint32_t /*total*/) noexcept {
    auto* cancel = static_cast<CancelAfter*>(user_data);
    ++cancel->calls;
    return step >= cancel->step ? 1 : 0;  // nonzero cancels
}

}  // namespace

int main(int argc, char** argv) {
    std::string model = "models/tiny-sd15";
    std::string output = "target/ffi/example.png";
    uint32_t steps = 4;
    uint32_t threads = 0;
    std::string controlnet;
    std::string control_output = "target/ffi/example-controlnet.png";
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string flag = argv[i];
        if (flag == "--model") model = argv[i + 1];
        else if (flag == "--controlnet") controlnet = argv[i + 1];
        else if (flag == "--control-output") control_output = argv[i + 1];
        else if (flag == "--output") output = argv[i + 1];
        else if (flag == "--steps") steps = uint32_t(std::strtoul(argv[i + 1], nullptr, 10));
        else if (flag == "--threads") threads = uint32_t(std::strtoul(argv[i + 1], nullptr, 10));
        else {
            std::fprintf(stderr, "unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    std::printf("tcd-ort %s\n", tcd_version());

    // Bad input is reported by the setter, before anything is loaded.
    Request request(tcd_request_new());
    expect(tcd_request_set_steps(request.get(), 0), TCD_ERR_INVALID_ARGUMENT, "steps = 0");
    expect(tcd_request_set_eta(request.get(), 2.0f), TCD_ERR_INVALID_ARGUMENT, "eta = 2");
    tcd_result* no_result = nullptr;
    expect(tcd_engine_generate(nullptr, request.get(), nullptr, nullptr, &no_result),
           TCD_ERR_NULL_POINTER, "generate without an engine");
    {
        // A missing model, and the message read through a buffer that is too small.
        Options options(tcd_engine_options_new());
        tcd_engine_options_set_model(options.get(), "models/tiny-sd15/no-such-model");
        tcd_engine* raw = nullptr;
        expect(tcd_engine_new(options.get(), &raw), TCD_ERR_MODEL, "a missing model");
        Engine missing(raw);
        char small[16];
        size_t needed = tcd_last_error_message(small, sizeof small);
        std::printf("ok: %zu-byte message truncated to \"%s\"\n", needed, small);
        if (missing || needed < sizeof small || std::strlen(small) != sizeof small - 1) ++failures;
    }

    Options options(tcd_engine_options_new());
    expect(tcd_engine_options_set_model(options.get(), model.c_str()), TCD_OK, "set model");
    expect(tcd_engine_options_set_providers(options.get(), "cpu"), TCD_OK, "set providers");
    expect(tcd_engine_options_set_threads(options.get(), threads), TCD_OK, "set threads");
    if (!controlnet.empty()) {
        expect(tcd_engine_options_add_controlnet(options.get(), controlnet.c_str()), TCD_OK,
               "add a ControlNet");
    }
    tcd_engine* raw_engine = nullptr;
    if (!expect(tcd_engine_new(options.get(), &raw_engine), TCD_OK, "load the model")) return 1;
    Engine engine(raw_engine);
    options.reset();  // the engine keeps what it needs

    expect(tcd_request_set_prompt(request.get(), "a photo of an astronaut riding a horse on mars"),
           TCD_OK, "set prompt");
    expect(tcd_request_set_steps(request.get(), steps), TCD_OK, "set steps");
    expect(tcd_request_set_eta(request.get(), 0.3f), TCD_OK, "set eta");
    expect(tcd_request_set_seed(request.get(), 0), TCD_OK, "set seed");

    tcd_result* raw_result = nullptr;
    if (!expect(tcd_engine_generate(engine.get(), request.get(), print_progress, nullptr,
                                    &raw_result),
                TCD_OK, "generate")) {
        return 1;
    }
    Result result(raw_result);
    uint32_t width = 0, height = 0;
    size_t stride = 0;
    const uint8_t* pixels = nullptr;
    if (tcd_result_count(result.get()) != 1 ||
        !expect(tcd_result_image(result.get(), 0, &width, &height, &stride, &pixels), TCD_OK,
                "read image 0")) {
        return 1;
    }
    // Written atomically by the library: the whole PNG or, on failure, the file as it was.
    if (!expect(tcd_result_write_png(result.get(), 0, output.c_str(), 1), TCD_OK, "write the PNG")) {
        return 1;
    }
    std::printf("wrote %s (%ux%u)\n", output.c_str(), width, height);
    result.reset();

    // A second run, cancelled from the callback after its first step.
    CancelAfter cancel{1, 0};
    tcd_result* cancelled = nullptr;
    expect(tcd_engine_generate(engine.get(), request.get(), cancel_after, &cancel, &cancelled),
           TCD_ERR_CANCELLED, "cancel from the callback");
    if (cancelled != nullptr || cancel.calls != 1) ++failures;

    if (!controlnet.empty()) {
        // The same request steered by a control image at half strength (the guide's 0.5).
        std::vector<uint8_t> control = circles_rgba(width, height);
        expect(tcd_request_add_control_image(request.get(), control.data(), width, height, 0,
                                             0.5f, 0.0f, 1.0f, TCD_CONTROL_NONE),
               TCD_OK, "add a control image");
        expect(tcd_request_add_control_image(request.get(), control.data(), width, height, 0,
                                             0.5f, 0.8f, 0.2f, TCD_CONTROL_NONE),
               TCD_ERR_INVALID_ARGUMENT, "a guidance window that ends before it starts");
        tcd_result* raw_controlled = nullptr;
        if (!expect(tcd_engine_generate(engine.get(), request.get(), nullptr, nullptr,
                                        &raw_controlled),
                    TCD_OK, "generate with a ControlNet")) {
            return 1;
        }
        Result controlled(raw_controlled);
        uint32_t cw = 0, ch = 0;
        size_t cstride = 0;
        const uint8_t* cpixels = nullptr;
        if (!expect(tcd_result_image(controlled.get(), 0, &cw, &ch, &cstride, &cpixels), TCD_OK,
                    "read the controlled image") ||
            !expect(tcd_result_write_png(controlled.get(), 0, control_output.c_str(), 1), TCD_OK,
                    "write the controlled PNG")) {
            return 1;
        }
        std::printf("wrote %s (%ux%u)\n", control_output.c_str(), cw, ch);
        // One ControlNet, two control images: refused before anything runs.
        expect(tcd_request_add_control_image(request.get(), control.data(), width, height, 0,
                                             1.0f, 0.0f, 1.0f, TCD_CONTROL_CANNY),
               TCD_OK, "add a second control image");
        tcd_result* mismatched = nullptr;
        expect(tcd_engine_generate(engine.get(), request.get(), nullptr, nullptr, &mismatched),
               TCD_ERR_INVALID_ARGUMENT, "two control images for one ControlNet");
        if (mismatched != nullptr) ++failures;
        expect(tcd_request_clear_control_images(request.get()), TCD_OK, "clear control images");
    }

    if (failures > 0) {
        std::fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all checks passed\n");
    return 0;
}
