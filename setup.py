"""Setuptools shim; metadata lives in setup.cfg.

The only thing here is the package list: ``twisted.plugins`` is a namespace
directory without ``__init__.py`` (Twisted's plugin convention), so
``find_packages`` cannot see it and it is named explicitly.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["gitstratum", "gitstratum.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["gitstratum_plugins.py"]},
)
