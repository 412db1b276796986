"""Model families: one subpackage each (``search``, ``recommend``, ...).

A family owns everything that depends on what is being modelled: how its data is read and
checked, how it is split, trained, evaluated against baselines and exported. Platform code
(registry, deployment, Triton control, monitoring) should talk to a family through one small
interface and never import a family module directly, so that adding a family is adding a
folder (see ``/work/shared/design/model-families.md`` for the suggested layout).
"""
