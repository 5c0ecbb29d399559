# The C extension: built once at install time with the system's C compiler (gcc or clang), plain
# flags; the module picks its AVX2 or AVX512-VNNI code at run time, so one build runs on any x86-64 CPU.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "chatglm_cpu._kernels",
            ["chatglm_cpu/_kernels.c"],
            depends=["chatglm_cpu/dot_kernels.h"],  # included twice, once per instruction set
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
)
