"""The report's HTML templates (evaluation/templates), with autoescape on: every value on the page is escaped there."""

from __future__ import annotations

import functools


@functools.cache
def template(name: str):
    """The jinja2 template ``name`` of evaluation/templates: autoescaped, and an undefined value is an error."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("mnasnet_batch.evaluation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(name)
