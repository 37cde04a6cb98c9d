"""Builds the BPF objects (bpf/Makefile: clang + bpftool) and the native helpers
(native/Makefile) into the package at install time.

The user never needs a compiler at run time once the package is built.
"""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithBpf(build_py):
    def run(self):
        out = os.path.join(HERE, "src", "tlstap", "bpf")
        os.makedirs(out, exist_ok=True)
        subprocess.run(["make", "-s", "-C", os.path.join(HERE, "bpf"), f"OUT={out}"], check=True)
        native = os.path.join(HERE, "src", "tlstap", "native")
        subprocess.run(["make", "-s", "-C", os.path.join(HERE, "native"), f"OUT={native}"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
