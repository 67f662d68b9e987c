#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 60) and prints, per target,
# the executions run, the crashes found and where their inputs were written.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# cargo-fuzz drives the targets (`cargo install cargo-fuzz`). It passes nightly-only flags to
# rustc (sanitizer coverage, AddressSanitizer); RUSTC_BOOTSTRAP=1 lets a stable toolchain
# accept them. libFuzzer is built from source by libfuzzer-sys with the system C++ compiler.
# Corpora start from fuzz/seeds/<target> and from files of the committed tiny model.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

model=../models/tiny-sd15
seed() {
    local target=$1
    mkdir -p "corpus/$target"
    if [ -d "seeds/$target" ]; then
        cp -n seeds/"$target"/* "corpus/$target/"
    fi
    case $target in
        onnx_initializers)
            cp -n "$model/unet/segment_0.onnx" "corpus/$target/unet_segment_0.onnx"
            cp -n "$model/vae_decoder/model.onnx" "corpus/$target/vae_decoder.onnx" ;;
        model_dir)
            # The parts in the order the target reads them, NUL-separated.
            local out="corpus/$target/tiny-sd15" part
            : > "$out"
            for part in model_index.json tcd_ort.json unet/config.json vae_decoder/config.json \
                scheduler/scheduler_config.json text_encoder/config.json; do
                cat "$model/$part" >> "$out"
                printf '\0' >> "$out"
            done ;;
        scheduler_config)
            { printf '\004'; cat "$model/scheduler/scheduler_config.json"; } \
                > "corpus/$target/tiny-sd15.json" ;;
        image)
            cp -n ../models/control-edges-64x64.png "corpus/$target/" ;;
    esac
}

# Debug assertions on (-a): arithmetic overflow is a crash, as in the test suite.
cargo fuzz build -O -a
printf '%-20s %8s %14s %8s  %s\n' target seconds executions crashes artifacts
for target in "${targets[@]}"; do
    seed "$target"
    mkdir -p "artifacts/$target" logs
    before=$(find "artifacts/$target" -type f | wc -l)
    log="logs/$target.log"
    cargo fuzz run -O -a "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 > "$log" 2>&1 || true
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    if [ -z "$execs" ]; then
        execs=$(grep -o '^#[0-9]*' "$log" | tr -d '#' | tail -1 || true)
    fi
    after=$(find "artifacts/$target" -type f | wc -l)
    printf '%-20s %8s %14s %8s  %s\n' "$target" "$seconds" "${execs:-?}" "$((after - before))" \
        "$( [ "$after" -gt "$before" ] && echo "fuzz/artifacts/$target (log: fuzz/$log)" )"
done
