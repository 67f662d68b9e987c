#!/bin/sh
# Installs the tcd-ort C ABI under a prefix: the header, the shared library cargo built, a
# pkg-config file and a CMake package config.
#
#   cargo rustc --lib --release --features capi --crate-type cdylib,staticlib
#   examples/cpp/install.sh /usr/local release
#
# Then `pkg-config --cflags --libs tcd-ort` or `find_package(tcd-ort CONFIG)` find it. ONNX
# Runtime itself is loaded at run time (tcd_engine_options_set_ort_library, ORT_DYLIB_PATH, or
# .ort/lib next to the working directory or the executable) and is not installed here.
set -eu
prefix=${1:?usage: install.sh PREFIX [debug|release]}
profile=${2:-release}
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
subst() { sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" "$1" > "$2"; }

install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/tcd-ort"
install -m 644 "$root/include/tcd_ort.h" "$prefix/include/tcd_ort.h"
install -m 755 "$root/target/$profile/libtcd_ort.so" "$prefix/lib/libtcd_ort.so"
subst "$root/examples/cpp/packaging/tcd-ort.pc.in" "$prefix/lib/pkgconfig/tcd-ort.pc"
subst "$root/examples/cpp/packaging/tcd-ortConfig.cmake.in" "$prefix/lib/cmake/tcd-ort/tcd-ortConfig.cmake"
subst "$root/examples/cpp/packaging/tcd-ortConfigVersion.cmake.in" \
  "$prefix/lib/cmake/tcd-ort/tcd-ortConfigVersion.cmake"
echo "installed tcd-ort $version into $prefix"
