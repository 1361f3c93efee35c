"""unipelt: parameter-efficient fine-tuning with UniPELT gates on one frozen encoder.

    from unipelt import PeltModel, preset, load_encoder
    model = PeltModel(load_encoder("minilm"))
    model.add_task("rte", preset("unipelt_apl"), num_labels=2)
"""
from .config import PeltConfig, preset
from .encoders import load_encoder, load_tokenizer, tiny_encoder
from .io import ModuleLoadError, load_task, save_task
from .methods import METHODS, MethodConfig, PeltMethod, register_method
from .model import PeltModel, PeltOutput

__version__ = "0.1.0"


def add_pelt(encoder, config: PeltConfig | str, num_labels: int, task: str = "default") -> PeltModel:
    """Wrap `encoder` (frozen) and attach one task's modules: the one-call entry point."""
    model = PeltModel(encoder)
    model.add_task(task, preset(config) if isinstance(config, str) else config, num_labels)
    return model


__all__ = [
    "PeltConfig", "PeltModel", "PeltOutput", "preset", "add_pelt", "load_encoder", "load_tokenizer", "tiny_encoder",
    "save_task", "load_task", "ModuleLoadError", "METHODS", "MethodConfig", "PeltMethod", "register_method",
]
