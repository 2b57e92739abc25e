"""Which GPU architectures an onnxruntime CUDA build carries kernels for.

Official `onnxruntime-gpu` wheels are built with a fixed `CMAKE_CUDA_ARCHITECTURES` list (see
`tools/ci_build/github/linux/build_linux_python_package.sh` in microsoft/onnxruntime and docs/gpu.md);
Nix builds use `cudaCapabilities` instead, which the `--cuda-archs` option (or
`IMMICH_GPU_CHECK_CUDA_ARCHS`) passes in. Compatibility rules (CUDA programming guide): a cubin for
`sm_XY` runs on every `X.Z` GPU with `Z >= Y`; PTX for a non-`a` virtual architecture is JIT-compiled
for any newer GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OFFICIAL_BUILDS", "ArchSet", "Verdict", "judge", "parse_archs"]


@dataclass(frozen=True)
class ArchSet:
    """Real (cubin) architectures and an optional forward-compatible PTX architecture."""

    real: tuple[tuple[int, int], ...]
    ptx: tuple[int, int] | None = None
    source: str = ""

    def describe(self) -> str:
        text = " ".join(f"sm_{a}{b}" for a, b in self.real)
        return text + (f" + PTX compute_{self.ptx[0]}{self.ptx[1]}" if self.ptx else "")


# By the CUDA major version the onnxruntime build was made for.
OFFICIAL_BUILDS: dict[int, ArchSet] = {
    11: ArchSet(
        ((5, 2), (6, 0), (6, 1), (7, 0), (7, 5), (8, 0)),
        source="onnxruntime-gpu CUDA 11.8 wheels: CMAKE_CUDA_ARCHITECTURES=52;60;61;70;75;80",
    ),
    12: ArchSet(
        ((6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0)),
        source="onnxruntime-gpu CUDA 12 wheels: 60-real;70-real;75-real;80-real;86-real;90a-real;"
        "90a-virtual (90a PTX is not forward-compatible)",
    ),
    13: ArchSet(
        ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)),
        source="CUDA 13 toolkit range (Maxwell/Pascal/Volta dropped); the wheel's exact list is not confirmed",
    ),
}


@dataclass(frozen=True)
class Verdict:
    """`ok` True: kernels exist; False: certainly none; None: only PTX or the table cannot tell."""

    ok: bool | None
    reason: str


def parse_archs(text: str) -> tuple[tuple[int, int], ...]:
    """`7.5;8.6`, `75,86` or `sm_75 sm_86` into ((7, 5), (8, 6))."""
    archs = []
    for word in text.replace(";", " ").replace(",", " ").split():
        digits = word.lower().removeprefix("sm_").removesuffix("-real").replace(".", "")
        if not digits.isdigit() or len(digits) < 2:
            raise ValueError(f"not a CUDA architecture: {word!r} (use 7.5, 75 or sm_75)")
        archs.append((int(digits[:-1]), int(digits[-1])))
    return tuple(archs)


def judge(capability: tuple[int, int], archs: ArchSet) -> Verdict:
    """Whether a GPU of `capability` can run a build carrying `archs`."""
    name = f"sm_{capability[0]}{capability[1]}"
    if any(major == capability[0] and minor <= capability[1] for major, minor in archs.real):
        return Verdict(True, f"{name} is covered by the build's kernels")
    if archs.ptx is not None and archs.ptx <= capability:
        return Verdict(True, f"{name} runs JIT-compiled PTX (slow first start)")
    if capability < min(archs.real):
        return Verdict(False, f"{name} is older than the oldest architecture in the build")
    return Verdict(None, f"{name} is not in the build's list; it works only if the build ships PTX for it")
