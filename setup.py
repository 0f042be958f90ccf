"""Builds the optional CUDA extension act_kernels._C with CMake.

ACT_KERNELS_CUDA=1 forces the build (fails without nvcc), =0 skips it; unset,
it is built when nvcc is found ($CUDA_HOME/bin, /usr/local/cuda/bin or PATH)
and skipped with one message otherwise. The extension links no libtorch, so
it needs no GPU and no torch at build time. ACT_KERNELS_CUDA_ARCHS overrides
the architectures (CMake syntax, default "80;90"); MAX_JOBS caps parallel nvcc.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        mode = os.environ.get("ACT_KERNELS_CUDA", "auto").strip().lower()
        nvcc = find_nvcc()
        if mode in ("0", "off", "false", "no"):
            print("act_kernels: ACT_KERNELS_CUDA=0, skipping the CUDA extension")
            return
        if nvcc is None:
            if mode in ("1", "on", "true", "yes"):
                raise RuntimeError("ACT_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME)")
            print("act_kernels: nvcc not found, skipping the CUDA extension "
                  "(the reference and triton backends need none)")
            return
        for ext in self.extensions:
            self.build_cmake(ext, nvcc)

    def build_cmake(self, ext, nvcc):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("ACT_KERNELS_CUDA_ARCHS", "80;90")
        config = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *config])
        jobs = os.environ.get("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])


setup(ext_modules=[CMakeExtension("act_kernels._C")], cmdclass={"build_ext": CMakeBuild})
