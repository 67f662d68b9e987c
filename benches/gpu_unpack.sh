#!/usr/bin/env bash
# Reassemble the onnxruntime-gpu libraries packed by benches/gpu_pack.py, on the GPU machine.
#
#   bash benches/gpu_unpack.sh PARTS_DIR... DEST
#
# Each PARTS_DIR is one carried `.gpu/ort/callN` directory. Its files are moved into a stash
# that outlives the call (default /tmp/tcd-gpu/parts, override with TCD_GPU_STASH), because
# the working tree is copied afresh for every call while /tmp of the warm machine is kept.
# PARTS_DIRs that are not present in this call are skipped, so the same command line serves
# every call. Once the stash holds every part listed in SHA256SUMS.parts, the parts are
# checked (sha256), each library's xz stream is reassembled and decompressed (xz, or Python's
# lzma when xz is missing), checked against SHA256SUMS.libs and left in DEST; libraries that
# already match in DEST are not rewritten.
#
# Exit status: 0 = DEST is ready; 2 = parts still missing (carry the next call directory and
# run the same command again); 1 = error (bad part, checksum mismatch, usage).
#
# Multi-call flow (consecutive calls on the same warm machine; a fresh machine starts over):
#   call 1, carry [".gpu/ort/call1"]:
#     bash benches/gpu_unpack.sh .gpu/ort/call1 .gpu/ort/call2 .gpu/ort/call3 /tmp/tcd-gpu/ort  # exit 2
#   call 2, carry [".gpu/ort/call2"]: the same command                                         # exit 2
#   call 3, carry [".gpu/ort/call3"]: the same command && (the GPU run)                         # exit 0
# then: ORT_DYLIB_PATH=/tmp/tcd-gpu/ort/libonnxruntime.so.1.31.1 (or --ort-lib /tmp/tcd-gpu/ort)
# with the CUDA 13 / cuDNN 9 libraries on LD_LIBRARY_PATH (the export line is printed).
set -euo pipefail

usage() { echo "usage: $0 PARTS_DIR... DEST" >&2; exit 1; }
[ $# -ge 2 ] || usage
DEST=${!#}
DIRS=("${@:1:$#-1}")
STASH=${TCD_GPU_STASH:-/tmp/tcd-gpu/parts}

PY=
for c in python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$c" >/dev/null 2>&1; then PY=$(command -v "$c"); break; fi
done

# sha256sum -c, or the same with Python
check_sums() { # LIST_FILE DIR
    if command -v sha256sum >/dev/null 2>&1; then
        (cd "$2" && sha256sum --quiet -c "$1")
    else
        [ -n "$PY" ] || { echo "gpu_unpack: neither sha256sum nor python3" >&2; return 1; }
        "$PY" -c '
import hashlib, os, sys
bad = 0
for line in open(sys.argv[1]):
    want, name = line.split(None, 1)
    name = name.strip()
    h = hashlib.sha256()
    with open(os.path.join(sys.argv[2], name), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != want:
        print(f"{name}: FAILED")
        bad = 1
sys.exit(bad)' "$1" "$2"
    fi
}

unxz_stream() {
    if command -v xz >/dev/null 2>&1; then
        xz -dc
    else
        [ -n "$PY" ] || { echo "gpu_unpack: neither xz nor python3" >&2; return 1; }
        "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 22)'
    fi
}

mkdir -p "$STASH"
STASH=$(cd "$STASH" && pwd)
moved=0
for d in "${DIRS[@]}"; do
    if [ ! -d "$d" ]; then
        echo "gpu_unpack: $d not carried in this call, skipped"
        continue
    fi
    if [ -z "$(ls -A "$d")" ]; then
        echo "gpu_unpack: $d is empty (moved to $STASH by an earlier run), skipped"
        continue
    fi
    [ -f "$d/PACK_ID" ] || { echo "gpu_unpack: $d has no PACK_ID (not a gpu_pack.py directory)" >&2; exit 1; }
    if [ -f "$STASH/PACK_ID" ] && ! cmp -s "$d/PACK_ID" "$STASH/PACK_ID"; then
        echo "gpu_unpack: $d is from another pack ($(cat "$d/PACK_ID")), dropping the stash ($(cat "$STASH/PACK_ID"))"
        rm -f "$STASH"/*
    fi
    for f in "$d"/*; do
        mv -f "$f" "$STASH/"
        moved=$((moved + 1))
    done
done
[ -f "$STASH/SHA256SUMS.parts" ] || { echo "gpu_unpack: nothing in $STASH yet; carry a call directory" >&2; exit 1; }

missing=()
total=0
while read -r _ name; do
    total=$((total + 1))
    [ -f "$STASH/$name" ] || missing+=("$name")
done < "$STASH/SHA256SUMS.parts"
echo "gpu_unpack: pack $(cat "$STASH/PACK_ID"), moved $moved files, $((total - ${#missing[@]}))/$total parts in $STASH"
if [ ${#missing[@]} -gt 0 ]; then
    printf 'gpu_unpack: still missing: %s\n' "${missing[@]}"
    echo "gpu_unpack: carry the next call directory and run the same command again"
    exit 2
fi

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
while read -r sum lib; do
    if [ -f "$DEST/$lib" ] && echo "$sum  $lib" | check_sums /dev/stdin "$DEST" >/dev/null 2>&1; then
        echo "gpu_unpack: $DEST/$lib already up to date"
        continue
    fi
    if [ -z "${parts_checked:-}" ]; then
        check_sums "$STASH/SHA256SUMS.parts" "$STASH" || { echo "gpu_unpack: a part is corrupt" >&2; exit 1; }
        parts_checked=1
    fi
    tmp="$DEST/.$lib.tmp"
    # part names are zero-padded (part00, part01, ...): the glob order is the stream order
    cat "$STASH/$lib".xz.part* | unxz_stream > "$tmp"
    if ! echo "$sum  .$lib.tmp" | check_sums /dev/stdin "$DEST"; then
        rm -f "$tmp"
        echo "gpu_unpack: $lib does not match its sha256" >&2
        exit 1
    fi
    chmod 755 "$tmp"
    mv -f "$tmp" "$DEST/$lib"
    echo "gpu_unpack: $DEST/$lib ($(stat -c %s "$DEST/$lib") bytes) ok"
done < "$STASH/SHA256SUMS.libs"

core=$(awk '$2 ~ /^libonnxruntime\.so\./ {print $2}' "$STASH/SHA256SUMS.libs")
nv=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
ld=
for d in "$nv/cu13/lib" "$nv/cudnn/lib"; do
    [ -d "$d" ] && ld="$ld${ld:+:}$d"
done
echo "gpu_unpack: ready:"
echo "  export ORT_DYLIB_PATH=$DEST/$core   # or --ort-lib $DEST"
[ -n "$ld" ] && echo "  export LD_LIBRARY_PATH=$ld\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exit 0
