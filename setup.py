"""Builds the C++ extension rexrag_fast._C with CMake (pybind11, C++17, -O3, ninja when present).

The extension does not link against torch, so the build environment needs no torch.
`REXRAG_ASAN=1 pip install -e .` builds it with AddressSanitizer (see README, "Sanitizers").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if os.environ.get("REXRAG_DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DREXRAG_ASAN={'ON' if os.environ.get('REXRAG_ASAN') == '1' else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", str(os.cpu_count() or 2)],
                       cwd=build_temp, check=True)


setup(
    packages=[
        "rexrag_fast",
        "rexrag_fast.ops",
        "rexrag_fast.cache",
        "rexrag_fast.engine",
        "rexrag_fast.retrieval",
        "rexrag_fast.agent",
        "rexrag_fast.rexrag",
        "rexrag_fast.train",
        "rexrag_fast.data",
        "rexrag_fast.kernels",
    ],
    package_dir={"rexrag_fast.kernels": "kernels"},
    package_data={"rexrag_fast": ["py.typed"], "rexrag_fast.data": ["*.yaml", "*.json"]},
    ext_modules=[CMakeExtension("rexrag_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
