"""The C part of the datapath (ipop_switch/tunnel/_fastpath.c); everything else is in
pyproject.toml. ``optional=True``: without a compiler or OpenSSL's headers the install
still succeeds and the datapath runs in Python (ipop_switch/tunnel/accel.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "ipop_switch.tunnel._fastpath",
    sources=["ipop_switch/tunnel/_fastpath.c"],
    depends=["ipop_switch/tunnel/_recvmany.h"],
    libraries=["crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
    optional=True,
)])
