"""The docs against the code: the generated settings page, and the package's names the docs mention."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import re

import pytest

import mnasnet_batch
from mnasnet_batch.config import JobConfig
from tests.support import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A backticked dotted name: `job.run`, `Storage.read_many`, `compute.actor_cpus`, `mnasnet_batch.outputs.folder`.
DOTTED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(\))?`")
# A backticked path of the repository's own: `mnasnet_batch/outputs/run.py`, `tests/cluster.py`, `conf/local.yaml`.
PATH = re.compile(r"`((?:mnasnet_batch|jobs|tests|scripts|benchmarks|conf|docs)/[A-Za-z0-9_./-]+)`")
# Other libraries' names that start like a module of the package: torchvision's ``weights.transforms()``.
OTHERS = {"weights.transforms"}
# Last parts that make a dotted name a file name (`review.labeling.xml`), not a module's attribute.
FILE_ENDINGS = {"json", "xml", "yaml", "yml", "csv", "txt", "md", "py", "html", "png", "svg", "tar", "parquet", "sh"}


def config_page():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_what_config_py_says():
    page = config_page()
    assert page.PAGE.read_text() == page.render(), "docs/configuration.md is stale: run scripts/config_docs.py"
    assert all(f"`{setting}`" in page.PAGE.read_text() for setting in settings())


def package_names() -> tuple[dict[str, list[str]], dict[str, list[object]]]:
    """Every module of the package by its last name (``folder`` -> ``mnasnet_batch.outputs.folder``), and every
    class by its name."""
    modules: dict[str, list[str]] = {"mnasnet_batch": ["mnasnet_batch"]}
    classes: dict[str, list[object]] = {}
    for info in pkgutil.walk_packages(mnasnet_batch.__path__, "mnasnet_batch."):
        modules.setdefault(info.name.rsplit(".", 1)[1], []).append(info.name)
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == info.name:
                classes.setdefault(name, []).append(value)
    return modules, classes


def resolves(obj: object, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(obj, type(pytest)) and not hasattr(obj, part):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
                continue
            except ImportError:
                return False
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def settings() -> set[str]:
    defaults = JobConfig()
    return {
        f"{section.name}.{item.name}"
        for section in dataclasses.fields(JobConfig)
        for item in dataclasses.fields(getattr(defaults, section.name))
    }


def test_the_package_names_in_the_docs_exist():
    modules, classes = package_names()
    known = settings()
    # A section that is not also a module (`input.uri`) nor Ray itself (`ray.init`): a name under it is a setting.
    sections_only = {s.split(".")[0] for s in known} - set(modules) - {"ray"}
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for name in sorted(set(DOTTED.findall(text))):
            first, *rest = name.split(".")
            if name in known or name in OTHERS or rest[-1] in FILE_ENDINGS:
                continue
            if first in sections_only:
                found = False  # a setting that config.py does not have
            elif first in modules:
                found = any(resolves(importlib.import_module(m), rest) for m in modules[first])
            elif first in classes:
                found = any(resolves(c, rest) for c in classes[first])
            else:
                continue  # another library's name (`torch.compile`, `ray.init`)
            if not found:
                missing.append(f"{doc.relative_to(ROOT)}: `{name}`")
        for path in sorted(set(PATH.findall(text))):
            module = path.rsplit(".", 1)[0] + ".py"  # `tests/support.make_model`: a name in tests/support.py
            if not (ROOT / path.rstrip("/")).exists() and not (ROOT / module).exists() and "*" not in path:
                missing.append(f"{doc.relative_to(ROOT)}: `{path}`")
    assert not missing, "names the package does not have:\n" + "\n".join(missing)
