"""Interoperability with other MoE code. `routelab.interop.hf` (needs the `hf` extra: transformers ≥ 5) converts
Hugging Face transformers sparse MoE blocks to routelab layers and back; importing routelab never imports it."""
