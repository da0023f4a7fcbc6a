from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "obanpro._core",
        ["obanpro/_core.pyx"],
        include_dirs=["obanpro"],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
