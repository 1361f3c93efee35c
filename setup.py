"""Packaging beyond pyproject.toml: the top-level `conf/` folder (Hydra config groups) ships inside the wheel as
`unipelt/conf/`, so an installed `unipelt` command finds its configs (unipelt/confdir.py looks there first)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["unipelt", "unipelt.*"]) + ["unipelt.conf"],
    package_dir={"unipelt.conf": "conf"},
    package_data={"unipelt": ["metrics/**/*.py"], "unipelt.conf": ["*.yaml", "**/*.yaml"]},
)
