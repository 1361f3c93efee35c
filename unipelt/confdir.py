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
