"""Where the Hydra config groups live.

In the repository they are the top-level `conf/` folder (beside `unipelt/`, `experiments/`, `tests/`); a built
wheel ships the same files as `unipelt/conf/` (setup.py maps the folder there), so an installed `unipelt` command
finds them with no checkout around. `conf_dir()` returns whichever exists, the installed copy first.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):  # installed wheel, then source checkout
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"unipelt's Hydra configs are missing: neither {_PACKAGE / 'conf'} (installed) nor "
                            f"{_PACKAGE.parent / 'conf'} (source checkout) holds config.yaml; reinstall unipelt")


CONF_DIR = conf_dir()


def _register_launcher() -> None:
    """config.yaml's defaults name unipelt's `grouped` Hydra launcher. Hydra finds plugins by scanning the
    `hydra_plugins` namespace, which misses an editable install; so the launcher is registered here, wherever the
    configs are composed (every composer imports CONF_DIR from this module)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.unipelt_grouped.grouped_launcher import GroupedLauncher

    Plugins.instance().register(GroupedLauncher)


_register_launcher()
