"""otca_fast: fused GRPO ops and structured credit (OTCA) for flow-matching image and video generators.

``from otca_fast import ops`` pulls in torch only; the trainer, rewards and backbones are separate
modules that are imported on demand.
"""

__version__ = "0.1.0"
