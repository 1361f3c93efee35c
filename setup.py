"""Packaging beyond pyproject.toml: the top-level `conf/` folder (Hydra config groups) ships inside the wheel as
`unipelt/conf/`, so an installed `unipelt` command finds its configs (unipelt/confdir.py looks there first)."""
from setuptools import find_namespace_packages, find_packages, setup

setup(
    # hydra_plugins/: the `grouped` Hydra launcher (a namespace package, as Hydra's plugin discovery expects)
    packages=find_packages(include=["unipelt", "unipelt.*"]) + ["unipelt.conf"]
    + find_namespace_packages(include=["hydra_plugins.*"]),
    package_dir={"unipelt.conf": "conf"},
    package_data={"unipelt": ["metrics/**/*.py"], "unipelt.conf": ["*.yaml", "**/*.yaml"]},
)
