"""The adapter core: pure PyTorch LoRA and mixture-of-LoRA-experts layers injected into any model.

Nothing here imports Lightning, tasks or data.
"""

from lightning_moe.adapters.aux_losses import load_balance_loss, router_z_loss, routing_statistics
from lightning_moe.adapters.backends import BACKENDS
from lightning_moe.adapters.checkpoint import load_adapter, load_adapter_weights, save_adapter
from lightning_moe.adapters.config import (
    AdapterConfig,
    AdapterRule,
    LoraConfig,
    MoELoraConfig,
    mixlora_rules,
    mole_rules,
)
from lightning_moe.adapters.errors import AdapterCheckpointError, AdapterConfigError, UserInputError
from lightning_moe.adapters.inject import (
    InjectionReport,
    adapted_layers,
    inject,
    merge_adapters,
    routing_collector,
    unmerge_adapters,
)
from lightning_moe.adapters.layer import AdaptedLinear
from lightning_moe.adapters.peft_interop import export_peft, import_peft
from lightning_moe.adapters.routing import RoutingCollector, RoutingRecord

__all__ = [
    "BACKENDS",
    "AdaptedLinear",
    "AdapterCheckpointError",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterRule",
    "UserInputError",
    "InjectionReport",
    "LoraConfig",
    "MoELoraConfig",
    "RoutingCollector",
    "RoutingRecord",
    "adapted_layers",
    "export_peft",
    "import_peft",
    "inject",
    "load_adapter",
    "load_adapter_weights",
    "load_balance_loss",
    "merge_adapters",
    "mixlora_rules",
    "mole_rules",
    "router_z_loss",
    "routing_collector",
    "routing_statistics",
    "save_adapter",
    "unmerge_adapters",
]
