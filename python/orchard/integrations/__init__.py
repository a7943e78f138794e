"""Integrations of Orchard with other libraries. Each submodule imports its library only when it
is itself imported:

- ``orchard.integrations.transformers``: Orchard as a Hugging Face transformers attention
  implementation (``attn_implementation="orchard"``).
"""
