"""``conveyor bench scenario NAME``: seeded experiments, each a few in-process runs side by side.

- ``plan``: each scenario's run plan (``run_scenario``, ``ScenarioContext``, ``SCENARIOS``).
- ``params``: each scenario's parameters and their documented defaults (imports nothing heavy:
  the CLI builds its flags from them).
- ``workloads``: tenants at a rate ratio, priority classes (pure functions of the seed).
- ``findings``: the few numbers each scenario exists to show.
"""
