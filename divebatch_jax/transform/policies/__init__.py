"""Batch-size policies: one small module per rule, all on one protocol (:mod:`.base`).

=====================  ===============================================  ==============
policy                 rule                                             statistics
=====================  ===============================================  ==============
constant()             b0 throughout                                    never
adabatch(...)          ×factor every ``every`` epochs                   never
sebs(...)              ×ρ at each stage boundary, lr constant           never
by_epoch(sizes)        sizes[e] in epoch e                              never
divebatch(...)         floor(min(max(δ·n·Δ̂, b), b_max))                 1 epoch/period
norm_test(...)         ⌈Var₁/(η²||ḡ||²)⌉, monotone                      every step
inner_product_test()   ⌈Var_ip/(θ²||ḡ||⁴)⌉ (∨ orthogonality)            every step
noise_scale(...)       scale·(1 + B_simple), EMA-smoothed               every step
goodput(throughput)    argmax_M rate(M)·(B_noise+b0)/(B_noise+M)        every step
linear_ramp(...)       b0 + Δb·⌊s/⌊N/k⌋⌋ over N examples, capped        never
seesaw(decay, ...)     b0·α^k after the schedule's k-th α-fold decay    never
cbs_warmup(cbs, ...)   b0·2^k, doubling as the critical batch size      never
                       passes it (measured: train/cbs.py)
=====================  ===============================================  ==============
"""

from divebatch_jax.transform.policies.adaptive_sampling import inner_product_test, norm_test
from divebatch_jax.transform.policies.cbs_warmup import cbs_warmup, fitted_cbs, measured_cbs, seesaw_over_examples
from divebatch_jax.transform.policies.base import BatchSizePolicy, PolicyDecision, PolicyInfo
from divebatch_jax.transform.policies.divebatch import divebatch, suggest_delta
from divebatch_jax.transform.policies.goodput import goodput
from divebatch_jax.transform.policies.linear_ramp import linear_ramp
from divebatch_jax.transform.policies.noise_scale import noise_scale
from divebatch_jax.transform.policies.schedules import adabatch, by_epoch, constant, sebs
from divebatch_jax.transform.policies.seesaw import seesaw

__all__ = [
    "BatchSizePolicy",
    "PolicyDecision",
    "PolicyInfo",
    "adabatch",
    "by_epoch",
    "cbs_warmup",
    "constant",
    "divebatch",
    "fitted_cbs",
    "goodput",
    "inner_product_test",
    "linear_ramp",
    "measured_cbs",
    "noise_scale",
    "norm_test",
    "sebs",
    "seesaw",
    "seesaw_over_examples",
    "suggest_delta",
]
