"""Policy as code: which audience sees what of each tag."""

from streamproc.policy.model import Audience, Policy, Rule, load_policy

__all__ = ["Audience", "Policy", "Rule", "load_policy"]
