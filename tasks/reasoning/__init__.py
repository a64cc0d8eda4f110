"""LLM reasoning: supervised fine-tuning of a causal LM with any adapter kind, scored by greedy
generation (GSM8K strict and flexible match); reinforcement learning on verifiable rewards (GRPO,
Dr. GRPO); the mixtures of trained LoRAs run here too."""

from lightning_moe.tasks.reasoning.causal_lm import CausalLMTask, build_causal_lm, greedy_generation
from lightning_moe.tasks.reasoning.grpo import GRPOTask
from lightning_moe.tasks.reasoning.reasoning_task import ReasoningTask

__all__ = ["CausalLMTask", "GRPOTask", "ReasoningTask", "build_causal_lm", "greedy_generation"]
