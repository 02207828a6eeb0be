"""Stand-in CUDA libraries so a CUDA build of torch imports and runs on a machine without CUDA.

torch publishes no CPU-only wheel of its older releases on PyPI; its CUDA wheel links against
the NVIDIA libraries (cudart, cublas, cudnn, nccl, ...), several GB as packages. CI tests the
oldest supported torch on the CPU, where none of those libraries is ever called. This script
reads the libraries of an installed torch, finds every symbol they import from a CUDA library
that is missing here, and compiles one small shared library per missing soname that defines
those symbols with the right symbol versions. Each stand-in function returns 100
(cudaErrorNoDevice) except cudaGetDeviceCount, which reports no device, so
torch.cuda.is_available() is False and nothing else reaches them.

    python .ci/cuda_stubs.py SITE_PACKAGES/torch OUT_DIR   # then LD_LIBRARY_PATH=OUT_DIR
"""

import collections
import pathlib
import re
import subprocess
import sys

NO_DEVICE = 100  # cudaErrorNoDevice

SPECIAL = {
    "cudaGetDeviceCount": f"int cudaGetDeviceCount(int *count) {{ *count = 0; return {NO_DEVICE}; }}",
    "cudaGetErrorString": 'const char *cudaGetErrorString(int e) { return "no CUDA device (stand-in)"; }',
    "cudaGetErrorName": 'const char *cudaGetErrorName(int e) { return "cudaErrorNoDevice"; }',
    "cudaGetLastError": "int cudaGetLastError(void) { return 0; }",
    "cudaPeekAtLastError": "int cudaPeekAtLastError(void) { return 0; }",
}


def needed(lib: pathlib.Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+)\]", out)


def symbols(lib: pathlib.Path, defined: bool) -> list[tuple[str, str, str]]:
    """(name, version, type) of a library's dynamic symbols, undefined or defined."""
    out = subprocess.run(["readelf", "-W", "--dyn-syms", str(lib)], capture_output=True, text=True,
                         check=True)
    rows = []
    for line in out.stdout.splitlines():
        cols = line.split()
        if len(cols) < 8 or not cols[0].rstrip(":").isdigit():
            continue
        if (cols[6] == "UND") == defined:
            continue
        name, _, version = cols[7].partition("@")
        rows.append((name, version.lstrip("@"), cols[3]))
    return rows


def is_cuda_library(soname: str) -> bool:
    """The NVIDIA libraries a CUDA build of torch links (not glibc's, gcc's or torch's own)."""
    return re.match(r"lib(cu|nccl|nvshmem|nvrtc|nvToolsExt)", soname) is not None


def main(torch_dir: str, out_dir: str) -> None:
    torch_dir, out = pathlib.Path(torch_dir), pathlib.Path(out_dir)
    libs = sorted((torch_dir / "lib").glob("*.so*")) + sorted(torch_dir.glob("_C*.so"))
    ours = {p.name for p in libs}
    # libcaffe2_nvrtc is opened only to compile CUDA code at run time: nothing loads it here.
    # Every one is replaced, even where this machine has a real one, so the result does not
    # depend on what the machine has installed.
    missing = sorted({n for lib in libs if lib.name != "libcaffe2_nvrtc.so" for n in needed(lib)
                      if n not in ours and is_cuda_library(n)})
    defined = {name for lib in libs for name, _, _ in symbols(lib, defined=True)}
    by_lib: dict[str, dict[str, str]] = collections.defaultdict(dict)  # soname -> {symbol: version}
    for lib in libs:
        for name, version, kind in symbols(lib, defined=False):
            if version in missing:  # the CUDA libraries version their symbols by soname
                by_lib[version][name] = version
            elif version == "NVSHMEM":
                by_lib["libnvshmem_host.so.3"][name] = version
            elif not version and kind != "OBJECT" and name not in defined and re.match(
                    r"(nccl|cusparseLt|cuFile|cu[A-Z])", name):
                by_lib["libnccl.so.2"][name] = ""  # unversioned: found in any loaded library
    out.mkdir(parents=True, exist_ok=True)
    for soname in missing:
        syms = by_lib.get(soname, {})
        stem = soname.split(".so")[0]
        source = out / f"{stem}.c"
        source.write_text("\n".join(
            SPECIAL.get(name, f"int {name}(void) {{ return {NO_DEVICE}; }}") for name in sorted(syms)) + "\n")
        versions = sorted({v for v in syms.values() if v})  # a library's symbols are all versioned or none
        script = out / f"{stem}.map"
        script.write_text("".join(f"{v} {{ global: " + " ".join(f"{n};" for n, vn in syms.items() if vn == v)
                                  + " };\n" for v in versions))
        flags = [f"-Wl,--version-script={script}"] if versions else []
        subprocess.run(["cc", "-shared", "-fPIC", "-w", "-o", str(out / soname), f"-Wl,-soname,{soname}",
                        *flags, str(source)], check=True)
    print(f"{len(missing)} stand-in libraries in {out}: {' '.join(missing)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
