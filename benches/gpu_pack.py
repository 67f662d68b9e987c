#!/usr/bin/env python3
"""Pack the onnxruntime-gpu shared libraries into small parts for an offline GPU machine.

The GPU machine reaches nothing, so every file has to travel inside the repository's working
tree, at most 64 MiB per copy *including* the tracked files. `onnxruntime-gpu==1.31.1`
(CUDA 13 build) is a ~255 MB wheel whose CUDA provider (~284 MB) is mostly CUDA fat binaries
with one compiled kernel (cubin) per GPU architecture. This script (standard library only):

1. downloads the wheel with pip (or takes `--wheel PATH`) and extracts the four libraries of
   `onnxruntime/capi/`: libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so,
   libonnxruntime_providers_cuda.so, libonnxruntime_providers_tensorrt.so;
2. in every library with an ELF section `.nv_fatbin` or `__nv_relfatbin`, overwrites with
   zeros the device-code payloads of every architecture that is not kept (`--keep-sm 90`:
   H100/H200). Headers, file size and layout stay byte-for-byte the same, so the CUDA driver
   still parses every fat binary and only ever reads a kept entry; xz then compresses the
   zeros away;
3. compresses each library with xz (`lzma`, preset 9 | extreme) and cuts the streams, largest
   library first, into parts of at most `--part-mb` MiB that fill `call1/`, `call2/`, ...
   directories one after the other, each small enough to travel with the working tree in one
   device call (`--call-mb`, by default 64 MiB minus the current working tree minus 2 MiB), so
   the number of calls is the smallest possible, with the parts spread evenly over them; every
   call directory also holds the checksum lists (`SHA256SUMS.parts`, `SHA256SUMS.libs`) and
   `PACK_ID`;
4. writes `manifest.json` (fat-binary tables, sizes, sha256 of the wheel, of the original
   and zeroed libraries, of the xz streams and of every part) next to them.

`benches/gpu_unpack.sh` reassembles the parts on the device (see there and benches/README.md).

Fat-binary layout (little endian), checked on the file before anything is zeroed: a
section holds fat-binary containers back to back (zero padding between them is allowed):

    container header, 16 bytes:  u32 magic 0xBA55ED50, u16 version (1), u16 header size (16),
                                 u64 size of the entries that follow
    entry header, >= 64 bytes:   +0 u16 kind (1 = PTX, 2 = ELF cubin), +2 u16 (0x0101),
                                 +4 u32 header size (64; 112 for sm_100+ cubins, 80 for
                                 sm_120+ PTX),
                                 +8 u64 payload size (padded to 8), +16 u32 compressed size,
                                 +20 u32 (0, or 64 with an extended header), +24 u16 u16 version,
                                 +28 u32 SM architecture (75, 80, 86, 89, 90, 120, ...),
                                 +32 u32 u32 object-name offset / length, +40 u64 flags
                                 (0x1 64-bit, 0x10 Linux, 0x2000 LZ4, 0x8000 zstd compressed),
                                 +48 u64 0, +56 u64 uncompressed size
    payload                      immediately after the entry header; the next entry starts
                                 at entry + header size + payload size

Which entries are kept, per container and per kept architecture T (`--keep-sm`, repeatable):
every cubin the driver may load on a T device, i.e. the same major version and a minor
version <= T's (for 90: the sm_90 cubins; sm_90a cubins carry arch 90 in this header, so they
are kept too). Only if a container has no such cubin are its PTX entries with arch <= T kept
(the driver then JIT-compiles the newest of them). Containers with neither (e.g. sm_120-only
kernels) cannot run on T and are zeroed completely. Entries of an unknown kind are kept.
Running such a kernel on a GPU of another architecture fails with "no kernel image is
available", it never reads the zeros.

Usage:

    python3 benches/gpu_pack.py                      # pip download, keep sm_90, .gpu/ort
    python3 benches/gpu_pack.py --wheel onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    python3 benches/gpu_pack.py --keep-sm 90 --part-mb 30 --out .gpu/ort --list

`--list` prints every fat-binary entry (otherwise a summary per kind/arch/flags). `--jobs`
compresses that many libraries at once (default 2; xz -9e of the CUDA provider takes minutes).
The zeroed libraries stay in `--work` (default /tmp/tcd-gpu-pack/libs) for inspection, next to
their xz streams, which a later run reuses when the zeroed library is unchanged. Then carry
`.gpu/ort/call1`, ... one per device call (`.gpu/` is ignored by git) and run
benches/gpu_unpack.sh there.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import zipfile

ORT_VERSION = "1.31.1"
LIBS = (
    f"libonnxruntime.so.{ORT_VERSION}",
    "libonnxruntime_providers_shared.so",
    "libonnxruntime_providers_cuda.so",
    "libonnxruntime_providers_tensorrt.so",
)
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")
FATBIN_MAGIC = 0xBA55ED50
CONTAINER = struct.Struct("<IHHQ")
ENTRY = struct.Struct("<HHIQIIHHIIIQQQ")
KIND_NAMES = {1: "ptx", 2: "cubin"}
FLAG_LZ4 = 0x2000
FLAG_ZSTD = 0x8000
MIB = 1 << 20
DEVICE_CALL_BYTES = 64 * MIB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# ELF and fat binaries


def elf_sections(data) -> list[dict]:
    """Section headers of a little-endian ELF64 file: name, type, file offset, size."""
    if bytes(data[:4]) != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shnum == 0 or shentsize != 64:
        raise ValueError(f"unsupported section table (shnum {shnum}, shentsize {shentsize})")
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64) for i in range(shnum)]
    str_off, str_size = raw[shstrndx][4], raw[shstrndx][5]
    names = bytes(data[str_off:str_off + str_size])
    out = []
    for name, typ, _flags, _addr, off, size, *_ in raw:
        end = names.index(b"\0", name)
        out.append({"name": names[name:end].decode(), "type": typ, "offset": off, "size": size})
    return out


def parse_fatbin(data, start: int, end: int) -> list[list[dict]]:
    """Containers (lists of entries) of the fat-binary section data[start:end]; strict."""
    containers = []
    pos = start
    while pos < end:
        if data[pos] == 0:  # zero padding between containers
            pos += 1
            continue
        if end - pos < CONTAINER.size:
            raise ValueError(f"truncated container header at {pos:#x}")
        magic, version, header_size, fat_size = CONTAINER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC or version != 1 or header_size != CONTAINER.size:
            raise ValueError(f"unexpected bytes at {pos:#x}: magic {magic:#x} version {version} "
                             f"header size {header_size}")
        entry = pos + header_size
        container_end = entry + fat_size
        if container_end > end:
            raise ValueError(f"container at {pos:#x} runs past the section end")
        entries = []
        while entry < container_end:
            (kind, _ver, ehsize, payload, csize, _ext, vminor, vmajor, arch, _name_off,
             _name_len, flags, _zero, usize) = ENTRY.unpack_from(data, entry)
            if ehsize < ENTRY.size or entry + ehsize + payload > container_end:
                raise ValueError(f"bad entry at {entry:#x} (header {ehsize}, payload {payload})")
            compressed = bool(flags & (FLAG_LZ4 | FLAG_ZSTD))
            if payload and (csize if compressed else usize) > payload:
                raise ValueError(f"entry at {entry:#x}: data larger than its payload")
            entries.append({
                "offset": entry, "kind": kind, "header_size": ehsize,
                "payload_offset": entry + ehsize, "payload_size": payload,
                "compressed_size": csize, "uncompressed_size": usize, "arch": arch,
                "version": f"{vmajor}.{vminor}", "flags": flags, "compressed": compressed,
            })
            entry += ehsize + payload
        if entry != container_end:
            raise ValueError(f"entries of the container at {pos:#x} overrun it")
        containers.append(entries)
        pos = container_end
    return containers


def kept_entries(entries: list[dict], keep_sm: list[int]) -> set[int]:
    """Indices of the entries a GPU of any architecture in keep_sm may load."""
    keep = set()
    for i, e in enumerate(entries):
        if e["kind"] not in KIND_NAMES:
            keep.add(i)
    for target in keep_sm:
        cubins = [i for i, e in enumerate(entries) if e["kind"] == 2
                  and e["arch"] // 10 == target // 10 and e["arch"] <= target]
        if cubins:
            keep.update(cubins)
        else:
            keep.update(i for i, e in enumerate(entries) if e["kind"] == 1 and e["arch"] <= target)
    return keep


def entry_row(e: dict, kept: bool) -> str:
    comp = "zstd" if e["flags"] & FLAG_ZSTD else "lz4" if e["flags"] & FLAG_LZ4 else "-"
    return (f"{e['offset']:#012x} {KIND_NAMES.get(e['kind'], e['kind']):>5} sm_{e['arch']:<4} "
            f"{e['header_size']:>4} {e['payload_size']:>10} {e['compressed_size']:>10} "
            f"{e['uncompressed_size']:>10} {comp:>5} {e['flags']:#010x} "
            f"{'keep' if kept else 'zero'}")


def zero_fatbins(path_in: str, path_out: str, keep_sm: list[int], list_all: bool) -> dict:
    """Copy path_in to path_out with the non-kept payloads zeroed; verify; return a report."""
    with open(path_in, "rb") as f:
        original = f.read()
    data = bytearray(original)
    view = memoryview(data)
    sections = [s for s in elf_sections(original) if s["name"] in FATBIN_SECTIONS]
    report = {"sections": [], "containers": 0, "entries": 0, "kept_entries": 0,
              "zeroed_entries": 0, "zeroed_bytes": 0, "containers_without_kept": 0}
    summary = collections.OrderedDict()
    ranges = []  # (offset, size, kept)
    name = os.path.basename(path_in)
    for sec in sections:
        if sec["type"] == 8:  # SHT_NOBITS
            continue
        containers = parse_fatbin(original, sec["offset"], sec["offset"] + sec["size"])
        report["sections"].append({"name": sec["name"], "offset": sec["offset"],
                                   "size": sec["size"], "containers": len(containers)})
        if list_all:
            print(f"{name} {sec['name']}: {'offset':>12} {'kind':>5} {'arch':<7} {'hdr':>4} "
                  f"{'payload':>10} {'compressed':>10} {'raw':>10} {'codec':>5} {'flags':>10}")
        for entries in containers:
            keep = kept_entries(entries, keep_sm)
            report["containers"] += 1
            if not keep:
                report["containers_without_kept"] += 1
            for i, e in enumerate(entries):
                kept = i in keep
                report["entries"] += 1
                report["kept_entries" if kept else "zeroed_entries"] += 1
                key = (KIND_NAMES.get(e["kind"], str(e["kind"])), e["arch"], e["flags"], kept)
                row = summary.setdefault(key, [0, 0, 0, e["header_size"]])
                row[0] += 1
                row[1] += e["payload_size"]
                row[2] += e["uncompressed_size"]
                if list_all:
                    print("  " + entry_row(e, kept))
                ranges.append((e["payload_offset"], e["payload_size"], kept))
                if not kept:
                    view[e["payload_offset"]:e["payload_offset"] + e["payload_size"]] = \
                        bytes(e["payload_size"])
                    report["zeroed_bytes"] += e["payload_size"]
    report["summary"] = [
        {"kind": k[0], "arch": k[1], "flags": f"{k[2]:#x}", "kept": k[3], "entries": v[0],
         "payload_bytes": v[1], "uncompressed_bytes": v[2], "header_size": v[3]}
        for k, v in summary.items()]
    with open(path_out, "wb") as f:
        f.write(data)
    del view
    verify_zeroed(original, path_out, ranges, sections)
    return report


def verify_zeroed(original: bytes, path: str, ranges: list, sections: list[dict]) -> None:
    """The written file: same size, still ELF with the same sections and fat-binary tables,
    kept payloads byte-identical, others all zero, every other byte unchanged."""
    with open(path, "rb") as f:
        new = f.read()
    if len(new) != len(original):
        raise AssertionError(f"{path}: size changed")
    if elf_sections(new) != elf_sections(original):
        raise AssertionError(f"{path}: section table changed")
    for sec in sections:
        if sec["type"] != 8:
            a = parse_fatbin(original, sec["offset"], sec["offset"] + sec["size"])
            b = parse_fatbin(new, sec["offset"], sec["offset"] + sec["size"])
            if a != b:
                raise AssertionError(f"{path}: fat-binary headers changed in {sec['name']}")
    pos = 0
    for off, size, kept in sorted(ranges):
        if new[pos:off] != original[pos:off]:
            raise AssertionError(f"{path}: bytes outside the payloads changed before {off:#x}")
        chunk = new[off:off + size]
        if kept and chunk != original[off:off + size]:
            raise AssertionError(f"{path}: kept payload at {off:#x} changed")
        if not kept and chunk.count(0) != size:
            raise AssertionError(f"{path}: payload at {off:#x} not zeroed")
        pos = off + size
    if new[pos:] != original[pos:]:
        raise AssertionError(f"{path}: bytes after the last payload changed")


def print_summary(name: str, report: dict) -> None:
    if not report["sections"]:
        print(f"{name}: no fat-binary section")
        return
    for s in report["sections"]:
        print(f"{name}: {s['name']} at {s['offset']:#x}, {s['size'] / 1e6:.1f} MB, "
              f"{s['containers']} containers")
    print(f"  {'kind':>5} {'arch':<7} {'flags':>10} {'hdr':>4} {'entries':>7} "
          f"{'payload MB':>10} {'raw MB':>8}  action")
    for r in report["summary"]:
        print(f"  {r['kind']:>5} sm_{r['arch']:<4} {r['flags']:>10} {r['header_size']:>4} "
              f"{r['entries']:>7} {r['payload_bytes'] / 1e6:>10.2f} "
              f"{r['uncompressed_bytes'] / 1e6:>8.2f}  {'keep' if r['kept'] else 'zero'}")
    print(f"  {report['entries']} entries: {report['kept_entries']} kept, "
          f"{report['zeroed_entries']} zeroed ({report['zeroed_bytes'] / 1e6:.1f} MB); "
          f"{report['containers_without_kept']} containers have nothing for the kept "
          f"architecture(s)")


# --------------------------------------------------------------------------------------------
# wheel, compression, parts


def fetch_wheel(download_dir: str) -> str:
    wheel = f"onnxruntime_gpu-{ORT_VERSION}-cp312-cp312-manylinux*x86_64.whl"
    pattern = os.path.join(download_dir, wheel)
    found = sorted(glob.glob(pattern))
    if not found:
        os.makedirs(download_dir, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", "--abi", "cp312",
                        "--platform", "manylinux_2_28_x86_64",
                        f"onnxruntime-gpu=={ORT_VERSION}", "-d", download_dir], check=True)
        found = sorted(glob.glob(pattern))
    if not found:
        sys.exit(f"gpu_pack: no cp312 manylinux x86_64 wheel in {download_dir}")
    return found[-1]


def compress(src: str, dst: str) -> str:
    preset = 9 | lzma.PRESET_EXTREME
    with open(src, "rb") as f, lzma.open(dst, "wb", format=lzma.FORMAT_XZ,
                                         check=lzma.CHECK_CRC64, preset=preset) as out:
        shutil.copyfileobj(f, out, 1 << 22)
    return dst


def working_tree_bytes(repo: str) -> int:
    """What the device copy carries besides the parts: tracked plus untracked, unignored files."""
    try:
        listing = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for rel in listing.decode(errors="surrogateescape").split("\0"):
        path = os.path.join(repo, rel)
        if rel and os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def split_into_calls(streams: list[tuple[str, str]], part_bytes: int,
                     call_bytes: int) -> list[list[dict]]:
    """Cut the xz streams (name, path), in order, into parts of at most part_bytes and fill
    device calls of call_bytes one after the other: a part never straddles two calls, so the
    number of calls is the smallest possible, ceil(total / call_bytes) give or take a sliver."""
    min_part = 64 << 10
    if call_bytes < min_part:
        sys.exit(f"gpu_pack: {call_bytes} bytes per call is too little")
    calls: list[list[dict]] = [[]]
    room = call_bytes
    for name, path in streams:
        index = 0
        with open(path, "rb") as f:
            while True:
                if room < min_part:
                    calls.append([])
                    room = call_bytes
                chunk = f.read(min(part_bytes, room))
                if not chunk:
                    break
                calls[-1].append({"file": f"{name}.xz.part{index:02d}", "lib": name,
                                  "size": len(chunk), "data": chunk,
                                  "sha256": hashlib.sha256(chunk).hexdigest()})
                room -= len(chunk)
                index += 1
    return [c for c in calls if c]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="onnxruntime-gpu wheel (default: pip download it)")
    ap.add_argument("--download-dir", default="/tmp/tcd-gpu-wheel",
                    help="where pip puts (and this script reuses) the wheel")
    ap.add_argument("--keep-sm", type=int, action="append",
                    help="SM architecture to keep, repeatable (default 90)")
    ap.add_argument("--part-mb", type=float, default=30, help="largest part, MiB (default 30)")
    ap.add_argument("--call-mb", type=float,
                    help="parts per device call, MiB (default 64 minus the working tree minus 2)")
    ap.add_argument("--out", default=os.path.join(REPO, ".gpu", "ort"), help="output directory")
    ap.add_argument("--work", default="/tmp/tcd-gpu-pack", help="scratch dir (zeroed libs, xz)")
    ap.add_argument("--jobs", type=int, default=2, help="libraries compressed at once")
    ap.add_argument("--list", action="store_true", help="print every fat-binary entry")
    args = ap.parse_args()
    keep_sm = args.keep_sm or [90]
    part_bytes = int(args.part_mb * MIB)
    if args.call_mb:
        call_budget = int(args.call_mb * MIB)
    else:
        tree = working_tree_bytes(REPO)
        call_budget = DEVICE_CALL_BYTES - tree - 2 * MIB
        print(f"working tree {tree / MIB:.1f} MiB -> {call_budget / MIB:.1f} MiB of parts per call")

    wheel = args.wheel or fetch_wheel(args.download_dir)
    print(f"wheel {wheel}")
    libs_dir = os.path.join(args.work, "libs")
    orig_dir = os.path.join(args.work, "original")
    for d in (libs_dir, orig_dir):
        os.makedirs(d, exist_ok=True)
    manifest = {"onnxruntime_gpu": ORT_VERSION, "wheel": os.path.basename(wheel),
                "wheel_sha256": sha256_file(wheel), "keep_sm": keep_sm,
                "xz": "preset 9 | extreme, CRC64", "part_bytes_max": part_bytes,
                "call_bytes_max": call_budget, "libs": []}
    with zipfile.ZipFile(wheel) as z:
        for name in LIBS:
            with z.open(f"onnxruntime/capi/{name}") as src, \
                    open(os.path.join(orig_dir, name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)

    for name in LIBS:
        src, dst = os.path.join(orig_dir, name), os.path.join(libs_dir, name)
        report = zero_fatbins(src, dst, keep_sm, args.list)
        os.chmod(dst, 0o755)
        print_summary(name, report)
        manifest["libs"].append({"name": name, "size": os.path.getsize(dst),
                                 "original_sha256": sha256_file(src),
                                 "sha256": sha256_file(dst), "fatbin": report})

    # an xz stream from an earlier run is reused when it was made from the same zeroed library
    todo = []
    for lib in manifest["libs"]:
        stamp = os.path.join(args.work, lib["name"] + ".xz.source-sha256")
        if not (os.path.exists(stamp) and open(stamp).read().strip() == lib["sha256"]
                and os.path.exists(os.path.join(args.work, lib["name"] + ".xz"))):
            todo.append(lib)
    print(f"xz -9e of {len(todo)} libraries ({args.jobs} at a time) ...", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        jobs = [(lib, pool.submit(compress, os.path.join(libs_dir, lib["name"]),
                                  os.path.join(args.work, lib["name"] + ".xz")))
                for lib in sorted(todo, key=lambda item: -item["size"])]
        for lib, job in jobs:
            job.result()
            with open(os.path.join(args.work, lib["name"] + ".xz.source-sha256"), "w") as f:
                f.write(lib["sha256"] + "\n")

    # split into parts, then group the parts into per-call directories
    os.makedirs(args.out, exist_ok=True)
    for old in os.listdir(args.out):
        path = os.path.join(args.out, old)
        if old.startswith("call") and os.path.isdir(path):
            shutil.rmtree(path)
        elif old in ("manifest.json", "SHA256SUMS.parts", "SHA256SUMS.libs", "PACK_ID"):
            os.remove(path)
    streams = []
    for lib in sorted(manifest["libs"], key=lambda item: -item["size"]):
        xz_path = os.path.join(args.work, lib["name"] + ".xz")
        lib["xz_size"] = os.path.getsize(xz_path)
        lib["xz_sha256"] = sha256_file(xz_path)
        streams.append((lib["name"], xz_path))
    # as few calls as the budget allows, filled evenly (slack for a growing working tree)
    total = sum(os.path.getsize(path) for _, path in streams)
    n_calls = -(-total // call_budget)
    fill = min(call_budget, -(-total // n_calls) + (256 << 10))
    calls = split_into_calls(streams, part_bytes, fill)
    parts = [p for call in calls for p in call]
    for n, call in enumerate(calls, 1):
        for part in call:
            part["call"] = f"call{n}"
    for lib in manifest["libs"]:
        lib["parts"] = [p for p in parts if p["lib"] == lib["name"]]
    libs_sums = "".join(f"{lib['sha256']}  {lib['name']}\n" for lib in manifest["libs"])
    parts_sums = "".join(f"{p['sha256']}  {p['file']}\n" for p in parts)
    pack_id = hashlib.sha256((libs_sums + parts_sums).encode()).hexdigest()[:16] + "\n"
    manifest["pack_id"] = pack_id.strip()
    manifest["calls"] = [{"dir": f"call{n}", "parts": [p["file"] for p in call],
                          "bytes": sum(p["size"] for p in call)} for n, call in enumerate(calls, 1)]
    for lib in manifest["libs"]:
        lib["parts"] = [{k: p[k] for k in ("file", "size", "sha256", "call")} for p in lib["parts"]]
    extra = {"SHA256SUMS.libs": libs_sums, "SHA256SUMS.parts": parts_sums, "PACK_ID": pack_id}
    for n, call in enumerate(calls, 1):
        d = os.path.join(args.out, f"call{n}")
        os.makedirs(d)
        for part in call:
            with open(os.path.join(d, part["file"]), "wb") as f:
                f.write(part["data"])
        for fname, text in extra.items():
            with open(os.path.join(d, fname), "w") as f:
                f.write(text)
    for fname, text in extra.items():
        with open(os.path.join(args.out, fname), "w") as f:
            f.write(text)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    print(f"\n{'library':<40} {'size MB':>9} {'xz MB':>8}")
    for lib in manifest["libs"]:
        print(f"{lib['name']:<40} {lib['size'] / 1e6:>9.1f} {lib['xz_size'] / 1e6:>8.2f}")
    print(f"\nparts in {args.out} (pack {manifest['pack_id']}):")
    for call in manifest["calls"]:
        print(f"  {call['dir']}/  {call['bytes'] / MIB:.2f} MiB")
        for fname in call["parts"]:
            size = next(p["size"] for p in parts if p["file"] == fname)
            print(f"    {fname:<50} {size:>10} bytes ({size / MIB:.2f} MiB)")
    dirs = " ".join(os.path.relpath(os.path.join(args.out, c["dir"]), REPO)
                    for c in manifest["calls"])
    print(f"\ncarry one call directory per device call, then in each call:\n"
          f"  bash benches/gpu_unpack.sh {dirs} DEST")


if __name__ == "__main__":
    main()
