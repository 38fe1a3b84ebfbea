"""Counting the matmul FLOPs of a traced function, to check analytic FLOP formulas."""

import math

import jax


def dot_general_flops(jaxpr) -> int:
  """2 * m * n * k summed over every dot_general in a jaxpr (recursing into sub-jaxprs; a scan's
  body counts `length` times). A `cond` runs one branch, unknown when tracing: trace the
  unrolled model (`scan_layers=False`) instead."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      raise ValueError("dot_general_flops cannot count a cond; trace with scan_layers=False.")
    repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      free_rhs = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += 2 * math.prod(lhs) * math.prod(free_rhs)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += repeats * dot_general_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += repeats * dot_general_flops(sub)
  return total
