"""Make ``ptune_rt.kernels`` importable from a source checkout.

Installed, the top-level ``kernels/`` folder of the repository becomes the ``ptune_rt.kernels``
subpackage (setup.py's package_dir). When ``ptune_rt`` is imported straight from a checkout (for
example ``python -m ptune_rt.cli`` run in the repository root) that subpackage does not exist on
disk, so this maps the name ``ptune_rt.kernels`` (and only that name: no top-level ``kernels``
module is ever importable) to the checkout's ``kernels/`` folder.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

NAME = "ptune_rt.kernels"


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(
            NAME, os.path.join(self.folder, "__init__.py"), submodule_search_locations=[self.folder])


def install(package_dir: str) -> None:
    """Register the finder when ``package_dir`` (ptune_rt's folder) has no kernels subpackage and no
    other finder (an installed wheel, an editable install) provides one."""
    if os.path.isdir(os.path.join(package_dir, "kernels")):
        return
    if any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec(NAME) is not None:
        return
    folder = os.path.join(os.path.dirname(package_dir), "kernels")
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.meta_path.append(_SourceKernelsFinder(folder))
