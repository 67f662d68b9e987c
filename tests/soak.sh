#!/usr/bin/env bash
# Soak check of the C ABI (issue 19): builds the C library as `make ffi` does, compiles
# examples/cpp/soak.cpp against it, and runs RUNS generations on one engine in one process,
# printing the resident set size every EVERY generations and whether it stayed flat after the
# warm-up (examples/cpp/soak.cpp says how it judges). Linux only (VmRSS from /proc).
#
#   tests/soak.sh [RUNS] [EVERY]      defaults: 200 generations, a sample every 10
#
# FFI_PROFILE=release uses a release build; SOAK_ARGS adds flags (--steps, --threads,
# --warmup, --max-growth-kib, --model). CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-200}
every=${2:-10}
profile=${FFI_PROFILE:-debug}
target=${CARGO_TARGET_DIR:-target}
out=target/ffi
if ! [[ $runs =~ ^[1-9][0-9]*$ && $every =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [RUNS] [EVERY] (positive integers)" >&2
    exit 2
fi
release=()
[[ $profile == release ]] && release=(--release)
cargo rustc --lib --features capi --crate-type cdylib,staticlib "${release[@]}"
libdir=$(cd "$target/$profile" && pwd)
mkdir -p "$out"
g++ -std=c++17 -Wall -Wextra -Werror -O1 -Iinclude examples/cpp/soak.cpp \
    -L"$libdir" -ltcd_ort -Wl,-rpath,"$libdir" -o "$out/tcd_soak"
# shellcheck disable=SC2086  # SOAK_ARGS is a list of flags
"$out/tcd_soak" --runs "$runs" --every "$every" ${SOAK_ARGS:-}
