"""Routed LoRA experts on any `nn.Linear`: one contract (a registered token router and its `RoutingDecision`), one
file per method.

    from routelab.adapters import add_lora_experts, save_adapters, load_adapters
    add_lora_experts(model, target_modules=["q_proj", "v_proj"], method="molora", num_experts=8, r=8)

Methods: molora (LLaVA-MoLE / MixLoRA), hydra (HydraLoRA), smora (SMoRA), flylora (FlyLoRA), remix (ReMix, trained
with `rloo_loss`), mhr (Multi-Head Routing, PEFT poly with n_splits), lora (the unrouted baseline).
Add `adapter_aux_loss(model)` to the training loss for the routers' balance losses, and call
`routelab.update_routers(model)` once per optimizer step (loss-free biases of smora and flylora).
"""

from routelab.adapters.io import load_adapters, save_adapters
from routelab.adapters.linear import RoutedLoRALinear, adapter_aux_loss, routed_lora_layers
from routelab.adapters.remix import rloo_loss
from routelab.adapters.wrap import METHODS, AdapterSpec, add_lora_experts, count_parameters

__all__ = [
    "METHODS",
    "AdapterSpec",
    "RoutedLoRALinear",
    "adapter_aux_loss",
    "add_lora_experts",
    "count_parameters",
    "load_adapters",
    "rloo_loss",
    "routed_lora_layers",
    "save_adapters",
]
