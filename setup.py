"""The one compiled part of corevisor: the seccomp sandbox's SIGSYS reporter (a signal
handler must be async-signal-safe, which Python code cannot be; see
src/corevisor/sandbox/_sigsys.c). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "corevisor.sandbox._sigsys",
            ["src/corevisor/sandbox/_sigsys.c"],
            extra_compile_args=["-O2", "-Wall", "-Werror"],
        )
    ]
)
