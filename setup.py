"""Build script for the compiled extension saq_kernels._C; the metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .    # editable, builds the extension with the torch installed
    pip install --no-build-isolation .       # regular install
    SAQ_BUILD_EXT=0 pip install -e .         # pure Python (the C++ kernels JIT-build on first use)
    python setup.py build_ext --inplace      # rebuild in the source tree while iterating

C++ CPU kernels always; the CUDA kernels (csrc/cuda/*.cu, csrc/cuda_register.cpp) only when torch
is a CUDA build and nvcc is found (TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX"). ninja is used when
installed. Sources and flags are defined once, in saq_kernels/_build.py.
"""
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "saq_kernels._C"


def _build_helpers():
    # By path: importing the saq_kernels package here would import its runtime dependencies.
    path = os.path.join(ROOT, "saq_kernels", "_build.py")
    spec = importlib.util.spec_from_file_location("_saq_kernels_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithSources(build_py):
    """Ships csrc/ as saq_kernels/_csrc in wheels, so an install whose extension is missing can
    still JIT-build it (saq_kernels._build.csrc_dir); a stale one is refused with the rebuild
    command."""

    def run(self):
        super().run()
        src = os.path.join(ROOT, "csrc")
        if getattr(self, "editable_mode", False) or not os.path.isdir(src):
            return
        dst = os.path.join(self.build_lib, "saq_kernels", "_csrc")
        shutil.copytree(src, dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _extension():
    """([ext], cmdclass) for saq_kernels._C, or ([], {}) with SAQ_BUILD_EXT=0."""
    if os.environ.get("SAQ_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # pip's build isolation hides the installed torch: install the pure-Python package; the
        # extension then JIT-builds on first use (saq_kernels/_build.py).
        print("saq: WARNING: torch is not importable in the build environment (pip build "
              "isolation?), so saq_kernels._C is not built ahead of time; it will JIT-build on "
              "first use. To build it now: pip install --no-build-isolation .")
        return [], {}

    B = _build_helpers()
    csrc = os.path.join(ROOT, "csrc")
    why_no_cuda = B.cuda_wanted(csrc)
    with_cuda = why_no_cuda is None
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731 (setuptools wants relative sources)
    sources = [rel(s) for s in B.cpp_sources(csrc)]
    kwargs = dict(
        include_dirs=[csrc],
        extra_compile_args={"cxx": B.cxx_flags()},
        extra_link_args=B.link_flags(),
    )
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = B.cuda_arch_list()
        sources += [rel(s) for s in B.cuda_sources(csrc)]
        kwargs["extra_compile_args"]["nvcc"] = B.nvcc_flags()
        kwargs["define_macros"] = [("WITH_CUDA", None)]
        ext = CUDAExtension(EXT_NAME, sources, **kwargs)
    else:
        print(f"saq: building the C++ CPU kernels only ({why_no_cuda})")
        ext = CppExtension(EXT_NAME, sources, **kwargs)

    class BuildExt(BuildExtension):
        """BuildExtension (ninja when available) that also writes _build_info.json beside the
        library: torch and CUDA versions, archs, flags, date. The loader compares the torch
        version with the running one."""

        def run(self):
            super().run()
            info = B.make_build_info(with_cuda, "setup.py")
            inplace = self.inplace
            self.inplace = False
            dirs = {os.path.dirname(self.get_ext_fullpath(EXT_NAME))}
            self.inplace = inplace
            if inplace:  # --inplace and editable installs copy the library into the sources
                dirs.add(os.path.dirname(self.get_ext_fullpath(EXT_NAME)))
            for d in sorted(dirs):
                B.write_build_info(d, info)

        def copy_file(self, infile, outfile, *args, **kwargs):
            # Replace the library atomically: copying over it in place truncates a file that
            # running Python processes have mapped (they crash); os.replace leaves them the old one.
            if outfile.endswith((".so", ".pyd")) and not self.dry_run:
                tmp = f"{outfile}.tmp{os.getpid()}"
                shutil.copyfile(infile, tmp)
                shutil.copymode(infile, tmp)
                os.replace(tmp, outfile)
                return outfile, 1
            return super().copy_file(infile, outfile, *args, **kwargs)

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
