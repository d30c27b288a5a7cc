"""Steering rules: every way to combine the base with its proxies, selectable by name.

A rule is validated settings plus a pure function on ``(B, V)`` log-probs. Select one by name
and settings (what the CLI, recipe files and the server pass) or build it in Python:

>>> from proxytune.rules import make_rule, Plausible
>>> make_rule({"name": "plausible", "tau": 0.1}) == Plausible(tau=0.1)
True

``proxytune rules`` lists them; docs/rules.md has the formulas, when to use each, and costs.
"""

from __future__ import annotations

from .alphas import Context, Gated, choose_alphas, confidence_gate, entropy
from .base import (
    RULES,
    Bound,
    FunctionRule,
    RuleBase,
    calibrate,
    make_rule,
    register,
    spec_of,
)
from .combine import (
    Base,
    Mixture,
    Nudging,
    Pairs,
    Product,
    Proxy,
    mixture_scores,
    nudge_scores,
    product_scores,
)
from .context import (
    CandidateCombiner,
    Combiner,
    PairInfo,
    Request,
    Rule,
    Sides,
    StepContext,
    TopKContext,
)
from .filters import Plausible, Rerank, Tokens, Union, plausible_mask, top_k_mask, union_mask
from .reward import Args, RewardScorer, args_scores, load_reward_model
from .spec import describe, merge_specs, parse_rule_args

__all__ = [
    "RULES",
    "Args",
    "Base",
    "Bound",
    "CandidateCombiner",
    "Combiner",
    "Context",
    "FunctionRule",
    "Gated",
    "Mixture",
    "Nudging",
    "PairInfo",
    "Pairs",
    "Plausible",
    "Product",
    "Proxy",
    "Request",
    "Rerank",
    "RewardScorer",
    "Rule",
    "RuleBase",
    "Sides",
    "StepContext",
    "Tokens",
    "TopKContext",
    "Union",
    "args_scores",
    "calibrate",
    "choose_alphas",
    "confidence_gate",
    "describe",
    "entropy",
    "load_reward_model",
    "make_rule",
    "merge_specs",
    "mixture_scores",
    "nudge_scores",
    "parse_rule_args",
    "plausible_mask",
    "product_scores",
    "register",
    "spec_of",
    "top_k_mask",
    "union_mask",
]
