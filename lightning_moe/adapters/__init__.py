"""The adapter core: pure PyTorch LoRA and mixture-of-LoRA-experts layers injected into any model.

Nothing here imports Lightning, the application shell, tasks or data. This module's imports are
the whole public API; the block of kinds is the registry (importing a kind registers it).
"""

# the adapter kinds, each one file: its config beside its adapter
from .lora import LoraAdapter, LoraConfig
from .moe import MoEAdapter, MoEConfig
from .task_moe import TaskMoEAdapter, TaskMoEConfig, set_active_task
from .xlora import XLoraAdapter, XLoraConfig
from .meteora import MeteoraAdapter, MeteoraConfig
from .codyra import CodyraAdapter, CodyraConfig, soft_threshold_rank_gates
from .mora import MoraAdapter, MoraConfig
from .dylora import DyLoraAdapter, DyLoraConfig
from .dense import DenseAdapter, DenseConfig
from .l4q import L4QAdapter, L4QConfig, set_fake_quantization

# the protocol, injection and routing
from .adapter_folder import load_adapter, load_adapter_weights, read_adapter_config, save_adapter
from .aux_losses import gate_label_loss, load_balance_loss, router_z_loss, routing_statistics
from .backends import BACKENDS
from .base import ADAPTER_KINDS, Adapter, AdapterConfig, config_from_dict, register_adapter
from .diffusers_interop import export_diffusers_lora
from .errors import AdapterCheckpointError, AdapterConfigError, AdapterError
from .inject import (
    InjectionReport,
    adapted_layers,
    adapters_disabled,
    describe_injection,
    end_task,
    inject,
    merge_adapters,
    routing_collector,
    unmerge_adapters,
)
from .layer import AdaptedLinear
from .lora_mixture import LoraMixtureAdapter, expert_references, fixed_mixture_size, set_mixture_weights
from .peft_interop import export_peft, import_peft
from .routing import RoutingCollector, RoutingRecord
from .presets import mixlora_rules, mole_rules
from .rules import AdapterRule
