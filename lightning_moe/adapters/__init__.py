"""The adapter core: pure PyTorch LoRA and mixture-of-LoRA-experts layers injected into any model.

Nothing here imports Lightning, tasks or data.
"""

from .aux_losses import gate_label_loss, load_balance_loss, router_z_loss, routing_statistics
from .backends import BACKENDS
from .checkpoint import load_adapter, load_adapter_weights, save_adapter
from .config import (
    AdapterConfig,
    AdapterRule,
    LoraConfig,
    MeteoraConfig,
    MoELoraConfig,
    XLoraConfig,
    mixlora_rules,
    mole_rules,
)
from .diffusers_interop import export_diffusers_lora
from .errors import AdapterCheckpointError, AdapterConfigError, UserInputError
from .inject import (
    InjectionReport,
    adapted_layers,
    inject,
    merge_adapters,
    routing_collector,
    unmerge_adapters,
)
from .layer import AdaptedLinear
from .mixture import LoraMixtureAdapter, set_mixture_weights
from .peft_interop import export_peft, import_peft
from .routing import RoutingCollector, RoutingRecord

__all__ = [
    "BACKENDS",
    "AdaptedLinear",
    "AdapterCheckpointError",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterRule",
    "UserInputError",
    "XLoraConfig",
    "InjectionReport",
    "LoraConfig",
    "LoraMixtureAdapter",
    "MeteoraConfig",
    "MoELoraConfig",
    "RoutingCollector",
    "RoutingRecord",
    "adapted_layers",
    "export_diffusers_lora",
    "export_peft",
    "import_peft",
    "inject",
    "load_adapter",
    "gate_label_loss",
    "load_adapter_weights",
    "load_balance_loss",
    "merge_adapters",
    "mixlora_rules",
    "mole_rules",
    "router_z_loss",
    "routing_collector",
    "routing_statistics",
    "save_adapter",
    "set_mixture_weights",
    "unmerge_adapters",
]
