"""Build step for the compiled ESL framer; everything else about the package is in pyproject.toml.

The extension is optional: when it cannot be compiled (no C compiler, no Python headers),
setuptools warns and installs the package without it, and engine.esl.protocol runs on its
pure-Python parser (``callgate version`` says which one is active and why).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine.esl._speedups",
            sources=["engine/esl/_speedups.c"],
            optional=True,
            extra_compile_args=[
                "-O2",
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
