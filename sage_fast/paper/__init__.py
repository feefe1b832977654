"""The paper's experiments on the synthetic world: `python -m sage_fast.paper micro`.

- `noise`: the noise budget of each SDE type against the exact integral (the paper's Table 1);
- `micro`: rollout geometry per SDE type (manifold distance against exploration), per-step
  gradient norms (the paper's Fig. 4) and the equalizer's scales, from the shipped base model;
- `report`: `docs/paper/micro.md` with its raw numbers; `plots`: its PNGs.
"""
